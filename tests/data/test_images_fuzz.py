"""Fuzz test: random and mutated PNG, JPEG and DICOM bytes never crash decode_image."""

import contextlib
import datetime
import io
import signal
import warnings

from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import numpy as np
from PIL import Image
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.uid import JPEGBaseline8Bit
from pydicom.uid import SecondaryCaptureImageStorage
from pydicom.uid import generate_uid
import pytest

from cxr_tf.data import images
from cxr_tf.data.images import ImageDecodeError
from cxr_tf.data.images import decode_image

# A decode that takes longer than this is a hang (seeds decode in ~1 ms).
HANG_SECONDS = 10
FAST = dict(
    max_examples=150,
    # Generous: the test machine is shared; real hangs are caught by _alarm.
    deadline=datetime.timedelta(seconds=3),
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SLOW = dict(FAST, max_examples=3000, derandomize=False)


def _encode(image, fmt, **kwargs):
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _gradient(height=24, width=32):
    rows = np.linspace(0, 255, height)[:, None]
    cols = np.linspace(0, 255, width)[None, :]
    return ((rows + cols) / 2).astype(np.uint8)


def _dicom(arr, photometric="MONOCHROME2", bits_stored=None, preamble=True, **el):
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
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


def _jpeg_dicom(gray):
    """An 8-bit JPEG-baseline DICOM (like the SIIM files), built by hand."""
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = gray.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = encapsulate([_encode(Image.fromarray(gray), "JPEG")])
    ds["PixelData"].VR = "OB"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _seeds():
    gray = _gradient()
    stored = (gray.astype(np.uint16) * 16).astype(np.uint16)
    png = [
        _encode(Image.fromarray(gray), "PNG"),
        _encode(Image.fromarray(stored * 4), "PNG"),
        _encode(Image.fromarray(np.stack([gray] * 3 + [gray * 0 + 255], -1)), "PNG"),
        _encode(Image.fromarray(gray).convert("P"), "PNG"),
    ]
    jpeg = [
        _encode(Image.fromarray(gray), "JPEG"),
        _encode(Image.fromarray(np.stack([gray] * 3, -1)), "JPEG", quality=50),
    ]
    dicom = [
        _dicom(stored, bits_stored=12, WindowCenter=2000, WindowWidth=3000),
        _dicom(stored, "MONOCHROME1", bits_stored=12, preamble=False),
        _dicom(stored, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1024),
        _jpeg_dicom(gray),
    ]
    for group in (png, jpeg, dicom):
        for seed in group:
            decode_image(seed)  # the seeds themselves are valid
    return {"png": png, "jpeg": jpeg, "dicom": dicom}


SEEDS = _seeds()


@st.composite
def mutated(draw, fmt):
    """A seed file of `fmt` with 1-6 random byte-level mutations."""
    data = bytearray(draw(st.sampled_from(SEEDS[fmt])))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(
            st.sampled_from(["flip", "set", "truncate", "insert", "delete", "dup"])
        )
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            # Extreme values hit sizes and lengths (0, 0xFF, 0x7F...).
            data[pos] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, 0xFE]))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        elif op == "dup":
            chunk = data[pos : pos + draw(st.integers(1, 256))]
            data[pos:pos] = chunk
    return bytes(data)


random_bytes = st.one_of(
    st.binary(max_size=4096),
    st.tuples(
        st.sampled_from(
            [
                images.PNG_MAGIC,
                images.JPEG_MAGIC,
                b"\x00" * 128 + images.DICOM_MAGIC,
                b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100",  # a no-preamble element
            ]
        ),
        st.binary(max_size=4096),
    ).map(lambda parts: parts[0] + parts[1]),
)


@contextlib.contextmanager
def _alarm(seconds):
    """Turns a hang into a test failure (SIGALRM; main thread only)."""

    def on_alarm(signum, frame):
        raise TimeoutError(f"decode_image hung for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _check(data):
    with _alarm(HANG_SECONDS), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = decode_image(data, "fuzz.bin")
        except ImageDecodeError as e:
            assert "fuzz.bin" in str(e)
            out = None
    # pydicom's warnings quote element values: none may leak out.
    assert not caught, [str(w.message) for w in caught]
    if out is None:
        return
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.uint8 and out.ndim == 2 and out.size > 0


@pytest.mark.parametrize("fmt", ["png", "jpeg", "dicom"])
def test_mutated_files(fmt):
    @settings(**FAST)
    @given(mutated(fmt))
    def run(data):
        _check(data)

    run()


@settings(**FAST)
@given(random_bytes)
def test_random_bytes(data):
    _check(data)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["png", "jpeg", "dicom"])
def test_mutated_files_long(fmt):
    @settings(**SLOW)
    @given(mutated(fmt))
    def run(data):
        _check(data)

    run()


@pytest.mark.slow
@settings(**SLOW)
@given(random_bytes)
def test_random_bytes_long(data):
    _check(data)
