"""Installs cxr_tf, its pipeline and its serving client."""

import setuptools

setuptools.setup(
    name="cxr_tf",
    version="0.1.0",
    description=(
        "Weakly supervised thoracic disease classification and "
        "localization on chest X-rays (PCAM pooling, InfoMask)."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=setuptools.find_packages(include=("cxr_tf*", "pipeline*", "serving*")),
    package_data={"serving": ["*.config"]},
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "keras>=3.15,<4",
        "numpy>=1.26",
        "pandas>=2.0",
        "scikit-learn>=1.3",
        "absl-py>=2.0",
        "tensorflow-serving-api>=2.19",
        "grpcio>=1.60",
        "apache-beam[tfrecord]>=2.60",
        "google-crc32c>=1.5",
        "pydicom>=3.0",
        "pillow>=10.0",
        "scipy>=1.11",
        "scikit-image>=0.22",
        "matplotlib>=3.8",
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6.100", "cryptography>=42"],
    },
)
