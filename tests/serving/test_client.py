"""serving/client.py against serving.local_server: batching, TLS, retries."""

import datetime
import json
import os
import socket
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import prediction_service_pb2_grpc

from serving import client as client_lib
from serving import local_server
from tests.serving.conftest import FINDINGS, jpeg_bytes, png_bytes


def _images(seed=0):
    rng = np.random.default_rng(seed)
    gray = rng.integers(0, 256, size=(48, 40), dtype=np.uint8)
    return [
        ("a.png", png_bytes(gray)),
        ("b.jpg", jpeg_bytes(gray[:40])),
        ("c16.png", png_bytes(rng.integers(0, 65536, size=(40, 56), dtype=np.uint16))),
    ]


def _direct(model_dir, items):
    loaded = tf.saved_model.load(os.path.join(model_dir, "1"))
    return loaded.signatures["serving_default"](
        image_bytes=tf.constant([data for _, data in items])
    )


def test_predict_bytes_matches_the_model(tiny_server, tiny_model_dir):
    items = _images()
    with client_lib.CxrClient(f"127.0.0.1:{tiny_server.port}", batch_size=2) as client:
        results = client.predict_bytes(items)
        assert client.model_info()["findings"] == FINDINGS
        assert client.metadata()["signatures"]["serving_default"]["inputs"] == {
            "image_bytes": {"dtype": "DT_STRING", "shape": [-1]}
        }
    expected = _direct(tiny_model_dir, items)
    for i, (name, _) in enumerate(items):
        assert results[i]["image"] == name
        np.testing.assert_allclose(
            [results[i]["probabilities"][f] for f in FINDINGS],
            expected["probabilities"][i].numpy(),
            atol=1e-6,
        )
        present = expected["num_boxes"][i].numpy()
        assert len(results[i]["boxes"]) == present.sum()
        for box in results[i]["boxes"]:
            k = FINDINGS.index(box["finding"])
            np.testing.assert_allclose(
                [box["x"], box["y"], box["w"], box["h"]],
                expected["boxes"][i, k, 0].numpy(),
            )
    # The tiny model's boxes cover the whole original image.
    if results[2]["boxes"]:
        assert results[2]["boxes"][0]["w"] == 56 and results[2]["boxes"][0]["h"] == 40


def test_rest_gives_the_same_results(tiny_server):
    items = _images()
    with client_lib.CxrClient(f"127.0.0.1:{tiny_server.port}") as grpc_client:
        expected = grpc_client.predict_bytes(items)
    rest_client = client_lib.CxrClient(rest=f"127.0.0.1:{tiny_server.rest_api_port}")
    results = rest_client.predict_bytes(items)
    assert rest_client.model_info()["findings"] == FINDINGS
    for got, want in zip(results, expected):
        assert got["image"] == want["image"]
        for f in FINDINGS:
            assert got["probabilities"][f] == pytest.approx(
                want["probabilities"][f], abs=1e-6
            )
        assert len(got["boxes"]) == len(want["boxes"])


def test_predict_pixels_signature(tiny_server):
    gray = np.full((64, 32), 200, np.uint8)
    with client_lib.CxrClient(
        f"127.0.0.1:{tiny_server.port}", signature_name="predict_pixels"
    ) as client:
        (result,) = client.predict_bytes([("tall.png", png_bytes(gray))])
    assert set(result["probabilities"]) == set(FINDINGS)
    # Boxes come back in the original image's pixels: the tiny model's
    # full-input box covers the letterboxed 64 x 32 film plus padding, which
    # is clipped away.
    assert result["boxes"]
    for box in result["boxes"]:
        assert (box["x"], box["y"], box["w"], box["h"]) == pytest.approx((0, 0, 32, 64))


