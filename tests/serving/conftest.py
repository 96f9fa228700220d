"""Fixtures: a tiny SavedModel honouring the export signature contract."""

import json
import os
import shutil
import struct
import time
import zlib

import numpy as np
import pytest
import tensorflow as tf

from cxr_tf.data.schema import FINDINGS

SIZE = 32
MAX_BOXES = 2


class TinyCxrModule(tf.Module):
    """Same signatures as cxr_tf.export, a 28-weight model behind them.

    Probabilities are sigmoid(w_k * mean(x) + b_k) of the normalised pixels;
    maps are sigmoid(w_k * 8x8-average-pooled pixels); one box per finding
    whose probability exceeds 0.5, covering the whole image.
    """

    def __init__(self, seed=0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.w = tf.Variable(rng.normal(size=(14,)).astype(np.float32) * 3.0)
        self.b = tf.Variable(rng.normal(size=(14,)).astype(np.float32))

    def _outputs(self, pixels, image_hw):
        mean = tf.reduce_mean(pixels, axis=[1, 2, 3])
        probabilities = tf.sigmoid(mean[:, None] * self.w + self.b)
        pooled = tf.nn.avg_pool2d(pixels, 8, 8, "VALID")[..., 0]  # (B,4,4)
        maps = tf.sigmoid(pooled[:, None] * self.w[None, :, None, None])
        hw = tf.cast(image_hw, tf.float32)
        full = tf.stack(
            [tf.zeros_like(hw[:, 0]), tf.zeros_like(hw[:, 0]), hw[:, 1], hw[:, 0]], -1
        )
        present = probabilities > 0.5
        boxes = tf.where(
            present[..., None, None],
            tf.tile(full[:, None, None, :], [1, 14, 1, 1]),
            0.0,
        )
        boxes = tf.concat([boxes, tf.zeros_like(boxes)], axis=2)  # N = 2
        scores = tf.where(present, probabilities, 0.0)[..., None]
        scores = tf.concat([scores, tf.zeros_like(scores)], axis=2)
        return {
            "probabilities": probabilities,
            "localization_maps": maps,
            "boxes": boxes,
            "box_scores": scores,
            "num_boxes": tf.cast(present, tf.int32),
        }

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve_bytes(self, image_bytes):
        def decode(data):
            image = tf.io.decode_image(data, channels=1, expand_animations=False)
            hw = tf.shape(image)[:2]
            image = tf.image.resize(tf.cast(image, tf.float32), [SIZE, SIZE])
            return (image - 128.0) / 64.0, hw

        pixels, hw = tf.map_fn(
            decode,
            image_bytes,
            fn_output_signature=(
                tf.TensorSpec([SIZE, SIZE, 1], tf.float32),
                tf.TensorSpec([2], tf.int32),
            ),
        )
        return self._outputs(pixels, hw)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, SIZE, SIZE, 1], tf.float32, name="pixels")
        ]
    )
    def serve_pixels(self, pixels):
        hw = tf.fill([tf.shape(pixels)[0], 2], SIZE)
        return self._outputs(pixels, hw)

    @tf.function(input_signature=[])
    def info(self):
        return {
            "findings": tf.constant(FINDINGS),
            "thresholds": tf.fill([14], 0.5),
            "preprocessing": tf.constant(
                json.dumps({"image_size": SIZE, "mean": 128.0, "std": 64.0})
            ),
        }


