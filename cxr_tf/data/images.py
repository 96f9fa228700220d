"""Decodes chest X-ray files (PNG, JPEG, DICOM) to 2-D uint8 grayscale arrays.

The DICOM steps, in words: docs/DATA_AND_METRICS.md, section 9.
"""

import contextlib
import dataclasses
import io
import logging as std_logging
import pathlib
import threading
import warnings

from absl import logging
import numpy as np
from PIL import Image
from PIL import ImageOps
import pydicom
from pydicom import uid as dicom_uid
from pydicom.pixels import apply_modality_lut
from pydicom.pixels import apply_voi

# Larger images are refused before their pixels are decoded (decompression
# bombs); a chest X-ray is at most ~4300x4300 (18 MP).
MAX_IMAGE_PIXELS = 50_000_000

# How a DICOM's grey scale is oriented: "header" follows Photometric
# Interpretation only (MONOCHROME1 inverted), as the standard says; "auto"
# does that, then inverts a projection radiograph whose content contradicts
# its header (see `looks_inverted`).
ORIENTATIONS = ("auto", "header")
# Modalities of projection radiographs: the content check knows chest films
# only. An absent Modality (many exports drop it) is checked too.
_RADIOGRAPH_MODALITIES = ("", "CR", "DX", "DR", "RG", "PX", "OT")
# Smaller images (icons, test patterns) are never judged by content.
_MIN_ORIENTATION_SIDE = 64
_ORIENTATION_GRID = 64

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8"
DICOM_MAGIC = b"DICM"
DICOM_MAGIC_OFFSET = 128

# Values of these tags identify a patient: never put them in a message or log.
_IDENTIFYING_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "PatientMotherBirthName",
    "OtherPatientIDs",
    "OtherPatientNames",
    "OtherPatientIDsSequence",
    "IssuerOfPatientID",
    "MedicalRecordLocator",
    "AccessionNumber",
    "StudyID",
    "InstitutionName",
    "InstitutionAddress",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
)
_MAX_REASON_CHARS = 300
_DECODING = threading.local()


class _QuietWhileDecoding(std_logging.Filter):
    """Drops pydicom's log records emitted while this thread decodes a file.

    pydicom logs invalid element values ("Invalid value for VR PN: ...");
    such a value may be a patient's name.
    """

    def filter(self, record):
        return not getattr(_DECODING, "depth", 0)


_QUIET_FILTER = _QuietWhileDecoding()


@contextlib.contextmanager
def _quiet_pydicom():
    """Silences pydicom's warnings and log records in this thread."""
    loggers = [std_logging.getLogger("pydicom")] + [
        std_logging.getLogger(name)
        for name in list(std_logging.Logger.manager.loggerDict)
        if name.startswith("pydicom.")
    ]
    for logger in loggers:
        if _QUIET_FILTER not in logger.filters:
            logger.addFilter(_QUIET_FILTER)
    _DECODING.depth = getattr(_DECODING, "depth", 0) + 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        _DECODING.depth -= 1


class ImageDecodeError(ValueError):
    """A file that is not a decodable PNG, JPEG or DICOM image.

    Attributes:
      source: the file name (or "<bytes>") the error is about.
      reason: why it could not be decoded.
    """

    def __init__(self, source, reason):
        self.source = source
        self.reason = reason
        super().__init__(f"Cannot decode image {source!r}: {reason}")


@dataclasses.dataclass(frozen=True)
class DecodeInfo:
    """What `decode_image_with_info` found besides the pixels.

    Attributes:
      format: "PNG", "JPEG" or "DICOM".
      photometric: the DICOM PhotometricInterpretation, else None.
      orientation_corrected: True when a DICOM's content contradicted its
        PhotometricInterpretation and the image was inverted to match the
        content (orientation="auto" only).
    """

    format: str
    photometric: str | None = None
    orientation_corrected: bool = False


def read_image(path, max_pixels=MAX_IMAGE_PIXELS, orientation="auto"):
    """Reads and decodes an image file; see `decode_image`.

    Args:
      path: path of a PNG, JPEG or DICOM file.
      max_pixels: images with more pixels are refused.
      orientation: "auto" or "header"; see `decode_image`.

    Returns:
      A 2-D `np.uint8` array (height, width).

    Raises:
      FileNotFoundError: the file does not exist.
      ImageDecodeError: the file is empty, truncated, corrupt or not an image.
    """
    return read_image_with_info(path, max_pixels, orientation)[0]


