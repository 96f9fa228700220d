"""gRPC (or REST) client for the exported chest X-ray model on TensorFlow Serving.

Usage:
  python serving/client.py --server=localhost:8500 --model_name=cxr \
      [--signature=serving_default] [--version=N | --version_label=L] \
      [--tls --ca_cert=ca.pem] [--timeout=30] [--batch_size=8] \
      [--overlay_dir=DIR] IMAGE_OR_DIR...
  python serving/client.py --rest=localhost:8501 --model_name=cxr IMAGE...

Prints one JSON line per image, in the form of `cxr_tf.predict`:
  {"image": name, "probabilities": {finding: p},
   "boxes": [{"finding", "x", "y", "w", "h", "score"}]}
(an image that cannot be read or served gets {"image": name, "error": msg}
and the exit status is 1).

The client reads the model's metadata first (GetModelMetadata) to find the
signature's input and output keys, and the finding names from the model's
`model_info` signature when it has one (else `cxr_tf.data.schema.FINDINGS`, or
the built-in list when cxr_tf is not installed). UNAVAILABLE is retried with
exponential backoff until the deadline (`--timeout`, per batch). DICOM files
are decoded locally (needs cxr_tf and pydicom) and sent as PNG.

Flags are absl flags (`--flagfile=F`, `--helpfull`), checked before any
connection; a mistake or an unreachable server ends in one line on stderr,
`error: <what> (<where>): <how to fix>`. TensorFlow itself is not imported
(the protos load on their own), so `--timeout=3` against a stopped server
answers in about 3 s.

Importable: `from serving.client import CxrClient`.
"""

import base64
import importlib.util
import io
import json
import os
import ssl
import sys
import threading
import time
import types
import urllib.error
import urllib.request

import grpc
import numpy as np

from serving import contract as serving_contract

# The TF Serving protos, loaded by `_load_apis` (not at import: see there).
get_model_metadata_pb2 = predict_pb2 = prediction_service_pb2_grpc = None

DEFAULT_FINDINGS = tuple(serving_contract.FINDINGS)
IMAGE_EXTENSIONS = serving_contract.IMAGE_EXTENSIONS
MODEL_INFO_SIGNATURE = serving_contract.MODEL_INFO_SIGNATURE
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


class ServingError(RuntimeError):
    """A request that failed; `code` is the grpc.StatusCode (or HTTP status)."""

    def __init__(self, code, message):
        super().__init__(f"{getattr(code, 'name', code)}: {message}")
        self.code = code
        self.message = message


def _is_dicom(data, name):
    return (len(data) > 132 and data[128:132] == b"DICM") or name.lower().endswith(
        (".dcm", ".dicom")
    )


def encode_for_serving(data, name="<bytes>"):
    """Returns bytes the serving signature accepts (PNG/JPEG as is, DICOM -> PNG).

    Args:
      data: the file's bytes.
      name: file name, for messages and to recognise DICOM by extension.

    Returns:
      Encoded PNG or JPEG bytes.

    Raises:
      ValueError: empty data, an unknown format, or DICOM without cxr_tf.
    """
    if not data:
        raise ValueError(f"{name}: empty file")
    if data.startswith(_PNG_MAGIC) or data.startswith(_JPEG_MAGIC):
        return data
    if _is_dicom(data, name):
        try:
            from cxr_tf.data import images  # pylint: disable=g-import-not-at-top
        except ImportError as e:
            raise ValueError(
                f"{name}: DICOM needs the cxr_tf package (cxr_tf.data.images) "
                f"to decode locally: {e}"
            ) from None
        pixels = images.decode_image(data, name)
        return _png_bytes(pixels)
    raise ValueError(
        f"{name}: not a PNG, JPEG or DICOM file (first bytes {data[:8]!r})"
    )


def _png_bytes(pixels):
    from PIL import Image  # pylint: disable=g-import-not-at-top

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def expand_paths(paths):
    """Files named, plus the image files (sorted) of directories named.

    Raises:
      FileNotFoundError: a path that does not exist.
    """
    files = []
    for path in paths:
        if os.path.isdir(path):
            files.extend(
                os.path.join(path, n)
                for n in sorted(os.listdir(path))
                if n.lower().endswith(IMAGE_EXTENSIONS)
            )
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"No such image file or directory: {path}")
    return files


