"""Hostile clients against serving.local_server and the exported graph.

Each test is an attack from issue 15: decompression bombs, garbage behind a
PNG signature, an error message quoting raw bytes, out-of-range REST
versions, oversized and cut-short REST bodies, a hand-copied version folder
without assets/, and an export a server running as another user cannot read.
Each asserts the refusal and that the server still answers good requests.
"""

import base64
import json
import logging
import os
import shutil
import socket
import stat
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

from cxr_tf.data import images
from serving import local_server
from tests.serving.conftest import png_bytes, png_zeros, wait_for

REST_TIMEOUT_S = 1.0
MAX_BODY = 1 << 20


@pytest.fixture(scope="module")
def guarded_server(exported_model_dir):
    """local_server on the export_lib model, with small REST bounds."""
    server = local_server.LocalServer(
        exported_model_dir,
        port=0,
        rest_api_port=0,
        poll_seconds=60,
        max_rest_body_bytes=MAX_BODY,
        rest_timeout_seconds=REST_TIMEOUT_S,
    ).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stub(guarded_server):
    channel = grpc.insecure_channel(f"127.0.0.1:{guarded_server.port}")
    yield prediction_service_pb2_grpc.PredictionServiceStub(channel)
    channel.close()


def _predict(stub, data, timeout=60):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "cxr"
    request.inputs["image_bytes"].CopyFrom(
        tf.make_tensor_proto(np.array([data], dtype=object))
    )
    return stub.Predict(request, timeout=timeout)


def _good_png(seed=0):
    rng = np.random.default_rng(seed)
    return png_bytes(rng.integers(0, 256, size=(48, 40), dtype=np.uint8))


def _assert_still_answers(stub):
    response = _predict(stub, _good_png(1))
    assert tf.make_ndarray(response.outputs["probabilities"]).shape == (1, 14)


def _peak_rss_bytes():
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def test_png_bomb_is_refused_from_its_header(stub):
    _assert_still_answers(stub)  # Traced and warm before measuring.
    bomb = png_zeros(16000, 16000)
    assert len(bomb) < 300_000
    peak_before = _peak_rss_bytes()
    start = time.perf_counter()
    with pytest.raises(grpc.RpcError) as info:
        _predict(stub, bomb)
    elapsed = time.perf_counter() - start
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == (
        "PNG header declares 16000x16000 = 256000000 pixels, more than the "
        f"limit of {images.MAX_IMAGE_PIXELS} pixels. Downscale the image before "
        "sending it."
    )
    assert elapsed < 2.0
    # Decoding would need 256 MB for the uint8 image alone.
    assert _peak_rss_bytes() - peak_before < 128 * 1024 * 1024
    _assert_still_answers(stub)


def test_6000_square_png_under_the_limit_is_served_and_server_answers(stub):
    # 36 MP is under MAX_IMAGE_PIXELS (the limit ingest and predict apply):
    # it is decoded and answered, not refused. With boxes found at
    # box_work_size=256 it costs a few hundred MB; with exact boxes
    # (box_work_size=None) several GB, in box extraction, not decoding.
    _assert_still_answers(stub)
    film = png_zeros(6000, 6000)
    peak_before = _peak_rss_bytes()
    response = _predict(stub, film, timeout=300)
    assert tf.make_ndarray(response.outputs["probabilities"]).shape == (1, 14)
    assert _peak_rss_bytes() - peak_before < 1024**3
    _assert_still_answers(stub)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x89PNG not really", "Not a PNG, JPEG, GIF or BMP image"),
        (b"\x89PNG\r\n\x1a\n not really \xff\xfe", "malformed PNG header"),
        # A sound IHDR over a corrupt IDAT reaches the decoder.
        (png_zeros(40, 30)[:33] + b"\x00\x00\x00\x08IDAT\xff\xfe not really", "PNG"),
        (b"\xff\xd8\xff\xe0\x00\x04 not really", "malformed JPEG header"),
        (b"", "Not a PNG"),
    ],
    ids=["png_signature_garbage", "png_sig_bad_ihdr", "png_bad_idat", "jpeg", "empty"],
)
def test_garbage_is_invalid_argument_without_request_bytes(stub, data, message):
    with pytest.raises(grpc.RpcError) as info:
        _predict(stub, data)
    details = info.value.details()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, details
    assert message in details
    assert "not really" not in details and "\\x" not in details
    _assert_still_answers(stub)


class _EchoingModule(tf.Module):
    """A signature whose op error quotes its input (substr past the end)."""

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="data")])
    def serve(self, data):
        return {"head": tf.strings.substr(data, 24, 1)}


def test_error_message_with_raw_bytes_is_invalid_argument(tmp_path):
    module = _EchoingModule()
    tf.saved_model.save(
        module, str(tmp_path / "1"), signatures={"serving_default": module.serve}
    )
    with local_server.LocalServer(str(tmp_path), port=0, poll_seconds=60) as server:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            request = predict_pb2.PredictRequest()
            request.model_spec.name = "cxr"
            request.inputs["data"].CopyFrom(
                tf.make_tensor_proto(np.array([b"\x89PNG \xff\xfe secret"], object))
            )
            with pytest.raises(grpc.RpcError) as info:
                stub.Predict(request, timeout=60)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "secret" not in info.value.details()
            request.inputs["data"].CopyFrom(
                tf.make_tensor_proto(np.array([b"x" * 30], object))
            )
            assert tf.make_ndarray(stub.Predict(request).outputs["head"]) == [b"x"]


