"""Export -> server -> client on the real NIH sample (slow: real ResNet-34)."""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.serving.conftest import wait_for

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMAGE_SIZE = 64
THRESHOLD = 0.5


def _run(args, **kwargs):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
    result = subprocess.run(
        args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900, **kwargs
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random ResNet-34 + PCAM bundle as training writes it, exported by the CLI."""
    from cxr_tf import model_dir as model_dir_lib
    from cxr_tf.data import schema
    from cxr_tf.models import ModelConfig, build_model

    root = tmp_path_factory.mktemp("e2e")
    model_dir = str(root / "model")
    config = ModelConfig(image_size=IMAGE_SIZE)
    os.makedirs(model_dir)
    build_model(config).save(os.path.join(model_dir, "model.keras"))
    model_dir_lib.write_config(model_dir, config, schema.FINDINGS)
    export_dir = str(root / "serving")
    stdout = _run(
        [
            sys.executable,
            "-m",
            "cxr_tf.export",
            f"--model={model_dir}",
            f"--export_dir={export_dir}",
            "--version=1",
            f"--threshold={THRESHOLD}",
            "--max_boxes=8",
        ]
    )
    assert stdout.strip().splitlines()[-1] == os.path.join(export_dir, "1")
    return model_dir, export_dir


def test_saved_model_cli_lists_both_signatures(exported):
    if shutil.which("saved_model_cli") is None:
        pytest.skip("saved_model_cli is not on PATH")
    _, export_dir = exported
    out = _run(["saved_model_cli", "show", "--all", "--dir", f"{export_dir}/1"])
    for expected in (
        "signature_def['serving_default']",
        "signature_def['predict_pixels']",
        "inputs['image_bytes'] tensor_info:\n        dtype: DT_STRING\n        shape: (-1)",
        f"inputs['pixels'] tensor_info:\n        dtype: DT_FLOAT\n        shape: "
        f"(-1, {IMAGE_SIZE}, {IMAGE_SIZE}, 1)",
        "outputs['boxes'] tensor_info:\n        dtype: DT_FLOAT\n        shape: "
        "(-1, 14, 8, 4)",
        "outputs['num_boxes'] tensor_info:\n        dtype: DT_INT32\n        shape: "
        "(-1, 14)",
        "outputs['localization_maps'] tensor_info:\n        dtype: DT_FLOAT\n"
        "        shape: (-1, 14, 2, 2)",
    ):
        assert expected in out, expected


@pytest.fixture(scope="module")
def served(exported, cxr14_sample, tmp_path_factory):
    """Client CLI + CxrClient results for six NIH films through local_server."""
    import contextlib
    import io

    from serving import client as client_lib
    from serving import local_server

    _, export_dir = exported
    tmp_path = tmp_path_factory.mktemp("served")
    names = sorted(os.listdir(cxr14_sample / "images"))[:6]
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    for name in names:
        shutil.copy(cxr14_sample / "images" / name, image_dir / name)
    stdout = io.StringIO()
    with local_server.LocalServer(export_dir, port=0, poll_seconds=60) as server:
        with contextlib.redirect_stdout(stdout):
            status = client_lib.main(
                [
                    f"--server=127.0.0.1:{server.port}",
                    "--model_name=cxr",
                    "--batch_size=4",
                    f"--overlay_dir={tmp_path / 'overlays'}",
                    str(image_dir),
                ]
            )
        with client_lib.CxrClient(f"127.0.0.1:{server.port}") as client:
            with_maps = client.predict_files([str(image_dir)], return_maps=True)
        with client_lib.CxrClient(
            f"127.0.0.1:{server.port}", signature_name="predict_pixels"
        ) as client:
            via_pixels = client.predict_files([str(image_dir)])
    lines = [json.loads(l) for l in stdout.getvalue().splitlines()]
    return {
        "status": status,
        "names": names,
        "image_dir": image_dir,
        "overlay_dir": tmp_path / "overlays",
        "lines": lines,
        "with_maps": with_maps,
        "via_pixels": via_pixels,
    }


def _training_pixels(path, image_size, normalization):
    """Training's path: decode -> ingestion resize -> pipeline letterbox."""
    import tensorflow as tf

    from cxr_tf.data import images, preprocess

    stored = preprocess.resize_longer_side(images.read_image(path), image_size)
    pixels, _ = preprocess.letterbox(
        tf.constant(stored[..., None]), None, image_size
    )
    pixels = tf.cast(pixels, tf.float32).numpy()
    return (pixels - normalization.mean) / normalization.std


def test_client_matches_model_and_eval_boxes(exported, served):
    import keras

    import cxr_tf.layers  # noqa: F401  pylint: disable=unused-import
    from cxr_tf import localization
    from cxr_tf.data import schema
    from cxr_tf.models import ModelConfig

    model_dir, _ = exported
    model = keras.saving.load_model(os.path.join(model_dir, "model.keras"))
    norm = ModelConfig(image_size=IMAGE_SIZE).normalization
    assert served["status"] == 0
    lines = served["lines"]
    assert [l["image"] for l in lines] == served["names"]
    assert sorted(os.listdir(served["overlay_dir"])) == [
        os.path.splitext(n)[0] + ".png" for n in served["names"]
    ]
    pixels = np.stack(
        [
            _training_pixels(served["image_dir"] / n, IMAGE_SIZE, norm)
            for n in served["names"]
        ]
    )
    keras_probabilities = model(pixels)["probabilities"].numpy()
    total_boxes = 0
    for i, (line, full) in enumerate(zip(lines, served["with_maps"])):
        assert set(line) == {"image", "probabilities", "boxes"}
        np.testing.assert_allclose(
            [line["probabilities"][f] for f in schema.FINDINGS],
            keras_probabilities[i],
            atol=1e-4,
        )
        # Boxes: the evaluation code on the served maps, in 1024-px pixels.
        expected = []
        for k, finding in enumerate(schema.FINDINGS):
            for b in localization.extract_boxes(
                full["localization_maps"][k],
                (1024, 1024),
                "probability",
                threshold=THRESHOLD,
                max_boxes=8,
            ):
                expected.append((finding, b.x, b.y, b.w, b.h, b.score))
        got = [
            (b["finding"], b["x"], b["y"], b["w"], b["h"], b["score"])
            for b in line["boxes"]
        ]
        assert [g[0] for g in got] == [e[0] for e in expected]
        np.testing.assert_allclose(
            [g[1:] for g in got] or np.zeros((0, 5)),
            [e[1:] for e in expected] or np.zeros((0, 5)),
            atol=1e-3,
        )
        for b in line["boxes"]:
            assert 0 <= b["x"] and b["x"] + b["w"] <= 1024
            assert 0 <= b["y"] and b["y"] + b["h"] <= 1024
        total_boxes += len(got)
    assert total_boxes > 0
    # predict_pixels, preprocessed by the client with the export's own code.
    for line, other in zip(lines, served["via_pixels"]):
        for f in schema.FINDINGS:
            assert other["probabilities"][f] == pytest.approx(
                line["probabilities"][f], abs=1e-5
            )
        for b in other["boxes"]:
            assert 0 <= b["x"] and b["x"] + b["w"] <= 1024 + 1e-3
    # The boxes are in the 1024-px film's pixels, not the 64-px input's.
    assert max(b["x"] + b["w"] for l in lines for b in l["boxes"]) > IMAGE_SIZE


def test_client_matches_cxr_tf_predict(exported, served, tmp_path):
    from cxr_tf import predict_lib
    from cxr_tf.data import images
    from cxr_tf.data import preprocess
    from cxr_tf.data import schema
    from cxr_tf.models import ModelConfig

    model_dir, _ = exported
    norm = ModelConfig(image_size=IMAGE_SIZE).normalization
    first = served["image_dir"] / served["names"][0]
    gap = (
        np.abs(
            preprocess.preprocess_pixels(images.read_image(first), IMAGE_SIZE, norm)
            - _training_pixels(first, IMAGE_SIZE, norm)
        ).max()
        * norm.std
    )
    # predict's preprocessing must equal training's (ingest resize + letterbox).
    assert gap <= 1e-3, f"predict and training pixels differ by {gap:.2f} levels"
    predict_lib.predict(
        predict_lib.PredictConfig(
            model=model_dir,
            output_dir=str(tmp_path / "predict"),
            box_threshold=THRESHOLD,
            box_findings="all",
            overlays=False,
            work_size=None,
        ),
        [str(served["image_dir"])],
    )
    with open(tmp_path / "predict" / predict_lib.PREDICTIONS_FILE) as f:
        reference = {r["image"]: r for r in map(json.loads, f)}
    for line in served["lines"]:
        ref = reference[line["image"]]
        np.testing.assert_allclose(
            [line["probabilities"][f] for f in schema.FINDINGS],
            [ref["probabilities"][f] for f in schema.FINDINGS],
            atol=1e-4,
        )
        got = sorted(
            (b["finding"], round(b["x"]), round(b["y"])) for b in line["boxes"]
        )
        want = sorted(
            (b["finding"], round(b["x"]), round(b["y"])) for b in ref["boxes"]
        )
        assert got == want, line["image"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensorflow_model_server(exported, cxr14_sample, tmp_path):
    binary = shutil.which("tensorflow_model_server")
    if binary is None:
        pytest.skip(
            "tensorflow_model_server is not on PATH (it ships as a Debian package "
            "from TF Serving's own apt repository and as the tensorflow/serving "
            "docker image, neither installable here); the same export and client "
            "are tested against serving.local_server instead"
        )
    from serving import client as client_lib

    _, export_dir = exported
    port = _free_port()
    warmup = os.path.join(export_dir, "1", "assets.extra", "tf_serving_warmup_requests")
    assert os.path.isfile(warmup)
    process = subprocess.Popen(
        [
            binary,
            f"--port={port}",
            "--model_name=cxr",
            f"--model_base_path={os.path.abspath(export_dir)}",
            f"--enable_batching=true",
            f"--batching_parameters_file={REPO}/serving/batching.config",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = client_lib.CxrClient(f"127.0.0.1:{port}", timeout=120)
        names = sorted(os.listdir(cxr14_sample / "images"))[:2]
        results = client.predict_files(
            [str(cxr14_sample / "images" / n) for n in names]
        )
        assert [r["image"] for r in results] == names
        assert all(len(r["probabilities"]) == 14 for r in results)
        assert wait_for(lambda: process.poll() is None, timeout=1)
    finally:
        process.terminate()
        process.wait(timeout=30)