def read_image_with_info(path, max_pixels=MAX_IMAGE_PIXELS, orientation="auto"):
    """`read_image`, also returning a `DecodeInfo`; see `decode_image_with_info`."""
    path = pathlib.Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"Image file not found: {str(path)!r}") from None
    except IsADirectoryError:
        raise ImageDecodeError(str(path), "is a directory") from None
    return decode_image_with_info(
        data, name=str(path), max_pixels=max_pixels, orientation=orientation
    )


def decode_image(data, name="<bytes>", max_pixels=MAX_IMAGE_PIXELS, orientation="auto"):
    """Decodes PNG, JPEG or DICOM bytes to a 2-D uint8 grayscale image.

    The format is detected from the magic bytes (PNG `\\x89PNG`, JPEG
    `\\xff\\xd8`, DICOM `DICM` at offset 128); other bytes are tried as a
    DICOM data set without preamble and accepted only if they parse as one
    with pixel data.

    - PNG / JPEG: 8-bit grayscale is returned as is; RGB(A) with R=G=B (as
      NIH ships some images) gives that channel, other colour images their
      ITU-R 601 luma; alpha is ignored; palette images go through their
      palette; 16-bit and 32-bit images are min-max scaled to 0..255. JPEG
      EXIF orientation is applied.
    - DICOM: modality LUT (Rescale Slope/Intercept), then the VOI LUT if the
      file has one, else the first window (Window Center/Width, VOI LUT
      Function), else min-max scaling; MONOCHROME1 is inverted so that
      bone is bright. Multi-frame files give their first frame. Values of
      patient-identifying tags never appear in errors or logs.
    - With `orientation="auto"` a grayscale projection radiograph (Modality
      CR, DX, DR, RG, PX, OT or absent; at least 64x64) whose content, after
      the header was applied, is a frontal chest film's negative (lungs
      brighter than mediastinum and abdomen, see `looks_inverted`) is
      inverted back, with a warning naming the file: its
      PhotometricInterpretation is wrong. Films whose content is ambiguous
      keep the header's orientation. `"header"` follows the header only.

    Args:
      data: the file's bytes.
      name: the file name used in error messages.
      max_pixels: images with more pixels are refused before decoding.
      orientation: "auto" (the header, checked against the content) or
        "header" (the header only); PNG and JPEG are never inverted.

    Returns:
      A 2-D `np.uint8` array (height, width) at the file's resolution.

    Raises:
      ImageDecodeError: (a `ValueError`) empty, truncated, corrupt,
        oversized or unsupported data; the message names `name`.
      TypeError: `data` is not bytes-like.
      ValueError: `orientation` is not one of `ORIENTATIONS`.
    """
    return decode_image_with_info(data, name, max_pixels, orientation)[0]


def decode_image_with_info(
    data, name="<bytes>", max_pixels=MAX_IMAGE_PIXELS, orientation="auto"
):
    """`decode_image`, also returning what it found.

    Args:
      data: the file's bytes.
      name: the file name used in error messages.
      max_pixels: images with more pixels are refused before decoding.
      orientation: "auto" or "header"; see `decode_image`.

    Returns:
      `(pixels, info)`: the 2-D `np.uint8` image and a `DecodeInfo`.

    Raises:
      The errors of `decode_image`.
    """
    if orientation not in ORIENTATIONS:
        raise ValueError(
            f"`orientation` must be one of {ORIENTATIONS}. "
            f"Received: orientation={orientation!r}"
        )
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(
            f"`data` must be bytes. Received: data of type {type(data).__name__}"
        )
    data = bytes(data)
    if not data:
        raise ImageDecodeError(name, "the file is empty (0 bytes)")
    if data.startswith(PNG_MAGIC):
        return _decode_pillow(data, name, "PNG", max_pixels), DecodeInfo("PNG")
    if data.startswith(JPEG_MAGIC):
        return _decode_pillow(data, name, "JPEG", max_pixels), DecodeInfo("JPEG")
    force = data[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] != DICOM_MAGIC
    return _decode_dicom(data, name, max_pixels, force, orientation)


