"""Tests for cxr_tf.data.images: the real NIH PNGs and DICOMs, formats, bad files."""

import csv
import io
import logging
import struct
import warnings
import zlib

import numpy as np
from PIL import Image
from PIL import ImageFile
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.uid import SecondaryCaptureImageStorage
from pydicom.uid import generate_uid
import pytest

from cxr_tf.data import images
from cxr_tf.data.images import ImageDecodeError
from cxr_tf.data.images import decode_image
from cxr_tf.data.images import read_image

SIIM = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
SIIM_MONO1 = "Fake_MONOHR1.dcm"
CR_MONO1 = "CR-MONO1-10-chest.dcm"
SECRET_NAME = "Doe^Secretname"
SECRET_ID = "PHI-998877"


def make_dicom(arr, photometric="MONOCHROME2", bits_stored=None, preamble=True, **el):
    """Serialises `arr` as a small uncompressed DICOM (test fixture)."""
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = SECRET_NAME
    ds.PatientID = SECRET_ID
    ds.set_pixel_data(
        arr,
        photometric_interpretation=photometric,
        bits_stored=bits_stored or arr.dtype.itemsize * 8,
    )
    for keyword, value in el.items():
        setattr(ds, keyword, value)
    buf = io.BytesIO()
    if preamble:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(buf, enforce_file_format=True)
    else:
        del ds.file_meta
        pydicom.dcmwrite(buf, ds, implicit_vr=True, little_endian=True)
    return buf.getvalue()


def encode(array_or_image, fmt="PNG", **kwargs):
    image = (
        array_or_image
        if isinstance(array_or_image, Image.Image)
        else Image.fromarray(array_or_image)
    )
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="module")
def sample_pngs(cxr14_sample):
    paths = sorted((cxr14_sample / "images").glob("*.png"))
    with open(cxr14_sample / "SOURCES.csv", newline="") as f:
        modes = {
            row["file"].split("/")[-1]: row["mode"]
            for row in csv.DictReader(f)
            if row["file"].startswith("images/")
        }
    return paths, modes


@pytest.fixture(scope="module")
def dicoms(cxr14_sample):
    folder = cxr14_sample / "dicom"
    return {name: read_image(folder / name) for name in (SIIM, SIIM_MONO1, CR_MONO1)}


def test_pillow_truncated_images_stay_errors():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# --- the real sample ------------------------------------------------------------


def test_all_sample_pngs_decode(sample_pngs):
    paths, modes = sample_pngs
    assert len(paths) == 135
    rgba = 0
    for path in paths:
        image = read_image(path)
        assert image.shape == (1024, 1024) and image.dtype == np.uint8, path
        with Image.open(path) as reference:
            assert reference.mode == modes[path.name]
            ref = np.asarray(reference)
        if reference.mode == "RGBA":
            rgba += 1
            # NIH RGBA: R=G=B, alpha 255; the gray image is the R channel.
            assert (ref[..., 3] == 255).all()
            np.testing.assert_array_equal(image, ref[..., 0])
        else:
            assert reference.mode == "L"
            np.testing.assert_array_equal(image, ref)
    assert rgba == 9


