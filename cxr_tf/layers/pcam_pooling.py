"""Probabilistic-CAM (PCAM) pooling of Ye et al. 2020, eq. (1), for K classes."""

import keras
from keras import ops

from cxr_tf.layers import _cam_head


@keras.saving.register_keras_serializable(package="cxr_tf")
class PCAMPooling(_cam_head.CAMHead):
    """PCAM pooling: CAM-probability-weighted average of the feature map.

    For each class k, with the 1x1 conv (w_k, b_k) shared by map and logit:
    s_ij = w_k . X_ij + b_k, p_ij = sigmoid(s_ij), a_ij = p_ij / sum p,
    x_k = sum a_ij X_ij and logit_k = w_k . x_k + b_k. Because the fc is
    affine and the a_ij sum to one, logit_k = sum a_ij s_ij, so the K pooled
    C-vectors are never built. The weights are computed as
    softmax(log_sigmoid(s)) over space in float32, which equals p / sum p and
    stays finite for any float32 s (sigmoid underflows to 0 for s < -88, and
    then p / sum p would be 0 / 0).

    Input shape:
      (batch, height, width, channels) feature map X.

    Output shape:
      A tuple `(logits, probability_maps)`: (batch, num_classes) and
      (batch, height, width, num_classes) with p_ij in [0, 1].

    Example:
    >>> layer = PCAMPooling(num_classes=14)
    >>> logits, maps = layer(np.zeros((2, 16, 16, 512), "float32"))
    >>> logits.shape, maps.shape
    (TensorShape([2, 14]), TensorShape([2, 16, 16, 14]))

    Args:
      num_classes: K, the number of classes.
      kernel_initializer: initializer of the (C, K) kernel w.
      bias_initializer: initializer of the (K,) bias b.
      **kwargs: base `keras.layers.Layer` arguments (name, dtype, ...).
    """

    map_kind = "probability"

    def pool(self, features, cam):
        del features
        cam = ops.cast(cam, self.pool_dtype)
        weights = _cam_head.spatial_softmax_weights(ops.log_sigmoid(cam))
        return ops.sum(weights * cam, axis=(1, 2))

    def output_map(self, cam):
        return ops.sigmoid(cam)
