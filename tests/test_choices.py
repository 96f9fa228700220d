"""cxr_tf.choices names what the Keras registries implement, no more, no less."""

import pytest

from cxr_tf import choices
from cxr_tf import layers
from cxr_tf.layers import info_mask
from cxr_tf.models import compact
from cxr_tf.models import config as model_config
from cxr_tf.models import infomask_net
from cxr_tf.models import localizer
from cxr_tf.models import resnet


def test_pooling_names_match_the_layer_registry():
    assert choices.POOLING_NAMES == layers.POOLING_NAMES
    for name in choices.POOLING_NAMES:
        assert layers.get_pooling(name, 2).map_kind in ("probability", "cam")


def test_backbones_match_the_model_config():
    assert choices.BACKBONES == model_config.BACKBONES


def test_strides_match_the_backbones():
    assert choices.BACKBONE_STRIDES["resnet34"] == resnet.FEATURE_STRIDE
    assert choices.BACKBONE_STRIDES["compact"] == compact.FEATURE_STRIDE
    assert choices.BACKBONE_STRIDES["infomask"] == infomask_net.FEATURE_STRIDE
    assert choices.IMAGE_SIZE_MULTIPLE == localizer.IMAGE_SIZE_MULTIPLE


def test_infomask_variants_match_the_layer():
    assert choices.INFOMASK_VARIANTS == info_mask.VARIANTS


@pytest.mark.parametrize("backbone", choices.BACKBONES)
@pytest.mark.parametrize("size", [0, 16, 31, 32, 48, 64, 100, 128, 224, 512])
def test_image_size_rule_matches_model_config(backbone, size):
    try:
        model_config.ModelConfig(backbone=backbone, image_size=size)
        accepted = True
    except ValueError:
        accepted = False
    assert (choices.image_size_problem(backbone, size) is None) == accepted


@pytest.mark.parametrize("backbone", choices.BACKBONES)
def test_imagenet_backbones_match_model_config(backbone):
    try:
        model_config.ModelConfig(backbone=backbone, weights="imagenet")
        accepted = True
    except ValueError:
        accepted = False
    assert (backbone in choices.IMAGENET_BACKBONES) == accepted


def test_image_size_hint_names_accepted_neighbours():
    assert choices.image_size_hint(100) == "use 96 or 128"
    for size in (96, 128):
        assert choices.image_size_problem("resnet34", size) is None


def test_training_and_predict_choices_match_the_libraries():
    from cxr_tf import predict_lib
    from cxr_tf import train_lib

    assert choices.OPTIMIZERS == train_lib.OPTIMIZERS
    assert choices.LR_SCHEDULES == train_lib.LR_SCHEDULES
    assert choices.STRATEGIES == train_lib.STRATEGIES
    assert choices.MIXED_PRECISION == train_lib.MIXED_PRECISION
    assert choices.JIT_COMPILE == train_lib.JIT_COMPILE
    assert choices.MAP_SOURCES == predict_lib.MAP_SOURCES
