"""Tests for cxr_tf.data.tfrecord: Example round trip, validation, file lookup."""

import io
import math

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from cxr_tf.data import schema
from cxr_tf.data import tfrecord


def _png(height=12, width=10, value=7):
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width), value, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _labels(*indices):
    labels = np.zeros(schema.NUM_FINDINGS, np.int64)
    labels[list(indices)] = 1
    return labels


def test_round_trip_keeps_every_field():
    example = tfrecord.make_example(
        _png(),
        image_id="00000001_000.png",
        labels=_labels(1, 13),
        height=12,
        width=10,
        patient_id="00000001",
        original_height=1024,
        original_width=1000,
        boxes=[[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0]],
        box_labels=[1, 7],
        view_position="PA",
        age=58.0,
        sex="M",
    )
    parsed = tfrecord.parse_example(tf.constant(example.SerializeToString()))
    assert parsed["image_id"].numpy() == b"00000001_000.png"
    assert parsed["patient_id"].numpy() == b"00000001"
    np.testing.assert_array_equal(parsed["labels"].numpy(), _labels(1, 13))
    assert parsed["labels"].dtype == tf.float32
    # [xmin, ymin, xmax, ymax] in, tf.image order [ymin, xmin, ymax, xmax] out.
    np.testing.assert_allclose(
        parsed["boxes"].numpy(), [[0.2, 0.1, 0.6, 0.5], [0.0, 0.0, 1.0, 1.0]]
    )
    np.testing.assert_array_equal(parsed["box_labels"].numpy(), [1, 7])
    assert (parsed["height"].numpy(), parsed["width"].numpy()) == (12, 10)
    assert parsed["original_height"].numpy() == 1024
    assert parsed["original_width"].numpy() == 1000
    assert parsed["view_position"].numpy() == b"PA"
    assert parsed["sex"].numpy() == b"M"
    assert parsed["age"].numpy() == pytest.approx(58.0)
    decoded = tf.io.decode_png(parsed["image"], channels=1).numpy()
    assert decoded.shape == (12, 10, 1) and (decoded == 7).all()


def test_image_without_boxes_and_unknown_age():
    example = tfrecord.make_example(
        _png(), image_id="a.png", labels=_labels(), height=12, width=10
    )
    parsed = tfrecord.parse_example(tf.constant(example.SerializeToString()))
    assert parsed["boxes"].shape == (0, 4)
    assert parsed["box_labels"].shape == (0,)
    assert math.isnan(parsed["age"].numpy())
    # Original size defaults to the stored one.
    assert parsed["original_height"].numpy() == 12


def test_foreign_record_without_optional_keys_parses():
    feature = {
        schema.KEY_IMAGE: tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[_png()])
        ),
        schema.KEY_HEIGHT: tf.train.Feature(int64_list=tf.train.Int64List(value=[12])),
        schema.KEY_WIDTH: tf.train.Feature(int64_list=tf.train.Int64List(value=[10])),
        schema.KEY_IMAGE_ID: tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[b"x.png"])
        ),
        schema.KEY_LABELS: tf.train.Feature(
            int64_list=tf.train.Int64List(value=_labels(2).tolist())
        ),
    }
    serialized = tf.train.Example(
        features=tf.train.Features(feature=feature)
    ).SerializeToString()
    parsed = tfrecord.parse_example(tf.constant(serialized))
    assert parsed["format"].numpy() == b"png"
    assert parsed["sex"].numpy() == b""
    assert parsed["boxes"].shape == (0, 4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"labels": np.zeros(13)}, "`labels` must be 14"),
        ({"labels": np.full(14, 2)}, "`labels` must be 14"),
        ({"boxes": [[0.5, 0.1, 0.2, 0.9]], "box_labels": [0]}, "`boxes` must be"),
        ({"boxes": [[0.1, 0.1, 1.5, 0.9]], "box_labels": [0]}, "`boxes` must be"),
        ({"boxes": [[0.1, 0.1, 0.5, 0.9]], "box_labels": []}, "`box_labels` must"),
        ({"boxes": [[0.1, 0.1, 0.5, 0.9]], "box_labels": [14]}, "`box_labels` must"),
        ({"height": 0}, "`height` must be positive"),
    ],
)
def test_make_example_rejects_bad_values(kwargs, message):
    args = dict(image=_png(), image_id="bad.png", labels=_labels(), height=12, width=10)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message) as info:
        tfrecord.make_example(**args)
    assert "bad.png" in str(info.value)


def test_record_files_and_read_examples(tmp_path):
    options = tf.io.TFRecordOptions(compression_type="GZIP")
    for shard in range(2):
        path = tmp_path / f"val-{shard:05d}-of-00002.tfrecord.gz"
        with tf.io.TFRecordWriter(str(path), options) as writer:
            example = tfrecord.make_example(
                _png(value=shard), f"{shard}.png", _labels(shard), 12, 10
            )
            writer.write(example.SerializeToString())
    files = tfrecord.record_files(tmp_path, "val")
    assert [f.rsplit("/", 1)[-1] for f in files] == [
        "val-00000-of-00002.tfrecord.gz",
        "val-00001-of-00002.tfrecord.gz",
    ]
    examples = list(tfrecord.read_examples(tmp_path, "val"))
    assert [e["image_id"] for e in examples] == ["0.png", "1.png"]
    assert examples[1]["pixels"].shape == (12, 10)
    assert examples[1]["pixels"].max() == 1
    assert examples[0]["age"] is None
    with pytest.raises(FileNotFoundError, match="test-"):
        tfrecord.record_files(tmp_path, "test")
    with pytest.raises(ValueError, match="`split` must be one of"):
        tfrecord.record_files(tmp_path, "training")