def orientation_cues(pixels):
    """Three measures of how much a frontal chest film looks like a positive.

    A chest film displayed as a positive (MONOCHROME2 convention) has dark
    lungs between a bright mediastinum and bright soft tissue, and a bright
    abdomen below them; its negative has all of that reversed. On a 64x64
    copy stretched to its 1st-99th percentiles (so text and borders weigh
    little), with the column profile the median of rows 30-65 %:

    1. mediastinum: the profile's mean over the central 10 % of the width
       minus its median over the lung columns (15-38 % and 62-85 %);
    2. shifted mediastinum: the same contrast around every centre from 40
       to 60 % of the width (patients are not always centred), the largest
       plus the smallest value;
    3. abdomen: the median of the lower 15 % (central half of the width)
       minus the median of the two lung fields.

    Each is positive for a positive film and changes sign when the image is
    inverted. On the 135 NIH sample films all three are never negative
    together, and all three are negative for 128 of their 135 negatives.

    Args:
      pixels: 2-D grayscale array, any numeric dtype.

    Returns:
      A float64 array of the three cues, in units of the stretched range
      (-1..1), or None when the image is smaller than 64x64 or flat.
    """
    pixels = np.asarray(pixels)
    if pixels.ndim != 2 or min(pixels.shape) < _MIN_ORIENTATION_SIDE:
        return None
    n = _ORIENTATION_GRID
    small = np.asarray(
        Image.fromarray(pixels.astype(np.float32)).resize((n, n), Image.BILINEAR),
        dtype=np.float64,
    )
    low, high = np.percentile(small, [1, 99])
    if not high > low:
        return None
    small = np.clip((small - low) / (high - low), 0.0, 1.0)

    def at(fraction):
        return int(n * fraction)

    profile = np.median(small[at(0.30) : at(0.65)], axis=0)
    lung_columns = np.concatenate(
        [profile[at(0.15) : at(0.38)], profile[at(0.62) : at(0.85)]]
    )
    mediastinum = profile[at(0.45) : at(0.55)].mean() - np.median(lung_columns)

    half, near, far = at(0.05), at(0.10), at(0.33)
    shifted = [
        profile[k - half : k + half + 1].mean()
        - 0.5
        * (
            np.median(profile[max(0, k - far) : k - near])
            + np.median(profile[k + near : min(n, k + far)])
        )
        for k in range(at(0.40), at(0.60) + 1)
    ]
    shifted_mediastinum = max(shifted) + min(shifted)

    lung_fields = np.concatenate(
        [
            small[at(0.30) : at(0.60), at(0.15) : at(0.40)].ravel(),
            small[at(0.30) : at(0.60), at(0.60) : at(0.85)].ravel(),
        ]
    )
    abdomen = np.median(small[at(0.85) :, at(0.25) : at(0.75)]) - np.median(lung_fields)
    return np.array([mediastinum, shifted_mediastinum, abdomen], np.float64)


def looks_inverted(pixels):
    """True when a frontal chest film is displayed as its negative.

    All three `orientation_cues` must say so (be negative); one cue alone
    misjudges a few real films (a patient off centre, a small abdomen), the
    three together none of the 135 NIH sample films.

    Args:
      pixels: 2-D grayscale array.

    Returns:
      bool; False when the image is too small or flat to judge.
    """
    cues = orientation_cues(pixels)
    return cues is not None and bool((cues < 0).all())


def _short(error):
    text = f"{type(error).__name__}: {error}"
    if len(text) > _MAX_REASON_CHARS:
        text = text[: _MAX_REASON_CHARS - 3] + "..."
    return text


def _decode_pillow(data, name, image_format, max_pixels):
    """Decodes PNG or JPEG with Pillow (truncated images stay errors)."""
    try:
        with warnings.catch_warnings():
            # Our own (lower) pixel cap applies; Pillow's bomb warning is noise.
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data), formats=[image_format])
            width, height = image.size
            if width <= 0 or height <= 0:
                raise ImageDecodeError(name, f"invalid size {width}x{height}")
            if width * height > max_pixels:
                raise ImageDecodeError(
                    name,
                    f"{width}x{height} pixels is more than max_pixels="
                    f"{max_pixels} (refused as a possible decompression bomb)",
                )
            if image_format == "PNG":
                # verify() checks every chunk CRC, IDAT included, which load()
                # does not; it needs its own fresh image object.
                Image.open(io.BytesIO(data), formats=["PNG"]).verify()
            image.load()
            if image_format == "JPEG":
                image = ImageOps.exif_transpose(image)
            return _pillow_to_gray(image, name)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError:
        raise ImageDecodeError(
            name, f"more than max_pixels={max_pixels} (decompression bomb)"
        ) from None
    except Exception as e:  # pylint: disable=broad-except
        # Pillow signals corrupt data with OSError, SyntaxError, ValueError,
        # zlib/struct errors, ...: all mean "not decodable" here.
        raise ImageDecodeError(
            name, f"corrupt or truncated {image_format} ({_short(e)})"
        ) from e


