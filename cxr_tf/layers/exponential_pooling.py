"""Exponential softmax pooling of each channel then the 1x1 conv."""

import keras
from keras import ops

from cxr_tf.layers import _cam_head


@keras.saving.register_keras_serializable(package="cxr_tf")
class ExponentialPooling(_cam_head.CAMHead):
    """Exponential pooling: x_c = sum_ij softmax_ij(X_c) X_cij, logit = w . x + b.

    Table 1 of the PCAM paper (Wang, Li and Metze 2019); the softmax over
    space subtracts the per-channel max, so it is finite for any input.

    Input shape:
      (batch, height, width, channels).

    Output shape:
      `(logits, cam_maps)`: (batch, num_classes), (batch, height, width,
      num_classes) with the raw CAM s_ij.

    Example:
    >>> logits, cams = ExponentialPooling(14)(np.ones((2, 8, 8, 32), "float32"))

    Args:
      num_classes: K, the number of classes.
      kernel_initializer: initializer of the (C, K) kernel.
      bias_initializer: initializer of the (K,) bias.
      **kwargs: base `keras.layers.Layer` arguments.
    """

    def pool(self, features, cam):
        del cam
        features = ops.cast(features, self.pool_dtype)
        weights = _cam_head.spatial_softmax_weights(features)
        return self.fc(ops.sum(weights * features, axis=(1, 2)))
