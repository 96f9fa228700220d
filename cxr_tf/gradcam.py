"""Grad-CAM (Selvaraju et al. 2017) maps for any model built by `build_model`.

The InfoMask paper's GradCAM baseline and CheXCAM (Grad-CAM on the last layer
of CheXNet, i.e. a DenseNet-121) are this map on the respective model. The
maps are raw (unnormalised) Grad-CAM values, so they are thresholded like the
CAM baselines: normalised to [0, 255] per image ("cam" map kind).
"""

import keras
import numpy as np
import tensorflow as tf

from cxr_tf.models import gradcam_target_layer

MAP_KIND = "cam"


class GradCAM:
    """Computes Grad-CAM maps of every class at a model's backbone feature map.

    For class k with logit y_k and feature map A (h, w, C):
    alpha_c = mean_ij dy_k/dA_ijc, map_k = ReLU(sum_c alpha_c A_c).

    Args:
      model: a model from `build_model` (or loaded from `.keras`): dict outputs
        with "logits".
      target_layer: name of the layer whose output is A; default
        `gradcam_target_layer(model)` (the backbone's last feature map, or
        that of InfoMask's classification block).
      jit_compile: compile the map computation with XLA.

    Example:

    >>> cam = GradCAM(model)
    >>> maps = cam(images)  # (B, h, w, K) float32, >= 0
    """

    def __init__(self, model, target_layer=None, jit_compile=False):
        self.target_layer = target_layer or gradcam_target_layer(model)
        try:
            layer = model.get_layer(self.target_layer)
        except ValueError:
            raise ValueError(
                f"`target_layer` {self.target_layer!r} is not a layer of model "
                f"{model.name!r}. Layers: {[l.name for l in model.layers]}"
            ) from None
        outputs = model.outputs
        if isinstance(model.output, dict):
            logits = model.output["logits"]
        else:
            logits = outputs[0]
        self._model = keras.Model(model.inputs, [_output_in_graph(layer), logits])
        self.num_classes = int(logits.shape[-1])
        self._fn = tf.function(self._maps, jit_compile=jit_compile)

    def _maps(self, images):
        with tf.GradientTape(persistent=True) as tape:
            features, logits = self._model(images, training=False)
            features = tf.cast(features, tf.float32)
            logits = tf.cast(logits, tf.float32)
            per_class = [logits[:, k] for k in range(self.num_classes)]
        maps = []
        for k in range(self.num_classes):
            # The feature map is an intermediate tensor of the forward pass,
            # so the gradient only runs back through the head.
            grads = tape.gradient(per_class[k], features)
            weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
            maps.append(tf.nn.relu(tf.reduce_sum(weights * features, axis=-1)))
        del tape
        return tf.stack(maps, axis=-1), logits

    def __call__(self, images):
        """Grad-CAM maps of a batch.

        Args:
          images: float32 (B, S, S, channels), normalised as the model expects.

        Returns:
          float32 numpy array (B, h, w, K) of non-negative maps.
        """
        maps, _ = self._fn(tf.convert_to_tensor(images, tf.float32))
        return maps.numpy()

    def maps_and_logits(self, images):
        """Like `__call__`, also returning the logits (B, K) of the same pass."""
        maps, logits = self._fn(tf.convert_to_tensor(images, tf.float32))
        return maps.numpy(), logits.numpy()


def gradcam_maps(model, images, target_layer=None):
    """One-shot Grad-CAM: `GradCAM(model, target_layer)(images)`.

    Args:
      model: a `build_model` model.
      images: float32 (B, S, S, channels), normalised.
      target_layer: see `GradCAM`.

    Returns:
      float32 numpy array (B, h, w, K).
    """
    return GradCAM(model, target_layer)(np.asarray(images, np.float32))


def _output_in_graph(layer):
    """The output tensor of `layer` in the graph of the model that calls it.

    For a plain layer this is `layer.output`; a nested functional model's
    `.output` is its own inner graph's output (fed by its own Input), so the
    symbolic output of its call node is used for both.
    """
    nodes = getattr(layer, "_inbound_nodes", [])
    if len(nodes) != 1:
        raise ValueError(
            f"Layer {layer.name!r} is called {len(nodes)} times in the model; "
            "Grad-CAM needs a layer called exactly once."
        )
    (tensor,) = nodes[0].output_tensors
    return tensor
