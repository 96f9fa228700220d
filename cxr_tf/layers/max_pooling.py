"""Global max pooling of each channel then the 1x1 conv."""

import keras
from keras import ops

from cxr_tf.layers import _cam_head


@keras.saving.register_keras_serializable(package="cxr_tf")
class MaxPooling(_cam_head.CAMHead):
    """GMP baseline: x_c = max_ij X_cij, logit_k = w_k . x + b_k.

    Input shape:
      (batch, height, width, channels).

    Output shape:
      `(logits, cam_maps)`: (batch, num_classes), (batch, height, width,
      num_classes) with the raw CAM s_ij.

    Example:
    >>> logits, cams = MaxPooling(14)(np.zeros((2, 8, 8, 32), "float32"))

    Args:
      num_classes: K, the number of classes.
      kernel_initializer: initializer of the (C, K) kernel.
      bias_initializer: initializer of the (K,) bias.
      **kwargs: base `keras.layers.Layer` arguments.
    """

    def pool(self, features, cam):
        del cam
        pooled = ops.max(ops.cast(features, self.pool_dtype), axis=(1, 2))
        return self.fc(pooled)
