"""An image's width and height read from its PNG/JPEG/GIF/BMP header, before decoding.

A decoder allocates what the header declares: a 242 KB PNG of zeros can
declare 16000x16000 pixels (256 MB as uint8, gigabytes once a graph works on
it in int32 and float64). `guard_image_bytes` reads the declared size with
plain TensorFlow ops (substr, decode_raw, a bounded while_loop, Assert), so
the check runs inside the exported graph, in `tensorflow_model_server` as in
Python, and refuses an image over `images.MAX_IMAGE_PIXELS` (the limit that
ingest and predict apply) with InvalidArgumentError before any decoder runs.

`read_image_size` is the same reading in pure Python (for tests and for
callers without TensorFlow); both give the same sizes and reasons, and the
same messages (the TF one writes a pixel count past 2^62 in float).
No message quotes the request's bytes.

Formats: PNG (IHDR), JPEG (the first SOFn frame header, walking at most
`MAX_JPEG_SEGMENTS` marker segments), GIF (logical screen) and BMP
(BITMAPINFOHEADER); these are what `tf.io.decode_image` reads and
`export_lib.decode_grayscale` accepts. Anything else is refused.
"""

import struct

import tensorflow as tf

from cxr_tf.data import images

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
GIF_SIGNATURES = (b"GIF87a", b"GIF89a")
BMP_SIGNATURE = b"BM"
FORMATS = ("PNG", "JPEG", "GIF", "BMP")
# Real files carry a handful of segments (APPn, DQT, DHT) before the frame
# header; a file needing more is refused rather than walked without end.
MAX_JPEG_SEGMENTS = 512
# SOF0..SOF15 less DHT (C4), JPG (C8) and DAC (CC), which share the range.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}
_JPEG_SOS, _JPEG_EOI = 0xDA, 0xD9

# Reasons, shared by the TF and Python readers (index = reason code).
OK, UNKNOWN_FORMAT, BAD_HEADER, EMPTY, TOO_LARGE = range(5)
_UNKNOWN_FORMAT_MESSAGE = (
    "Not a PNG, JPEG, GIF or BMP image: its first bytes match no known "
    "signature. Send the encoded file as it is on disk."
)
_BAD_HEADER_MESSAGE = (
    "Truncated or malformed {format} header: no width and height could be "
    "read. Send the complete file."
)
_EMPTY_MESSAGE = "{format} header declares {width}x{height} pixels: an empty image."
_TOO_LARGE_MESSAGE = (
    "{format} header declares {width}x{height} = {pixels} pixels, more than "
    "the limit of {limit} pixels. Downscale the image before sending it."
)


class ImageHeaderError(ValueError):
    """An image refused from its header (unknown, malformed, empty, too large)."""

    def __init__(self, reason, message):
        super().__init__(message)
        self.reason = reason


def read_image_size(data, max_pixels=images.MAX_IMAGE_PIXELS):
    """Format, height and width of an encoded image, from its header only.

    Args:
      data: the encoded bytes.
      max_pixels: the largest width * height accepted.

    Returns:
      (format, height, width); format is one of `FORMATS`.

    Raises:
      ImageHeaderError: unknown format, truncated or malformed header, a zero
        side, or more than `max_pixels` pixels.
    """
    data = bytes(data)
    if data.startswith(PNG_SIGNATURE):
        fmt = "PNG"
        ok = len(data) >= 24 and data[12:16] == b"IHDR"
        width, height = struct.unpack(">II", data[16:24]) if ok else (0, 0)
    elif data.startswith(JPEG_SIGNATURE):
        fmt = "JPEG"
        ok, height, width = _jpeg_size(data)
    elif data[:6] in GIF_SIGNATURES:
        fmt = "GIF"
        ok = len(data) >= 10
        width, height = struct.unpack("<HH", data[6:10]) if ok else (0, 0)
    elif data.startswith(BMP_SIGNATURE):
        fmt = "BMP"
        ok = len(data) >= 26
        width, height = struct.unpack("<ii", data[18:26]) if ok else (0, 0)
        ok = ok and width >= 0
        height = abs(height)  # Negative: rows stored top-down.
    else:
        raise ImageHeaderError(UNKNOWN_FORMAT, _UNKNOWN_FORMAT_MESSAGE)
    if not ok:
        raise ImageHeaderError(BAD_HEADER, _BAD_HEADER_MESSAGE.format(format=fmt))
    if width == 0 or height == 0:
        raise ImageHeaderError(
            EMPTY, _EMPTY_MESSAGE.format(format=fmt, width=width, height=height)
        )
    if width * height > max_pixels:
        raise ImageHeaderError(
            TOO_LARGE,
            _TOO_LARGE_MESSAGE.format(
                format=fmt,
                width=width,
                height=height,
                pixels=width * height,
                limit=max_pixels,
            ),
        )
    return fmt, height, width


