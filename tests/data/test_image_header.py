"""cxr_tf.data.image_header: sizes from headers, in TF ops and in Python, alike."""

import io
import struct
import zlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from cxr_tf.data import image_header
from cxr_tf.data import images


def _pil(fmt, width=37, height=21, **kwargs):
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (height, width), np.uint8)
    Image.fromarray(pixels).save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _chunk(kind, data):
    crc = struct.pack(">I", zlib.crc32(kind + data))
    return struct.pack(">I", len(data)) + kind + data + crc


def png_header_only(width, height):
    """The signature and IHDR of a gray 8-bit PNG: all a header reader sees."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return image_header.PNG_SIGNATURE + _chunk(b"IHDR", ihdr)


_read_tf = tf.function(image_header.read_image_size_tf, autograph=False)
_guard = tf.function(image_header.guard_image_bytes, autograph=False)


def _both(data, max_pixels=images.MAX_IMAGE_PIXELS):
    """(reason, format, height, width) from the TF reader and the Python twin."""
    reason, fmt, height, width = _read_tf(tf.constant(data), max_pixels)
    got_tf = (int(reason), fmt.numpy().decode(), int(height), int(width))
    try:
        got_py = (image_header.OK,) + image_header.read_image_size(data, max_pixels)
    except image_header.ImageHeaderError as e:
        got_py = (e.reason,)
    return got_tf, got_py


@pytest.mark.parametrize(
    "fmt, data",
    [
        ("PNG", _pil("PNG")),
        ("PNG", tf.io.encode_png(tf.zeros([21, 37, 1], tf.uint16)).numpy()),
        ("JPEG", _pil("JPEG")),
        ("JPEG", _pil("JPEG", progressive=True)),
        ("JPEG", _pil("JPEG", exif=b"Exif\x00\x00" + b"\x00" * 3000, dpi=(300, 300))),
        ("GIF", _pil("GIF")),
        ("BMP", _pil("BMP")),
    ],
    ids=[
        "png",
        "png_16bit",
        "jpeg_baseline",
        "jpeg_progressive",
        "jpeg_app1",
        "gif",
        "bmp",
    ],
)
def test_sizes_of_real_files(fmt, data):
    got_tf, got_py = _both(data)
    assert got_tf == (image_header.OK, fmt, 21, 37)
    assert got_py == got_tf


def test_jpeg_frame_types_and_fill_bytes():
    baseline = _pil("JPEG")
    progressive = _pil("JPEG", progressive=True)
    # SOF0 in one, SOF2 in the other: the walk reached the frame header.
    assert b"\xff\xc0" in baseline and b"\xff\xc2" in progressive
    # Fill bytes (FF FF ...) before a marker are legal and skipped.
    padded = baseline[:2] + b"\xff\xff\xff" + baseline[2:]
    assert _both(padded)[0] == (image_header.OK, "JPEG", 21, 37)


def test_bmp_top_down_rows_have_a_negative_height():
    data = bytearray(_pil("BMP"))
    data[22:26] = struct.pack("<i", -21)
    got_tf, got_py = _both(bytes(data))
    assert got_tf == got_py == (image_header.OK, "BMP", 21, 37)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP"])
def test_every_truncation_agrees_and_never_passes_without_a_size(fmt):
    data = _pil(fmt, progressive=True) if fmt == "JPEG" else _pil(fmt)
    # Every cut inside the header region, then a sample of the rest.
    cuts = list(range(80)) + list(range(80, len(data), 41))
    if fmt == "JPEG":
        frame = data.index(b"\xff\xc2")
        cuts += list(range(frame - 4, frame + 12))
    for cut in cuts:
        got_tf, got_py = _both(data[:cut])
        assert got_tf[0] == got_py[0], cut
        if got_tf[0] == image_header.OK:
            assert got_tf == got_py == (image_header.OK, fmt, 21, 37), cut
        else:
            assert got_tf[0] in (image_header.UNKNOWN_FORMAT, image_header.BAD_HEADER)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"\x89PNG not really", image_header.UNKNOWN_FORMAT),
        (b"", image_header.UNKNOWN_FORMAT),
        (b"GIF", image_header.UNKNOWN_FORMAT),
        (bytes(range(256)) * 4, image_header.UNKNOWN_FORMAT),
        (
            image_header.PNG_SIGNATURE + b"\x00\x00\x00\x0dIDAT" + b"\x00" * 20,
            image_header.BAD_HEADER,
        ),
        # SOS before any frame header.
        (b"\xff\xd8\xff\xda\x00\x08" + b"\x00" * 40, image_header.BAD_HEADER),
        # A segment length under 2.
        (b"\xff\xd8\xff\xe0\x00\x01" + b"\x00" * 40, image_header.BAD_HEADER),
        # A sound APP0 followed by bytes that are no marker.
        (
            b"\xff\xd8\xff\xe0\x00\x10\x00\x00\x42" + b"\x00" * 40,
            image_header.BAD_HEADER,
        ),
        (png_header_only(0, 5), image_header.EMPTY),
        (png_header_only(16000, 16000), image_header.TOO_LARGE),
    ],
    ids=[
        "png_signature_garbage",
        "empty",
        "gif_prefix",
        "random",
        "png_without_ihdr",
        "jpeg_sos_before_frame",
        "jpeg_short_segment",
        "jpeg_walks_into_garbage",
        "png_zero_width",
        "png_bomb",
    ],
)
def test_garbage_is_refused_with_its_reason(data, reason):
    got_tf, got_py = _both(data)
    assert got_tf[0] == got_py[0] == reason


def test_jpeg_walk_is_bounded():
    # Segment after empty segment: more than MAX_JPEG_SEGMENTS before a frame.
    many = b"\xff\xd8" + b"\xff\xfe\x00\x02" * (image_header.MAX_JPEG_SEGMENTS + 5)
    data = many + _pil("JPEG")[2:]
    got_tf, got_py = _both(data)
    assert got_tf[0] == got_py[0] == image_header.BAD_HEADER
    # One segment fewer than the bound and the frame is found.
    few = b"\xff\xd8" + b"\xff\xfe\x00\x02" * (image_header.MAX_JPEG_SEGMENTS - 10)
    assert _both(few + _pil("JPEG")[2:])[0][0] == image_header.OK


def test_the_limit_is_ingests():
    limit = images.MAX_IMAGE_PIXELS
    side = int(limit**0.5)
    assert _both(png_header_only(side, side))[0][0] == image_header.OK
    assert _both(png_header_only(limit + 1, 1))[0][0] == image_header.TOO_LARGE
    assert _both(png_header_only(limit, 1))[0][0] == image_header.OK
    # A 6000x6000 film (36 MP) is under the limit; a smaller limit refuses it.
    assert _both(png_header_only(6000, 6000))[0][0] == image_header.OK
    assert _both(png_header_only(6000, 6000), 1000)[0][0] == image_header.TOO_LARGE
    # PNG sides are 32-bit: their int64 product overflows to a negative.
    for side in (2**31 - 1, 2**32 - 1):
        got_tf, got_py = _both(png_header_only(side, side))
        assert got_tf[0] == got_py[0] == image_header.TOO_LARGE
    overflow = r"4294967295x4294967295 = 1.8"
    with pytest.raises(tf.errors.InvalidArgumentError, match=overflow):
        _guard(tf.constant(png_header_only(2**32 - 1, 2**32 - 1)))


def test_guard_raises_invalid_argument_without_request_bytes():
    secret = b"\x89PNG not really \xff\xfe SECRET-PATIENT-42"
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        _guard(tf.constant(secret))
    assert "Not a PNG, JPEG, GIF or BMP image" in info.value.message
    assert "SECRET" not in info.value.message and "not really" not in info.value.message

    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        _guard(tf.constant(png_header_only(16000, 16000)))
    assert (
        "PNG header declares 16000x16000 = 256000000 pixels, more than the limit "
        f"of {images.MAX_IMAGE_PIXELS} pixels"
    ) in info.value.message
    with pytest.raises(image_header.ImageHeaderError, match="16000x16000 = 256000000"):
        image_header.read_image_size(png_header_only(16000, 16000))

    data = _pil("PNG")
    assert _guard(tf.constant(data)).numpy() == data
