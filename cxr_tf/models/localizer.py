"""Assembles backbone, pooling and output heads into the localizer model."""

import keras
from keras import ops

from cxr_tf import choices
from cxr_tf import layers as cxr_layers
from cxr_tf.models import compact
from cxr_tf.models import infomask_net
from cxr_tf.models.config import ModelConfig

# The layer whose output is the feature map Grad-CAM reads: the trunk's
# output for the pooling models, the classification block's last feature map
# for InfoMask. Backbone layers are built into the model's own graph (not as
# nested models) so `model.get_layer(FEATURES_LAYER).output` is connected to
# `model.input`.
FEATURES_LAYER = "features"
OUTPUT_KEYS = ("logits", "probabilities", "localization_maps")
# The largest stride of the registry's backbones; requiring a multiple of it
# for all keeps maps aligned with pixels and shapes static for XLA.
IMAGE_SIZE_MULTIPLE = choices.IMAGE_SIZE_MULTIPLE


@keras.saving.register_keras_serializable(package="cxr_tf")
class ClassBroadcast(keras.layers.Layer):
    """Repeats a class-agnostic map once per class.

    Args:
      num_classes: number of copies along the last axis.

    Input shape:
      `(B, h, w, 1)`.

    Output shape:
      `(B, h, w, num_classes)`.
    """

    def __init__(self, num_classes, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(
                "`num_classes` must be a positive int. "
                f"Received: num_classes={num_classes!r}"
            )
        self.num_classes = num_classes

    def call(self, inputs):
        return ops.repeat(ops.cast(inputs, self.compute_dtype), self.num_classes, -1)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.num_classes,)

    def get_config(self):
        config = super().get_config()
        config["num_classes"] = self.num_classes
        return config


@keras.saving.register_keras_serializable(package="cxr_tf")
class MaskNormalizedPooling(keras.layers.Layer):
    """Per mask, the features averaged with the mask as weights: sum(M F) / sum(M).

    The InfoMask network's classifier on the trunk's features. With the
    mask as the weights, a film's pooled features are those of the pixels
    the mask keeps, whatever their number, so the classification loss
    rewards a mask that keeps the discriminative pixels and drops the rest;
    a constant mask gives global average pooling. Global average pooling of
    F * M instead lets a network keep every pixel at one mask value and
    scale the dense weights (measured: docs/design/infomask.md). Sums in
    float32 under any dtype policy.

    Args:
      epsilon: added to sum(M) (an all-zero mask pools to 0).

    Input shape:
      A list `[features, masks]`: (B, h, w, C) and (B, h, w, K).

    Output shape:
      `(B, K, C)`: mask k's average of the features.
    """

    def __init__(self, epsilon=1e-3, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def call(self, inputs):
        features, masks = (ops.cast(x, "float32") for x in inputs)
        total = ops.einsum("bhwk,bhwc->bkc", masks, features)
        weight = ops.sum(masks, axis=(1, 2))
        pooled = total / (ops.expand_dims(weight, -1) + self.epsilon)
        return ops.cast(pooled, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        features_shape, masks_shape = input_shape
        return (features_shape[0], masks_shape[-1], features_shape[-1])

    def get_config(self):
        config = super().get_config()
        config["epsilon"] = self.epsilon
        return config


@keras.saving.register_keras_serializable(package="cxr_tf")
class ClasswiseDense(keras.layers.Layer):
    """Logit k = w_k . x_k + b_k: one dense unit per class, on its own input.

    Input shape:
      `(B, K, C)`.

    Output shape:
      `(B, K)`.
    """

    def build(self, input_shape):
        classes, channels = input_shape[-2], input_shape[-1]
        self.kernel = self.add_weight(
            name="kernel", shape=(classes, channels), initializer="glorot_uniform"
        )
        self.bias = self.add_weight(name="bias", shape=(classes,), initializer="zeros")

    def call(self, inputs):
        return ops.sum(inputs * self.kernel, axis=-1) + self.bias

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1])


