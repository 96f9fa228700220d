"""Tests of cxr_tf.data.preprocess: the image contract's NumPy and TF twins."""

import numpy as np
import pytest
import tensorflow as tf

from cxr_tf.data import preprocess
from cxr_tf.data import schema

# (H, W) films x (ingest size, network size): square, wide, tall, odd,
# smaller than the ingest size, and ingest sizes above and at the network's.
SHAPES = [(300, 600), (600, 300), (257, 131), (90, 70), (512, 512), (1000, 997)]
SIZES = [(128, 64), (256, 64), (64, 64), (None, 64), (96, 32)]


def _film(shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def test_letterbox_inverse_maps_network_boxes_to_original():
    # A 300 x 600 film in a 64 px input: scale 64/600, 32 x 64 resized, 16 px
    # padding above.
    box = preprocess.Letterbox(300, 600, 64)
    assert box.resized_hw == (32, 64) and box.offset_yx == (16, 0)
    out = box.network_boxes_to_original([[16 / 64, 0.0, 48 / 64, 0.5]])
    np.testing.assert_allclose(out, [[0.0, 0.0, 300.0, 300.0]], atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ingest,size", SIZES)
def test_stored_size_numpy_equals_tf(shape, ingest, size):
    want = preprocess.stored_size(*shape, ingest or size)
    got = preprocess.stored_size_tf(
        tf.constant(shape[0]), tf.constant(shape[1]), ingest or size
    )
    assert tuple(int(v) for v in got) == want


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ingest", [64, 128, 301])
def test_resize_like_ingestion_is_bit_exact(shape, ingest):
    film = _film(shape)
    want = preprocess.resize_longer_side(film, ingest)
    got = preprocess.resize_like_ingestion(tf.constant(film[..., None]), ingest)
    np.testing.assert_array_equal(got.numpy()[..., 0], want)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ingest,size", SIZES)
def test_geometry_numpy_equals_tf(shape, ingest, size):
    box = preprocess.Letterbox(*shape, size, ingest)
    side, off_y, off_x = (
        float(v)
        for v in preprocess.letterbox_geometry(
            tf.constant(shape[0]), tf.constant(shape[1]), size, ingest
        )
    )
    assert side == pytest.approx(box.canvas, rel=1e-6)
    assert off_y == pytest.approx(box.offset_yx[0] * box.per_pixel, rel=1e-5, abs=1e-4)
    assert off_x == pytest.approx(box.offset_yx[1] * box.per_pixel, rel=1e-5, abs=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ingest,size", SIZES)
def test_pixels_numpy_path_equals_tf_path(shape, ingest, size):
    film = _film(shape, seed=1)
    want = preprocess.preprocess_pixels(film, size, schema.FIXED, ingest)
    got = preprocess.preprocess_gray_tf(
        tf.constant(film[..., None]), size, schema.FIXED, ingest
    )
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ingest,size", SIZES)
def test_raw_film_path_equals_the_records_path(shape, ingest, size):
    # What training sees: ingestion stores the film at `ingest`, the input
    # pipeline letterboxes the stored film to `size`. predict and the served
    # model start from the raw film: they must land on the same pixels, and
    # the letterbox of the stored film must sit where `Letterbox` says.
    film = _film(shape, seed=2)
    stored = preprocess.resize_longer_side(film, ingest or size)
    records_path, _ = preprocess.letterbox(tf.constant(stored[..., None]), None, size)
    raw_path = preprocess.preprocess_pixels(film, size, schema.FIXED, ingest)
    records = (records_path.numpy().astype(np.float32) - 128.0) / 64.0
    np.testing.assert_allclose(raw_path, records, atol=1e-6)
    box = preprocess.Letterbox(*shape, size, ingest)
    (off_y, off_x), (new_h, new_w) = box.offset_yx, box.resized_hw
    inside = np.zeros((size, size), bool)
    inside[off_y : off_y + new_h, off_x : off_x + new_w] = True
    # Padding is exactly zero; the film (random pixels) nearly never is.
    assert (records_path.numpy()[..., 0][~inside] == 0).all()
    assert (records_path.numpy()[..., 0][inside] > 0).mean() > 0.9


@pytest.mark.parametrize("ingest,size", [(128, 64), (None, 64)])
def test_a_box_survives_the_round_trip(ingest, size):
    # A box in original pixels -> normalised to the stored film (as ingestion
    # writes it) -> the letterbox's transform -> back to original pixels.
    shape = (300, 600)
    x, y, w, h = 120.0, 60.0, 240.0, 90.0
    stored_h, stored_w = preprocess.stored_size(*shape, ingest or size)
    boxes = tf.constant(
        [[y / shape[0], x / shape[1], (y + h) / shape[0], (x + w) / shape[1]]],
        tf.float32,
    )
    _, network = preprocess.letterbox(
        tf.zeros([stored_h, stored_w, 1], tf.uint8), boxes, size
    )
    back = preprocess.Letterbox(*shape, size, ingest).network_boxes_to_original(
        network.numpy()
    )
    # One network pixel is 600 / 64 original pixels: rounding of the stored
    # and letterboxed sizes moves a box by well under that.
    np.testing.assert_allclose(back[0], [x, y, w, h], atol=600 / size / 2)


def test_crop_map_removes_the_padding():
    box = preprocess.Letterbox(300, 600, 64, 128)
    score = np.arange(64, dtype=np.float32).reshape(8, 8)
    cropped = box.crop_map(score)
    assert cropped.shape == (4, 8)
    np.testing.assert_array_equal(cropped, score[2:6])


def test_to_original_rejects_an_unknown_unit():
    with pytest.raises(ValueError, match="unit"):
        preprocess.Letterbox(10, 10, 8).to_original(0, 0, 1, 1, unit="cm")
