"""Linear softmax pooling of each channel then the 1x1 conv (PCAM Table 1)."""

import keras
from keras import ops

from cxr_tf.layers import _cam_head


@keras.saving.register_keras_serializable(package="cxr_tf")
class LinearPooling(_cam_head.CAMHead):
    """Linear pooling: x_c = sum_ij X_cij^2 / sum_ij X_cij, logit = w . x + b.

    The weights X_cij / sum X_cij are those of Table 1 of the PCAM paper
    (Wang, Li and Metze 2019). They are meaningful for non-negative features,
    which is what the ReLU-ended backbones give. The denominator is
    max(sum X_c, epsilon) so an all-zero channel pools to 0, not NaN.

    Input shape:
      (batch, height, width, channels), expected >= 0.

    Output shape:
      `(logits, cam_maps)`: (batch, num_classes), (batch, height, width,
      num_classes) with the raw CAM s_ij.

    Example:
    >>> logits, cams = LinearPooling(14)(np.ones((2, 8, 8, 32), "float32"))

    Args:
      num_classes: K, the number of classes.
      epsilon: floor of the denominator, > 0.
      kernel_initializer: initializer of the (C, K) kernel.
      bias_initializer: initializer of the (K,) bias.
      **kwargs: base `keras.layers.Layer` arguments.

    Raises:
      ValueError: if `epsilon` is not a positive float.
    """

    def __init__(self, num_classes, epsilon=1e-6, **kwargs):
        super().__init__(num_classes, **kwargs)
        _cam_head.check_positive_float("epsilon", epsilon)
        self.epsilon = epsilon

    def pool(self, features, cam):
        del cam
        features = ops.cast(features, self.pool_dtype)
        total = ops.sum(features, axis=(1, 2))
        total = ops.maximum(total, ops.cast(self.epsilon, self.pool_dtype))
        pooled = ops.sum(ops.square(features), axis=(1, 2)) / total
        return self.fc(pooled)

    def get_config(self):
        config = super().get_config()
        config["epsilon"] = self.epsilon
        return config