def _rest(server, path, body=None):
    url = f"http://127.0.0.1:{server.rest_api_port}{path}"
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(url, data=data, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


@pytest.mark.parametrize(
    "version", ["99999999999999999999999", "9223372036854775808", "0", "abc", ""]
)
def test_rest_bad_version_is_400(guarded_server, version):
    status, body = _rest(guarded_server, f"/v1/models/cxr/versions/{version}")
    assert status == 400, body
    assert "must be an integer" in body["error"]
    status, body = _rest(
        guarded_server,
        f"/v1/models/cxr/versions/{version}:predict",
        {"instances": [{"b64": base64.b64encode(_good_png()).decode()}]},
    )
    assert status == 400, body
    assert _rest(guarded_server, "/v1/models/cxr/versions/1")[0] == 200


def test_rest_predict_and_bomb(guarded_server):
    image = {"b64": base64.b64encode(_good_png()).decode()}
    predict = "/v1/models/cxr:predict"
    status, body = _rest(guarded_server, predict, {"instances": [image]})
    assert status == 200 and len(body["predictions"][0]["probabilities"]) == 14
    bomb = {"b64": base64.b64encode(png_zeros(16000, 16000)).decode()}
    status, body = _rest(guarded_server, predict, {"instances": [bomb]})
    assert status == 400 and "16000x16000" in body["error"]


def _raw_http(server, request_bytes, timeout=30):
    """Sends raw bytes and reads until the server closes; returns the reply."""
    with socket.create_connection(("127.0.0.1", server.rest_api_port), timeout) as s:
        s.sendall(request_bytes)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def test_rest_oversized_body_is_413_unread(guarded_server):
    head = (
        "POST /v1/models/cxr:predict HTTP/1.1\r\nHost: x\r\n"
        f"Content-Length: {MAX_BODY + 1}\r\n\r\n"
    ).encode()
    start = time.monotonic()
    reply = _raw_http(guarded_server, head + b"{")
    assert reply.startswith(b"HTTP/1.0 413"), reply[:200]
    assert b"over the limit" in reply
    # Answered at once, without waiting for the announced body.
    assert time.monotonic() - start < REST_TIMEOUT_S
    assert _rest(guarded_server, "/v1/models/cxr")[0] == 200


def test_rest_bogus_content_length_times_out(guarded_server):
    head = (
        "POST /v1/models/cxr:predict HTTP/1.1\r\nHost: x\r\n"
        "Content-Length: 5000\r\n\r\n"
    ).encode()
    start = time.monotonic()
    # 10 bytes of 5000 sent, then silence: the handler must give up.
    reply = _raw_http(guarded_server, head + b'{"inputs":')
    elapsed = time.monotonic() - start
    assert reply.startswith(b"HTTP/1.0 408"), reply[:200]
    assert REST_TIMEOUT_S <= elapsed < REST_TIMEOUT_S + 10
    assert _rest(guarded_server, "/v1/models/cxr")[0] == 200


@pytest.mark.parametrize(
    "headers, code",
    [
        ("", b"411"),
        ("Transfer-Encoding: chunked\r\n", b"411"),
        ("Content-Length: -5\r\n", b"400"),
    ],
)
def test_rest_body_without_a_length_is_refused(guarded_server, headers, code):
    request = (
        f"POST /v1/models/cxr:predict HTTP/1.1\r\nHost: x\r\n{headers}\r\n"
    ).encode()
    reply = _raw_http(guarded_server, request)
    assert reply.startswith(b"HTTP/1.0 " + code), reply[:200]


def test_version_without_assets_is_not_served(fresh_model_dir, caplog):
    # A hand copy that left out assets/.
    incomplete = os.path.join(fresh_model_dir, "2")
    shutil.copytree(
        os.path.join(fresh_model_dir, "1"),
        incomplete,
        ignore=shutil.ignore_patterns("assets"),
    )
    caplog.set_level(logging.WARNING)
    with local_server.LocalServer(fresh_model_dir, port=0, poll_seconds=0.05) as server:
        assert server.store.current.version == 1
        assert local_server.list_versions(fresh_model_dir) == [1]
        messages = [r.getMessage() for r in caplog.records]
        assert any(
            "Not serving cxr version 2" in m and "has no assets/" in m for m in messages
        ), messages
        # Logged once, not at every poll.
        polls = server.store.poll_once(), server.store.poll_once()
        assert polls == (1, 1)
        assert sum("version 2" in r.getMessage() for r in caplog.records) == 1
        # Completing the copy makes it servable.
        shutil.copytree(
            os.path.join(fresh_model_dir, "1", "assets"),
            os.path.join(incomplete, "assets"),
        )
        assert wait_for(lambda: server.store.current.version == 2)


def test_export_is_world_readable_under_umask_077(exported_model_dir):
    version = os.path.join(exported_model_dir, "1")
    modes = {}
    for directory, dirs, files in os.walk(version):
        for name in dirs + [""]:
            modes[os.path.join(directory, name)] = "dir"
        for name in files:
            modes[os.path.join(directory, name)] = "file"
    assert any(p.endswith("saved_model.pb") for p in modes)
    for path, kind in modes.items():
        mode = stat.S_IMODE(os.stat(path).st_mode)
        assert mode == (0o755 if kind == "dir" else 0o644), (path, oct(mode))
