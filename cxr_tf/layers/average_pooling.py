"""Global average pooling then the 1x1 conv (Table 1 of the PCAM paper)."""

import keras
from keras import ops

from cxr_tf.layers import _cam_head


@keras.saving.register_keras_serializable(package="cxr_tf")
class AveragePooling(_cam_head.CAMHead):
    """GAP baseline: x_c = mean_ij X_cij, logit_k = w_k . x + b_k.

    By linearity logit_k is also the spatial mean of the CAM s_ij, the map
    returned for localization (Zhou et al. 2016).

    Input shape:
      (batch, height, width, channels).

    Output shape:
      `(logits, cam_maps)`: (batch, num_classes), (batch, height, width,
      num_classes) with the raw CAM s_ij.

    Example:
    >>> logits, cams = AveragePooling(14)(np.zeros((2, 8, 8, 32), "float32"))

    Args:
      num_classes: K, the number of classes.
      kernel_initializer: initializer of the (C, K) kernel.
      bias_initializer: initializer of the (K,) bias.
      **kwargs: base `keras.layers.Layer` arguments.
    """

    def pool(self, features, cam):
        del cam
        pooled = ops.mean(ops.cast(features, self.pool_dtype), axis=(1, 2))
        return self.fc(pooled)
