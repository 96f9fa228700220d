"""Pooling heads (PCAM and the Table 1 baselines) and the InfoMask layer."""

import inspect

from cxr_tf import choices
from cxr_tf.layers.attention_pooling import AttentionPooling
from cxr_tf.layers.average_pooling import AveragePooling
from cxr_tf.layers.exponential_pooling import ExponentialPooling
from cxr_tf.layers.info_mask import InfoMask
from cxr_tf.layers.linear_pooling import LinearPooling
from cxr_tf.layers.lse_lba_pooling import LSELBAPooling
from cxr_tf.layers.lse_pooling import LSEPooling
from cxr_tf.layers.max_pooling import MaxPooling
from cxr_tf.layers.pcam_pooling import PCAMPooling

# Built from the registry (`cxr_tf.choices.POOLING_REGISTRY`, the one home
# of the names); the imports above are the package's public names.
POOLING_CLASSES = {
    name: choices.load(path) for name, path in choices.POOLING_REGISTRY.items()
}
POOLING_NAMES = choices.POOLING_NAMES

# Base-layer arguments every pooling accepts besides its own.
_LAYER_OPTIONS = ("name", "dtype", "trainable")


def pooling_options(name):
    """The keyword options `get_pooling(name, ...)` accepts.

    Args:
      name: a pooling name of `POOLING_NAMES`.

    Returns:
      A sorted tuple of option names (num_classes excluded).

    Raises:
      ValueError: if `name` is not in `POOLING_NAMES`.
    """
    cls = _pooling_class(name)
    options = set(_LAYER_OPTIONS)
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass.__module__.startswith("keras"):
            continue
        for param in inspect.signature(klass.__init__).parameters.values():
            if param.kind is param.POSITIONAL_OR_KEYWORD:
                options.add(param.name)
    options -= {"self", "num_classes"}
    return tuple(sorted(options))


def get_pooling(name, num_classes, /, **options):
    """Builds the global pooling head called `name`.

    Args:
      name: one of `POOLING_NAMES`.
      num_classes: K, the number of classes, a positive int.
      **options: constructor options of that pooling, e.g. `gamma` for "lse",
        `gamma0` for "lse_lba", `attention_dim` for "attention", and the
        layer's own `name` / `dtype` (hence `name` above is positional-only).

    Returns:
      A `keras.layers.Layer` whose `call(features)` returns
      `(logits (B, K), maps (B, H, W, K))` and whose `map_kind` is
      "probability" (pcam) or "cam" (the others).

    Raises:
      ValueError: on an unknown `name`, an option the pooling does not take,
        or an invalid value (from the layer).
    """
    cls = _pooling_class(name)
    allowed = pooling_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"Unknown option(s) {unknown} for pooling {name!r}. "
            f"Allowed: {list(allowed)}. Received: options={options!r}"
        )
    return cls(num_classes, **options)


def _pooling_class(name):
    # The registry, read at call time: an entry added to it (a new pooling,
    # or one a test defines) needs no change here.
    if name not in choices.POOLING_REGISTRY:
        raise ValueError(
            f"`name` must be one of {tuple(choices.POOLING_REGISTRY)}. "
            f"Received: name={name!r}"
        )
    return choices.load(choices.POOLING_REGISTRY[name])


__all__ = [
    "AttentionPooling",
    "AveragePooling",
    "ExponentialPooling",
    "InfoMask",
    "LinearPooling",
    "LSELBAPooling",
    "LSEPooling",
    "MaxPooling",
    "PCAMPooling",
    "POOLING_CLASSES",
    "POOLING_NAMES",
    "get_pooling",
    "pooling_options",
]
