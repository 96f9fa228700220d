"""DenseNet-121 and ResNet-50 trunks from keras.applications, grayscale-ready."""

import keras
import numpy as np
from keras import ops

from cxr_tf.data import schema

# Per-channel ImageNet statistics of the keras.applications preprocessing
# (`imagenet_utils.preprocess_input`): "torch" scales to [0, 1] and
# standardises RGB; "caffe" flips RGB to BGR and only subtracts the mean.
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)

APPLICATIONS = {
    "densenet121": (keras.applications.DenseNet121, "torch"),
    "resnet50": (keras.applications.ResNet50, "caffe"),
}


@keras.saving.register_keras_serializable(package="cxr_tf")
class ImageNetInput(keras.layers.Layer):
    """Maps gray-normalised pixels to the input an ImageNet network expects.

    The data pipeline normalises every backbone's input with one
    `schema.Normalization` (for these backbones `schema.IMAGENET_GRAY`).
    ImageNet weights expect per-channel statistics on three channels, so this
    layer undoes the gray normalisation (back to the 0..255 scale), tiles one
    channel to three, and applies the network's own preprocessing.

    Args:
      mode: "torch" (DenseNet: /255, per-channel mean and std, RGB) or
        "caffe" (ResNet-50: RGB->BGR, per-channel mean subtracted).
      mean: the gray normalisation mean the input was normalised with.
      std: the gray normalisation std the input was normalised with.

    Input shape:
      `(B, H, W, C)` with C = 1 or 3.

    Output shape:
      `(B, H, W, 3)`.

    Example:
    >>> layer = ImageNetInput("torch", mean=114.5, std=57.6)
    >>> layer(np.zeros((2, 32, 32, 1), "float32")).shape
    (2, 32, 32, 3)
    """

    def __init__(self, mode, mean, std, **kwargs):
        super().__init__(**kwargs)
        if mode not in ("torch", "caffe"):
            raise ValueError(
                f"`mode` must be 'torch' or 'caffe'. Received: mode={mode!r}"
            )
        if not std > 0:
            raise ValueError(f"`std` must be positive. Received: std={std!r}")
        self.mode = mode
        self.mean = float(mean)
        self.std = float(std)

    def call(self, inputs):
        dtype = self.compute_dtype
        x = ops.cast(inputs, dtype) * ops.cast(self.std, dtype) + ops.cast(
            self.mean, dtype
        )
        if x.shape[-1] == 1:
            x = ops.concatenate([x, x, x], axis=-1)
        if self.mode == "torch":
            mean = np.asarray(_TORCH_MEAN) * 255.0
            std = np.asarray(_TORCH_STD) * 255.0
            return (x - ops.cast(mean, dtype)) / ops.cast(std, dtype)
        x = ops.flip(x, axis=-1)
        return x - ops.cast(np.asarray(_CAFFE_MEAN_BGR), dtype)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (3,)

    def get_config(self):
        config = super().get_config()
        config.update({"mode": self.mode, "mean": self.mean, "std": self.std})
        return config


def build_application(
    backbone, input_shape, weights=None, name=None, input_tensor=None
):
    """Builds a keras.applications trunk without its classification head.

    With `weights=None` the network is built directly on `input_shape` (one
    channel for grayscale films). With `weights="imagenet"` the pretrained
    three-channel network is preceded by `ImageNetInput`, which turns the
    `schema.IMAGENET_GRAY`-normalised input into the network's own
    per-channel preprocessing; the weights are downloaded by Keras on first
    use.

    Args:
      backbone: "densenet121" or "resnet50".
      input_shape: `(height, width, channels)`, channels 1 or 3.
      weights: None or "imagenet".
      name: name of the returned model (default: `backbone`).
      input_tensor: optional symbolic tensor of shape `input_shape` to build
        on: the layers then join the caller's graph (no nested model), and
        the returned model's output is connected to the caller's input.

    Returns:
      A functional `keras.Model` mapping `(B, H, W, C)` images, normalised
      with `schema.normalization_for(backbone)`, to the stride-32 feature map
      (1024 channels for DenseNet-121, 2048 for ResNet-50).

    Raises:
      ValueError: unknown `backbone`, bad `weights` or bad `input_shape`.
    """
    if backbone not in APPLICATIONS:
        raise ValueError(
            f"`backbone` must be one of {tuple(APPLICATIONS)}. "
            f"Received: backbone={backbone!r}"
        )
    if weights not in (None, "imagenet"):
        raise ValueError(
            f"`weights` must be None or 'imagenet'. Received: weights={weights!r}"
        )
    if len(input_shape) != 3 or input_shape[-1] not in (1, 3):
        raise ValueError(
            "`input_shape` must be (height, width, channels) with channels 1 or "
            f"3. Received: input_shape={input_shape!r}"
        )
    name = name or backbone
    constructor, mode = APPLICATIONS[backbone]
    if weights is None:
        return constructor(
            include_top=False,
            weights=None,
            input_tensor=input_tensor,
            input_shape=tuple(input_shape),
            name=name,
        )
    gray = schema.normalization_for(backbone)
    own_input = input_tensor is None
    if own_input:
        input_tensor = keras.Input(shape=tuple(input_shape), name="image")
    x = ImageNetInput(mode, mean=gray.mean, std=gray.std, name="imagenet_input")(
        input_tensor
    )
    # Built on `x`, the application's model starts at `input_tensor`'s
    # source and includes ImageNetInput; that layer has no weights, so the
    # h5 weights (matched layer by layer) still load.
    model = constructor(
        include_top=False,
        weights="imagenet",
        input_tensor=x,
        input_shape=tuple(input_shape[:-1]) + (3,),
        name=name,
    )
    if own_input:
        # keras.applications lists the source inputs; one input is simpler.
        model = keras.Model(input_tensor, model.output, name=name)
    return model


def trunk_features(inputs, config):
    """The "densenet121" and "resnet50" entries of the backbone registry.

    Args:
      inputs: the symbolic `(B, S, S, C)` image tensor of the caller's model.
      config: the `ModelConfig` (its `backbone` and `weights`).

    Returns:
      The stride-32 feature map tensor, built into the caller's graph.
    """
    return build_application(
        config.backbone, tuple(inputs.shape[1:]), weights=config.weights,
        input_tensor=inputs,
    ).output