def _tensor_info_dict(tensor_info):
    from tensorflow.core.framework import (  # pylint: disable=g-import-not-at-top
        types_pb2,
    )

    shape = (
        None
        if tensor_info.tensor_shape.unknown_rank
        else [d.size for d in tensor_info.tensor_shape.dim]
    )
    return {"dtype": types_pb2.DataType.Name(tensor_info.dtype), "shape": shape}


def _signature_dict(signature_map):
    return {
        name: {
            "inputs": {k: _tensor_info_dict(v) for k, v in sig.inputs.items()},
            "outputs": {k: _tensor_info_dict(v) for k, v in sig.outputs.items()},
        }
        for name, sig in signature_map.signature_def.items()
        if not name.startswith("__")
    }


def _load_apis():
    """Imports the TF Serving protos without running `tensorflow/__init__.py`.

    tensorflow_serving.apis imports `tensorflow.core.framework.*_pb2`, plain
    protobuf modules; importing them the usual way first imports all of
    TensorFlow (10-30 s). Unless TensorFlow is already loaded, a bare package
    stands in for `tensorflow` while they load, and is removed afterwards so
    a later `import tensorflow` (predict_pixels) gets the real one.
    """
    global get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc
    if predict_pb2 is not None:
        return
    shim = None
    if "tensorflow" not in sys.modules:
        spec = importlib.util.find_spec("tensorflow")
        if spec is not None and spec.submodule_search_locations:
            shim = types.ModuleType("tensorflow")
            shim.__path__ = list(spec.submodule_search_locations)
            sys.modules["tensorflow"] = shim
    try:
        # pylint: disable=g-import-not-at-top,redefined-outer-name
        from tensorflow_serving.apis import get_model_metadata_pb2
        from tensorflow_serving.apis import predict_pb2
        from tensorflow_serving.apis import prediction_service_pb2_grpc
    finally:
        if shim is not None and sys.modules.get("tensorflow") is shim:
            del sys.modules["tensorflow"]


# numpy dtype <-> tensorflow.core.framework.types_pb2.DataType numbers.
_NP_TO_DT = {
    np.dtype(np.float32): 1,
    np.dtype(np.float64): 2,
    np.dtype(np.int32): 3,
    np.dtype(np.uint8): 4,
    np.dtype(np.int16): 5,
    np.dtype(np.int8): 6,
    np.dtype(np.int64): 9,
    np.dtype(np.bool_): 10,
}
_DT_TO_NP = {v: k for k, v in _NP_TO_DT.items()}
_DT_STRING = 7
_DT_VALUE_FIELD = {1: "float_val", 2: "double_val", 9: "int64_val", 10: "bool_val"}


def _make_tensor_proto(array):
    """`tf.make_tensor_proto` for numeric and bytes arrays, without TensorFlow."""
    from tensorflow.core.framework import tensor_pb2  # pylint: disable=g-import-not-at-top

    array = np.asarray(array)
    proto = tensor_pb2.TensorProto()
    for size in array.shape:
        proto.tensor_shape.dim.add(size=size)
    if array.dtype.kind in "SUO":
        proto.dtype = _DT_STRING
        proto.string_val.extend(
            v if isinstance(v, bytes) else str(v).encode() for v in array.ravel()
        )
        return proto
    if array.dtype not in _NP_TO_DT:
        raise ValueError(f"Unsupported tensor dtype {array.dtype}")
    proto.dtype = _NP_TO_DT[array.dtype]
    proto.tensor_content = np.ascontiguousarray(array).tobytes()
    return proto


def _make_ndarray(proto):
    """`tf.make_ndarray` for the dtypes the model returns, without TensorFlow."""
    shape = [d.size for d in proto.tensor_shape.dim]
    count = int(np.prod(shape)) if shape else 1
    if proto.dtype == _DT_STRING:
        return np.array(list(proto.string_val), dtype=object).reshape(shape)
    if proto.dtype not in _DT_TO_NP:
        raise ValueError(f"Unsupported tensor dtype number {proto.dtype}")
    dtype = _DT_TO_NP[proto.dtype]
    if proto.tensor_content:
        return np.frombuffer(proto.tensor_content, dtype).copy().reshape(shape)
    values = list(getattr(proto, _DT_VALUE_FIELD.get(proto.dtype, "int_val")))
    if not values:
        return np.zeros(shape, dtype)
    # A short value list repeats its last entry (TensorProto's convention).
    values += [values[-1]] * (count - len(values))
    return np.array(values[:count], dtype).reshape(shape)


