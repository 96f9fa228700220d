"""Log-sum-exp pooling of each channel then the 1x1 conv (Wang et al. 2017)."""

import keras
from keras import ops

from cxr_tf.layers import _cam_head


def log_mean_exp_pool(values, gamma):
    """(1/gamma) log mean_ij exp(gamma x_ij) over axes 1, 2, max subtracted.

    Args:
      values: float32 tensor (B, H, W, D).
      gamma: float32 scalar or (D,) sharpness, > 0.

    Returns:
      float32 tensor (B, D).
    """
    peak = ops.max(values, axis=(1, 2))
    shifted = gamma * (values - peak[:, None, None, :])
    return peak + ops.log(ops.mean(ops.exp(shifted), axis=(1, 2))) / gamma


@keras.saving.register_keras_serializable(package="cxr_tf")
class LSEPooling(_cam_head.CAMHead):
    """LSE pooling: x_c = (1/gamma) log[mean_ij exp(gamma X_cij)], logit = w.x + b.

    Between average (gamma -> 0) and max (gamma -> inf) pooling; Wang et al.
    2017 found gamma = 10 best, the default. Computed as
    m + log(mean exp(gamma (X - m))) / gamma with m the per-channel max, so
    the largest exponent is 0 and the mean is >= 1/(H W): never inf, never
    log(0).

    Input shape:
      (batch, height, width, channels).

    Output shape:
      `(logits, cam_maps)`: (batch, num_classes), (batch, height, width,
      num_classes) with the raw CAM s_ij.

    Example:
    >>> logits, cams = LSEPooling(14, gamma=5.0)(np.ones((2, 8, 8, 32), "float32"))

    Args:
      num_classes: K, the number of classes.
      gamma: sharpness r, a positive float.
      kernel_initializer: initializer of the (C, K) kernel.
      bias_initializer: initializer of the (K,) bias.
      **kwargs: base `keras.layers.Layer` arguments.

    Raises:
      ValueError: if `gamma` is not a positive float.
    """

    def __init__(self, num_classes, gamma=10.0, **kwargs):
        super().__init__(num_classes, **kwargs)
        _cam_head.check_positive_float("gamma", gamma)
        self.gamma = gamma

    def pool(self, features, cam):
        del cam
        gamma = ops.cast(self.gamma, self.pool_dtype)
        pooled = log_mean_exp_pool(ops.cast(features, self.pool_dtype), gamma)
        return self.fc(pooled)

    def get_config(self):
        config = super().get_config()
        config["gamma"] = self.gamma
        return config
