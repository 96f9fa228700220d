"""Test-wide settings: quiet TensorFlow, a path to ../shared or a clear skip."""

import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pytest  # pylint: disable=g-import-not-at-top

SHARED_DIR = pathlib.Path(__file__).resolve().parent.parent / "shared"
SAMPLE_DIR = SHARED_DIR / "cxr14_sample"


@pytest.fixture(scope="session")
def cxr14_sample():
    """The real NIH sample in ../shared/cxr14_sample, or a skip saying why."""
    if not (SAMPLE_DIR / "meta").is_dir():
        pytest.skip(
            f"real ChestX-ray14 sample not found at {SAMPLE_DIR}: these "
            "tests run inside the project checkout next to ../shared"
        )
    return SAMPLE_DIR