def _to_original(x, y, w, h, geometry):
    """A box in network pixels -> original pixels, clipped to the image."""
    scale, dx, dy, height, width = geometry
    x0, y0 = max((x - dx) * scale, 0.0), max((y - dy) * scale, 0.0)
    x1 = min((x + w - dx) * scale, float(width))
    y1 = min((y + h - dy) * scale, float(height))
    return x0, y0, max(x1 - x0, 0.0), max(y1 - y0, 0.0)


def _approximate_pixels(data, name, size, pre):
    """Pillow letterbox (bilinear) + normalisation, for clients without cxr_tf."""
    from PIL import Image  # pylint: disable=g-import-not-at-top

    try:
        image = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    except Exception as e:  # pylint: disable=broad-except
        raise ServingError(
            grpc.StatusCode.INVALID_ARGUMENT, f"{name}: cannot decode ({e})"
        ) from None
    h, w = image.shape
    stored = pre.get("ingest_image_size") or size
    source = Image.fromarray(image)
    if max(h, w) > stored:
        # As ingestion: area shrink to the stored size first.
        k = stored / max(h, w)
        source = source.resize(
            (max(1, round(w * k)), max(1, round(h * k))), Image.Resampling.BOX
        )
    scale = max(h, w) / size
    nh, nw = max(1, round(h / scale)), max(1, round(w / scale))
    resized = np.asarray(source.resize((nw, nh), Image.BILINEAR), np.float32)
    canvas = np.zeros((size, size), np.float32)
    dy, dx = (size - nh) // 2, (size - nw) // 2
    canvas[dy : dy + nh, dx : dx + nw] = resized
    return (canvas - pre["mean"]) / pre["std"], (scale, dx, dy, h, w)


