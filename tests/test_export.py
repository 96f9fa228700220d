"""cxr_tf.export_lib: signatures, preprocessing, boxes, assets, fresh-process load."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from cxr_tf.data import preprocess
from cxr_tf import model_dir as model_dir_lib
from cxr_tf import export_lib
from cxr_tf import localization
from cxr_tf.data import images
from cxr_tf.data import schema
from cxr_tf.layers import get_pooling
from cxr_tf.models import ModelConfig

SIZE = 32
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_model(pooling, seed=0):
    """A small functional model with the localizer's outputs and a real pooling."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SIZE, SIZE, 1), name="image")
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv2D(16, 3, strides=4, padding="same", activation="relu")(x)
    logits, maps = get_pooling(pooling, 14)(x)
    return keras.Model(
        inputs,
        {
            "logits": logits,
            "probabilities": keras.layers.Activation("sigmoid")(logits),
            "localization_maps": maps,
        },
    )


def _save(model, directory, pooling, bare_config=False, metrics=None):
    os.makedirs(directory, exist_ok=True)
    config = ModelConfig(image_size=SIZE, pooling=pooling)
    model.save(os.path.join(directory, "model.keras"))
    payload = (
        config.to_dict()
        if bare_config
        else {
            "model": config.to_dict(),
            "findings": list(schema.FINDINGS),
            "map_kind": "probability" if pooling == "pcam" else "cam",
        }
    )
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(payload, f)
    if metrics is not None:
        with open(os.path.join(directory, "metrics.json"), "w") as f:
            json.dump(metrics, f)
    return directory


@pytest.fixture(scope="module")
def pcam_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_pcam")
    model = _tiny_model("pcam")
    model_dir = _save(model, str(root / "model"), "pcam", metrics={"mean_auc": 0.5})
    path = export_lib.export_saved_model(
        export_lib.ExportConfig(
            model_dir,
            str(root / "serving"),
            threshold=0.5,
            class_thresholds={"Mass": 0.45, "Nodule": 0.55},
            max_boxes=4,
        )
    )
    return model, path


def _png(array):
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[..., None]
    dtype = tf.uint16 if array.dtype == np.uint16 else tf.uint8
    return tf.io.encode_png(tf.constant(array, dtype)).numpy()


def _test_images():
    """(name, bytes): gray, gray-as-RGBA, colour, 16-bit, JPEG, non-square, small."""
    rng = np.random.default_rng(0)
    ramp = np.add.outer(np.arange(96), np.arange(96)).astype(np.float64)
    gray = np.clip(ramp + rng.normal(0, 30, ramp.shape), 0, 255).astype(np.uint8)
    colour = rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)
    rgba = np.concatenate(
        [
            np.repeat(gray[..., None], 3, -1),
            colour[:1, :1, :1].repeat(96, 0).repeat(96, 1),
        ],
        -1,
    )
    return [
        ("gray.png", _png(gray)),
        ("rgba.png", _png(rgba)),
        ("colour.png", _png(colour)),
        ("deep.png", _png((ramp * 300 + 1000).astype(np.uint16))),
        ("photo.jpg", tf.io.encode_jpeg(gray[..., None], quality=90).numpy()),
        ("wide.png", _png(gray[:50, :])),
        ("small.png", _png(gray[:20, :24])),
    ]


def _reference_pixels(data, size=SIZE, normalization=schema.FIXED):
    """Training's path: images.decode_image -> ingestion resize -> letterbox."""
    gray = images.decode_image(data)
    stored = preprocess.resize_longer_side(gray, size)
    pixels, _ = preprocess.letterbox(
        tf.constant(stored[..., None]), None, size
    )
    pixels = pixels.numpy().astype(np.float32)
    return (pixels - normalization.mean) / normalization.std, gray.shape


def test_preprocessing_matches_training_path():
    for name, data in _test_images():
        got, hw = export_lib.preprocess_image_bytes(
            tf.constant(data), SIZE, schema.FIXED
        )
        want, shape = _reference_pixels(data)
        assert tuple(hw.numpy()) == shape, name
        # Equal up to float rounding of the normalisation (64 = 1 gray level).
        np.testing.assert_allclose(got.numpy(), want, atol=1e-5, err_msg=name)


