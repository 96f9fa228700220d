"""LSE pooling with a learned lower-bounded sharpness (LSE-LBA, Yao et al. 2018)."""

import keras
from keras import ops

from cxr_tf.layers import _cam_head
from cxr_tf.layers import lse_pooling


@keras.saving.register_keras_serializable(package="cxr_tf")
class LSELBAPooling(_cam_head.CAMHead):
    """LSE-LBA: logit_k = (1/r_k) log[mean_ij exp(r_k s_ij)], r_k = gamma0 + exp(beta_k).

    Unlike the other baselines this pools the saliency map itself, here the
    CAM s_ij of class k (PCAM paper, Table 1 and Sec. 2.2). One trainable
    beta_k per class (initialised to 0, so r_k starts at gamma0 + 1); the
    exp keeps r_k above the lower bound gamma0 > 0.

    Input shape:
      (batch, height, width, channels).

    Output shape:
      `(logits, cam_maps)`: (batch, num_classes), (batch, height, width,
      num_classes) with the raw CAM s_ij.

    Example:
    >>> logits, cams = LSELBAPooling(14)(np.ones((2, 8, 8, 32), "float32"))

    Args:
      num_classes: K, the number of classes.
      gamma0: the lower bound of the sharpness, a positive float.
      kernel_initializer: initializer of the (C, K) kernel.
      bias_initializer: initializer of the (K,) bias.
      **kwargs: base `keras.layers.Layer` arguments.

    Raises:
      ValueError: if `gamma0` is not a positive float.
    """

    def __init__(self, num_classes, gamma0=5.0, **kwargs):
        super().__init__(num_classes, **kwargs)
        _cam_head.check_positive_float("gamma0", gamma0)
        self.gamma0 = gamma0

    def build_extra(self, channels):
        del channels
        self.beta = self.add_weight(
            name="beta", shape=(self.num_classes,), initializer="zeros", autocast=False
        )

    def sharpness(self):
        """r_k = gamma0 + exp(beta_k), float32 (K,)."""
        beta = ops.cast(self.beta, self.pool_dtype)
        return ops.cast(self.gamma0, self.pool_dtype) + ops.exp(beta)

    def pool(self, features, cam):
        del features
        return lse_pooling.log_mean_exp_pool(
            ops.cast(cam, self.pool_dtype), self.sharpness()
        )

    def get_config(self):
        config = super().get_config()
        config["gamma0"] = self.gamma0
        return config