class CxrClient:
    """Talks to TF Serving (or serving.local_server) about the exported model.

    Example:
      >>> client = CxrClient("localhost:8500", model_name="cxr")
      >>> for result in client.predict_files(["00000100_000.png"]):
      ...     print(result["probabilities"]["Effusion"])
    """

    def __init__(
        self,
        server=None,
        model_name="cxr",
        signature_name=serving_contract.SERVING_SIGNATURE,
        version=None,
        version_label=None,
        tls=False,
        ca_cert=None,
        tls_server_name=None,
        timeout=30.0,
        batch_size=8,
        rest=None,
        findings=None,
        initial_backoff=0.05,
        max_backoff=1.0,
    ):
        """Creates the client (connects lazily).

        Args:
          server: "host:port" of the gRPC API (8500 by default in TF Serving).
          model_name: the served model name.
          signature_name: "serving_default" (encoded images) or
            "predict_pixels" (the client preprocesses).
          version: ask for this numeric version.
          version_label: ask for this version label (exclusive with version).
          tls: use TLS (gRPC) / https (REST).
          ca_cert: PEM file of the CA to trust (TLS); None = system roots.
          tls_server_name: override the name checked in the server's cert.
          timeout: deadline in seconds of one batch, retries included.
          batch_size: images per request.
          rest: "host:port" of the REST API; used instead of gRPC when given.
          findings: finding names; None = from the model, else the default list.
          initial_backoff: first wait before retrying UNAVAILABLE, seconds.
          max_backoff: longest wait between retries, seconds.

        Raises:
          ValueError: inconsistent arguments.
        """
        _load_apis()
        if bool(server) == bool(rest):
            raise ValueError(
                "Give exactly one of `server` (gRPC) and `rest`. Received: "
                f"server={server!r}, rest={rest!r}"
            )
        if version is not None and version_label:
            raise ValueError(
                "`version` and `version_label` are exclusive. Received: "
                f"version={version!r}, version_label={version_label!r}"
            )
        if batch_size < 1:
            raise ValueError(
                f"`batch_size` must be a positive int. Received: batch_size={batch_size}"
            )
        if not timeout or timeout <= 0:
            raise ValueError(f"`timeout` must be > 0 seconds. Received: {timeout!r}")
        if ca_cert and not os.path.isfile(ca_cert):
            raise ValueError(f"`ca_cert` file not found: {ca_cert}")
        self.server = server
        self.rest = rest
        self.model_name = model_name
        self.signature_name = signature_name
        self.version = version
        self.version_label = version_label
        self.tls = tls or bool(ca_cert)
        self.ca_cert = ca_cert
        self.tls_server_name = tls_server_name
        self.timeout = float(timeout)
        self.batch_size = batch_size
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self._findings = tuple(findings) if findings else None
        self._model_info = None
        self._metadata = None
        self._channel = None
        self._stub = None
        self._lock = threading.Lock()
        # Counts UNAVAILABLE answers that were retried (tests wait on it).
        self.retries = 0
        self.retry_event = threading.Event()

    # ------------------------------------------------------------------ transport
    def _get_stub(self):
        with self._lock:
            if self._stub is None:
                options = [
                    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
                    ("grpc.max_send_message_length", 256 * 1024 * 1024),
                    # Reconnect quickly after the server comes up, so that
                    # retries within the deadline can reach it.
                    ("grpc.initial_reconnect_backoff_ms", 100),
                    ("grpc.min_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 1000),
                ]
                if self.tls:
                    root = None
                    if self.ca_cert:
                        with open(self.ca_cert, "rb") as f:
                            root = f.read()
                    if self.tls_server_name:
                        options.append(
                            ("grpc.ssl_target_name_override", self.tls_server_name)
                        )
                    self._channel = grpc.secure_channel(
                        self.server,
                        grpc.ssl_channel_credentials(root_certificates=root),
                        options=options,
                    )
                else:
                    self._channel = grpc.insecure_channel(self.server, options=options)
                self._stub = prediction_service_pb2_grpc.PredictionServiceStub(
                    self._channel
                )
            return self._stub

    def close(self):
        with self._lock:
            if self._channel is not None:
                self._channel.close()
            self._channel = None
            self._stub = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _with_retries(self, call, what):
        """Runs `call(remaining_seconds)`, retrying UNAVAILABLE until the deadline."""
        deadline = time.monotonic() + self.timeout
        delay = self.initial_backoff
        last = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServingError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"{what}: no answer within {self.timeout:g} s"
                    + (f" (last error: {last})" if last else ""),
                )
            try:
                return call(remaining)
            except grpc.RpcError as e:
                code = e.code()
                if code != grpc.StatusCode.UNAVAILABLE:
                    raise ServingError(code, f"{what}: {e.details()}") from None
                last = e.details()
            except ServingError as e:
                if e.code not in (503, grpc.StatusCode.UNAVAILABLE):
                    raise
                last = e.message
            self.retries += 1
            self.retry_event.set()
            wait = min(delay, deadline - time.monotonic())
            if wait > 0:
                time.sleep(wait)  # Backoff between attempts, not synchronisation.
            delay = min(delay * 2, self.max_backoff)

    def _model_spec(self, spec, signature_name):
        spec.name = self.model_name
        if signature_name:
            spec.signature_name = signature_name
        if self.version is not None:
            spec.version.value = int(self.version)
        elif self.version_label:
            spec.version_label = self.version_label

    def _rest_url(self, verb=""):
        scheme = "https" if self.tls else "http"
        url = f"{scheme}://{self.rest}/v1/models/{self.model_name}"
        if self.version is not None:
            url += f"/versions/{int(self.version)}"
        elif self.version_label:
            url += f"/labels/{self.version_label}"
        return url + verb

    def _rest(self, url, body=None, timeout=None):
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(
            url, data=data, headers={"Content-Type": "application/json"}
        )
        context = None
        if self.tls:
            context = ssl.create_default_context(cafile=self.ca_cert)
        try:
            with urllib.request.urlopen(
                request, timeout=timeout, context=context
            ) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read()).get("error", "")
            except ValueError:
                message = str(e)
            raise ServingError(e.code, f"{url}: {message}") from None
        except (urllib.error.URLError, ConnectionError) as e:
            # Connection refused and the like: the REST twin of UNAVAILABLE.
            raise ServingError(503, f"{url}: {getattr(e, 'reason', e)}") from None

    # ------------------------------------------------------------------ metadata
    def metadata(self):
        """The model's signatures, read from the server (cached).

        Returns:
          {"version": int or None, "signatures": {name: {"inputs": {key:
          {"dtype", "shape"}}, "outputs": {...}}}}.

        Raises:
          ServingError: the server answered with an error.
        """
        if self._metadata is not None:
            return self._metadata
        if self.rest:
            body = self._with_retries(
                lambda t: self._rest(self._rest_url("/metadata"), timeout=t),
                "GetModelMetadata (REST)",
            )
            from google.protobuf import (  # pylint: disable=g-import-not-at-top
                json_format,
            )

            signature_map = json_format.ParseDict(
                body["metadata"]["signature_def"],
                get_model_metadata_pb2.SignatureDefMap(),
            )
            version = body.get("model_spec", {}).get("version")
        else:
            request = get_model_metadata_pb2.GetModelMetadataRequest()
            self._model_spec(request.model_spec, "")
            request.metadata_field.append("signature_def")
            stub = self._get_stub()
            response = self._with_retries(
                lambda t: stub.GetModelMetadata(request, timeout=t),
                "GetModelMetadata",
            )
            signature_map = get_model_metadata_pb2.SignatureDefMap()
            response.metadata["signature_def"].Unpack(signature_map)
            version = (
                response.model_spec.version.value
                if response.model_spec.HasField("version")
                else None
            )
        self._metadata = {
            "version": int(version) if version is not None else None,
            "signatures": _signature_dict(signature_map),
        }
        return self._metadata

    def _signature(self, name):
        signatures = self.metadata()["signatures"]
        if name not in signatures:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"The model has no signature {name!r}; it has {sorted(signatures)}",
            )
        return signatures[name]

    def model_info(self):
        """Finding names, thresholds and preprocessing, from the model.

        Returns:
          {"findings": tuple, "thresholds": tuple or None, "preprocessing":
          dict or None}. Falls back to the default finding list when the
          model has no `model_info` signature.
        """
        if self._model_info is not None:
            return self._model_info
        info = {
            "findings": None,
            "thresholds": None,
            "preprocessing": None,
            "training_data": None,
        }
        outputs = None
        if MODEL_INFO_SIGNATURE in self.metadata()["signatures"]:
            try:
                outputs = self.predict_raw({}, signature_name=MODEL_INFO_SIGNATURE)
            except ServingError as e:
                # A server that cannot run an input-less signature (e.g. one
                # whose batching wraps every signature) still serves images.
                if e.code in (
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.StatusCode.UNAVAILABLE,
                ):
                    raise
                print(
                    f"warning: {MODEL_INFO_SIGNATURE} failed ({e}); using the "
                    "default finding names",
                    file=sys.stderr,
                )
        if outputs is not None:
            info["findings"] = tuple(
                v.decode("utf-8") for v in np.ravel(outputs["findings"])
            )
            if "thresholds" in outputs:
                info["thresholds"] = tuple(
                    float(v) for v in np.ravel(outputs["thresholds"])
                )
            for key in ("preprocessing", "training_data"):
                if key in outputs:
                    raw = np.ravel(outputs[key])[0]
                    info[key] = json.loads(
                        raw.decode("utf-8") if isinstance(raw, bytes) else raw
                    )
        if self._findings:
            info["findings"] = self._findings
        elif not info["findings"]:
            info["findings"] = DEFAULT_FINDINGS
        self._model_info = info
        return info

    # ------------------------------------------------------------------ predict
    def predict_raw(self, inputs, signature_name=None):
        """Runs one signature on numpy inputs.

        Args:
          inputs: {input key: np.ndarray} (string arrays as dtype=object bytes).
          signature_name: defaults to the client's signature.

        Returns:
          {output key: np.ndarray}.

        Raises:
          ServingError: the server answered with an error (after retries).
        """
        name = signature_name or self.signature_name
        if self.rest:
            columns = {}
            for key, value in inputs.items():
                value = np.asarray(value)
                if value.dtype == object:
                    columns[key] = [
                        {"b64": base64.b64encode(v).decode("ascii")}
                        for v in value.reshape(-1)
                    ]
                else:
                    columns[key] = value.tolist()
            body = {"signature_name": name, "inputs": columns}
            reply = self._with_retries(
                lambda t: self._rest(self._rest_url(":predict"), body, timeout=t),
                f"Predict {name} (REST)",
            )
            outputs = reply["outputs"]
            if not isinstance(outputs, dict):
                outputs = {next(iter(self._signature(name)["outputs"])): outputs}
            arrays = {}
            for k, v in outputs.items():
                array = np.asarray(v)
                if array.dtype.kind == "U":
                    array = np.vectorize(lambda x: x.encode("utf-8"), otypes=[object])(
                        array
                    )
                arrays[k] = array
            return arrays
        request = predict_pb2.PredictRequest()
        self._model_spec(request.model_spec, name)
        for key, value in inputs.items():
            request.inputs[key].CopyFrom(_make_tensor_proto(value))
        stub = self._get_stub()
        response = self._with_retries(
            lambda t: stub.Predict(request, timeout=t), f"Predict {name}"
        )
        return {k: _make_ndarray(v) for k, v in response.outputs.items()}

    def _results(self, names, outputs, offsets=None):
        findings = self.model_info()["findings"]
        probabilities = np.asarray(outputs["probabilities"])
        if probabilities.shape[-1] != len(findings):
            raise ServingError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"The model returns {probabilities.shape[-1]} probabilities but "
                f"{len(findings)} finding names are known",
            )
        results = []
        for i, name in enumerate(names):
            result = {
                "image": name,
                "probabilities": {
                    f: float(p) for f, p in zip(findings, probabilities[i])
                },
                "boxes": [],
            }
            if "boxes" in outputs:
                boxes = np.asarray(outputs["boxes"])[i]
                scores = np.asarray(outputs["box_scores"])[i]
                counts = np.asarray(outputs["num_boxes"])[i]
                for k, finding in enumerate(findings):
                    for j in range(int(counts[k])):
                        x, y, w, h = (float(v) for v in boxes[k, j])
                        if offsets is not None:
                            x, y, w, h = _to_original(x, y, w, h, offsets[i])
                        result["boxes"].append(
                            {
                                "finding": finding,
                                "x": x,
                                "y": y,
                                "w": w,
                                "h": h,
                                "score": float(scores[k, j]),
                            }
                        )
            results.append(result)
        return results

    def predict_bytes(self, items, return_maps=False):
        """Predicts encoded images, `batch_size` per request.

        Args:
          items: list of (name, bytes) with PNG/JPEG/DICOM bytes.
          return_maps: also put "localization_maps" (14,h,w) arrays in results.

        Returns:
          One dict per item, in order: the JSON form described in the module
          docstring, or {"image": name, "error": message} for an item that
          could not be encoded or was refused (INVALID_ARGUMENT).

        Raises:
          ServingError: a failure that is not about one image (unreachable
            server, deadline, unknown model).
        """
        results = [None] * len(items)
        ready = []
        for index, (name, data) in enumerate(items):
            try:
                ready.append((index, name, encode_for_serving(data, name)))
            except ValueError as e:
                results[index] = {"image": name, "error": str(e)}
        for start in range(0, len(ready), self.batch_size):
            batch = ready[start : start + self.batch_size]
            for index, result in self._predict_batch(batch, return_maps):
                results[index] = result
        return results

    def _predict_batch(self, batch, return_maps):
        signature = self._signature(self.signature_name)
        try:
            if self.signature_name == serving_contract.PIXELS_SIGNATURE or (
                len(signature["inputs"]) == 1
                and next(iter(signature["inputs"].values()))["dtype"] == "DT_FLOAT"
            ):
                outputs, offsets = self._predict_pixels(batch, signature)
            else:
                key = next(iter(signature["inputs"]))
                outputs = self.predict_raw(
                    {key: np.array([data for _, _, data in batch], dtype=object)}
                )
                offsets = None
        except ServingError as e:
            if e.code not in (grpc.StatusCode.INVALID_ARGUMENT, 400):
                raise
            if len(batch) == 1:
                return [(batch[0][0], {"image": batch[0][1], "error": e.message})]
            # One bad image fails its whole batch: find it by sending singly.
            pairs = []
            for item in batch:
                pairs.extend(self._predict_batch([item], return_maps))
            return pairs
        results = self._results([name for _, name, _ in batch], outputs, offsets)
        if return_maps and "localization_maps" in outputs:
            for i, result in enumerate(results):
                result["localization_maps"] = np.asarray(outputs["localization_maps"])[
                    i
                ]
        return [(index, result) for (index, _, _), result in zip(batch, results)]

    def _predict_pixels(self, batch, signature):
        """predict_pixels: preprocess here, map the boxes back to the image.

        With cxr_tf importable the preprocessing is training's exact path
        (`cxr_tf.data.images.decode_image`, then `cxr_tf.data.preprocess`
        at the model's ingest and network sizes); without it, a Pillow
        approximation (bilinear letterbox).
        """
        key, info = next(iter(signature["inputs"].items()))
        size, channels = info["shape"][1], info["shape"][3]
        pre = self.model_info()["preprocessing"] or {}
        if "mean" not in pre or "std" not in pre:
            raise ServingError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "predict_pixels needs the model's normalisation (model_info "
                "signature with 'preprocessing'); use serving_default instead",
            )
        ingest_size = pre.get("ingest_image_size")
        try:
            # pylint: disable=g-import-not-at-top
            from cxr_tf.data import images
            from cxr_tf.data import preprocess
            from cxr_tf.data import schema
        except ImportError:
            preprocess = None
        pixels, geometry = [], []
        for _, name, data in batch:
            if preprocess is not None:
                try:
                    gray = images.decode_image(data, name=name)
                except ValueError as e:
                    raise ServingError(
                        grpc.StatusCode.INVALID_ARGUMENT, f"{name}: {e}"
                    ) from None
                image = preprocess.preprocess_pixels(
                    gray,
                    size,
                    schema.Normalization(pre["mean"], pre["std"]),
                    ingest_size,
                )
                h, w = gray.shape
                box = preprocess.Letterbox(h, w, size, ingest_size)
                off_y, off_x = box.offset_yx
                pixels.append(np.repeat(image, channels, axis=-1))
                geometry.append((box.per_pixel, off_x, off_y, h, w))
            else:
                image, entry = _approximate_pixels(data, name, size, pre)
                pixels.append(np.repeat(image[..., None], channels, axis=-1))
                geometry.append(entry)
        outputs = self.predict_raw({key: np.stack(pixels).astype(np.float32)})
        return outputs, geometry

    def predict_files(self, paths, return_maps=False):
        """Reads image files (or directories of them) and predicts them.

        Returns:
          As `predict_bytes`, named by file base name.
        """
        items = []
        for path in expand_paths(paths):
            with open(path, "rb") as f:
                items.append((os.path.basename(path), f.read()))
        return self.predict_bytes(items, return_maps=return_maps)


