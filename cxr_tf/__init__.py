"""cxr_tf: weakly supervised thoracic disease localization on chest X-rays."""

__version__ = "0.1.0"
