"""The registries in cxr_tf.choices: every entry builds and is what it claims."""

import keras
import numpy as np
import pytest

from cxr_tf import choices
from cxr_tf import layers
from cxr_tf.data import schema
from cxr_tf.models import config as model_config
from cxr_tf.models import localizer


@pytest.mark.parametrize("name", choices.POOLING_NAMES)
def test_every_pooling_entry_builds_a_pooling_layer(name):
    layer = layers.get_pooling(name, 2)
    assert type(layer) is choices.load(choices.POOLING_REGISTRY[name])
    assert layer.map_kind in ("probability", "cam")
    logits, maps = layer(np.zeros((1, 4, 4, 8), "float32"))
    assert tuple(logits.shape) == (1, 2) and tuple(maps.shape) == (1, 4, 4, 2)


@pytest.mark.parametrize(
    "name", [n for n, spec in choices.BACKBONE_REGISTRY.items() if spec.trunk]
)
def test_every_trunk_has_the_stride_its_entry_claims(name):
    spec = choices.BACKBONE_REGISTRY[name]
    size = 64
    config = model_config.ModelConfig(backbone=name, image_size=size)
    inputs = keras.Input((size, size, 1))
    features = choices.load(spec.trunk)(inputs, config)
    assert tuple(features.shape[1:3]) == (size // spec.stride,) * 2
    assert spec.normalization in schema.NORMALIZATIONS
    assert choices.IMAGE_SIZE_MULTIPLE % spec.stride == 0


def test_infomask_entry_builds_the_infomask_network():
    spec = choices.BACKBONE_REGISTRY["infomask"]
    model = localizer.build_model(model_config.ModelConfig(backbone="infomask", image_size=32))
    maps = model.get_layer("localization_maps").output
    assert tuple(maps.shape[1:3]) == (32 // spec.stride,) * 2
    assert localizer.map_kind_for(model_config.ModelConfig(backbone="infomask")) == "probability"


def test_infomask_variants_are_the_layers():
    from cxr_tf.layers import info_mask  # pylint: disable=import-outside-toplevel

    assert info_mask.VARIANTS is choices.INFOMASK_VARIANTS


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


def test_load_names_module_and_attribute():
    assert choices.load("cxr_tf.choices:load") is choices.load
    with pytest.raises(AttributeError):
        choices.load("cxr_tf.choices:no_such_name")