def write_overlay(path, image_bytes, result, findings, positive_threshold=0.5):
    """Writes an overlay PNG (maps and boxes) with `cxr_tf.visualize`.

    Shows the findings with probability >= positive_threshold (at least the
    most probable one).

    Args:
      path: PNG file to write.
      image_bytes: the image file's bytes (PNG/JPEG/DICOM).
      result: a `predict_bytes(..., return_maps=True)` result.
      findings: finding names, in the order of the maps.
      positive_threshold: probability from which a finding is shown.

    Returns:
      The path written, or None when cxr_tf is not importable.
    """
    try:
        from cxr_tf import localization  # pylint: disable=g-import-not-at-top
        from cxr_tf import visualize  # pylint: disable=g-import-not-at-top
        from cxr_tf.data import images  # pylint: disable=g-import-not-at-top
    except ImportError:
        return None
    image = images.decode_image(image_bytes, result["image"])
    maps = np.asarray(result["localization_maps"])
    probabilities = result["probabilities"]
    shown = [f for f in findings if probabilities[f] >= positive_threshold]
    if not shown:
        shown = [max(findings, key=lambda f: probabilities[f])]
    boxes = {f: [] for f in shown}
    for box in result["boxes"]:
        if box["finding"] in boxes:
            boxes[box["finding"]].append(
                localization.Box(box["x"], box["y"], box["w"], box["h"], box["score"])
            )
    # Served maps are in [0, 1] for every map kind (CAMs min-max normalised).
    visualize.overlay_figure(
        image,
        {f: maps[findings.index(f)] for f in shown},
        boxes,
        probabilities,
        map_kind="probability",
        path=path,
        title=result["image"],
    )
    return path


