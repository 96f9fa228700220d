"""Tests for cxr_tf.data.input_pipeline: decoding, letterbox, augmentation, sharding."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from cxr_tf.data import input_pipeline
from cxr_tf.data import schema
from cxr_tf.data import tfrecord

SIZE = 32
NORM = schema.Normalization(mean=128.0, std=64.0)


def _film(height, width, box):
    """A black image with a white rectangle exactly covering `box` (x0, y0, x1, y1)."""
    pixels = np.zeros((height, width), np.uint8)
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _write_records(folder, split, shapes, per_file):
    """Writes records of white-box films; returns {image_id: (labels, box)}."""
    options = tf.io.TFRecordOptions(compression_type="GZIP")
    truth = {}
    index = 0
    files = len(shapes) // per_file
    for shard in range(files):
        path = folder / f"{split}-{shard:05d}-of-{files:05d}.tfrecord.gz"
        with tf.io.TFRecordWriter(str(path), options) as writer:
            for height, width in shapes[shard * per_file : (shard + 1) * per_file]:
                box = (
                    width // 4,
                    height // 3,
                    width // 4 + width // 3,
                    height // 2 + 4,
                )
                labels = np.zeros(schema.NUM_FINDINGS, np.int64)
                labels[index % schema.NUM_FINDINGS] = 1
                norm_box = [
                    box[0] / width,
                    box[1] / height,
                    box[2] / width,
                    box[3] / height,
                ]
                image_id = f"{index:08d}_000.png"
                example = tfrecord.make_example(
                    _film(height, width, box),
                    image_id=image_id,
                    labels=labels,
                    height=height,
                    width=width,
                    original_height=height * 4,
                    original_width=width * 4,
                    boxes=[norm_box],
                    box_labels=[index % 8],
                )
                writer.write(example.SerializeToString())
                truth[image_id] = (labels, norm_box, (height, width))
                index += 1
    return truth


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    folder = tmp_path_factory.mktemp("records")
    # Square at the training size, and non-square ones that get letterboxed.
    shapes = [(SIZE, SIZE), (48, 32), (32, 48), (SIZE, SIZE), (64, 40), (20, 30)]
    truth = _write_records(folder, "train", shapes, per_file=2)
    _write_records(folder, "val", shapes[:2], per_file=1)
    return folder, truth


def _config(**kwargs):
    args = dict(image_size=SIZE, batch_size=2, normalization=NORM, seed=3)
    args.update(kwargs)
    return input_pipeline.InputConfig(**args)


def _bright_inside(image, box, margin=1.5):
    """Fraction of bright pixels of `image` (S, S) inside `box` (normalised yx)."""
    bright = np.argwhere(image > 128.0)
    ymin, xmin, ymax, xmax = np.asarray(box) * image.shape[0]
    # Pixel (r, c) covers [r, r+1) x [c, c+1).
    inside = (
        (bright[:, 0] >= ymin - margin)
        & (bright[:, 0] + 1 <= ymax + margin)
        & (bright[:, 1] >= xmin - margin)
        & (bright[:, 1] + 1 <= xmax + margin)
    )
    return len(bright), inside.mean() if len(bright) else 0.0


def test_eval_reads_every_record_once_with_labels_and_boxes(records):
    folder, truth = records
    dataset = input_pipeline.build_dataset(
        folder, "train", _config(), training=False, with_info=True
    )
    seen = {}
    for features, labels in dataset:
        assert features["image"].dtype == tf.float32
        assert features["image"].shape[1:] == (SIZE, SIZE, 1)
        assert features["boxes"].shape[1:] == (16, 4)
        for i, image_id in enumerate(features["image_id"].numpy()):
            seen[image_id.decode()] = i
            expected_labels, _, _ = truth[image_id.decode()]
            np.testing.assert_array_equal(labels[i].numpy(), expected_labels)
            assert features["num_boxes"][i].numpy() == 1
            assert features["box_labels"][i, 1].numpy() == -1
            pixels = features["image"][i, ..., 0].numpy() * NORM.std + NORM.mean
            # White box and black background survive the normalisation.
            assert pixels.max() == pytest.approx(255.0, abs=1e-3)
            count, inside = _bright_inside(pixels, features["boxes"][i, 0].numpy())
            assert count > 0 and inside == 1.0
    assert sorted(seen) == sorted(truth)


def test_boxed_only_keeps_the_boxed_records_in_order(tmp_path):
    options = tf.io.TFRecordOptions(compression_type="GZIP")
    path = tmp_path / "val-00000-of-00001.tfrecord.gz"
    boxed = []
    with tf.io.TFRecordWriter(str(path), options) as writer:
        for index in range(7):
            with_box = index % 3 != 1
            image_id = f"{index:08d}_000.png"
            writer.write(
                tfrecord.make_example(
                    _film(SIZE, SIZE, (4, 4, 12, 12)),
                    image_id=image_id,
                    labels=np.eye(schema.NUM_FINDINGS, dtype=np.int64)[index],
                    height=SIZE,
                    width=SIZE,
                    boxes=[[0.1, 0.1, 0.4, 0.4]] if with_box else None,
                    box_labels=[index] if with_box else None,
                ).SerializeToString()
            )
            if with_box:
                boxed.append(image_id)
    assert 0 < len(boxed) < 7
    dataset = input_pipeline.build_dataset(
        tmp_path, "val", _config(), training=False, with_info=True, boxed_only=True
    )
    seen = [
        image_id.decode()
        for features, _ in dataset
        for image_id in features["image_id"].numpy()
    ]
    assert seen == boxed
    everything = input_pipeline.build_dataset(
        tmp_path, "val", _config(), training=False, with_info=True
    )
    assert sum(int(f["image_id"].shape[0]) for f, _ in everything) == 7


def test_letterbox_pads_and_moves_boxes(records):
    folder, truth = records
    dataset = input_pipeline.build_dataset(
        folder, "val", _config(batch_size=1), training=False, with_info=True
    )
    features, _ = next(iter(dataset.skip(1)))  # the 48x32 film
    image_id = features["image_id"][0].numpy().decode()
    height, width = truth[image_id][2]
    assert (height, width) == (48, 32)
    pixels = features["image"][0, ..., 0].numpy() * NORM.std + NORM.mean
    # Taller than wide: scaled to 32x21, centred, zero columns either side.
    new_w = round(width * SIZE / height)
    offset = (SIZE - new_w) // 2
    assert np.all(pixels[:, : offset - 1] == 0.0)
    assert np.all(pixels[:, offset + new_w + 1 :] == 0.0)
    xmin, ymin, xmax, ymax = truth[image_id][1]
    expected = [
        ymin,
        (xmin * new_w + offset) / SIZE,
        ymax,
        (xmax * new_w + offset) / SIZE,
    ]
    np.testing.assert_allclose(features["boxes"][0, 0].numpy(), expected, atol=1e-6)
    assert features["original_height"][0].numpy() == 4 * height


def test_plain_elements_are_image_and_labels(records):
    folder, _ = records
    dataset = input_pipeline.build_dataset(folder, "val", _config(), training=False)
    image, labels = next(iter(dataset))
    assert image.shape == (2, SIZE, SIZE, 1)
    assert labels.shape == (2, schema.NUM_FINDINGS)
    assert labels.dtype == tf.float32


def test_training_repeats_and_drops_remainder(records):
    folder, _ = records
    dataset = input_pipeline.build_dataset(
        folder, "train", _config(batch_size=4, augment=True), training=True
    )
    assert dataset.element_spec[0].shape == (4, SIZE, SIZE, 1)
    batches = list(dataset.take(5))  # 20 images out of 6 records
    assert len(batches) == 5
    for image, _ in batches:
        pixels = image.numpy() * NORM.std + NORM.mean
        assert pixels.min() >= -1e-3 and pixels.max() <= 255.0 + 1e-3


@pytest.mark.parametrize("flip", [False, True])
def test_boxes_follow_the_augmentation(records, flip):
    folder, _ = records
    config = _config(
        batch_size=6,
        augment=True,
        flip=flip,
        rotation_degrees=25.0,
        scale_range=0.3,
        translation=0.15,
        shuffle_buffer=0,
    )
    dataset = input_pipeline.build_dataset(
        folder, "train", config, training=True, with_info=True
    )
    reference = input_pipeline.build_dataset(
        folder, "train", _config(batch_size=6), training=False, with_info=True
    )
    ref_features, _ = next(iter(reference))
    ref_boxes = dict(
        zip(ref_features["image_id"].numpy(), ref_features["boxes"][:, 0].numpy())
    )
    moved = 0
    for features, _ in dataset.take(4):
        for i in range(6):
            pixels = features["image"][i, ..., 0].numpy() * NORM.std + NORM.mean
            box = features["boxes"][i, 0].numpy()
            count, inside = _bright_inside(pixels, box)
            assert count > 0
            assert inside == 1.0, (box, features["image_id"][i].numpy())
            # The enclosing box stays tight: bright pixels fill a good part.
            area = (box[2] - box[0]) * (box[3] - box[1]) * SIZE * SIZE
            assert count / area > 0.3
            image_id = features["image_id"][i].numpy()
            moved += not np.allclose(box, ref_boxes[image_id], atol=1e-3)
    assert moved > 20  # the geometry did change


def test_augment_batch_known_transform():
    """A pure shift moves the box by exactly the shift."""
    config = _config(
        augment=True,
        rotation_degrees=0.0,
        scale_range=0.0,
        brightness=0.0,
        contrast=0.0,
        translation=0.25,
    )
    image = np.zeros((1, SIZE, SIZE, 1), np.float32)
    image[0, 8:16, 8:16] = 255.0
    box = np.array([[[8, 8, 16, 16]]], np.float32) / SIZE
    out = input_pipeline.augment_batch(
        {"image": tf.constant(image), "boxes": tf.constant(box), "num_boxes": [1]},
        tf.constant([1, 2], tf.int64),
        config,
    )
    moved = out["boxes"].numpy()[0, 0] * SIZE
    shift = moved - box[0, 0] * SIZE
    assert shift[0] == pytest.approx(shift[2], abs=1e-3)
    assert shift[1] == pytest.approx(shift[3], abs=1e-3)
    assert np.abs(shift).max() > 0.5
    ys, xs = np.nonzero(out["image"].numpy()[0, ..., 0] > 128)
    assert ys.min() >= moved[0] - 1 and ys.max() + 1 <= moved[2] + 1
    assert xs.min() >= moved[1] - 1 and xs.max() + 1 <= moved[3] + 1


@pytest.mark.parametrize("pipelines", [2, 3, 5])
def test_input_context_gives_disjoint_parts(records, pipelines):
    folder, truth = records  # 3 train files of 2 records
    parts = []
    for pipeline_id in range(pipelines):
        context = tf.distribute.InputContext(
            num_input_pipelines=pipelines,
            input_pipeline_id=pipeline_id,
            num_replicas_in_sync=2 * pipelines,
        )
        dataset = input_pipeline.build_dataset(
            folder,
            "train",
            _config(batch_size=2 * pipelines),
            training=False,
            input_context=context,
            with_info=True,
        )
        ids = []
        for features, _ in dataset:
            assert features["image"].shape[0] == 1  # per-replica batch
            ids.extend(features["image_id"].numpy().tolist())
        parts.append(set(ids))
    union = set().union(*parts)
    assert sum(len(p) for p in parts) == len(union)
    assert {i.decode() for i in union} == set(truth)


def test_config_validation():
    with pytest.raises(ValueError, match="`image_size` must be a positive int"):
        input_pipeline.InputConfig(image_size=0)
    with pytest.raises(ValueError, match="`rotation_degrees` must be"):
        input_pipeline.InputConfig(rotation_degrees=-1.0)
    with pytest.raises(ValueError, match="`normalization` must be"):
        input_pipeline.InputConfig(normalization=(128, 64))
    with pytest.raises(FileNotFoundError, match="No TFRecord files"):
        input_pipeline.build_dataset("/nonexistent", "train", _config(), True)


def test_xla_warp_matches_image_projective_transform():
    """The XLA warp samples like ImageProjectiveTransformV3 (bilinear, zero fill)."""
    rng = np.random.default_rng(0)
    batch, size = 3, 24
    images = rng.integers(0, 256, (batch, size, size, 1)).astype(np.uint8)
    angle = np.array([0.3, -0.1, 0.0])
    scale = np.array([0.8, 1.2, 1.0])
    shift = np.array([[3.5, -2.25], [-30.0, 1.0], [0.0, 0.0]])  # one mostly outside
    cos, sin = np.cos(angle), np.sin(angle)
    centre = (size - 1) / 2
    a0, a1, b0, b1 = cos / scale, sin / scale, -sin / scale, cos / scale
    a2 = centre - a0 * (centre + shift[:, 0]) - a1 * (centre + shift[:, 1])
    b2 = centre - b0 * (centre + shift[:, 0]) - b1 * (centre + shift[:, 1])
    transforms = np.stack([a0, a1, a2, b0, b1, b2], 1).astype(np.float32)
    expected = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.constant(images, tf.float32),
        transforms=np.concatenate([transforms, np.zeros((batch, 2))], 1).astype(
            np.float32
        ),
        output_shape=[size, size],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    ).numpy()
    ones, zeros = tf.ones([batch]), tf.zeros([batch])
    warped = input_pipeline._warp_and_jitter(  # pylint: disable=protected-access
        tf.constant(images), transforms, ones, zeros, zeros, 0.0, 255.0
    ).numpy()
    np.testing.assert_allclose(warped, expected, atol=1e-3)
    assert np.abs(warped[2] - images[2]).max() < 1e-3  # identity is exact
    # The intensity part: clip(x * gain + mean(input) * scale_mean + offset).
    gain = tf.constant([1.1, 0.9, 1.0])
    jittered = input_pipeline._warp_and_jitter(  # pylint: disable=protected-access
        tf.constant(images),
        transforms,
        gain,
        1.0 - gain,
        tf.fill([batch], 5.0),
        0.0,
        255.0,
    ).numpy()
    mean = images.reshape(batch, -1).mean(1)[:, None, None, None]
    gain = gain.numpy()[:, None, None, None]
    np.testing.assert_allclose(
        jittered,
        np.clip(expected * gain + mean * (1 - gain) + 5.0, 0.0, 255.0),
        atol=1e-2,
    )


def _noise_records(folder, split, shards, per_file, size=SIZE):
    """Shards of noise films (incompressible: a cut lands inside a record)."""
    rng = np.random.RandomState(0)
    options = tf.io.TFRecordOptions(compression_type="GZIP")
    paths = []
    for shard in range(shards):
        path = folder / f"{split}-{shard:05d}-of-{shards:05d}.tfrecord.gz"
        with tf.io.TFRecordWriter(str(path), options) as writer:
            for i in range(per_file):
                pixels = rng.randint(0, 255, (size, size, 1)).astype(np.uint8)
                writer.write(
                    tfrecord.make_example(
                        tf.io.encode_png(pixels).numpy(),
                        image_id=f"{split}{shard}_{i}.png",
                        labels=np.zeros(schema.NUM_FINDINGS, np.int64),
                        height=size,
                        width=size,
                    ).SerializeToString()
                )
        paths.append(path)
    return paths


def _cut(path, fraction=1 / 3):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


@pytest.mark.parametrize("training", [True, False])
def test_cut_shard_is_named_when_read(tmp_path, training):
    from cxr_tf import errors

    paths = _noise_records(tmp_path, "train", shards=3, per_file=12)
    _cut(paths[1])
    ds = input_pipeline.build_dataset(tmp_path, "train", _config(), training=training)
    with pytest.raises(errors.UserFileError) as info:
        with input_pipeline.naming_damaged_files(tmp_path, ["train"]):
            for _ in ds.take(100):
                pass
    message = str(info.value)
    assert str(paths[1]) in message
    assert "truncated" in message and "\n" not in message
    # Only the cut shard is blamed.
    assert str(paths[0]) not in message and str(paths[2]) not in message
    assert isinstance(info.value.__cause__, tf.errors.DataLossError)


def test_iteration_of_intact_shards_loses_nothing(tmp_path):
    _noise_records(tmp_path, "test", shards=2, per_file=5)
    ds = input_pipeline.build_dataset(
        tmp_path, "test", _config(), training=False, with_info=True
    )
    ids = [
        i.decode()
        for features, _ in input_pipeline.iterate_naming_damaged_files(
            ds, tmp_path, "test"
        )
        for i in features["image_id"].numpy()
    ]
    assert sorted(ids) == sorted(f"test{s}_{i}.png" for s in range(2) for i in range(5))
    assert input_pipeline.find_damaged_files(sorted(tmp_path.glob("*.gz"))) == []


def test_damaged_file_named_in_evaluation_loop(tmp_path):
    from cxr_tf import errors

    (path,) = _noise_records(tmp_path, "test", shards=1, per_file=12)
    _cut(path, 0.5)
    ds = input_pipeline.build_dataset(tmp_path, "test", _config(), training=False)
    with pytest.raises(errors.UserFileError, match="damaged TFRecord file") as info:
        list(input_pipeline.iterate_naming_damaged_files(ds, tmp_path, "test"))
    assert info.value.where == str(path)
