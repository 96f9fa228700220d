"""Tests of cxr_tf.model_dir: config.json schema, checkpoint rule, stored size."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from cxr_tf import errors
from cxr_tf import model_dir
from cxr_tf import train_lib
from cxr_tf.data import schema
from cxr_tf.data import tfrecord


def _records(folder, shapes):
    """Writes a train shard of films stored at `shapes` (no ingest report)."""
    folder.mkdir(parents=True, exist_ok=True)
    options = tf.io.TFRecordOptions(compression_type="GZIP")
    path = folder / "train-00000-of-00001.tfrecord.gz"
    with tf.io.TFRecordWriter(str(path), options) as writer:
        for i, (h, w) in enumerate(shapes):
            example = tfrecord.make_example(
                np.full((h, w), 100, np.uint8),
                image_id=f"{i:08d}_000.png",
                labels=np.zeros(schema.NUM_FINDINGS, np.int64),
                height=h,
                width=w,
                original_height=h * 4,
                original_width=w * 4,
                boxes=[],
                box_labels=[],
            )
            writer.write(example.SerializeToString())
    return folder


def _report(folder, image_size, source_dir=None, written=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / schema.INGEST_REPORT).write_text(
        json.dumps(
            {
                "config": {"image_size": image_size, "data_dir": str(source_dir)},
                "written": written or {"train": 5, "val": 1, "test": 2},
            }
        )
    )
    return folder


def _config(data_dir, image_size=128, **overrides):
    from cxr_tf.models import ModelConfig

    args = dict(
        data_dir=str(data_dir), model_dir="unused",
        model=ModelConfig(image_size=image_size),
    )
    args.update(overrides)
    return train_lib.TrainConfig(**args)


def test_stored_size_comes_from_the_ingest_report(tmp_path):
    assert model_dir.stored_image_size(str(_report(tmp_path, 1024))) == 1024


def test_stored_size_without_a_report_is_read_from_the_records(tmp_path):
    data = _records(tmp_path / "r", [(48, 64), (64, 40)])
    assert model_dir.stored_image_size(str(data)) == 64


def test_records_stored_smaller_than_the_network_input_are_refused(tmp_path):
    data = _records(tmp_path / "r", [(64, 64)])
    with pytest.raises(errors.UserValueError) as info:
        train_lib.check_stored_size(_config(data, image_size=128))
    message = str(info.value)
    assert "stored at 64 px" in message and "--image_size=128" in message
    assert "--allow_upscale" in message and str(data) in message
    # With the flag the run goes on (upscaling, with a warning).
    got = train_lib.check_stored_size(_config(data, image_size=128, allow_upscale=True))
    assert got["ingest_image_size"] == 64


def test_records_stored_larger_are_letterboxed_down_and_recorded(tmp_path):
    data = _report(tmp_path / "r", 1024)
    got = train_lib.check_stored_size(_config(data, image_size=512))
    assert got["ingest_image_size"] == 1024


def test_training_data_says_synthetic_from_the_generator_marker(tmp_path):
    films = tmp_path / "films"
    films.mkdir()
    (films / model_dir.SYNTHETIC_MARKER).write_text("{}")
    data = model_dir.training_data(str(_report(tmp_path / "r", 128, films)))
    assert data["synthetic"] is True and data["films"]["train"] == 5
    real = tmp_path / "nih"
    real.mkdir()
    data = model_dir.training_data(str(_report(tmp_path / "r2", 1024, real)))
    assert data["synthetic"] is False and str(real) in data["source"]


# config.json's "train" as training wrote it before TrainConfig nested its
# ModelConfig (to_dict at 1131e28): the model fields flat beside the others.
FLAT_TRAIN_SECTION = {
    "allow_upscale": False, "augment": True, "backbone": "compact",
    "backup_every_steps": 50, "batch_size": 16, "data_dir": "records",
    "epochs": 1, "findings": ["Pneumonia"], "flip": False, "image_size": 64,
    "infomask_alpha": 0.01, "infomask_tau": 0.2, "infomask_variant": "infomask",
    "infomask_width": 1.0, "jit_compile": "auto", "learning_rate": 0.0001,
    "loss": "balanced_bce", "lr_decay_epochs": [], "lr_decay_factor": 0.1,
    "lr_schedule": "constant", "lr_warmup_steps": 0, "mixed_precision": "none",
    "model_dir": "model", "momentum": 0.9, "num_cpu_devices": 0,
    "num_overlay_images": 4, "optimizer": "adam", "pooling": "lse",
    "pooling_options": {"gamma": 10.0}, "seed": 0, "shuffle_buffer": 1024,
    "steps_per_epoch": None, "strategy": "mirrored", "validation_steps": None,
    "verbose": 1, "weight_decay": 0.0, "weights": None,
}


def test_a_model_dir_written_with_the_flat_train_section_still_loads(tmp_path):
    from cxr_tf.models import ModelConfig
    from cxr_tf.models import build_model

    config = ModelConfig(
        backbone="compact", pooling="lse", num_classes=1, image_size=64,
        pooling_options={"gamma": 10.0},
    )
    directory = tmp_path / "m"
    path = model_dir.write_config(str(directory), config, ("Pneumonia",))
    payload = model_dir.read_config(path)
    payload["train"] = FLAT_TRAIN_SECTION
    model_dir.atomic_write_text(path, json.dumps(payload))
    build_model(config).save(str(directory / model_dir.FINAL_MODEL))
    loaded = model_dir.load(str(directory))
    # The model comes from the top-level "model"; "train" passes through as is.
    assert loaded.model_config == config and loaded.findings == ("Pneumonia",)
    assert loaded.map_kind == "cam" and loaded.payload["train"] == FLAT_TRAIN_SECTION


def test_checkpoint_rule(tmp_path):
    from cxr_tf.models import ModelConfig

    directory = tmp_path / "m"
    model_dir.write_config(str(directory), ModelConfig(image_size=64), schema.FINDINGS)
    with pytest.raises(errors.UserFileError, match="train a model"):
        model_dir.resolve(str(directory))
    (directory / model_dir.FINAL_MODEL).write_bytes(b"x")
    # "best" is strict and says which checkpoints exist.
    with pytest.raises(errors.UserFileError, match="--checkpoint=final"):
        model_dir.resolve(str(directory), "best")
    os.makedirs(directory / "checkpoints")
    (directory / model_dir.BEST_CHECKPOINT).write_bytes(b"y")
    assert model_dir.resolve(str(directory), "best")[0].endswith("best.keras")
    assert model_dir.resolve(str(directory))[0].endswith("model.keras")
    with pytest.raises(errors.UserValueError, match="checkpoint"):
        model_dir.resolve(str(directory), "newest")


def test_a_cut_model_file_is_named_as_corrupt(tmp_path):
    from cxr_tf.models import ModelConfig
    from cxr_tf.models import build_model

    config = ModelConfig(image_size=64, backbone="compact", pooling="lse")
    directory = tmp_path / "m"
    model_dir.write_config(str(directory), config, schema.FINDINGS)
    path = directory / model_dir.FINAL_MODEL
    build_model(config).save(str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(errors.UserValueError, match="corrupt or truncated") as info:
        model_dir.load(str(directory))
    assert str(path) in str(info.value)


def test_config_json_records_the_layer_map_kind(tmp_path):
    from cxr_tf.models import ModelConfig

    for pooling, kind in (("pcam", "probability"), ("lse", "cam")):
        path = model_dir.write_config(
            str(tmp_path / pooling), ModelConfig(image_size=64, pooling=pooling),
            schema.FINDINGS,
        )
        with open(path) as f:
            assert json.load(f)["map_kind"] == kind


def test_box_thresholds_are_stored_and_read_for_the_model_map_kind(tmp_path):
    from cxr_tf.models import ModelConfig

    directory = str(tmp_path / "m")
    config = ModelConfig(image_size=64, backbone="infomask")
    path = model_dir.write_config(directory, config, schema.FINDINGS)
    model_dir.write_box_thresholds(directory, {"probability": 0.35})
    payload = model_dir.read_config(path)
    assert payload["box_thresholds"] == {"probability": 0.35}
    # The rest of config.json is untouched.
    assert payload["map_kind"] == "probability"
    assert payload["model"]["backbone"] == "infomask"

    def loaded(kind, data):
        return model_dir.LoadedModel(
            model=None, model_config=config, findings=tuple(schema.FINDINGS),
            map_kind=kind, path="", payload=data,
        )

    assert loaded("probability", payload).box_threshold == 0.35
    assert loaded("cam", payload).box_threshold is None
    assert loaded("probability", {}).box_threshold is None
    # One threshold per finding (an InfoMask model's): read back in the
    # model's finding order; a finding it does not name has no threshold.
    model_dir.write_box_thresholds(
        directory, {"probability": {"Nodule": 0.31, "Mass": 0.6}}
    )
    payload = model_dir.read_config(path)
    per = loaded("probability", payload).box_threshold
    assert per == model_dir.FindingThresholds((("Mass", 0.6), ("Nodule", 0.31)))
    assert model_dir.box_threshold_for(per, "Nodule") == 0.31
    assert model_dir.box_threshold_for(per, "Hernia") is None


@pytest.mark.parametrize(
    "thresholds, text",
    [({"heat": 0.5}, "'heat'"), ({"probability": float("nan")}, "nan"),
     ({"probability": "0.5"}, "'0.5'"),
     ({"probability": {"Nodules": 0.5}}, "'Nodules'"),
     ({"probability": {"Nodule": float("inf")}}, "probability.Nodule=inf")],
)
def test_bad_box_thresholds_are_named(tmp_path, thresholds, text):
    from cxr_tf.models import ModelConfig

    directory = str(tmp_path / "m")
    model_dir.write_config(directory, ModelConfig(image_size=64), schema.FINDINGS)
    with pytest.raises(ValueError, match=text):
        model_dir.write_box_thresholds(directory, thresholds)


def test_box_thresholds_need_a_config(tmp_path):
    with pytest.raises(errors.UserFileError, match="train the model first"):
        model_dir.write_box_thresholds(str(tmp_path), {"probability": 0.5})


def test_a_mask_threshold_choice_holds_for_its_file_kind_records_and_grid(tmp_path):
    from cxr_tf.models import ModelConfig

    data = _records(tmp_path / "data", [(8, 8)])
    (data / "train-00000-of-00001.tfrecord.gz").rename(
        data / "val-00000-of-00001.tfrecord.gz"
    )
    records = model_dir.records_fingerprint(str(data), "val")
    assert records["split"] == "val" and len(records["files"]) == 1
    assert model_dir.records_fingerprint(str(data), "test")["files"] == []
    directory = str(tmp_path / "m")
    config = ModelConfig(image_size=64)
    path = model_dir.write_config(directory, config, schema.FINDINGS)
    choice = {
        "model_sha256": "ab" * 32, "map_kind": "probability", "records": records,
        "candidates": [0.25, 0.5], "threshold": 0.5, "error": 0.2, "pairs": 3,
    }
    model_dir.write_mask_threshold_choices(directory, [choice])
    loaded = model_dir.LoadedModel(
        model=None, model_config=config, findings=tuple(schema.FINDINGS),
        map_kind="probability", path="", payload=model_dir.read_config(path),
    )
    # Read back through JSON: equal to a fresh fingerprint of the same files.
    assert loaded.mask_threshold_choice(
        "ab" * 32, "probability", model_dir.records_fingerprint(str(data), "val"),
        (0.25, 0.5),
    ) == choice
    for args in [
        ("cd" * 32, "probability", records, (0.25, 0.5)),  # another file
        ("ab" * 32, "cam", records, (0.25, 0.5)),  # another map kind
        ("ab" * 32, "probability", records, (0.5,)),  # another grid
        ("ab" * 32, "probability", {**records, "split": "test"}, (0.25, 0.5)),
    ]:
        assert loaded.mask_threshold_choice(*args) is None
    # A rewritten record file no longer matches.
    val = data / "val-00000-of-00001.tfrecord.gz"
    os.utime(val, ns=(val.stat().st_atime_ns, val.stat().st_mtime_ns + 10**9))
    assert loaded.mask_threshold_choice(
        "ab" * 32, "probability", model_dir.records_fingerprint(str(data), "val"),
        (0.25, 0.5),
    ) is None
    with pytest.raises(ValueError, match="lacks"):
        model_dir.write_mask_threshold_choices(directory, [{"threshold": 0.5}])
