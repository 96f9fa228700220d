"""Shared base of the CAM-style global pooling heads (one 1x1 conv + pooling)."""

import keras
from keras import ops


def check_num_classes(num_classes):
    """Raises ValueError unless `num_classes` is a positive int."""
    if (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, int)
        or num_classes < 1
    ):
        raise ValueError(
            "`num_classes` must be a positive int. "
            f"Received: num_classes={num_classes!r}"
        )


def check_positive_float(name, value):
    """Raises ValueError unless `value` is a finite float > 0."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not value > 0
        or value == float("inf")
    ):
        raise ValueError(
            f"`{name}` must be a positive finite float. Received: {name}={value!r}"
        )


class CAMHead(keras.layers.Layer):
    """A 1x1 conv giving the class activation map s, then a global pooling.

    Subclasses implement `pool(features, cam)` returning logits (B, K) in
    `pool_dtype`.
    The CAM s_ij = w_k . X_ij + b_k and the pooling run in float32 (float64
    for a float64 layer) whatever the policy: under mixed_float16 the sums of
    C products and the exp / log / divisions of the pooling would overflow in
    float16, and this head is a tiny part of the network's cost. The weights
    are created with autocast=False, so they are read in float32 too; the
    outputs are cast to the compute dtype as Keras expects.

    Args:
      num_classes: K, the number of classes (one (w_k, b_k) each).
      kernel_initializer: initializer of the (C, K) kernel.
      bias_initializer: initializer of the (K,) bias.
      **kwargs: base `keras.layers.Layer` arguments (name, dtype, ...).
    """

    map_kind = "cam"

    def __init__(
        self,
        num_classes,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_num_classes(num_classes)
        self.num_classes = num_classes
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.input_spec = keras.layers.InputSpec(ndim=4)

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None:
            raise ValueError(
                f"{type(self).__name__} needs a known channel dimension. "
                f"Received: input_shape={input_shape}"
            )
        self.kernel = self.add_weight(
            name="kernel",
            shape=(channels, self.num_classes),
            initializer=self.kernel_initializer,
            autocast=False,
        )
        self.bias = self.add_weight(
            name="bias",
            shape=(self.num_classes,),
            initializer=self.bias_initializer,
            autocast=False,
        )
        self.build_extra(channels)

    def build_extra(self, channels):
        """Hook for subclasses that own more weights than the 1x1 conv."""
        del channels

    @property
    def pool_dtype(self):
        """float32, or float64 when the layer computes in float64."""
        return "float64" if self.compute_dtype == "float64" else "float32"

    def cam(self, features):
        """The class activation map s (B, H, W, K), in `pool_dtype`."""
        features = ops.cast(features, self.pool_dtype)
        return self.fc(features)

    def fc(self, pooled):
        """The 1x1 conv w_k . x + b_k in `pool_dtype`, x (..., C) -> (..., K)."""
        kernel = ops.cast(self.kernel, self.pool_dtype)
        bias = ops.cast(self.bias, self.pool_dtype)
        return ops.matmul(pooled, kernel) + bias

    def call(self, features):
        cam = self.cam(features)
        logits = self.pool(features, cam)
        dtype = self.compute_dtype
        return ops.cast(logits, dtype), ops.cast(self.output_map(cam), dtype)

    def output_map(self, cam):
        """The localization map returned next to the logits (the raw CAM)."""
        return cam

    def compute_output_shape(self, input_shape):
        batch, height, width = input_shape[0], input_shape[1], input_shape[2]
        return (batch, self.num_classes), (batch, height, width, self.num_classes)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_classes": self.num_classes,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            }
        )
        return config


def spatial_softmax_weights(scores):
    """softmax over H and W of float32 scores (B, H, W, K), max subtracted."""
    scores = scores - ops.max(scores, axis=(1, 2), keepdims=True)
    exp = ops.exp(scores)
    return exp / ops.sum(exp, axis=(1, 2), keepdims=True)