def _check_config(config):
    if not isinstance(config, ModelConfig):
        raise TypeError(
            "`config` must be a cxr_tf.models.ModelConfig. "
            f"Received: config={config!r} of type {type(config).__name__}"
        )
    if config.image_size % IMAGE_SIZE_MULTIPLE:
        raise ValueError(
            f"`image_size` must be a multiple of {IMAGE_SIZE_MULTIPLE}. "
            f"Received: image_size={config.image_size!r}"
        )


def _make_pooling(config):
    return cxr_layers.get_pooling(
        config.pooling, config.num_classes, **dict(config.pooling_options)
    )


def map_kind_for(config):
    """Says what the model's `localization_maps` hold.

    Args:
      config: a `ModelConfig`.

    Returns:
      "probability" (maps in [0, 1]: PCAM's p_ij, or the InfoMask mask) or
      "cam" (raw class activation maps s_ij, to be normalised per image).

    Raises:
      ValueError: unknown pooling name (from `get_pooling`).
    """
    if choices.BACKBONE_REGISTRY[config.backbone].trunk is None:  # InfoMask
        return cxr_layers.InfoMask.map_kind
    return _make_pooling(config).map_kind


def _backbone_features(config, inputs):
    # The registry entry names the trunk builder: a new backbone needs no
    # change here.
    trunk = choices.load(choices.BACKBONE_REGISTRY[config.backbone].trunk)
    return keras.layers.Identity(name=FEATURES_LAYER)(trunk(inputs, config))


def _outputs(logits, maps):
    # float32 outputs whatever the dtype policy, so the losses, metrics and
    # exported signatures never see float16.
    logits = keras.layers.Activation("linear", dtype="float32", name="logits")(logits)
    probabilities = keras.layers.Activation(
        "sigmoid", dtype="float32", name="probabilities"
    )(logits)
    return {
        "logits": logits,
        "probabilities": probabilities,
        "localization_maps": maps,
    }


def _build_pooling_model(config, inputs):
    # The pooling first: a bad name or option fails before the trunk is built.
    pooling = _make_pooling(config)
    features = _backbone_features(config, inputs)
    logits, maps = pooling(features)
    maps = keras.layers.Activation("linear", dtype="float32", name="localization_maps")(
        maps
    )
    return keras.Model(
        inputs, _outputs(logits, maps), name=f"{config.backbone}_{config.pooling}"
    )


def _info_mask(config, recipe, num_masks=1):
    return cxr_layers.InfoMask(
        variant=config.infomask_variant,
        alpha=config.infomask_alpha,
        tau=config.infomask_tau,
        attention_activation=recipe.attention_activation,
        clip_gradient_leak=recipe.clip_gradient_leak,
        attention_bias_initializer=keras.initializers.Constant(recipe.attention_bias),
        num_masks=num_masks,
        name="infomask",
    )


def _build_infomask_model(config, inputs, recipe):
    if recipe.mask_site == "features":
        return _build_feature_mask_model(config, inputs, recipe)
    width = config.infomask_width
    features = infomask_net.encoder_trunk(inputs, recipe.normalization, width)
    masked, mask = _info_mask(config, recipe)([features, inputs])
    class_features = keras.layers.Identity(name=FEATURES_LAYER)(
        infomask_net.classifier_trunk(masked, recipe.normalization, width)
    )
    pooled = keras.layers.GlobalAveragePooling2D(name="classifier_gap")(class_features)
    logits = keras.layers.Dense(config.num_classes, name="classifier_dense")(pooled)
    # The mask is class-agnostic: average it down to the classifier's grid
    # (stride 4) and give every class the same map.
    coarse = keras.layers.AveragePooling2D(
        infomask_net.FEATURE_STRIDE, name="mask_pool"
    )(mask)
    maps = ClassBroadcast(
        config.num_classes, dtype="float32", name="localization_maps"
    )(coarse)
    return keras.Model(
        inputs, _outputs(logits, maps), name=f"infomask_{config.infomask_variant}"
    )


