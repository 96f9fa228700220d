"""Attention-based MIL pooling of Ilse et al. 2018, one attention per class."""

import keras
from keras import ops

from cxr_tf.layers import _cam_head


@keras.saving.register_keras_serializable(package="cxr_tf")
class AttentionPooling(_cam_head.CAMHead):
    """Attention MIL pooling: x_k = sum_ij a_ijk X_ij, logit_k = w_k . x_k + b_k.

    a_ijk = softmax_ij(u_k^T tanh(V X_ij)) (Ilse et al. 2018, no biases).
    V (C, L) is shared by all classes and u_k (L,) is per class, so each
    finding attends to its own instances at the cost of L extra weights per
    class. As for PCAM, logit_k = sum a_ijk s_ijk by linearity of the fc.
    The returned map is the CAM s_ij.

    Input shape:
      (batch, height, width, channels).

    Output shape:
      `(logits, cam_maps)`: (batch, num_classes), (batch, height, width,
      num_classes) with the raw CAM s_ij.

    Example:
    >>> logits, cams = AttentionPooling(14, attention_dim=64)(
    ...     np.ones((2, 8, 8, 32), "float32"))

    Args:
      num_classes: K, the number of classes.
      attention_dim: L, width of the attention hidden layer, positive int.
      attention_initializer: initializer of V and u.
      kernel_initializer: initializer of the (C, K) kernel.
      bias_initializer: initializer of the (K,) bias.
      **kwargs: base `keras.layers.Layer` arguments.

    Raises:
      ValueError: if `attention_dim` is not a positive int.
    """

    def __init__(
        self,
        num_classes,
        attention_dim=128,
        attention_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(num_classes, **kwargs)
        if (
            isinstance(attention_dim, bool)
            or not isinstance(attention_dim, int)
            or attention_dim < 1
        ):
            raise ValueError(
                "`attention_dim` must be a positive int. "
                f"Received: attention_dim={attention_dim!r}"
            )
        self.attention_dim = attention_dim
        self.attention_initializer = keras.initializers.get(attention_initializer)

    def build_extra(self, channels):
        self.attention_v = self.add_weight(
            name="attention_v",
            shape=(channels, self.attention_dim),
            initializer=self.attention_initializer,
            autocast=False,
        )
        self.attention_u = self.add_weight(
            name="attention_u",
            shape=(self.attention_dim, self.num_classes),
            initializer=self.attention_initializer,
            autocast=False,
        )

    def attention(self, features):
        """The attention weights a (B, H, W, K), summing to 1 over H, W."""
        dtype = self.compute_dtype
        # tanh bounds the hidden layer, so the wide matmul is safe in float16.
        hidden = ops.tanh(ops.matmul(features, ops.cast(self.attention_v, dtype)))
        hidden = ops.cast(hidden, self.pool_dtype)
        scores = ops.matmul(hidden, ops.cast(self.attention_u, self.pool_dtype))
        return _cam_head.spatial_softmax_weights(scores)

    def pool(self, features, cam):
        weights = self.attention(features)
        return ops.sum(weights * ops.cast(cam, self.pool_dtype), axis=(1, 2))

    def get_config(self):
        config = super().get_config()
        config["attention_dim"] = self.attention_dim
        config["attention_initializer"] = keras.initializers.serialize(
            self.attention_initializer
        )
        return config
