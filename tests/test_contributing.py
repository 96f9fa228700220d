"""CONTRIBUTING.md's lists are true: a registry entry is all the package needs.

A backbone and a pooling defined only in this file are added to the
registries of `cxr_tf.choices` (as CONTRIBUTING.md's step 2 does in the
source) and then go through the model builder, the model directory, loading
and predict with no other file changed.
"""

import json

import keras
import numpy as np
from keras import ops
from PIL import Image

from cxr_tf import choices
from cxr_tf import layers
from cxr_tf import model_dir as model_dir_lib
from cxr_tf import predict_lib
from cxr_tf.data import schema
from cxr_tf.models import ModelConfig
from cxr_tf.models import build_model


def tiny_trunk(inputs, config):  # pylint: disable=unused-argument
    """A stride-8 trunk: three 3x3/2 convolutions."""
    x = inputs
    for index, filters in enumerate((8, 16, 16)):
        x = keras.layers.Conv2D(
            filters, 3, strides=2, padding="same", activation="relu",
            name=f"tiny_conv{index}",
        )(x)
    return x


@keras.saving.register_keras_serializable(package="cxr_tf_test")
class SigmoidAveragePooling(layers.AveragePooling):
    """Average pooling whose maps are probabilities (sigmoid of the CAM)."""

    map_kind = "probability"

    def output_map(self, cam):
        return ops.sigmoid(cam)


def _films(folder, count=2, side=96):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(count):
        pixels = rng.integers(0, 256, (side, side), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"film_{index}.png")
    return folder


def test_a_backbone_and_a_pooling_added_by_registry_entries_only(tmp_path, monkeypatch):
    monkeypatch.setitem(
        choices.BACKBONE_REGISTRY, "tiny",
        choices.Backbone(f"{__name__}:tiny_trunk", 8, "fixed", description="test"),
    )
    monkeypatch.setitem(
        choices.POOLING_REGISTRY, "sigmoid_avg", f"{__name__}:SigmoidAveragePooling"
    )
    config = ModelConfig(image_size=64, backbone="tiny", pooling="sigmoid_avg")
    assert choices.image_size_problem("tiny", 64) is None
    assert config.normalization == schema.FIXED
    model = build_model(config)
    assert tuple(model.output["localization_maps"].shape[1:3]) == (8, 8)

    folder = tmp_path / "model"
    model_dir_lib.write_config(str(folder), config, schema.FINDINGS)
    model.save(str(folder / model_dir_lib.FINAL_MODEL))
    with open(folder / model_dir_lib.CONFIG_FILE) as f:
        assert json.load(f)["map_kind"] == "probability"
    loaded = model_dir_lib.load(str(folder))
    assert loaded.map_kind == "probability"

    films = _films(tmp_path / "films")
    predict_lib.predict(
        predict_lib.PredictConfig(
            model=str(folder), output_dir=str(tmp_path / "pred"), overlays=False
        ),
        [str(films)],
    )
    with open(tmp_path / "pred" / predict_lib.PREDICTIONS_FILE) as f:
        records = [json.loads(line) for line in f]
    assert sorted(r["image"] for r in records) == ["film_0.png", "film_1.png"]
    for record in records:
        assert record["map_kind"] == "probability"
        assert set(record["probabilities"]) == set(schema.FINDINGS)