def _build_feature_mask_model(config, inputs, recipe):
    if config.infomask_width != 1.0:
        raise ValueError(
            "`infomask_width` scales the paper's image-mask network "
            "(`build_infomask_model` with `infomask_net.STABLE`); the mask on "
            "the compact trunk's features has no width. "
            f"Received: infomask_width={config.infomask_width!r}"
        )
    features = keras.layers.Identity(name=FEATURES_LAYER)(compact.compact_trunk(inputs))
    # One mask per finding: each finding's logit reads the features its own
    # mask keeps, and its map is that mask.
    _, masks = _info_mask(config, recipe, num_masks=config.num_classes)(
        [features, features]
    )
    pooled = MaskNormalizedPooling(name="classifier_pool")([features, masks])
    logits = ClasswiseDense(name="classifier_dense")(pooled)
    maps = keras.layers.Activation("linear", dtype="float32", name="localization_maps")(
        masks
    )
    return keras.Model(
        inputs, _outputs(logits, maps), name=f"infomask_{config.infomask_variant}"
    )


def build_model(config):
    """Builds the weakly supervised localizer a `ModelConfig` describes.

    Pooling backbones (resnet34, densenet121, resnet50: stride 32; compact,
    the CPU demo's: stride 8): trunk -> features ->
    `get_pooling(config.pooling, ...)` -> logits and maps.
    InfoMask (`infomask_net.FEATURES`): the compact trunk -> features F ->
    `InfoMask` with one mask per class -> per class, the mask-weighted
    average of F (`MaskNormalizedPooling`) -> one dense unit
    (`ClasswiseDense`); class k's map is mask k (docs/design/infomask.md).

    Args:
      config: a `ModelConfig`.

    Returns:
      A functional `keras.Model` taking `image` float32 `(B, S, S, channels)`,
      already normalised with `config.normalization`, and returning a dict:
      "logits" `(B, K)`, "probabilities" `(B, K)` (sigmoid of the logits),
      "localization_maps" `(B, h, w, K)` with h = w = S/32 (S/8 for
      compact and InfoMask); all float32 under any dtype policy. The
      layer named `gradcam_target_layer(model)` outputs the backbone
      feature map.

    Raises:
      TypeError: `config` is not a `ModelConfig`.
      ValueError: `image_size` not a multiple of 32, unknown pooling name or
        bad pooling options, bad InfoMask settings (an `infomask_width`
        other than 1.0).
    """
    _check_config(config)
    inputs = keras.Input(
        shape=(config.image_size, config.image_size, config.channels), name="image"
    )
    if choices.BACKBONE_REGISTRY[config.backbone].trunk is None:  # InfoMask
        return _build_infomask_model(config, inputs, infomask_net.FEATURES)
    return _build_pooling_model(config, inputs)


def build_infomask_model(config, recipe=infomask_net.STABLE):
    """`build_model` for the InfoMask backbone with a chosen `Recipe`.

    Args:
      config: a `ModelConfig` with `backbone="infomask"`.
      recipe: an `infomask_net.Recipe`; `infomask_net.PAPER` builds the
        paper's text read literally, for measurements (it does not train:
        docs/design/infomask.md).

    Returns:
      The model, as `build_model` returns it.

    Raises:
      ValueError: `config` is not an InfoMask config (and as `build_model`).
    """
    _check_config(config)
    if config.backbone != "infomask":
        raise ValueError(
            "`build_infomask_model` needs backbone='infomask'. "
            f"Received: backbone={config.backbone!r}"
        )
    inputs = keras.Input(
        shape=(config.image_size, config.image_size, config.channels), name="image"
    )
    return _build_infomask_model(config, inputs, recipe)


def gradcam_target_layer(model):
    """Names the layer whose output is the backbone feature map.

    `model.get_layer(name).output` is the `(B, h, w, C)` feature map in the
    model's graph, e.g. for Grad-CAM:
    `keras.Model(model.input, [model.get_layer(name).output, model.output])`.

    Args:
      model: a model from `build_model` (or one loaded from `.keras`).

    Returns:
      The layer name ("features"): the trunk's output for the pooling
      models (the pooling layer's input), the classification block's last
      feature map (before global average pooling) for InfoMask.

    Raises:
      ValueError: `model` has no such layer.
    """
    names = {layer.name for layer in model.layers}
    if FEATURES_LAYER not in names:
        raise ValueError(
            f"Model {model.name!r} has no {FEATURES_LAYER!r} layer: was it built "
            f"by build_model? Received layers: {sorted(names)[:20]}"
        )
    return FEATURES_LAYER
