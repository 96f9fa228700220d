"""TensorBoard summaries of a training run: scalars and overlay grids."""


import numpy as np



def _summary_metadata(plugin):
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = plugin
    return metadata


def write_scalar(tag, value, step):
    """Writes a TensorBoard scalar with core TF ops (no tensorboard package).

    `tf.summary.scalar` lives in the tensorboard package, which the project
    does not need otherwise; the event format is the same.
    """
    import tensorflow as tf

    return tf.summary.write(
        tag,
        tf.constant(float(value), tf.float32),
        step=step,
        metadata=_summary_metadata("scalars"),
    )


def write_images(tag, images, step):
    """Writes RGB images (N, H, W, 3) in [0, 1] as a TensorBoard image summary."""
    import tensorflow as tf

    images = np.asarray(images)
    pngs = [
        tf.io.encode_png(tf.constant(np.round(np.clip(i, 0, 1) * 255).astype(np.uint8)))
        for i in images
    ]
    height, width = images.shape[1:3]
    tensor = tf.stack([tf.constant(str(width)), tf.constant(str(height))] + pngs)
    return tf.summary.write(
        tag, tensor, step=step, metadata=_summary_metadata("images")
    )


def current_learning_rate(optimizer):
    """The optimizer's learning rate at its current step, as a float."""
    return float(np.asarray(optimizer.learning_rate))


def overlay_grid(images, maps, probabilities, findings, max_classes=1):
    """RGB overlays (N, S, S, 3) in [0, 1] of each image's top finding's map.

    Args:
      images: (N, S, S, 1) network inputs (normalised; rescaled per image).
      maps: (N, h, w, K) localization maps.
      probabilities: (N, K).
      findings: K names (unused in pixels; kept for symmetry with visualize).
      max_classes: findings per image (the most probable ones).

    Returns:
      float32 array (N, S, S*max_classes, 3).
    """
    import matplotlib

    cmap = matplotlib.colormaps["jet"]
    del findings
    out = []
    for image, image_maps, probs in zip(images, maps, probabilities):
        gray = image[..., 0].astype(np.float64)
        gray = (gray - gray.min()) / max(gray.max() - gray.min(), 1e-8)
        size = gray.shape
        panels = []
        for k in np.argsort(-probs)[:max_classes]:
            m = _resize_bilinear(image_maps[..., k], size)
            m = (m - m.min()) / max(m.max() - m.min(), 1e-8)
            heat = cmap(m)[..., :3]
            panels.append(0.6 * gray[..., None] + 0.4 * heat)
        out.append(np.concatenate(panels, axis=1))
    return np.asarray(out, dtype=np.float32)


def _resize_bilinear(array, size):
    import tensorflow as tf

    return tf.image.resize(array[None, ..., None], size, method="bilinear").numpy()[
        0, ..., 0
    ]


# ---------------------------------------------------------------------------
# The run.
