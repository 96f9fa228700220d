"""Backbones and the assembled localizer: `build_model(ModelConfig(...))`."""

from cxr_tf.models.config import BACKBONES
from cxr_tf.models.config import ModelConfig
from cxr_tf.models.localizer import build_model
from cxr_tf.models.localizer import gradcam_target_layer
from cxr_tf.models.localizer import map_kind_for

__all__ = [
    "BACKBONES",
    "ModelConfig",
    "build_model",
    "gradcam_target_layer",
    "map_kind_for",
]