def _jpeg_size(data):
    """(found, height, width) from the first SOFn segment of a JPEG."""
    pos = 2
    for _ in range(MAX_JPEG_SEGMENTS):
        if pos + 2 > len(data) or data[pos] != 0xFF:
            return False, 0, 0
        marker = data[pos + 1]
        if marker == 0xFF:  # A fill byte before the marker.
            pos += 1
        elif marker in _JPEG_SOF:
            if pos + 9 > len(data):
                return False, 0, 0
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return True, height, width
        elif marker in _JPEG_STANDALONE:
            pos += 2
        elif marker in (_JPEG_SOS, _JPEG_EOI) or pos + 4 > len(data):
            return False, 0, 0
        else:
            length = struct.unpack(">H", data[pos + 2 : pos + 4])[0]
            if length < 2:
                return False, 0, 0
            pos += 2 + length
    return False, 0, 0


# ---------------------------------------------------------------------------
# The same reading in TensorFlow ops.


def _bytes_at(data, pos, count):
    """`count` bytes of `data` from `pos` as int64, zeros past the end."""
    length = tf.strings.length(data)
    # substr past the end raises an error that quotes the whole input.
    start = tf.minimum(tf.cast(pos, tf.int32), length)
    raw = tf.io.decode_raw(tf.strings.substr(data, start, count), tf.uint8)
    raw = tf.pad(raw, [[0, count - tf.shape(raw)[0]]])
    return tf.cast(tf.reshape(raw, [count]), tf.int64)


def _big_endian(values):
    result = tf.constant(0, tf.int64)
    for value in tf.unstack(values):
        result = result * 256 + value
    return result


def _little_endian(values):
    return _big_endian(tf.reverse(values, [0]))


def _starts_with(head, signature):
    return tf.reduce_all(
        tf.equal(head[: len(signature)], tf.constant(list(signature), tf.int64))
    )


def _jpeg_size_tf(data):
    """(found, height, width) as `_jpeg_size`, in a bounded tf.while_loop."""
    length = tf.cast(tf.strings.length(data), tf.int64)
    sof = tf.constant(sorted(_JPEG_SOF), tf.int64)
    standalone = tf.constant(sorted(_JPEG_STANDALONE), tf.int64)

    def body(i, pos, done, found, height, width):
        b = _bytes_at(data, pos, 9)
        marker = b[1]
        bad = tf.logical_or(pos + 2 > length, tf.not_equal(b[0], 0xFF))
        fill = tf.equal(marker, 0xFF)
        is_sof = tf.reduce_any(tf.equal(marker, sof))
        is_standalone = tf.reduce_any(tf.equal(marker, standalone))
        end = tf.logical_or(tf.equal(marker, _JPEG_SOS), tf.equal(marker, _JPEG_EOI))
        seg_length = b[2] * 256 + b[3]
        segment = ~(fill | is_sof | is_standalone | end)
        bad = bad | end | (is_sof & (pos + 9 > length))
        bad = bad | (segment & ((pos + 4 > length) | (seg_length < 2)))
        got = ~bad & is_sof
        step = tf.where(
            fill,
            tf.constant(1, tf.int64),
            tf.where(is_standalone, tf.constant(2, tf.int64), 2 + seg_length),
        )
        return (
            i + 1,
            pos + step,
            bad | got,
            got,
            tf.where(got, b[5] * 256 + b[6], height),
            tf.where(got, b[7] * 256 + b[8], width),
        )

    zero = tf.constant(0, tf.int64)
    _, _, _, found, height, width = tf.while_loop(
        lambda i, pos, done, *_: tf.logical_and(i < MAX_JPEG_SEGMENTS, ~done),
        body,
        (
            tf.constant(0),
            tf.constant(2, tf.int64),
            tf.constant(False),
            tf.constant(False),
            zero,
            zero,
        ),
        maximum_iterations=MAX_JPEG_SEGMENTS,
    )
    return found, height, width