def _define_flags(flag_values):
    """The CLI's flags, in their own `FlagValues` (importers keep theirs clean)."""
    from absl import flags  # pylint: disable=g-import-not-at-top

    fv = flag_values
    flags.DEFINE_string("server", None, "gRPC host:port (TF Serving: 8500).", flag_values=fv)
    flags.DEFINE_string("rest", None, "REST host:port instead of gRPC (8501).", flag_values=fv)
    flags.DEFINE_string("model_name", "cxr", "Served model name.", flag_values=fv)
    flags.DEFINE_string("signature", "serving_default", "Signature.", flag_values=fv)
    flags.DEFINE_integer("version", None, "Model version.", lower_bound=0, flag_values=fv)
    flags.DEFINE_string("version_label", None, "Model version label.", flag_values=fv)
    flags.DEFINE_bool("tls", False, "Use TLS.", flag_values=fv)
    flags.DEFINE_string("ca_cert", None, "PEM CA file to trust (implies --tls).", flag_values=fv)
    flags.DEFINE_string("tls_server_name", None, "Name to check in the cert.", flag_values=fv)
    flags.DEFINE_float("timeout", 30.0, "Seconds per batch.", lower_bound=0.0, flag_values=fv)
    flags.DEFINE_integer("batch_size", 8, "Images per request.", lower_bound=1, flag_values=fv)
    flags.DEFINE_string("overlay_dir", None, "Write overlay PNGs here.", flag_values=fv)
    flags.DEFINE_bool("debug", False, "Print the traceback of any error.", flag_values=fv)
    flags.DEFINE_bool("help", False, "Show this help.", short_name="?", flag_values=fv)
    flags.DEFINE_bool("helpfull", False, "Show this help.", flag_values=fv)
    flags.DEFINE_bool("helpshort", False, "Show this help.", flag_values=fv)
    return fv


