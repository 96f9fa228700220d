"""serving.local_server over the real gRPC protos, on a tiny SavedModel."""

import os

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

from serving import local_server
from tests.serving.conftest import export_tiny, png_bytes, wait_for


@pytest.fixture(scope="module")
def stub(tiny_server):
    channel = grpc.insecure_channel(f"127.0.0.1:{tiny_server.port}")
    yield prediction_service_pb2_grpc.PredictionServiceStub(channel)
    channel.close()


def _request(inputs, signature="serving_default", name="cxr"):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = signature
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    return request


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [
        png_bytes(rng.integers(0, 256, size=(40 + 8 * i, 48), dtype=np.uint8))
        for i in range(n)
    ]


def test_predict_matches_the_savedmodel(stub, tiny_model_dir):
    images = _images(3)
    response = stub.Predict(_request({"image_bytes": np.array(images, dtype=object)}))
    loaded = tf.saved_model.load(os.path.join(tiny_model_dir, "1"))
    expected = loaded.signatures["serving_default"](image_bytes=tf.constant(images))
    assert response.model_spec.version.value == 1
    assert set(response.outputs) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(
            tf.make_ndarray(response.outputs[key]), value.numpy(), atol=1e-6
        )


def test_metadata_lists_signatures(stub):
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "cxr"
    request.metadata_field.append("signature_def")
    response = stub.GetModelMetadata(request)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    sig = signatures.signature_def["serving_default"]
    assert sig.inputs["image_bytes"].dtype == tf.string.as_datatype_enum
    assert set(sig.outputs) == {
        "probabilities",
        "localization_maps",
        "boxes",
        "box_scores",
        "num_boxes",
    }
    assert [
        d.size
        for d in signatures.signature_def["predict_pixels"]
        .inputs["pixels"]
        .tensor_shape.dim
    ] == [-1, 32, 32, 1]


def test_model_status(tiny_server):
    with grpc.insecure_channel(f"127.0.0.1:{tiny_server.port}") as channel:
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "cxr"
        response = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
            request
        )
    (status,) = response.model_version_status
    assert status.version == 1
    assert status.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE


@pytest.mark.parametrize(
    "inputs, signature, message",
    [
        ({"image_bytes": np.array([b"not an image"], dtype=object)}, None, "image"),
        ({"image_bytes": np.zeros((2,), np.float32)}, None, "dtype"),
        ({"image_bytes": np.array([], dtype=object)}, None, "empty batch"),
        ({"image_bytes": np.array([b"x"] * 9, dtype=object)}, None, "max_batch_size"),
        ({"pixels": np.zeros((1, 32, 32, 1), np.float32)}, None, "takes inputs"),
        ({"pixels": np.zeros((1, 16, 16, 1), np.float32)}, "predict_pixels", "shape"),
        ({"image_bytes": np.array([b"x"], dtype=object)}, "nope", "not found"),
    ],
)
def test_bad_requests_are_invalid_argument(stub, inputs, signature, message):
    request = _request(inputs, signature or "serving_default")
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details(), info.value.details()
    # The server keeps serving afterwards.
    good = stub.Predict(_request({"image_bytes": np.array(_images(1), dtype=object)}))
    assert tf.make_ndarray(good.outputs["probabilities"]).shape == (1, 14)


def test_unknown_model_and_version_are_not_found(stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(
            _request({"image_bytes": np.array(_images(1), dtype=object)}, name="other")
        )
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    request = _request({"image_bytes": np.array(_images(1), dtype=object)})
    request.model_spec.version.value = 7
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(request)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "version 7" in info.value.details()


def test_picks_up_a_new_version(fresh_model_dir):
    server = local_server.LocalServer(fresh_model_dir, port=0, poll_seconds=0.05)
    with server:
        assert server.store.current.version == 1
        export_tiny(fresh_model_dir, 2, seed=1)
        assert wait_for(lambda: server.store.current.version == 2)
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            response = stub.Predict(
                _request({"image_bytes": np.array(_images(1), dtype=object)})
            )
        assert response.model_spec.version.value == 2


def test_empty_base_path_is_unavailable_until_a_version_appears(tmp_path):
    base = str(tmp_path)
    with local_server.LocalServer(base, port=0, poll_seconds=0.05) as server:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            request = _request({"image_bytes": np.array(_images(1), dtype=object)})
            with pytest.raises(grpc.RpcError) as info:
                stub.Predict(request)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            os.makedirs(os.path.join(base, "3", "variables"))  # Half-written.
            export_tiny(base, 4)
            assert wait_for(lambda: server.store.current is not None)
            assert stub.Predict(request).model_spec.version.value == 4


def test_constructor_validates():
    with pytest.raises(ValueError, match="ssl_cert"):
        local_server.LocalServer("/tmp", ssl_cert="a.pem")
    with pytest.raises(ValueError, match="max_batch_size"):
        local_server.LocalServer("/tmp", max_batch_size=0)


def test_output_filter(stub):
    request = _request({"image_bytes": np.array(_images(2), dtype=object)})
    request.output_filter.append("probabilities")
    response = stub.Predict(request)
    assert list(response.outputs) == ["probabilities"]
    assert tf.make_ndarray(response.outputs["probabilities"]).shape == (2, 14)
    request.output_filter.append("masks")
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "masks" in info.value.details()