def read_image_size_tf(data, max_pixels=images.MAX_IMAGE_PIXELS):
    """`read_image_size` in TensorFlow ops, without raising.

    Args:
      data: scalar string tensor.
      max_pixels: the largest width * height accepted.

    Returns:
      (reason int32 scalar (`OK`, `UNKNOWN_FORMAT`, ...), format string
      scalar ("" when unknown), height int64, width int64).
    """
    data = tf.convert_to_tensor(data, tf.string)
    head = _bytes_at(data, 0, 26)
    length = tf.cast(tf.strings.length(data), tf.int64)
    is_png = _starts_with(head, PNG_SIGNATURE)
    is_jpeg = _starts_with(head, JPEG_SIGNATURE)
    is_gif = _starts_with(head, GIF_SIGNATURES[0]) | _starts_with(
        head, GIF_SIGNATURES[1]
    )
    is_bmp = _starts_with(head, BMP_SIGNATURE)

    png_ok = (length >= 24) & _starts_with(head[12:], b"IHDR")
    zero = tf.constant(0, tf.int64)
    jpeg_ok, jpeg_h, jpeg_w = tf.cond(
        is_jpeg, lambda: _jpeg_size_tf(data), lambda: (tf.constant(False), zero, zero)
    )
    bmp_w = _little_endian(head[18:22])
    bmp_h = _little_endian(head[22:26])
    # int32 two's complement: a negative height means top-down rows.
    bmp_w = tf.where(bmp_w >= 2**31, bmp_w - 2**32, bmp_w)
    bmp_h = tf.abs(tf.where(bmp_h >= 2**31, bmp_h - 2**32, bmp_h))

    def pick(png, jpeg, gif, bmp):
        return tf.where(
            is_png, png, tf.where(is_jpeg, jpeg, tf.where(is_gif, gif, bmp))
        )

    known = is_png | is_jpeg | is_gif | is_bmp
    header_ok = pick(png_ok, jpeg_ok, length >= 10, (length >= 26) & (bmp_w >= 0))
    height = pick(_big_endian(head[20:24]), jpeg_h, _little_endian(head[8:10]), bmp_h)
    width = pick(_big_endian(head[16:20]), jpeg_w, _little_endian(head[6:8]), bmp_w)
    header_ok = known & header_ok
    height = tf.where(header_ok, height, 0)
    width = tf.where(header_ok, width, 0)
    fmt = pick(*[tf.constant(f) for f in FORMATS])
    reason = tf.where(
        ~known,
        UNKNOWN_FORMAT,
        tf.where(
            ~header_ok,
            BAD_HEADER,
            tf.where(
                (height == 0) | (width == 0),
                EMPTY,
                tf.where(_over(height, width, max_pixels), TOO_LARGE, OK),
            ),
        ),
    )
    return reason, tf.where(known, fmt, ""), height, width


def _over(height, width, max_pixels):
    """height * width > max_pixels, without int64 overflow (PNG sides are 32-bit)."""
    return (height > max_pixels) | (width > max_pixels) | (height * width > max_pixels)


def _pixels_text(height, width):
    """height * width as text; float64 where the int64 product would overflow."""
    small = (height < 2**31) & (width < 2**31)
    exact = tf.strings.as_string(tf.where(small, height * width, 0))
    rough = tf.strings.as_string(
        tf.cast(height, tf.float64) * tf.cast(width, tf.float64), scientific=True
    )
    return tf.where(small, exact, rough)


def _message(template, **values):
    """`template.format(**values)` for tensors.

    tf.strings.format would quote the format name, and Assert prints its
    message escaped, so the templates hold no quotes.
    """
    pieces = []
    for i, part in enumerate(template.replace("}", "{").split("{")):
        if i % 2 == 0:
            pieces.append(tf.constant(part))
        else:
            value = values[part]
            pieces.append(
                value if value.dtype == tf.string else tf.strings.as_string(value)
            )
    return tf.strings.join(pieces)


def guard_image_bytes(data, max_pixels=images.MAX_IMAGE_PIXELS):
    """`data`, once its header has passed `read_image_size_tf`'s checks.

    Decode the returned tensor (not `data`): it carries the check as a
    control dependency, so no decoder starts on a refused image.

    Args:
      data: scalar string tensor.
      max_pixels: the largest width * height accepted.

    Returns:
      The same string tensor.

    Raises:
      tf.errors.InvalidArgumentError: at run time, with a message naming
        the format and declared size (never the bytes themselves).
    """
    data = tf.convert_to_tensor(data, tf.string)
    reason, fmt, height, width = read_image_size_tf(data, max_pixels)
    message = tf.switch_case(
        reason,
        [
            lambda: tf.constant(""),
            lambda: tf.constant(_UNKNOWN_FORMAT_MESSAGE),
            lambda: _message(_BAD_HEADER_MESSAGE, format=fmt),
            lambda: _message(_EMPTY_MESSAGE, format=fmt, width=width, height=height),
            lambda: _message(
                _TOO_LARGE_MESSAGE,
                format=fmt,
                width=width,
                height=height,
                pixels=_pixels_text(height, width),
                limit=tf.constant(max_pixels, tf.int64),
            ),
        ],
    )
    check = tf.debugging.Assert(tf.equal(reason, OK), [message], summarize=1)
    with tf.control_dependencies([check]):
        return tf.identity(data)
