"""Tests for the statistics / validation step."""

import io
import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from cxr_tf.data import schema
from pipeline import base, statistics


def _png(size, value):
    buf = io.BytesIO()
    Image.fromarray(np.full(size, value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _example(image_id, patient, labels, size=(32, 32), boxes=()):
    f = {
        schema.KEY_IMAGE: tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[_png(size, 100)])
        ),
        schema.KEY_IMAGE_ID: tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[image_id.encode()])
        ),
        schema.KEY_PATIENT_ID: tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[patient.encode()])
        ),
        schema.KEY_LABELS: tf.train.Feature(
            int64_list=tf.train.Int64List(value=labels)
        ),
        schema.KEY_HEIGHT: tf.train.Feature(
            int64_list=tf.train.Int64List(value=[size[0]])
        ),
        schema.KEY_WIDTH: tf.train.Feature(
            int64_list=tf.train.Int64List(value=[size[1]])
        ),
        schema.KEY_BBOX_LABEL: tf.train.Feature(
            int64_list=tf.train.Int64List(value=list(boxes))
        ),
    }
    return tf.train.Example(features=tf.train.Features(feature=f)).SerializeToString()


def _write(path, examples):
    with tf.io.TFRecordWriter(str(path), options="GZIP") as w:
        for e in examples:
            w.write(e)


def _all_positive(n_patients, prefix, skip_finding=None):
    out = []
    for k in range(schema.NUM_FINDINGS):
        if schema.FINDINGS[k] == skip_finding:
            continue
        labels = [0] * schema.NUM_FINDINGS
        labels[k] = 1
        out.append(
            _example(
                f"{prefix}{k:05d}_000.png",
                f"{prefix}{k % n_patients:05d}",
                labels,
                boxes=[k] if k < 8 else [],
            )
        )
    return out


def test_clean_data_passes(tmp_path):
    for split in schema.SPLITS:
        _write(
            tmp_path / f"{split}-00000-of-00001.tfrecord.gz",
            _all_positive(3, split[:2]),
        )
    paths = statistics.run_statistics(
        tmp_path / "out",
        tmp_path,
        image_size=32,
        pipeline_args=["--direct_num_workers=1"],
    )
    stats = json.load(open(paths["statistics"]))
    assert stats["train"]["num_examples"] == schema.NUM_FINDINGS
    assert stats["test"]["label_counts"]["Hernia"] == 1
    assert stats["val"]["num_boxes"] == 8
    assert json.load(open(paths["anomalies"])) == []


def test_planted_leak_and_missing_finding_are_named(tmp_path):
    _write(
        tmp_path / "train-00000-of-00001.tfrecord.gz",
        _all_positive(3, "t") + [_example("x_000.png", "LEAKY01", [0] * 14)],
    )
    _write(tmp_path / "val-00000-of-00001.tfrecord.gz", _all_positive(3, "v"))
    _write(
        tmp_path / "test-00000-of-00001.tfrecord.gz",
        _all_positive(3, "s", skip_finding="Pneumonia")
        + [_example("x_001.png", "LEAKY01", [0] * 14)],
    )
    with pytest.raises(base.AnomaliesFoundError) as err:
        statistics.run_statistics(
            tmp_path / "out", tmp_path, pipeline_args=["--direct_num_workers=1"]
        )
    msg = str(err.value)
    assert "LEAKY01" in msg and "'train' and 'test'" in msg
    assert "'Pneumonia' has no positive example in split 'test'" in msg
    kinds = sorted(
        a["kind"] for a in json.load(open(tmp_path / "out" / "anomalies.json"))
    )
    assert kinds == ["missing_finding", "patient_leak"]


def test_wrong_size_and_bad_labels(tmp_path):
    bad = [2] + [0] * 13
    examples = _all_positive(3, "t") + [_example("b_000.png", "B", bad, size=(40, 20))]
    for split in schema.SPLITS:
        _write(
            tmp_path / f"{split}-00000-of-00001.tfrecord.gz",
            examples if split == "train" else _all_positive(3, split[:2]),
        )
    with pytest.raises(base.AnomaliesFoundError) as err:
        statistics.run_statistics(
            tmp_path / "out",
            tmp_path,
            image_size=32,
            pipeline_args=["--direct_num_workers=1"],
        )
    assert "labels outside" in str(err.value) and "b_000.png" in str(err.value)
    assert "longer side 32" in str(err.value) and "40x20" in str(err.value)
