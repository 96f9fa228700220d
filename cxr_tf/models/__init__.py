"""Backbones and the assembled localizer: `build_model(ModelConfig(...))`.

`ModelConfig` and `BACKBONES` import without Keras, so a command can check
its flags before TensorFlow loads; the builders load Keras on first use.
Importing `cxr_tf.models.localizer` registers the custom layers.
"""

from cxr_tf.models.config import BACKBONES
from cxr_tf.models.config import ModelConfig

_LOCALIZER_NAMES = ("build_model", "gradcam_target_layer", "map_kind_for")


def __getattr__(name):
    if name in _LOCALIZER_NAMES:
        from cxr_tf.models import localizer  # pylint: disable=import-outside-toplevel

        return getattr(localizer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BACKBONES",
    "ModelConfig",
    "build_model",
    "gradcam_target_layer",
    "map_kind_for",
]
