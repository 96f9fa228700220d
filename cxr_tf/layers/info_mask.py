"""InfoMask (Taghanaki et al. 2019): a variational spatial mask of the input."""

import keras
from keras import ops

from cxr_tf import choices

VARIANTS = choices.INFOMASK_VARIANTS
# "relu" is the paper's; "softplus" keeps a gradient for every pixel (see
# docs/design/infomask.md: a one-channel ReLU attention dies in 2-3 steps).
ATTENTION_ACTIVATIONS = ("relu", "softplus")


@keras.saving.register_keras_serializable(package="cxr_tf")
class InfoMask(keras.layers.Layer):
    """Learned mask M that keeps the discriminative pixels of the input.

    From the encoder features: attention A = ReLU(1x1 conv) (or softplus,
    `attention_activation`), one channel, upsampled bilinearly to the image
    size; mu = 1x1 conv(A) and log-variance = 1x1 conv(A);
    sigma = exp(logvar / 2); z = mu + sigma * eps with eps ~ N(0, 1) drawn
    only when training (z = mu otherwise);
    M = clip(sigmoid(z) - tau, 0, 1) (eq. 4) and the output is images * M.
    With `num_masks` = K > 1 (one mask per finding of a multi-label task;
    the paper's task has one), each mask has its own attention channel, mu
    and log-variance, and the KL (or L1) is averaged over the masks too.

    Regulariser, added with `self.add_loss` on every call:
    - "infomask": alpha * KL(N(mu, sigma^2) || N(0, 1)), the KL averaged over
      batch and pixels (not summed), so alpha keeps its meaning at any image
      size: alpha * mean(0.5 * (mu^2 + sigma^2 - 1 - logvar)).
    - "featuremask": none, and z = mu also in training (deterministic mask).
    - "regl1": alpha * mean |M| over batch and pixels instead of the KL; z is
      still sampled in training.
    The mask parameters and the regulariser run in float32.

    Gradient of the clip: with `clip_gradient_leak` = 0 (the default) the
    clip's exact gradient, zero wherever sigmoid(z) - tau is outside [0, 1].
    With a leak g > 0 the forward value is still exactly eq. 4, and only the
    backward pass lets g times the gradient through the clipped pixels
    (a leaky straight-through clip), so a mask driven to M = 0 (RegL1) can be
    raised again by the classification loss. The L1 term itself has gradient
    0 at M = 0 (sign(0) = 0), so the leak never pushes a zero mask lower.
    Input shape:
      A list `[encoder_features, images]`: (B, h, w, C) and (B, H, W, Ci).

    Output shape:
      A tuple `(masked_images, mask)`: (B, H, W, Ci) and (B, H, W, 1) in
      [0, 1 - tau]; with K masks, (B, H, W, K, Ci) (one masked copy per
      mask) and (B, H, W, K).

    Example:
    >>> masked, mask = InfoMask(seed=0)(
    ...     [np.ones((2, 8, 8, 16), "float32"), np.ones((2, 32, 32, 1), "float32")])

    Args:
      variant: "infomask", "featuremask" or "regl1".
      alpha: weight of the KL (or L1) term, a float >= 0.
      tau: mask offset in [0, 1).
      seed: int or None, seed of the noise eps.
      kernel_initializer: initializer of the three 1x1 conv kernels.
      bias_initializer: initializer of the three 1x1 conv biases.
      attention_activation: "relu" (the paper) or "softplus".
      clip_gradient_leak: float in [0, 1], the fraction of the gradient
        passed through clipped pixels in the backward pass (0: exact).
      attention_bias_initializer: initializer of the attention conv's bias
        (None: `bias_initializer`); a positive start keeps the attention in
        its linear range, where its spatial variation reaches the mask.
      num_masks: K, the number of masks (1: the paper's).
      **kwargs: base `keras.layers.Layer` arguments.

    Raises:
      ValueError: on an unknown `variant` or `attention_activation`, a
        negative `alpha`, `tau` outside [0, 1), `clip_gradient_leak` outside
        [0, 1], a non-int `seed` or a `num_masks` that is not a positive int.
    """

    # The mask M is in [0, 1]: the model's localization map is a probability.
    map_kind = "probability"

    def __init__(
        self,
        variant="infomask",
        alpha=0.5,
        tau=0.2,
        seed=None,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        attention_activation="relu",
        clip_gradient_leak=0.0,
        attention_bias_initializer=None,
        num_masks=1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if variant not in VARIANTS:
            raise ValueError(
                f"`variant` must be one of {VARIANTS}. Received: variant={variant!r}"
            )
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float))
            or not 0 <= alpha < float("inf")
        ):
            raise ValueError(
                f"`alpha` must be a finite float >= 0. Received: alpha={alpha!r}"
            )
        if (
            isinstance(tau, bool)
            or not isinstance(tau, (int, float))
            or not (0 <= tau < 1)
        ):
            raise ValueError(f"`tau` must be a float in [0, 1). Received: tau={tau!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"`seed` must be an int or None. Received: seed={seed!r}")
        if attention_activation not in ATTENTION_ACTIVATIONS:
            raise ValueError(
                f"`attention_activation` must be one of {ATTENTION_ACTIVATIONS}. "
                f"Received: attention_activation={attention_activation!r}"
            )
        if (
            isinstance(clip_gradient_leak, bool)
            or not isinstance(clip_gradient_leak, (int, float))
            or not 0 <= clip_gradient_leak <= 1
        ):
            raise ValueError(
                "`clip_gradient_leak` must be a float in [0, 1]. "
                f"Received: clip_gradient_leak={clip_gradient_leak!r}"
            )
        if (
            isinstance(num_masks, bool)
            or not isinstance(num_masks, int)
            or num_masks < 1
        ):
            raise ValueError(
                "`num_masks` must be a positive int. "
                f"Received: num_masks={num_masks!r}"
            )
        self.num_masks = num_masks
        self.variant = variant
        self.attention_activation = attention_activation
        self.clip_gradient_leak = clip_gradient_leak
        self.alpha = alpha
        self.tau = tau
        self.seed = seed
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.attention_bias_initializer = (
            None
            if attention_bias_initializer is None
            else keras.initializers.get(attention_bias_initializer)
        )
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        if not isinstance(input_shape, (list, tuple)) or len(input_shape) != 2:
            raise ValueError(
                "InfoMask expects a list [encoder_features, images]. "
                f"Received: input_shape={input_shape}"
            )
        features_shape, images_shape = input_shape
        if len(features_shape) != 4 or len(images_shape) != 4:
            raise ValueError(
                "InfoMask expects rank-4 encoder features and images. "
                f"Received: input_shape={input_shape}"
            )
        if features_shape[-1] is None:
            raise ValueError(
                "InfoMask needs a known channel dimension of the encoder "
                f"features. Received: input_shape={input_shape}"
            )
        self.attention_kernel = self._kernel("attention_kernel", features_shape[-1])
        self.attention_bias = self._bias(
            "attention_bias", self.attention_bias_initializer
        )
        # Per mask, mu and the log-variance are 1x1 convs of its own
        # one-channel attention: a scale and a bias each.
        self.mu_kernel = self._kernel("mu_kernel", 1)
        self.mu_bias = self._bias("mu_bias")
        self.logvar_kernel = self._kernel("logvar_kernel", 1)
        self.logvar_bias = self._bias("logvar_bias")

    def _kernel(self, name, channels):
        return self.add_weight(
            name=name,
            shape=(channels, self.num_masks),
            initializer=self.kernel_initializer,
            autocast=False,
        )

    def _bias(self, name, initializer=None):
        return self.add_weight(
            name=name,
            shape=(self.num_masks,),
            initializer=initializer or self.bias_initializer,
            autocast=False,
        )

    @property
    def pool_dtype(self):
        """float32, or float64 when the layer computes in float64."""
        return "float64" if self.compute_dtype == "float64" else "float32"

    def attention(self, features, height, width):
        """A = ReLU (or softplus) of a 1x1 conv, upsampled bilinearly, (B, H, W, 1)."""
        dtype = self.compute_dtype
        attention = ops.matmul(features, ops.cast(self.attention_kernel, dtype))
        attention = attention + ops.cast(self.attention_bias, dtype)
        if self.attention_activation == "softplus":
            attention = ops.softplus(attention)
        else:
            attention = ops.relu(attention)
        return ops.image.resize(
            attention, (height, width), interpolation="bilinear", antialias=False
        )

    def call(self, inputs, training=None):
        features, images = inputs
        height, width = ops.shape(images)[1], ops.shape(images)[2]
        attention = ops.cast(self.attention(features, height, width), self.pool_dtype)
        mu = attention * self.mu_kernel[0] + self.mu_bias
        logvar = attention * self.logvar_kernel[0] + self.logvar_bias
        z = mu
        if training and self.variant != "featuremask":
            eps = keras.random.normal(
                ops.shape(mu), dtype=self.pool_dtype, seed=self.seed_generator
            )
            z = mu + ops.exp(0.5 * logvar) * eps
        mask = self.clip(ops.sigmoid(z) - ops.cast(self.tau, self.pool_dtype))
        alpha = ops.cast(self.alpha, self.pool_dtype)
        if self.variant == "infomask":
            kl = 0.5 * (ops.square(mu) + ops.exp(logvar) - 1.0 - logvar)
            self.add_loss(alpha * ops.mean(kl))
        elif self.variant == "regl1":
            self.add_loss(alpha * ops.mean(ops.abs(mask)))
        mask = ops.cast(mask, self.compute_dtype)
        if self.num_masks == 1:
            return images * mask, mask
        # One masked copy of the input per mask: (B, H, W, num_masks, Ci).
        return ops.expand_dims(images, -2) * ops.expand_dims(mask, -1), mask

    def clip(self, values):
        """clip(values, 0, 1); the backward pass leaks `clip_gradient_leak` outside."""
        clipped = ops.clip(values, 0.0, 1.0)
        if not self.clip_gradient_leak:
            return clipped
        # Forward: clipped + (y - stop(y)) = clipped exactly. Backward:
        # d clipped + g * (1 - d clipped): 1 inside [0, 1], g outside.
        outside = values - clipped
        leak = ops.cast(self.clip_gradient_leak, values.dtype) * outside
        # (leak - stop(leak)) is exactly 0 forward, so the sum is exact.
        return clipped + (leak - ops.stop_gradient(leak))

    def compute_output_shape(self, input_shape):
        images_shape = tuple(input_shape[1])
        mask_shape = images_shape[:-1] + (self.num_masks,)
        if self.num_masks == 1:
            return images_shape, mask_shape
        return mask_shape + images_shape[-1:], mask_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "variant": self.variant,
                "alpha": self.alpha,
                "tau": self.tau,
                "seed": self.seed,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
                "attention_activation": self.attention_activation,
                "clip_gradient_leak": self.clip_gradient_leak,
                "num_masks": self.num_masks,
                "attention_bias_initializer": (
                    None
                    if self.attention_bias_initializer is None
                    else keras.initializers.serialize(self.attention_bias_initializer)
                ),
            }
        )
        return config