def export_tiny(base_path, version, seed=0):
    """Writes a TinyCxrModule as base_path/version (temp dir, then rename)."""
    module = TinyCxrModule(seed)
    final = os.path.join(base_path, str(version))
    tmp = os.path.join(base_path, f".tmp-{version}")
    tf.saved_model.save(
        module,
        tmp,
        signatures={
            "serving_default": module.serve_bytes,
            "predict_pixels": module.serve_pixels,
            "model_info": module.info,
        },
    )
    os.rename(tmp, final)
    return final


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A model base path holding version 1 of the tiny model (read-only use)."""
    base = tmp_path_factory.mktemp("tiny_model")
    export_tiny(str(base), 1)
    return str(base)


@pytest.fixture()
def fresh_model_dir(tmp_path, tiny_model_dir):
    """A private copy of the tiny model base path, for tests that add versions."""
    base = tmp_path / "model"
    shutil.copytree(tiny_model_dir, base)
    return str(base)


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir):
    """serving.local_server on the tiny model, gRPC and REST, on free ports."""
    from serving import local_server

    server = local_server.LocalServer(
        tiny_model_dir, port=0, max_batch_size=8, rest_api_port=0, poll_seconds=60
    ).start()
    yield server
    server.stop()


def png_bytes(array):
    """Encodes a 2-D uint8 or uint16 array as PNG."""
    array = np.asarray(array)
    dtype = tf.uint16 if array.dtype == np.uint16 else tf.uint8
    return tf.io.encode_png(tf.constant(array[..., None], dtype=dtype)).numpy()


def jpeg_bytes(array):
    return tf.io.encode_jpeg(
        tf.constant(np.asarray(array, np.uint8)[..., None])
    ).numpy()


def wait_for(condition, timeout=20.0, interval=0.02):
    """Bounded polling: `condition()` until true or `timeout` s; returns it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return bool(condition())


def png_zeros(width, height):
    """A valid all-zero 8-bit gray PNG, compressed row by row (a bomb when large).

    16000x16000 comes to about 240 KB and decodes to 256 MB.
    """
    from cxr_tf.data import image_header  # pylint: disable=g-import-not-at-top

    def chunk(kind, data):
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # Filter byte 0, then the row.
    body = b"".join(compressor.compress(row) for _ in range(height))
    body += compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        image_header.PNG_SIGNATURE
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", body)
        + chunk(b"IEND", b"")
    )


def export_keras_model(root, image_size=SIZE, box_work_size=256):
    """A small conv + PCAM Keras model exported by `export_lib` (real graph).

    Boxes are found at `box_work_size` (as benchmarks/serving_load.py): with
    exact boxes (None) a 6000x6000 film costs gigabytes in box extraction.

    Returns:
      The model base path (root/serving, holding version 1).
    """
    import keras  # pylint: disable=g-import-not-at-top

    from cxr_tf import export_lib  # pylint: disable=g-import-not-at-top
    from cxr_tf.layers import get_pooling  # pylint: disable=g-import-not-at-top
    from cxr_tf.models import ModelConfig  # pylint: disable=g-import-not-at-top

    keras.utils.set_random_seed(0)
    inputs = keras.Input((image_size, image_size, 1), name="image")
    x = keras.layers.Conv2D(4, 3, strides=4, padding="same", activation="relu")(inputs)
    logits, maps = get_pooling("pcam", len(FINDINGS))(x)
    model = keras.Model(
        inputs,
        {
            "logits": logits,
            "probabilities": keras.layers.Activation("sigmoid")(logits),
            "localization_maps": maps,
        },
    )
    model_dir = os.path.join(root, "model")
    os.makedirs(model_dir)
    model.save(os.path.join(model_dir, "model.keras"))
    config = ModelConfig(image_size=image_size, pooling="pcam")
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(
            {
                "model": config.to_dict(),
                "findings": list(FINDINGS),
                "map_kind": "probability",
            },
            f,
        )
    base = os.path.join(root, "serving")
    export_lib.export_saved_model(
        export_lib.ExportConfig(
            model_dir,
            base,
            version=1,
            threshold=0.5,
            max_boxes=2,
            box_work_size=box_work_size,
        )
    )
    return base


@pytest.fixture(scope="session")
def exported_model_dir(tmp_path_factory):
    """A model base path exported by export_lib under umask 077 (read-only use)."""
    root = tmp_path_factory.mktemp("exported")
    old = os.umask(0o077)
    try:
        return export_keras_model(str(root))
    finally:
        os.umask(old)
