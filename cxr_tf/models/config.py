"""The frozen model config: everything needed to rebuild a model."""

import dataclasses
import json

from cxr_tf import choices
from cxr_tf import config_dict
from cxr_tf.choices import BACKBONES  # One home for the names (TF-free).
from cxr_tf.data import schema


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """What `build_model` needs.

    Attributes:
      backbone: one of `BACKBONES`.
      pooling: a pooling name of `cxr_tf.layers.POOLING_NAMES` (ignored by the
        `infomask` backbone, whose classifier pools globally).
      num_classes: number of findings (14 for ChestX-ray14).
      image_size: square input side in pixels.
      channels: input channels (1 for grayscale films).
      weights: None (random init) or "imagenet" (keras.applications only).
      pooling_options: extra keyword arguments of the pooling layer, as sorted
        (name, value) pairs so the config stays hashable (e.g. gamma for LSE).
      infomask_variant: "infomask", "featuremask" or "regl1" (InfoMask backbone).
      infomask_alpha: weight of the KL (or L1) term of the mask.
      infomask_tau: mask offset, M = clip(sigmoid(z) - tau, 0, 1).
      infomask_width: multiplier of the filter counts of the paper's
        image-mask network (`localizer.build_infomask_model` with an
        `infomask_net` image-site recipe; `infomask_net.scaled_filters`).
        `build_model`'s InfoMask network has no width and refuses any value
        but 1.0. No training flag sets it.
    """

    backbone: str = "resnet34"
    pooling: str = "pcam"
    num_classes: int = schema.NUM_FINDINGS
    image_size: int = 512
    channels: int = 1
    weights: str | None = None
    pooling_options: tuple = ()
    infomask_variant: str = "infomask"
    # 0.5 (the author's later code) let the KL flatten the mask on every
    # probe; 0.01 kept it on the lesion (docs/design/infomask.md).
    infomask_alpha: float = 0.01
    infomask_tau: float = 0.2
    infomask_width: float = 1.0

    def __post_init__(self):
        if self.backbone not in choices.BACKBONE_REGISTRY:  # Read at call time.
            raise ValueError(
                f"`backbone` must be one of {tuple(choices.BACKBONE_REGISTRY)}. "
                f"Received: backbone={self.backbone!r}"
            )
        config_dict.check_int("num_classes", self.num_classes)
        config_dict.check_int("image_size", self.image_size, minimum=32)
        if self.image_size % 32:
            raise ValueError(
                "`image_size` must be a multiple of 32 (the backbones' stride). "
                f"Received: image_size={self.image_size!r}"
            )
        if self.channels not in (1, 3):
            raise ValueError(
                "`channels` must be 1 or 3. " f"Received: channels={self.channels!r}"
            )
        if self.weights not in (None, "imagenet"):
            raise ValueError(
                "`weights` must be None or 'imagenet'. "
                f"Received: weights={self.weights!r}"
            )
        if (
            self.weights == "imagenet"
            and not choices.BACKBONE_REGISTRY[self.backbone].imagenet_weights
        ):
            raise ValueError(
                "`weights='imagenet'` exists only for the "
                f"keras.applications backbones {choices.IMAGENET_BACKBONES}. "
                f"Received: backbone={self.backbone!r}"
            )
        if not (
            isinstance(self.infomask_width, (int, float))
            and 0.0 < self.infomask_width <= 4.0
        ):
            raise ValueError(
                "`infomask_width` must be a number in (0, 4]. "
                f"Received: infomask_width={self.infomask_width!r}"
            )
        if isinstance(self.pooling_options, dict):
            object.__setattr__(
                self, "pooling_options", tuple(sorted(self.pooling_options.items()))
            )

    @property
    def normalization(self):
        return schema.normalization_for(self.backbone)

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["pooling_options"] = dict(self.pooling_options)
        return d

    @classmethod
    def from_dict(cls, d):
        return config_dict.from_dict(cls, d)

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