def _pillow_to_gray(image, name):
    """Converts a loaded Pillow image to 2-D uint8."""
    mode = image.mode
    if mode == "L":
        return np.array(image, dtype=np.uint8)
    if mode in ("1",):
        return np.array(image.convert("L"), dtype=np.uint8)
    if mode in ("LA", "La"):
        return np.array(image, dtype=np.uint8)[..., 0].copy()
    if mode in ("P", "PA"):
        image = image.convert("RGB")
        mode = "RGB"
    if mode in ("RGB", "RGBA", "RGBX", "RGBa"):
        rgb = np.asarray(image, dtype=np.uint8)[..., :3]
        red = rgb[..., 0]
        if np.array_equal(red, rgb[..., 1]) and np.array_equal(red, rgb[..., 2]):
            return red.copy()
        return np.array(image.convert("RGB").convert("L"), dtype=np.uint8)
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _min_max(np.asarray(image))
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return np.array(image.convert("RGB").convert("L"), dtype=np.uint8)
    raise ImageDecodeError(name, f"unsupported image mode {mode!r}")


def _min_max(arr):
    """Scales an array linearly so its min and max become 0 and 255."""
    arr = np.asarray(arr, dtype=np.float64)
    finite = np.isfinite(arr)
    if not finite.any():
        return np.zeros(arr.shape, dtype=np.uint8)
    low = float(arr[finite].min())
    high = float(arr[finite].max())
    if high <= low:
        return np.zeros(arr.shape, dtype=np.uint8)
    scaled = (np.where(finite, arr, low) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _identifying_strings(ds):
    """Returns the values of identifying tags, to be scrubbed from messages."""
    values = []
    for keyword in _IDENTIFYING_KEYWORDS:
        try:
            tag = pydicom.datadict.tag_for_keyword(keyword)
            if tag is None or tag not in ds:
                continue
            raw = ds.get_item(tag).value
            for value in (raw, ds[tag].value):
                if isinstance(value, bytes):
                    value = value.decode("latin-1", "replace")
                for part in (
                    str(value),
                    *str(value).split("^"),
                    *str(value).split("\\"),
                ):
                    part = part.strip(" \x00")
                    if len(part) >= 2:
                        values.append(part)
        except Exception:  # pylint: disable=broad-except
            continue
    return sorted(set(values), key=len, reverse=True)


def _scrubbed(error, ds):
    text = _short(error)
    if ds is not None:
        for value in _identifying_strings(ds):
            text = text.replace(value, "<redacted>")
    return text


def _decode_dicom(data, name, max_pixels, force, orientation):
    """Decodes DICOM pixel data; `force` reads files without preamble."""
    # pydicom warns and logs with element values (possibly a patient's name),
    # also while the error message is scrubbed: all of it runs quietly.
    with _quiet_pydicom():
        ds = None
        try:
            try:
                ds = pydicom.dcmread(io.BytesIO(data), force=force)
            except Exception as e:  # pylint: disable=broad-except
                if force:
                    raise ImageDecodeError(
                        name, "not a PNG, JPEG or DICOM image"
                    ) from None
                raise ImageDecodeError(
                    name, f"unreadable DICOM header ({_scrubbed(e, None)})"
                ) from None
            if "PixelData" not in ds:
                if force:
                    raise ImageDecodeError(name, "not a PNG, JPEG or DICOM image")
                raise ImageDecodeError(
                    name, "DICOM file has no pixel data (or is truncated before it)"
                )
            return _dicom_to_gray(ds, name, max_pixels, orientation)
        except ImageDecodeError:
            raise
        except Exception as e:  # pylint: disable=broad-except
            reason = _scrubbed(e, ds)
        # Raised outside the handler: the original exception (whose message
        # may carry tag values) is neither chained nor shown as context.
        raise ImageDecodeError(name, f"cannot decode DICOM pixel data ({reason})")


def _dicom_int(ds, keyword, default=None):
    value = ds.get(keyword, default)
    if value is None or value == "":
        return default
    return int(value)


def _dicom_to_gray(ds, name, max_pixels, orientation):
    if not getattr(ds, "file_meta", None) or "TransferSyntaxUID" not in ds.file_meta:
        # Files without preamble/meta header: the encoding pydicom detected.
        implicit, little = ds.original_encoding
        if implicit:
            syntax = dicom_uid.ImplicitVRLittleEndian
        elif little:
            syntax = dicom_uid.ExplicitVRLittleEndian
        else:
            syntax = dicom_uid.ExplicitVRBigEndian
        if getattr(ds, "file_meta", None) is None:
            ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = syntax
    rows = _dicom_int(ds, "Rows", 0)
    cols = _dicom_int(ds, "Columns", 0)
    frames = _dicom_int(ds, "NumberOfFrames", 1)
    samples = _dicom_int(ds, "SamplesPerPixel", 1)
    if rows <= 0 or cols <= 0 or frames <= 0 or samples not in (1, 3):
        raise ImageDecodeError(
            name,
            f"invalid DICOM image geometry rows={rows}, columns={cols}, "
            f"frames={frames}, samples_per_pixel={samples}",
        )
    if rows * cols * frames > max_pixels:
        raise ImageDecodeError(
            name,
            f"{frames} frame(s) of {cols}x{rows} pixels is more than "
            f"max_pixels={max_pixels} (refused as a possible decompression bomb)",
        )
    if frames > 1:
        arr = pydicom.pixels.pixel_array(ds, index=0)
    else:
        arr = ds.pixel_array
    if samples == 3:
        # Colour DICOMs are rare for X-ray; pydicom gives RGB, we take luma.
        arr = np.asarray(arr, dtype=np.float64)
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise ImageDecodeError(name, f"unexpected colour array shape {arr.shape}")
        gray = _min_max(arr @ np.array([0.299, 0.587, 0.114]))
        return gray, DecodeInfo("DICOM", photometric=_photometric(ds))
    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise ImageDecodeError(name, f"unexpected pixel array shape {arr.shape}")
    photometric = _photometric(ds) or "MONOCHROME2"
    values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    if not np.isfinite(values).all():
        # e.g. a Rescale Slope of "nan" or "inf" in the header.
        raise ImageDecodeError(
            name, "the modality LUT / rescale gives non-finite values"
        )
    out = _apply_voi(values, ds, name)
    if photometric == "MONOCHROME1":
        out = 255 - out
    corrected = False
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if (
        orientation == "auto"
        and modality in _RADIOGRAPH_MODALITIES
        and looks_inverted(out)
    ):
        out = 255 - out
        corrected = True
        logging.warning(
            "%s: the image content is a chest film's negative (lungs brighter "
            "than mediastinum and abdomen) under PhotometricInterpretation %s; "
            "the header is taken to be wrong and the image is inverted. "
            "orientation='header' follows the header only.",
            name,
            photometric,
        )
    return out, DecodeInfo(
        "DICOM", photometric=photometric, orientation_corrected=corrected
    )


def _photometric(ds):
    value = ds.get("PhotometricInterpretation")
    return str(value).strip() if value else None


def _apply_voi(values, ds, name):
    """VOI LUT, else window, else min-max: modality values -> uint8."""
    if ds.get("VOILUTSequence"):
        try:
            descriptor = ds.VOILUTSequence[0].LUTDescriptor
            n_entries = int(descriptor[0]) or 65536
            first = int(descriptor[1])
            mapped = np.asarray(apply_voi(values, ds, index=0), dtype=np.float64)
            # Scale by the values the LUT really holds: descriptors often
            # claim more output bits than are used.
            lut = np.asarray(
                apply_voi(np.arange(first, first + n_entries), ds, index=0),
                dtype=np.float64,
            )
            low, high = float(lut.min()), float(lut.max())
            if high > low:
                scaled = (mapped - low) * (255.0 / (high - low))
                return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        except Exception as e:  # pylint: disable=broad-except
            logging.warning(
                "%s: unusable VOI LUT (%s); using the window or min-max.",
                name,
                type(e).__name__,
            )
    window = _window(ds)
    if window is not None:
        center, width, function = window
        if function == "SIGMOID":
            unit = 1.0 / (
                1.0 + np.exp(np.clip(-4.0 * (values - center) / width, -700, 700))
            )
        elif function == "LINEAR_EXACT":
            unit = (values - center) / width + 0.5
        else:
            # PS3.3 C.11.2.1.2.1 (LINEAR).
            unit = (values - (center - 0.5)) / (width - 1.0) + 0.5
        return np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)
    return _min_max(values)


def _window(ds):
    """Returns (center, width, function) of the first valid window, or None."""
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    try:
        center = ds.WindowCenter
        width = ds.WindowWidth
        center = float(
            center[0]
            if isinstance(center, (list, tuple, pydicom.multival.MultiValue))
            else center
        )
        width = float(
            width[0]
            if isinstance(width, (list, tuple, pydicom.multival.MultiValue))
            else width
        )
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    except Exception:  # pylint: disable=broad-except
        return None
    if not (np.isfinite(center) and np.isfinite(width)):
        return None
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        function = "LINEAR"
    if (function == "LINEAR" and width <= 1.0) or width <= 0.0:
        return None
    return center, width, function