def test_preprocessing_of_real_films(cxr14_sample):
    names = sorted(os.listdir(cxr14_sample / "images"))
    rgba = [n for n in names if _mode(cxr14_sample / "images" / n) == "RGBA"][:1]
    for name in names[:2] + rgba:
        data = (cxr14_sample / "images" / name).read_bytes()
        got, _ = export_lib.preprocess_image_bytes(tf.constant(data), 64, schema.FIXED)
        want, _ = _reference_pixels(data, 64)
        np.testing.assert_allclose(got.numpy(), want, atol=1e-5, err_msg=name)


def _mode(path):
    from PIL import Image

    with Image.open(path) as image:
        return image.mode


def test_layout_assets_and_warmup(pcam_export):
    _, path = pcam_export
    assert sorted(os.listdir(path)) == [
        "assets",
        "assets.extra",
        "fingerprint.pb",
        "saved_model.pb",
        "variables",
    ]
    assert not [n for n in os.listdir(os.path.dirname(path)) if n.startswith(".tmp")]
    assets = os.path.join(path, "assets")
    with open(os.path.join(assets, "findings.txt")) as f:
        assert tuple(f.read().split()) == schema.FINDINGS
    with open(os.path.join(assets, "thresholds.json")) as f:
        thresholds = json.load(f)
    assert thresholds["thresholds"]["Mass"] == 0.45
    assert thresholds["thresholds"]["Effusion"] == 0.5
    with open(os.path.join(assets, "preprocessing.json")) as f:
        assert json.load(f)["mean"] == 128.0
    with open(os.path.join(assets, "model_card.json")) as f:
        card = json.load(f)
    assert card["metrics"] == {"mean_auc": 0.5}
    assert card["model_config"]["image_size"] == SIZE
    assert "Not a medical device" in card["intended_use"]

    from tensorflow_serving.apis import prediction_log_pb2

    warmup = os.path.join(path, "assets.extra", "tf_serving_warmup_requests")
    logs = []
    for record in tf.data.TFRecordDataset(warmup):
        log = prediction_log_pb2.PredictionLog()
        log.ParseFromString(record.numpy())
        logs.append(log)
    assert [l.predict_log.request.model_spec.signature_name for l in logs] == [
        "serving_default",
        "predict_pixels",
    ]
    # The warm-up requests run on the export.
    loaded = tf.saved_model.load(path)
    for log in logs:
        request = log.predict_log.request
        inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
        out = loaded.signatures[request.model_spec.signature_name](**inputs)
        assert out["probabilities"].shape == (1, 14)


def test_signature_dtypes_and_shapes(pcam_export):
    from serving import local_server

    _, path = pcam_export
    sigs = local_server.read_signature_defs(path)

    def spec(info):
        return tf.dtypes.as_dtype(info.dtype).name, [
            d.size for d in info.tensor_shape.dim
        ]

    default = sigs["serving_default"]
    assert spec(default.inputs["image_bytes"]) == ("string", [-1])
    assert spec(default.outputs["probabilities"]) == ("float32", [-1, 14])
    assert spec(default.outputs["localization_maps"]) == ("float32", [-1, 14, 4, 4])
    assert spec(default.outputs["boxes"]) == ("float32", [-1, 14, 4, 4])
    assert spec(default.outputs["box_scores"]) == ("float32", [-1, 14, 4])
    assert spec(default.outputs["num_boxes"]) == ("int32", [-1, 14])
    pixels = sigs["predict_pixels"]
    assert spec(pixels.inputs["pixels"]) == ("float32", [-1, SIZE, SIZE, 1])
    assert set(pixels.outputs) == set(default.outputs)