def _lung_and_spine(image):
    """Mean of two central lung windows and of the central (spine) column."""
    h, w = image.shape
    rows = slice(h // 3, 2 * h // 3)
    lungs = np.concatenate(
        [
            image[rows, w // 5 : 2 * w // 5].ravel(),
            image[rows, 3 * w // 5 : 4 * w // 5].ravel(),
        ]
    )
    spine = image[rows, int(w * 0.45) : int(w * 0.55)]
    return float(lungs.mean()), float(spine.mean())


@pytest.mark.parametrize("name", [SIIM, SIIM_MONO1, CR_MONO1])
def test_dicoms_are_oriented_lungs_dark_bones_bright(dicoms, name):
    image = dicoms[name]
    assert image.ndim == 2 and image.dtype == np.uint8
    lungs, spine = _lung_and_spine(image)
    assert lungs + 40 < spine, (lungs, spine)


def test_siim_dicom_is_jpeg_decoded_with_installed_packages(cxr14_sample, dicoms):
    ds = pydicom.dcmread(cxr14_sample / "dicom" / SIIM)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.JPEGBaseline8Bit
    image = dicoms[SIIM]
    assert image.shape == (1024, 1024)
    # 8-bit, no window: min-max scaling of the stored values 0..254.
    stored = ds.pixel_array.astype(np.float64)
    expected = np.rint((stored - stored.min()) * 255 / (stored.max() - stored.min()))
    np.testing.assert_array_equal(image, expected.astype(np.uint8))


def test_mislabelled_monochrome1_copy_is_caught_by_its_content(
    cxr14_sample, dicoms, caplog
):
    # Fake_MONOHR1 holds the SIIM file's pixel data byte for byte with only
    # PhotometricInterpretation changed to MONOCHROME1: the header is wrong.
    folder = cxr14_sample / "dicom"
    assert (folder / SIIM_MONO1).read_bytes() != (folder / SIIM).read_bytes()
    fake = pydicom.dcmread(folder / SIIM_MONO1)
    real = pydicom.dcmread(folder / SIIM)
    assert fake.PhotometricInterpretation == "MONOCHROME1"
    assert real.PhotometricInterpretation == "MONOCHROME2"
    assert fake.PixelData == real.PixelData
    original = dicoms[SIIM]

    # Read as the header says, it is the negative: the header flip is applied...
    header_only = read_image(folder / SIIM_MONO1, orientation="header")
    np.testing.assert_array_equal(header_only, 255 - original)
    lungs, spine = _lung_and_spine(header_only)
    assert lungs > spine
    assert images.looks_inverted(header_only)

    # ... and "auto" (the default) sees a negative chest film, inverts it back
    # and says so, naming the file.
    with caplog.at_level(logging.WARNING):
        auto, info = images.read_image_with_info(folder / SIIM_MONO1)
    np.testing.assert_array_equal(auto, original)
    np.testing.assert_array_equal(dicoms[SIIM_MONO1], original)
    assert info == images.DecodeInfo(
        "DICOM", photometric="MONOCHROME1", orientation_corrected=True
    )
    assert any(
        SIIM_MONO1 in r.getMessage() and "MONOCHROME1" in r.getMessage()
        for r in caplog.records
    )


@pytest.mark.parametrize("name", [SIIM, CR_MONO1])
def test_dicoms_with_a_right_header_are_not_touched(cxr14_sample, dicoms, name):
    path = cxr14_sample / "dicom" / name
    auto, info = images.read_image_with_info(path)
    assert not info.orientation_corrected
    np.testing.assert_array_equal(auto, read_image(path, orientation="header"))
    assert not images.looks_inverted(auto)


def test_orientation_cues_on_the_real_films(sample_pngs):
    # The content check must never invert a correctly displayed film: on all
    # 135 NIH films no cue set says "negative", while most negatives are seen.
    paths, _ = sample_pngs
    false_flips, caught = [], 0
    for path in paths:
        image = read_image(path)
        cues = images.orientation_cues(image)
        assert cues.shape == (3,)
        np.testing.assert_allclose(
            images.orientation_cues(255 - image), -cues, atol=1e-6
        )
        if images.looks_inverted(image):
            false_flips.append(path.name)
        caught += images.looks_inverted(255 - image)
    assert false_flips == []
    assert caught >= 125, caught


def _film_dicom(pixels, photometric, **el):
    return make_dicom(pixels, photometric=photometric, bits_stored=8, **el)


@pytest.fixture(scope="module")
def small_film(sample_pngs):
    paths, _ = sample_pngs
    image = Image.fromarray(read_image(paths[0])).resize((256, 256), Image.BILINEAR)
    # Spanning 0..255, so a DICOM of it without window decodes to it exactly.
    return images._min_max(np.asarray(image))  # pylint: disable=protected-access


def test_wrong_monochrome2_header_is_caught_too(small_film):
    # A negative stored under MONOCHROME2 (the other way a header goes wrong).
    data = _film_dicom(255 - small_film, "MONOCHROME2", Modality="DX")
    pixels, info = images.decode_image_with_info(data, "neg.dcm")
    assert info.orientation_corrected and info.photometric == "MONOCHROME2"
    np.testing.assert_array_equal(pixels, small_film)
    np.testing.assert_array_equal(
        decode_image(data, orientation="header"), 255 - small_film
    )
    # A right header stays as it is under both modes.
    right = _film_dicom(255 - small_film, "MONOCHROME1", Modality="CR")
    for mode in images.ORIENTATIONS:
        pixels, info = images.decode_image_with_info(right, orientation=mode)
        assert not info.orientation_corrected
        np.testing.assert_array_equal(pixels, small_film)


def test_content_check_only_for_large_radiographs(small_film):
    negative = 255 - small_film
    # Not a projection radiograph: the chest-film check does not apply.
    ct = _film_dicom(negative, "MONOCHROME2", Modality="CT")
    np.testing.assert_array_equal(decode_image(ct), negative)
    # Too small to judge.
    tiny = images._min_max(negative[::8, ::8])  # pylint: disable=protected-access
    assert images.orientation_cues(tiny) is None
    np.testing.assert_array_equal(decode_image(_film_dicom(tiny, "MONOCHROME2")), tiny)
    # Flat images have no cues either.
    assert images.orientation_cues(np.full((100, 100), 7, np.uint8)) is None
    # PNG and JPEG carry no orientation claim: never inverted.
    pixels, info = images.decode_image_with_info(encode(negative))
    assert info == images.DecodeInfo("PNG")
    np.testing.assert_array_equal(pixels, negative)


def test_orientation_argument_is_validated(small_film):
    with pytest.raises(ValueError, match="`orientation` must be one of"):
        decode_image(encode(small_film), orientation="content")


def test_cr_mono1_without_preamble_window_and_inversion(cxr14_sample, dicoms):
    path = cxr14_sample / "dicom" / CR_MONO1
    with pytest.raises(pydicom.errors.InvalidDicomError):
        pydicom.dcmread(path)
    ds = pydicom.dcmread(path, force=True)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    assert (ds.BitsStored, float(ds.WindowCenter), float(ds.WindowWidth)) == (
        10,
        550.0,
        1024.0,
    )
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    stored = ds.pixel_array.astype(np.float64)
    # PS3.3 C.11.2.1.2.1 LINEAR window, then MONOCHROME1 inverted.
    unit = np.clip((stored - (550 - 0.5)) / (1024 - 1) + 0.5, 0, 1)
    expected = 255 - np.clip(np.rint(unit * 255), 0, 255)
    np.testing.assert_array_equal(dicoms[CR_MONO1], expected.astype(np.uint8))


# --- formats ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def gray():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(48, 64), dtype=np.uint8)


def test_png_modes(gray):
    np.testing.assert_array_equal(decode_image(encode(gray)), gray)
    rgb = np.stack([gray] * 3, axis=-1)
    np.testing.assert_array_equal(decode_image(encode(rgb)), gray)
    la = Image.merge("LA", [Image.fromarray(gray), Image.fromarray(255 - gray)])
    np.testing.assert_array_equal(decode_image(encode(la)), gray)
    palette = Image.fromarray(gray).convert("P")
    expected = np.asarray(palette.convert("L"))
    np.testing.assert_array_equal(decode_image(encode(palette)), expected)
    bilevel = Image.fromarray(gray).convert("1")
    assert set(np.unique(decode_image(encode(bilevel)))) <= {0, 255}
    # A real colour image gives its ITU-R 601 luma.
    colour = gray[..., None] * np.array([1, 0, 0], np.uint8) + np.uint8(20)
    luma = np.asarray(Image.fromarray(colour).convert("L"))
    np.testing.assert_array_equal(decode_image(encode(colour)), luma)


def test_png_16_bit_is_min_max_scaled():
    arr = (np.arange(40 * 50).reshape(40, 50) * 7 + 1000).astype(np.uint16)
    data = encode(arr)
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    expected = np.rint((arr - 1000.0) * 255 / (arr.max() - 1000.0)).astype(np.uint8)
    np.testing.assert_array_equal(decode_image(data), expected)
    flat = np.full((8, 8), 4000, np.uint16)
    np.testing.assert_array_equal(
        decode_image(encode(flat)), np.zeros((8, 8), np.uint8)
    )


def test_jpeg(gray):
    smooth = np.tile(np.linspace(0, 255, 64), (48, 1)).astype(np.uint8)
    out = decode_image(encode(smooth, "JPEG", quality=95))
    assert out.shape == (48, 64) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - smooth).max() <= 8
    colour = encode(np.stack([smooth] * 3, axis=-1), "JPEG", quality=95)
    assert np.abs(decode_image(colour).astype(int) - smooth).max() <= 8


def test_dicom_rescale_and_window():
    stored = (np.arange(32 * 32).reshape(32, 32) * 3).astype(np.uint16)
    data = make_dicom(
        stored,
        bits_stored=12,
        RescaleSlope=2,
        RescaleIntercept=-100,
        WindowCenter=1500,
        WindowWidth=1001,
    )
    values = stored * 2.0 - 100
    unit = np.clip((values - 1499.5) / 1000 + 0.5, 0, 1)
    np.testing.assert_array_equal(
        decode_image(data), np.rint(unit * 255).astype(np.uint8)
    )


def test_dicom_signed_monochrome1_without_window_is_min_max_inverted():
    stored = np.linspace(-500, 1500, 24 * 16).reshape(24, 16).astype(np.int16)
    data = make_dicom(stored, photometric="MONOCHROME1", bits_stored=12)
    expected = np.rint((stored + 500.0) * 255 / 2000.0).astype(np.uint8)
    np.testing.assert_array_equal(decode_image(data), 255 - expected)


def test_dicom_voi_lut_sequence():
    stored = (np.arange(16 * 16).reshape(16, 16) % 256).astype(np.uint16)
    lut = Dataset()
    lut.LUTDescriptor = [256, 0, 16]
    # A made-up LUT using 0..1023 of its 16 declared bits, reversed.
    lut.add_new(0x00283006, "US", [int(v) for v in np.linspace(1023, 0, 256).round()])
    data = make_dicom(stored, bits_stored=8, VOILUTSequence=[lut])
    out = decode_image(data)
    expected = np.rint(np.linspace(1023, 0, 256).round()[stored] * 255 / 1023)
    np.testing.assert_array_equal(out, expected.astype(np.uint8))


def test_dicom_without_preamble_and_multiframe():
    stored = (np.arange(20 * 30).reshape(20, 30) % 1024).astype(np.uint16)
    plain = decode_image(make_dicom(stored, bits_stored=10))
    no_preamble = make_dicom(stored, bits_stored=10, preamble=False)
    assert no_preamble[128:132] != b"DICM"
    np.testing.assert_array_equal(decode_image(no_preamble), plain)
    frames = np.stack([stored, stored[::-1]])
    np.testing.assert_array_equal(
        decode_image(make_dicom(frames, bits_stored=10)), plain
    )


def test_dicom_non_finite_rescale_is_an_error():
    stored = np.full((4, 4), 3, np.uint16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns while writing "nan"
        data = make_dicom(
            stored, bits_stored=12, RescaleSlope="nan", RescaleIntercept=0
        )
    with pytest.raises(ImageDecodeError, match="non-finite"):
        decode_image(data, "nan.dcm")


# --- errors -------------------------------------------------------------------------


def _png_with_size(width, height):
    """A PNG whose IHDR claims width x height (the data is tiny)."""

    def chunk(kind, body):
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 100)
    return (
        images.PNG_MAGIC
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def bad_files(tmp_path, gray, cxr14_sample):
    png = encode(gray)
    jpeg = encode(gray, "JPEG")
    dicom = (cxr14_sample / "dicom" / CR_MONO1).read_bytes()
    siim = (cxr14_sample / "dicom" / SIIM).read_bytes()
    flipped = bytearray(png)
    flipped[len(png) // 2] ^= 0xFF  # inside IDAT: only the CRC check sees it
    contents = {
        "zero.png": b"",
        "truncated.png": png[: len(png) // 2],
        "no_iend.png": png[:-12],
        "crc.png": bytes(flipped),
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "header_only.jpg": jpeg[:20],
        "truncated.dcm": dicom[: len(dicom) // 2],
        "truncated_siim.dcm": siim[: len(siim) // 2],
        "notes.txt": b"Patient notes, not an image\n" * 20,
        "random.bin": np.random.default_rng(1).bytes(4096),
        "image.gif": encode(gray, "GIF"),
        "bomb.png": _png_with_size(60_000, 60_000),
    }
    paths = {}
    for name, data in contents.items():
        paths[name] = tmp_path / name
        paths[name].write_bytes(data)
    return paths


@pytest.mark.parametrize(
    "name, reason",
    [
        ("zero.png", "empty"),
        ("truncated.png", "truncated PNG"),
        ("no_iend.png", "truncated PNG"),
        ("crc.png", "truncated PNG"),
        ("truncated.jpg", "truncated JPEG"),
        ("header_only.jpg", "truncated JPEG"),
        ("truncated.dcm", "cannot decode DICOM pixel data"),
        ("truncated_siim.dcm", "no pixel data"),
        ("notes.txt", "not a PNG, JPEG or DICOM"),
        ("random.bin", "not a PNG, JPEG or DICOM"),
        ("image.gif", "not a PNG, JPEG or DICOM"),
        ("bomb.png", "max_pixels=50000000"),
    ],
)
def test_bad_files_raise_image_decode_error(bad_files, name, reason):
    path = bad_files[name]
    with pytest.raises(ImageDecodeError, match=reason) as info:
        read_image(path)
    assert str(path) in str(info.value)
    assert info.value.source == str(path)
    assert isinstance(info.value, ValueError)


def test_missing_file_and_wrong_type(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ImageDecodeError, match="is a directory"):
        read_image(tmp_path)
    with pytest.raises(TypeError, match="`data` must be bytes"):
        decode_image("not bytes")


def test_max_pixels(gray):
    with pytest.raises(ImageDecodeError, match="max_pixels=1000"):
        decode_image(encode(gray), "small.png", max_pixels=1000)
    big = make_dicom(
        np.zeros((8, 8), np.uint16), bits_stored=12, Rows=60_000, Columns=60_000
    )
    with pytest.raises(ImageDecodeError, match="60000x60000 pixels is more than"):
        decode_image(big, "big.dcm")


def test_identifying_dicom_tags_never_in_errors_or_logs(caplog):
    stored = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32)
    data = make_dicom(stored, bits_stored=12, NumberOfFrames="1234567890")
    # The patient id planted where decoding reads it: pydicom logs the bad
    # IS value and int() puts it in its exception message.
    data = data.replace(b"1234567890", SECRET_ID.encode())
    truncated = make_dicom(stored, bits_stored=12)[:-7]
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        messages = []
        for blob in (data, truncated):
            with pytest.raises(ImageDecodeError) as info:
                decode_image(blob, "phi.dcm")
            message = str(info.value)
            messages.append(message)
            assert "phi.dcm" in message and "cannot decode DICOM" in message
            for secret in (SECRET_ID, "Secretname", "Doe"):
                assert secret not in message
            assert info.value.__cause__ is None
            assert info.value.__context__ is None or info.value.__suppress_context__
    assert "<redacted>" in messages[0]
    assert "less than expected" in messages[1]
    texts = [r.getMessage() for r in caplog.records] + [str(w.message) for w in caught]
    assert not [t for t in texts if "Secretname" in t or SECRET_ID in t]
    # Without the guard pydicom itself would have logged the value.
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _ = pydicom.dcmread(io.BytesIO(data)).NumberOfFrames
    assert any(SECRET_ID in r.getMessage() for r in caplog.records)


def test_orientation_check_on_synthetic_films():
    # Films the check's regions were not chosen on (PA and AP, all findings).
    from cxr_tf.data import synthetic  # pylint: disable=import-outside-toplevel

    specs = synthetic.sample_specs(25, seed=11, image_size=128)
    for spec in specs:
        film, _ = synthetic.render_film(spec, 128)
        assert not images.looks_inverted(film), spec.image_id
        assert images.looks_inverted(255 - film), spec.image_id
