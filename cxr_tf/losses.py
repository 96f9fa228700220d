"""Binary cross-entropy losses from logits: plain, class-weighted, batch-balanced.

All take `(y_true (B, K) in {0, 1}, logits (B, K))` and work from logits with
log_sigmoid, so they stay finite for any logit. `call` returns one value per
image (the mean over the K classes of the weighted element losses), and the
default Keras reduction "sum_over_batch_size" then averages over the batch.

InfoMask models: the total objective (eq. 3 of Taghanaki et al. 2019) is the
classification loss compiled here plus `alpha * KL` (or `alpha * mean |M|`),
which the `InfoMask` layer adds through `add_loss`; Keras sums compiled and
added losses, so nothing more is needed (see `InfoMaskLoss`).
"""

import keras
from keras import ops

LOSS_NAMES = ("balanced_bce", "bce", "weighted_bce")


def _element_terms(logits):
    """(-ln f, -ln(1 - f)) per element, f = sigmoid(logits), both finite."""
    return -ops.log_sigmoid(logits), -ops.log_sigmoid(-logits)


@keras.saving.register_keras_serializable(package="cxr_tf")
class BinaryCrossentropyFromLogits(keras.losses.Loss):
    """Multi-label BCE: mean over classes of -[y ln f + (1 - y) ln(1 - f)].

    Args:
      name: loss name.
      reduction: Keras reduction over the per-image values.
      dtype: dtype the loss is computed in (default float32, also under
        mixed precision).
    """

    def __init__(self, name="bce", reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def call(self, y_true, y_pred):
        positive, negative = _element_terms(y_pred)
        return ops.mean(y_true * positive + (1.0 - y_true) * negative, axis=-1)


@keras.saving.register_keras_serializable(package="cxr_tf")
class InfoMaskLoss(BinaryCrossentropyFromLogits):
    """Classification term of the InfoMask objective: BCE from logits.

    Total InfoMask loss = this + alpha * mean KL(N(mu, sigma^2) || N(0, 1))
    ("infomask"), or + alpha * mean |M| ("regl1"), or nothing more
    ("featuremask"). The second term is added by `cxr_tf.layers.InfoMask`
    with `add_loss` and summed in by `Model.fit`; the paper's softmax over two
    classes is the sigmoid BCE of one logit per finding here (multi-label).
    """

    def __init__(
        self, name="infomask_loss", reduction="sum_over_batch_size", dtype=None
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)


def _check_weights(name, values):
    if values is None:
        return None
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(
            f"`{name}` must be a sequence of floats >= 0. Received: {name}={values!r}"
        ) from None
    if not values or any(not 0 <= v < float("inf") for v in values):
        raise ValueError(
            f"`{name}` must be a non-empty sequence of finite floats >= 0. "
            f"Received: {name}={values!r}"
        )
    return values


@keras.saving.register_keras_serializable(package="cxr_tf")
class WeightedBinaryCrossentropy(keras.losses.Loss):
    """Class-weighted BCE from logits.

    Element loss for class k: c_k * -[q_k y ln f + (1 - y) ln(1 - f)], averaged
    over the K classes, with c_k = `class_weights[k]` (default 1) and
    q_k = `positive_weights[k]` (default 1, a pos_weight as in
    `tf.nn.weighted_cross_entropy_with_logits`).

    Args:
      class_weights: K floats >= 0 or None.
      positive_weights: K floats >= 0 or None.
      name: loss name.
      reduction: Keras reduction over the per-image values.
      dtype: dtype the loss is computed in.

    Raises:
      ValueError: if both weights are None, or a weight is negative, not
        finite, or not a number. A length other than K fails at call time.
    """

    def __init__(
        self,
        class_weights=None,
        positive_weights=None,
        name="weighted_bce",
        reduction="sum_over_batch_size",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.class_weights = _check_weights("class_weights", class_weights)
        self.positive_weights = _check_weights("positive_weights", positive_weights)
        if self.class_weights is None and self.positive_weights is None:
            raise ValueError(
                "WeightedBinaryCrossentropy needs `class_weights` or "
                "`positive_weights`. Received: class_weights=None, "
                "positive_weights=None"
            )

    def call(self, y_true, y_pred):
        positive, negative = _element_terms(y_pred)
        if self.positive_weights is not None:
            positive = positive * ops.convert_to_tensor(
                self.positive_weights, dtype=self.dtype
            )
        element = y_true * positive + (1.0 - y_true) * negative
        if self.class_weights is not None:
            element = element * ops.convert_to_tensor(
                self.class_weights, dtype=self.dtype
            )
        return ops.mean(element, axis=-1)

    def get_config(self):
        config = super().get_config()
        config["class_weights"] = self.class_weights
        config["positive_weights"] = self.positive_weights
        return config


@keras.saving.register_keras_serializable(package="cxr_tf")
class BalancedBinaryCrossentropy(keras.losses.Loss):
    """Batch-balanced BCE of Wang et al. 2017 (W-CEL), from logits.

    L = beta_P sum_{y=1} -ln f + beta_N sum_{y=0} -ln(1 - f), with
    beta_P = (|P| + |N|) / |P| and beta_N = (|P| + |N|) / |N| counted over
    the labels of the batch: all B*K labels together (the paper's "total
    number of 1s and 0s in a batch"), or per class with `per_class=True`.
    L is divided by the number of labels |P| + |N|, so with the default
    reduction the value is mean_{y=1}(-ln f) + mean_{y=0}(-ln(1 - f)); a batch
    with no positive (or no negative) keeps only the other mean, never NaN.
    The betas are statistics of the batch and get no gradient. Sample weights
    scale the per-image values after the betas are counted.

    Args:
      per_class: count |P| and |N| per class (column) instead of over the
        whole batch.
      name: loss name.
      reduction: Keras reduction over the per-image values.
      dtype: dtype the loss is computed in.

    Raises:
      ValueError: if `per_class` is not a bool.
    """

    def __init__(
        self,
        per_class=False,
        name="balanced_bce",
        reduction="sum_over_batch_size",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if not isinstance(per_class, bool):
            raise ValueError(
                f"`per_class` must be a bool. Received: per_class={per_class!r}"
            )
        self.per_class = per_class

    def call(self, y_true, y_pred):
        positive, negative = _element_terms(y_pred)
        axis = 0 if self.per_class else None
        num_pos = ops.sum(y_true, axis=axis, keepdims=self.per_class)
        num_neg = ops.sum(1.0 - y_true, axis=axis, keepdims=self.per_class)
        total = num_pos + num_neg
        # An empty side has a zero sum, so any finite beta gives it weight 0.
        beta_p = ops.stop_gradient(total / ops.maximum(num_pos, 1.0))
        beta_n = ops.stop_gradient(total / ops.maximum(num_neg, 1.0))
        element = beta_p * y_true * positive + beta_n * (1.0 - y_true) * negative
        return ops.mean(element, axis=-1)

    def get_config(self):
        config = super().get_config()
        config["per_class"] = self.per_class
        return config


_LOSSES = {
    "balanced_bce": BalancedBinaryCrossentropy,
    "bce": BinaryCrossentropyFromLogits,
    "weighted_bce": WeightedBinaryCrossentropy,
}


def get_loss(name, **kwargs):
    """Builds the loss called `name`.

    Args:
      name: one of `LOSS_NAMES`.
      **kwargs: constructor arguments, e.g. `class_weights=[...]` for
        "weighted_bce" or `per_class=True` for "balanced_bce".

    Returns:
      A `keras.losses.Loss` taking (y_true (B, K), logits (B, K)).

    Raises:
      ValueError: on an unknown `name` or invalid arguments.
    """
    if name not in _LOSSES:
        raise ValueError(f"`name` must be one of {LOSS_NAMES}. Received: name={name!r}")
    try:
        return _LOSSES[name](**kwargs)
    except TypeError as error:
        raise ValueError(
            f"Invalid arguments for loss {name!r}: {error}. Received: {kwargs!r}"
        ) from None