_FRESH_PROCESS = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    path, inputs, output = sys.argv[1:4]
    data = [bytes.fromhex(h) for h in json.load(open(inputs))]
    loaded = tf.saved_model.load(path)
    out = loaded.signatures["serving_default"](image_bytes=tf.constant(data))
    info = loaded.signatures["model_info"]()
    pixels = np.load(output + ".pixels.npy")
    px = loaded.signatures["predict_pixels"](pixels=tf.constant(pixels))
    arrays = {k: v.numpy() for k, v in out.items()}
    arrays.update({"px_" + k: v.numpy() for k, v in px.items()})
    arrays["findings"] = info["findings"].numpy().astype(str)
    arrays["cxr_tf_imported"] = np.array(
        any(m == "cxr_tf" or m.startswith("cxr_tf.") for m in sys.modules))
    np.savez(output, **arrays)
    """)


def _fresh_process_outputs(path, items, pixels, tmp_path):
    inputs = tmp_path / "inputs.json"
    inputs.write_text(json.dumps([data.hex() for _, data in items]))
    output = str(tmp_path / "out.npz")
    np.save(output + ".pixels.npy", pixels)
    env = dict(os.environ, PYTHONPATH="", TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS, path, str(inputs), output],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(np.load(output, allow_pickle=False))


def _expected_boxes(score_map, hw, size, map_kind, threshold, max_boxes):
    """The evaluation code's boxes, mapped through the letterbox."""
    height, width = hw
    side = max(height, width)
    scale = size / side
    new_h = min(max(round(height * scale), 1), size)
    new_w = min(max(round(width * scale), 1), size)
    off_y = (size - new_h) // 2 / scale
    off_x = (size - new_w) // 2 / scale
    boxes = []
    for b in localization.extract_boxes(
        score_map, (side, side), map_kind, threshold=threshold, max_boxes=max_boxes
    ):
        x0, y0 = max(b.x - off_x, 0.0), max(b.y - off_y, 0.0)
        x1, y1 = min(b.x + b.w - off_x, width), min(b.y + b.h - off_y, height)
        boxes.append((x0, y0, max(x1 - x0, 0.0), max(y1 - y0, 0.0), b.score))
    return np.array(boxes, np.float32).reshape(-1, 5)


@pytest.mark.slow
def test_fresh_process_load_matches_keras_and_eval_boxes(pcam_export, tmp_path):
    model, path = pcam_export
    items = _test_images()
    pixels = np.stack([_reference_pixels(data)[0] for _, data in items]).astype(
        np.float32
    )
    out = _fresh_process_outputs(path, items, pixels, tmp_path)
    assert not out["cxr_tf_imported"]
    assert tuple(out["findings"]) == schema.FINDINGS
    keras_out = model(pixels)
    np.testing.assert_allclose(
        out["probabilities"], keras_out["probabilities"].numpy(), atol=1e-4
    )
    np.testing.assert_allclose(
        out["px_probabilities"], keras_out["probabilities"].numpy(), atol=1e-4
    )
    np.testing.assert_allclose(
        out["localization_maps"],
        np.transpose(keras_out["localization_maps"].numpy(), [0, 3, 1, 2]),
        atol=1e-4,
    )
    thresholds = [0.5] * 14
    thresholds[4], thresholds[5] = 0.45, 0.55
    total = 0
    for i, (name, data) in enumerate(items):
        hw = images.decode_image(data).shape
        for k in range(14):
            want = _expected_boxes(
                out["localization_maps"][i, k],
                hw,
                SIZE,
                "probability",
                thresholds[k],
                4,
            )
            n = out["num_boxes"][i, k]
            assert n == len(want), (name, k)
            np.testing.assert_allclose(
                out["boxes"][i, k, :n], want[:, :4], atol=1e-3, err_msg=name
            )
            np.testing.assert_allclose(out["box_scores"][i, k, :n], want[:, 4])
            assert not out["boxes"][i, k, n:].any()
            total += n
            # predict_pixels: boxes in SxS pixels.
            want_px = localization.extract_boxes(
                out["px_localization_maps"][i, k],
                (SIZE, SIZE),
                "probability",
                threshold=thresholds[k],
                max_boxes=4,
            )
            assert out["px_num_boxes"][i, k] == len(want_px)
    assert total > 0  # The comparison saw boxes.