def test_bad_image_in_a_batch_is_reported_alone(tiny_server):
    items = _images()
    items.insert(1, ("broken.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 10))
    items.append(("notes.txt", b"hello"))
    with client_lib.CxrClient(f"127.0.0.1:{tiny_server.port}", batch_size=4) as c:
        results = c.predict_bytes(items)
    assert [("error" in r) for r in results] == [False, True, False, False, True]
    assert "not a PNG, JPEG or DICOM" in results[4]["error"]
    assert results[1]["image"] == "broken.png"


def test_cli_prints_json_lines(tiny_server, tmp_path, capsys):
    for name, data in _images():
        (tmp_path / name).write_bytes(data)
    status = client_lib.main(
        [f"--server=127.0.0.1:{tiny_server.port}", "--batch_size=2", str(tmp_path)]
    )
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert status == 0
    assert [l["image"] for l in lines] == ["a.png", "b.jpg", "c16.png"]
    assert all(set(l) == {"image", "probabilities", "boxes"} for l in lines)


def test_dicom_is_decoded_locally(tiny_server, cxr14_sample):
    pytest.importorskip("cxr_tf.data.images")
    path = cxr14_sample / "dicom" / "CR-MONO1-10-chest.dcm"
    with client_lib.CxrClient(f"127.0.0.1:{tiny_server.port}") as client:
        (result,) = client.predict_files([str(path)])
    assert "error" not in result, result
    assert len(result["probabilities"]) == 14


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_retries_until_a_late_server_starts(tiny_model_dir):
    port = _free_port()
    client = client_lib.CxrClient(f"127.0.0.1:{port}", timeout=60, max_backoff=0.2)
    outcome = {}

    def run():
        try:
            outcome["results"] = client.predict_bytes(_images()[:1])
        except Exception as e:  # pylint: disable=broad-except
            outcome["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    # The client has met UNAVAILABLE at least once before the server exists.
    assert client.retry_event.wait(timeout=30)
    server = local_server.LocalServer(tiny_model_dir, port=port, poll_seconds=60)
    with server:
        thread.join(timeout=60)
    client.close()
    assert not thread.is_alive()
    assert "error" not in outcome, outcome.get("error")
    assert client.retries >= 1
    assert len(outcome["results"][0]["probabilities"]) == 14


def test_unreachable_server_fails_at_the_deadline():
    client = client_lib.CxrClient(f"127.0.0.1:{_free_port()}", timeout=1.0)
    start = time.monotonic()
    with pytest.raises(client_lib.ServingError) as info:
        client.metadata()
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 10
    assert client.retries >= 1


class _StuckService(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Answers nothing until released: a server slower than the deadline."""

    def __init__(self):
        self.release = threading.Event()
        self.entered = threading.Event()

    def GetModelMetadata(self, request, context):  # pylint: disable=invalid-name
        self.entered.set()
        self.release.wait(timeout=30)
        context.abort(grpc.StatusCode.CANCELLED, "released")


def test_deadline_expiry():
    import concurrent.futures

    service = _StuckService()
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        client = client_lib.CxrClient(f"127.0.0.1:{port}", timeout=0.5)
        start = time.monotonic()
        with pytest.raises(client_lib.ServingError) as info:
            client.metadata()
        elapsed = time.monotonic() - start
        assert service.entered.is_set()
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert 0.4 < elapsed < 5
        assert client.retries == 0  # DEADLINE_EXCEEDED is not retried.
    finally:
        service.release.set()
        server.stop(None)


def _self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


def test_tls(tiny_model_dir, tmp_path):
    pytest.importorskip("cryptography")
    cert, key = _self_signed(tmp_path)
    server = local_server.LocalServer(
        tiny_model_dir, port=0, ssl_cert=cert, ssl_key=key, poll_seconds=60
    )
    with server:
        with client_lib.CxrClient(
            f"localhost:{server.port}", tls=True, ca_cert=cert, timeout=20
        ) as client:
            (result,) = client.predict_bytes(_images()[:1])
        assert len(result["probabilities"]) == 14
        # The same server refuses a client that does not trust its certificate
        # (system roots only) and a plaintext client.
        for kwargs in ({"tls": True}, {}):
            with client_lib.CxrClient(
                f"localhost:{server.port}", timeout=1.0, **kwargs
            ) as client:
                with pytest.raises(client_lib.ServingError) as info:
                    client.metadata()
            assert info.value.code in (
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.UNAVAILABLE,
            )


def test_arguments_are_validated():
    with pytest.raises(ValueError, match="exactly one"):
        client_lib.CxrClient()
    with pytest.raises(ValueError, match="exclusive"):
        client_lib.CxrClient("h:1", version=1, version_label="stable")
    with pytest.raises(ValueError, match="batch_size"):
        client_lib.CxrClient("h:1", batch_size=0)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        client_lib.expand_paths(["/nowhere/x.png"])


def test_versions_and_labels(tiny_model_dir):
    server = local_server.LocalServer(
        tiny_model_dir, port=0, poll_seconds=60, version_labels={"stable": 1}
    )
    with server:
        address = f"127.0.0.1:{server.port}"
        for kwargs in ({"version": 1}, {"version_label": "stable"}):
            with client_lib.CxrClient(address, **kwargs) as client:
                assert client.metadata()["version"] == 1
                (result,) = client.predict_bytes(_images()[:1])
                assert "error" not in result
        for kwargs, message in (
            ({"version": 2}, "version 2"),
            ({"version_label": "canary"}, "canary"),
        ):
            with client_lib.CxrClient(address, **kwargs) as client:
                with pytest.raises(client_lib.ServingError) as info:
                    client.metadata()
            assert info.value.code == grpc.StatusCode.NOT_FOUND
            assert message in info.value.message


def test_client_runs_without_cxr_tf(tiny_server, tmp_path):
    import subprocess
    import sys

    name, data = _images()[0]
    (tmp_path / name).write_bytes(data)
    script = (
        "import sys; sys.modules['cxr_tf'] = None\n"  # Any cxr_tf import fails.
        "from serving import client\n"
        "sys.exit(client.main(sys.argv[1:]))\n"
    )
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            f"--server=127.0.0.1:{tiny_server.port}",
            str(tmp_path / name),
        ],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (line,) = [json.loads(l) for l in result.stdout.splitlines()]
    assert line["image"] == name
    assert tuple(line["probabilities"]) == FINDINGS


def test_cli_reads_a_flagfile_and_shows_helpfull(tiny_server, tmp_path, capsys):
    name, data = _images()[0]
    (tmp_path / name).write_bytes(data)
    flagfile = tmp_path / "client.flags"
    flagfile.write_text(f"--server=127.0.0.1:{tiny_server.port}\n--timeout=30\n")
    status = client_lib.main([f"--flagfile={flagfile}", str(tmp_path / name)])
    (line,) = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert status == 0 and line["image"] == name
    assert client_lib.main(["--helpfull"]) == 0
    assert "--flagfile" in capsys.readouterr().out
    assert client_lib.main([f"--flagfile={tmp_path / 'missing.flags'}", "x.png"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot open the flagfile") and "missing.flags" in err


@pytest.mark.parametrize(
    "array",
    [
        np.arange(6, dtype=np.float32).reshape(2, 3) / 7,
        np.array([[1, -2], [3, 4]], np.int32),
        np.array([True, False]),
        np.array([b"\x89PNG", b""], dtype=object),
        np.float32(2.5),
    ],
    ids=["float32", "int32", "bool", "bytes", "scalar"],
)
def test_tensor_protos_match_tensorflow(array):
    ours = client_lib._make_tensor_proto(array)  # pylint: disable=protected-access
    theirs = tf.make_tensor_proto(array)
    assert ours.dtype == theirs.dtype
    assert ours.tensor_shape == theirs.tensor_shape
    expected = tf.make_ndarray(theirs)
    for proto in (ours, theirs):
        got = client_lib._make_ndarray(proto)  # pylint: disable=protected-access
        assert got.shape == expected.shape and got.dtype == expected.dtype
        assert got.tolist() == expected.tolist()


def test_short_value_lists_repeat_their_last_entry():
    proto = tf.make_tensor_proto(np.zeros((2, 2), np.float32))
    proto.ClearField("tensor_content")
    proto.float_val.extend([1.5])
    expected = tf.make_ndarray(proto)
    got = client_lib._make_ndarray(proto)  # pylint: disable=protected-access
    assert got.tolist() == expected.tolist() == [[1.5, 1.5], [1.5, 1.5]]