class _UsageError(Exception):
    """A mistake in the command line: `error: <what> (<where>): <fix>`."""

    def __init__(self, what, where, fix):
        super().__init__(f"{what} ({where}): {fix}")


def _parse_argv(argv):
    from absl import flags  # pylint: disable=g-import-not-at-top

    fv = _define_flags(flags.FlagValues())
    try:
        images = fv(["client"] + list(argv))[1:]
    except flags.CantOpenFlagFileError as e:
        raise _UsageError(
            "cannot open the flagfile",
            "--flagfile=" + str(e).rsplit(": ", 1)[-1].strip("'"),
            "check the path",
        ) from None
    except flags.Error as e:
        raise _UsageError(str(e), "flags", "see --helpfull") from None
    if fv.help or fv.helpfull or fv.helpshort:
        print(__doc__ + "\n" + fv.main_module_help())
        return fv, None
    if bool(fv.server) == bool(fv.rest):
        raise _UsageError(
            "give exactly one of --server and --rest", "--server/--rest", "e.g. --server=localhost:8500"
        )
    if fv.version is not None and fv.version_label:
        raise _UsageError(
            "--version and --version_label exclude each other",
            "--version/--version_label",
            "give one",
        )
    if fv.ca_cert and not os.path.isfile(fv.ca_cert):
        raise _UsageError("no such file", f"--ca_cert={fv.ca_cert}", "check the path")
    if fv.timeout <= 0:
        raise _UsageError("must be > 0 seconds", f"--timeout={fv.timeout}", "give a positive number")
    if not images:
        raise _UsageError("no image given", "arguments", "give image files or folders")
    try:
        paths = expand_paths(images)
    except FileNotFoundError as e:
        raise _UsageError(str(e), images[0], "check the path") from None
    if not paths:
        raise _UsageError(
            "no PNG, JPEG or DICOM files", " ".join(images), "give image files or folders"
        )
    return fv, paths