def test_cam_maps_are_min_max_normalised_and_boxes_match(tmp_path):
    model = _tiny_model("lse")
    model_dir = _save(model, str(tmp_path / "m"), "lse", bare_config=True)
    path = export_lib.export_saved_model(
        export_lib.ExportConfig(model_dir, str(tmp_path / "e"), version=3)
    )
    assert path.endswith(os.sep + "3")
    loaded = tf.saved_model.load(path)
    data = _png(np.random.default_rng(1).integers(0, 256, (64, 64), np.uint8))
    out = loaded.signatures["serving_default"](image_bytes=tf.constant([data]))
    maps = out["localization_maps"].numpy()[0]
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    flat = maps.reshape(14, -1)
    varying = flat.max(1) > flat.min(1)
    np.testing.assert_allclose(flat[varying].min(1), 0.0, atol=1e-6)
    np.testing.assert_allclose(flat[varying].max(1), 1.0, atol=1e-6)
    with open(os.path.join(path, "assets", "thresholds.json")) as f:
        assert json.load(f)["thresholds"]["Hernia"] == 180.0
    for k in range(14):
        want = localization.extract_boxes(maps[k], (64, 64), "cam", max_boxes=10)
        n = int(out["num_boxes"][0, k])
        assert n == len(want)
        np.testing.assert_allclose(
            out["boxes"][0, k, :n],
            [[b.x, b.y, b.w, b.h] for b in want][:n] or np.zeros((0, 4)),
        )


@pytest.mark.slow
def test_versions_are_atomic_and_not_overwritten(tmp_path):
    model_dir = _save(_tiny_model("avg"), str(tmp_path / "m"), "avg")
    keras_file = os.path.join(model_dir, "model.keras")
    export_dir = str(tmp_path / "e")
    os.makedirs(os.path.join(export_dir, "7"))
    config = export_lib.ExportConfig(keras_file, export_dir)
    assert export_lib.next_version(export_dir) == 8
    path = export_lib.export_saved_model(config)
    assert os.path.basename(path) == "8"
    with pytest.raises(FileExistsError, match="overwrite"):
        export_lib.export_saved_model(
            export_lib.ExportConfig(keras_file, export_dir, version=8)
        )
    assert sorted(os.listdir(export_dir)) == ["7", "8"]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="version"):
        export_lib.ExportConfig("m", "e", version=0)
    with pytest.raises(ValueError, match="Unknown finding"):
        export_lib.ExportConfig("m", "e", class_thresholds={"Flu": 0.5})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model_dir_lib.load(str(tmp_path / "missing"))
    (tmp_path / "lonely").mkdir()
    (tmp_path / "lonely" / "model.keras").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="config.json"):
        model_dir_lib.load(str(tmp_path / "lonely"))


def test_box_threshold_chosen_at_training_is_the_export_default(tmp_path):
    # A mask model's threshold chosen on validation (config.json
    # `box_thresholds`) reaches thresholds.json and the served boxes.
    model = _tiny_model("pcam", seed=2)
    model_dir = _save(model, str(tmp_path / "m"), "pcam")
    model_dir_lib.write_box_thresholds(model_dir, {"probability": 0.35})
    path = export_lib.export_saved_model(
        export_lib.ExportConfig(model_dir, str(tmp_path / "e"), max_boxes=10)
    )
    with open(os.path.join(path, "assets", "thresholds.json")) as f:
        assert set(json.load(f)["thresholds"].values()) == {0.35}
    loaded = tf.saved_model.load(path)
    data = _png(np.random.default_rng(3).integers(0, 256, (64, 64), np.uint8))
    out = loaded.signatures["serving_default"](image_bytes=tf.constant([data]))
    maps = out["localization_maps"].numpy()[0]
    for k in range(14):
        want = localization.extract_boxes(
            maps[k], (64, 64), "probability", threshold=0.35, max_boxes=10
        )
        assert int(out["num_boxes"][0, k]) == len(want), k
    # Maps of an untrained PCAM are near 0.5: boxes at 0.35, none at 0.9.
    assert int(np.sum(out["num_boxes"])) > 0
    # One threshold per finding (an InfoMask model's choice): each finding
    # keeps its own; one it does not name keeps the kind's default.
    model_dir_lib.write_box_thresholds(
        model_dir, {"probability": {"Mass": 0.2, "Nodule": 0.4}}
    )
    path = export_lib.export_saved_model(
        export_lib.ExportConfig(model_dir, str(tmp_path / "e"), max_boxes=10)
    )
    with open(os.path.join(path, "assets", "thresholds.json")) as f:
        served = json.load(f)["thresholds"]
    assert served["Mass"] == 0.2 and served["Nodule"] == 0.4
    assert served["Hernia"] == localization.DEFAULT_THRESHOLDS["probability"]