def main(argv=None):
    """The CLI; returns the exit status (0; 1 when any image failed or a mistake
    in the command line; 2 when the server failed).

    Args:
      argv: the arguments after the program name (default: `sys.argv[1:]`).
        absl flags: `--flagfile`, `--helpfull` work as in every cxr_tf command.
    """
    argv = sys.argv[1:] if argv is None else argv
    try:
        fv, paths = _parse_argv(argv)
    except _UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if paths is None:
        return 0
    try:
        return _run(fv, paths)
    except ServingError as e:
        if fv.debug:
            import traceback  # pylint: disable=g-import-not-at-top

            traceback.print_exc()
        where = f"--server={fv.server}" if fv.server else f"--rest={fv.rest}"
        print(
            f"error: {e} ({where}): check that the server runs and serves "
            f"--model_name={fv.model_name}; --timeout={fv.timeout:g} s per batch",
            file=sys.stderr,
        )
        return 2


def _run(args, paths):
    client = CxrClient(
        server=args.server,
        rest=args.rest,
        model_name=args.model_name,
        signature_name=args.signature,
        version=args.version,
        version_label=args.version_label,
        tls=args.tls,
        ca_cert=args.ca_cert,
        tls_server_name=args.tls_server_name,
        timeout=args.timeout,
        batch_size=args.batch_size,
    )
    if args.overlay_dir:
        os.makedirs(args.overlay_dir, exist_ok=True)
    status = 0
    with client:
        for start in range(0, len(paths), args.batch_size):
            chunk = paths[start : start + args.batch_size]
            items = []
            for path in chunk:
                with open(path, "rb") as f:
                    items.append((os.path.basename(path), f.read()))
            results = client.predict_bytes(items, return_maps=bool(args.overlay_dir))
            for (name, data), result in zip(items, results):
                if "error" in result:
                    status = 1
                elif args.overlay_dir:
                    written = write_overlay(
                        os.path.join(args.overlay_dir, os.path.splitext(name)[0] + ".png"),
                        data,
                        result,
                        list(client.model_info()["findings"]),
                    )
                    if written is None:
                        print(
                            "--overlay_dir needs cxr_tf.visualize; no overlay written",
                            file=sys.stderr,
                        )
                result.pop("localization_maps", None)
                print(json.dumps(result), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
