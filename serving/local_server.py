"""A small gRPC PredictionService over exported SavedModels, for tests only.

This is NOT a replacement for TensorFlow Serving. It exists so that the export
(`cxr_tf.export`) and the client (`serving/client.py`) can be exercised over the
real wire protocol (the `tensorflow_serving.apis` protos on grpcio) on machines
where the `tensorflow_model_server` binary is absent. It implements only
`PredictionService.Predict`, `PredictionService.GetModelMetadata` and
`ModelService.GetModelStatus`, serves the newest numeric version under
`--model_base_path` (polling the directory for new ones, as TF Serving's
default "latest" version policy does), has no request batching, no model
warm-up replay, and no monitoring endpoint. Optionally it answers a subset of
the REST API (`--rest_api_port`: `:predict` and `/metadata`).

Usage:
  python -m serving.local_server --model_base_path=E --port=8500 \
      [--model_name=cxr] [--host=127.0.0.1] [--ssl_cert=C --ssl_key=K]
"""

import base64
import concurrent.futures
import dataclasses
import http.server
import json
import os
import re
import sys
import threading



def _define_flags():
    """The CLI's flags (defined only when run as a program)."""
    from absl import flags  # pylint: disable=g-import-not-at-top

    if "model_base_path" in flags.FLAGS:
        return
    flags.DEFINE_string("model_base_path", None, "Directory of numeric versions.")
    flags.DEFINE_integer("port", 8500, "gRPC port.", lower_bound=0)
    flags.DEFINE_string("model_name", "cxr", "Model name requests must use.")
    flags.DEFINE_string("host", "127.0.0.1", "Interface to bind.")
    flags.DEFINE_integer("max_batch_size", 64, "Largest batch accepted.", lower_bound=1)
    flags.DEFINE_float("poll_seconds", 1.0, "How often to look for new versions.")
    flags.DEFINE_string("ssl_cert", None, "PEM certificate (TLS, with --ssl_key).")
    flags.DEFINE_string("ssl_key", None, "PEM private key.")
    flags.DEFINE_integer("rest_api_port", None, "Also serve the REST subset here.")
    flags.DEFINE_multi_string("version_label", [], "LABEL=VERSION, repeatable.")
    flags.mark_flag_as_required("model_base_path")


def _check_flags():
    """Checks the command line without TensorFlow; raises `errors.UserError`."""
    from absl import flags  # pylint: disable=g-import-not-at-top

    from cxr_tf import cli  # pylint: disable=g-import-not-at-top
    from cxr_tf import errors  # pylint: disable=g-import-not-at-top

    f = flags.FLAGS
    holder = f["model_base_path"]
    path = cli.check_dir(holder)
    if "://" not in path:
        versions = [
            n
            for n in os.listdir(path)
            if n.isdigit() and os.path.isfile(os.path.join(path, n, "saved_model.pb"))
        ]
        if not versions:
            raise errors.UserFileError(
                "no model versions (<number>/saved_model.pb)",
                f"--model_base_path={path}",
                "export one: python -m cxr_tf.export --model=M --export_dir="
                + path,
            )
    for name in ("ssl_cert", "ssl_key"):
        cli.check_file(f[name])
    if bool(f.ssl_cert) != bool(f.ssl_key):
        raise errors.UserValueError(
            "TLS needs both files", "--ssl_cert/--ssl_key", "give both or neither"
        )


if __name__ == "__main__":
    # Answer a mistake in the command line before TensorFlow loads.
    from cxr_tf import cli as _cli  # pylint: disable=g-import-not-at-top

    _define_flags()
    _cli.precheck(_check_flags)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Importers: quiet TF.

import grpc  # pylint: disable=g-import-not-at-top
import numpy as np
import tensorflow as tf
from absl import logging
from google.protobuf import json_format
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import model_pb2
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

from serving import contract as serving_contract

DEFAULT_SIGNATURE = serving_contract.SERVING_SIGNATURE
_VERSION_DIR = re.compile(r"^\d+$")
# ModelSpec.version is an Int64Value; versions are positive.
MAX_VERSION = 2**63 - 1
# REST bodies are JSON with base64 images: a batch of 64 films of ~3 MB.
DEFAULT_MAX_REST_BODY_BYTES = 256 * 1024 * 1024
# How long a REST handler waits on a silent client (headers or body).
DEFAULT_REST_TIMEOUT_SECONDS = 30.0


class RequestError(Exception):
    """A request that cannot be served; carries the gRPC status code."""

    def __init__(self, code, message):
        message = _printable(message)
        super().__init__(message)
        self.code = code
        self.message = message


@dataclasses.dataclass
class Servable:
    """One loaded SavedModel version.

    Attributes:
      version: the numeric version (the directory name).
      path: the version directory.
      loaded: the object returned by `tf.saved_model.load`.
      signature_defs: `{name: SignatureDef proto}` read from saved_model.pb.
    """

    version: int
    path: str
    loaded: object
    signature_defs: dict


def scan_versions(model_base_path):
    """The complete numeric versions under a model base path, and the others.

    A version is complete once its directory holds saved_model.pb and
    assets/ (an export writes to a temporary name and renames, so it is
    never seen half-written; a folder copied by hand may be, and one
    without assets/ lacks the findings and thresholds the model card and
    clients read).

    Args:
      model_base_path: directory holding `<version>/saved_model.pb`.

    Returns:
      (sorted list of complete versions, `{version: why it is skipped}`).
    """
    if not tf.io.gfile.isdir(model_base_path):
        return [], {}
    versions, skipped = [], {}
    for name in tf.io.gfile.listdir(model_base_path):
        name = name.rstrip("/")
        if not _VERSION_DIR.match(name):
            continue
        path = os.path.join(model_base_path, name)
        missing = []
        if not tf.io.gfile.exists(os.path.join(path, "saved_model.pb")):
            missing.append("saved_model.pb")
        if not tf.io.gfile.isdir(os.path.join(path, "assets")):
            missing.append("assets/")
        if missing:
            skipped[int(name)] = f"{path} has no {' and no '.join(missing)}"
        else:
            versions.append(int(name))
    return sorted(versions), skipped


def list_versions(model_base_path):
    """Returns the complete numeric versions (`scan_versions`), ascending."""
    return scan_versions(model_base_path)[0]


def read_signature_defs(export_path):
    """Reads the serving signature defs of a SavedModel without loading it.

    Args:
      export_path: a SavedModel directory.

    Returns:
      `{name: tensorflow.SignatureDef}` of the "serve" meta graph.

    Raises:
      ValueError: no meta graph tagged "serve".
    """
    saved_model = saved_model_pb2.SavedModel()
    with tf.io.gfile.GFile(os.path.join(export_path, "saved_model.pb"), "rb") as f:
        saved_model.ParseFromString(f.read())
    for meta_graph in saved_model.meta_graphs:
        if "serve" in meta_graph.meta_info_def.tags:
            return dict(meta_graph.signature_def)
    raise ValueError(f"No meta graph tagged 'serve' in {export_path}/saved_model.pb")


class ServableStore:
    """Keeps the newest version of one model loaded; polls for newer ones."""

    def __init__(self, model_base_path, model_name, version_labels=None):
        """Creates the store (loads nothing yet: call `poll_once`).

        Args:
          model_base_path: directory of numeric version subdirectories.
          model_name: the name requests must use.
          version_labels: optional `{label: version}`.
        """
        self.model_base_path = model_base_path
        self.model_name = model_name
        self.version_labels = dict(version_labels or {})
        self._lock = threading.Lock()
        self._current = None
        self._stop = threading.Event()
        self._thread = None
        self._reported_skips = set()
        self.loaded_event = threading.Event()

    @property
    def current(self):
        with self._lock:
            return self._current

    def poll_once(self):
        """Loads the newest version if it is newer than the one served.

        Returns:
          The version served after the poll, or None while there is none.
        """
        versions, skipped = scan_versions(self.model_base_path)
        for version, reason in sorted(skipped.items()):
            # Once per folder and reason, not at every poll.
            if (version, reason) not in self._reported_skips:
                self._reported_skips.add((version, reason))
                logging.warning(
                    "Not serving %s version %d: %s (incomplete copy?)",
                    self.model_name,
                    version,
                    reason,
                )
        current = self.current
        if versions and (current is None or versions[-1] > current.version):
            version = versions[-1]
            path = os.path.join(self.model_base_path, str(version))
            logging.info(
                "Loading %s version %d from %s", self.model_name, version, path
            )
            try:
                servable = Servable(
                    version=version,
                    path=path,
                    loaded=tf.saved_model.load(path),
                    signature_defs=read_signature_defs(path),
                )
            except Exception as e:  # pylint: disable=broad-except
                # A broken export must not take down the version being served.
                logging.error("Could not load %s: %s", path, e)
                return current.version if current else None
            with self._lock:
                self._current = servable
            self.loaded_event.set()
            logging.info("Serving %s version %d", self.model_name, version)
            return version
        return current.version if current else None

    def start_polling(self, interval_seconds):
        """Polls the base path every `interval_seconds` in a daemon thread."""

        def loop():
            while not self._stop.wait(interval_seconds):
                self.poll_once()

        self._thread = threading.Thread(target=loop, name="version-poll", daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def resolve(self, model_spec):
        """Returns the servable a request's ModelSpec names.

        Raises:
          RequestError: unknown model, version or label, or nothing loaded yet.
        """
        if model_spec.name != self.model_name:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND,
                f"Servable not found for request: model_spec.name="
                f"{model_spec.name!r}; this server serves {self.model_name!r}",
            )
        current = self.current
        if current is None:
            raise RequestError(
                grpc.StatusCode.UNAVAILABLE,
                f"No version of {self.model_name!r} loaded yet from "
                f"{self.model_base_path}",
            )
        wanted = None
        if model_spec.HasField("version"):
            wanted = model_spec.version.value
        elif model_spec.version_label:
            if model_spec.version_label not in self.version_labels:
                raise RequestError(
                    grpc.StatusCode.NOT_FOUND,
                    f"Unknown version_label {model_spec.version_label!r}; "
                    f"known labels: {sorted(self.version_labels)}",
                )
            wanted = self.version_labels[model_spec.version_label]
        if wanted is not None and wanted != current.version:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND,
                f"Servable not found: {self.model_name} version {wanted} is not "
                f"loaded (serving version {current.version})",
            )
        return current


def _dtype_name(enum_value):
    return tf.dtypes.as_dtype(enum_value).name


def _check_input(key, array, tensor_info, max_batch_size):
    """Validates one decoded request input against its signature entry."""
    expected = tf.dtypes.as_dtype(tensor_info.dtype)
    if array.ndim == 0:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"Input {key!r} must be batched (rank >= 1). Received a scalar.",
        )
    if not tensor_info.tensor_shape.unknown_rank:
        dims = [d.size for d in tensor_info.tensor_shape.dim]
        if len(dims) != array.ndim or any(
            d >= 0 and d != s for d, s in zip(dims, array.shape)
        ):
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Input {key!r} has shape {list(array.shape)}; the signature "
                f"expects {dims} (-1 = any)",
            )
    if array.shape[0] == 0:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"Input {key!r} is an empty batch (shape {list(array.shape)})",
        )
    if max_batch_size and array.shape[0] > max_batch_size:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"Input {key!r} has a batch of {array.shape[0]}, more than "
            f"max_batch_size={max_batch_size}",
        )
    is_string = array.dtype == object or array.dtype.kind in "SU"
    if (expected == tf.string) != is_string or (
        not is_string and array.dtype != expected.as_numpy_dtype
    ):
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"Input {key!r} has dtype {'string' if is_string else array.dtype}; "
            f"the signature expects dtype {expected.name}",
        )
    try:
        return tf.constant(array, dtype=expected)
    except (ValueError, TypeError) as e:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT, f"Input {key!r}: {e}"
        ) from None


class Predictor:
    """Runs requests on the servable of a `ServableStore` (shared by gRPC/REST)."""

    def __init__(self, store, max_batch_size=64):
        self.store = store
        self.max_batch_size = max_batch_size

    def signature(self, servable, signature_name):
        name = signature_name or DEFAULT_SIGNATURE
        if name not in servable.signature_defs or name.startswith("__"):
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Serving signature name {name!r} not found in the signature "
                f"defs of version {servable.version}; available: "
                f"{sorted(k for k in servable.signature_defs if not k.startswith('__'))}",
            )
        return name, servable.signature_defs[name]

    def run(self, servable, signature_name, arrays, output_filter=()):
        """Runs a signature on numpy inputs.

        Args:
          servable: a `Servable`.
          signature_name: signature to run ("" = serving_default).
          arrays: `{input key: np.ndarray}`.
          output_filter: output keys to return (empty = all).

        Returns:
          (signature name, `{output key: np.ndarray}`).

        Raises:
          RequestError: INVALID_ARGUMENT for bad inputs, INTERNAL otherwise.
        """
        name, signature_def = self.signature(servable, signature_name)
        expected = set(signature_def.inputs)
        if set(arrays) != expected:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Signature {name!r} takes inputs {sorted(expected)}. "
                f"Received: {sorted(arrays)}",
            )
        unknown = set(output_filter) - set(signature_def.outputs)
        if unknown:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"output_filter names {sorted(unknown)}, not outputs of {name!r} "
                f"({sorted(signature_def.outputs)})",
            )
        feeds = {
            key: _check_input(
                key, array, signature_def.inputs[key], self.max_batch_size
            )
            for key, array in arrays.items()
        }
        try:
            outputs = servable.loaded.signatures[name](**feeds)
        except tf.errors.InvalidArgumentError as e:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT, _op_error_message(e)
            ) from None
        except tf.errors.OpError as e:
            raise RequestError(grpc.StatusCode.INTERNAL, _op_error_message(e)) from None
        except UnicodeDecodeError:
            # TF could not turn the op's status message into text: it quoted
            # raw request bytes, which only an op refusing its input does.
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Signature {name!r} refused its input (the model's error "
                "message held raw request bytes and is not repeated)",
            ) from None
        keys = list(output_filter) or list(outputs)
        return name, {k: np.asarray(outputs[k].numpy()) for k in keys}


_MAX_MESSAGE_CHARS = 500
_ASSERTION = re.compile(r"^assertion failed: \[(?P<text>.*)\]$")


def _op_error_message(error):
    """The line of a TF graph error that says what went wrong.

    Graph asserts (`image_header.guard_image_bytes`) come as "assertion
    failed: [text]"; the text is kept. The line is cut to 500 printable
    characters, so an op that quotes its input cannot echo it whole.
    """
    lines = [
        line.strip()
        for line in error.message.splitlines()
        if line.strip()
        and not line.startswith(("Graph execution error", "Detected at node", "<stack"))
        and not line.strip().startswith("[[")
        and not line.startswith("  File ")
    ]
    line = lines[0] if lines else error.message
    line = re.sub(r"^(\{\{function_node [^}]*\}\}\s*)+", "", line)
    line = re.sub(r"\s*\[\[.*$|\s*\[Op:.*$", "", line)
    match = _ASSERTION.match(line)
    if match:
        line = match["text"]
    return _printable(line)


def _printable(text):
    """`text` with non-printable characters as "?", at most 500 characters."""
    text = "".join(c if c.isprintable() else "?" for c in str(text))
    if len(text) > _MAX_MESSAGE_CHARS:
        text = text[: _MAX_MESSAGE_CHARS - 3] + "..."
    return text


def _request_arrays(request):
    """Decodes the TensorProtos of a PredictRequest, or INVALID_ARGUMENT."""
    arrays = {}
    for key, proto in request.inputs.items():
        try:
            arrays[key] = tf.make_ndarray(proto)
        except Exception as e:  # pylint: disable=broad-except
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Input {key!r} is not a valid TensorProto "
                f"(dtype {_dtype_name(proto.dtype) if proto.dtype else 'unset'}): {e}",
            ) from None
    return arrays


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Predict and GetModelMetadata over a `ServableStore`."""

    def __init__(self, predictor):
        self.predictor = predictor

    def Predict(self, request, context):  # pylint: disable=invalid-name
        try:
            servable = self.predictor.store.resolve(request.model_spec)
            arrays = _request_arrays(request)
            name, outputs = self.predictor.run(
                servable,
                request.model_spec.signature_name,
                arrays,
                tuple(request.output_filter),
            )
        except RequestError as e:
            context.abort(e.code, e.message)
        except Exception as e:  # pylint: disable=broad-except
            # gRPC would answer UNKNOWN with the exception's text.
            logging.exception("Predict failed")
            context.abort(
                grpc.StatusCode.INTERNAL,
                f"Predict failed with {type(e).__name__}; see the server log",
            )
        response = predict_pb2.PredictResponse()
        response.model_spec.name = self.predictor.store.model_name
        response.model_spec.version.value = servable.version
        response.model_spec.signature_name = name
        for key, value in outputs.items():
            response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
        return response

    def GetModelMetadata(self, request, context):  # pylint: disable=invalid-name
        try:
            servable = self.predictor.store.resolve(request.model_spec)
            if list(request.metadata_field) != ["signature_def"]:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "metadata_field must be ['signature_def']. Received: "
                    f"{list(request.metadata_field)}",
                )
        except RequestError as e:
            context.abort(e.code, e.message)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for key, value in servable.signature_defs.items():
            signature_map.signature_def[key].CopyFrom(value)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = self.predictor.store.model_name
        response.model_spec.version.value = servable.version
        response.metadata["signature_def"].Pack(signature_map)
        return response


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """GetModelStatus: AVAILABLE for the served version."""

    def __init__(self, store):
        self.store = store

    def GetModelStatus(self, request, context):  # pylint: disable=invalid-name
        try:
            servable = self.store.resolve(request.model_spec)
        except RequestError as e:
            context.abort(e.code, e.message)
        response = get_model_status_pb2.GetModelStatusResponse()
        status = response.model_version_status.add()
        status.version = servable.version
        status.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
        return response


def _json_to_array(value, tensor_info):
    """A REST JSON input value as a numpy array of the signature's dtype."""
    dtype = tf.dtypes.as_dtype(tensor_info.dtype)
    if dtype == tf.string:

        def decode(v):
            if isinstance(v, dict) and set(v) == {"b64"}:
                return base64.b64decode(v["b64"])
            if isinstance(v, list):
                return [decode(x) for x in v]
            if isinstance(v, str):
                return v.encode("utf-8")
            raise ValueError(f"expected a string or {{'b64': ...}}, got {v!r:.80}")

        return np.array(decode(value), dtype=object)
    return np.asarray(value, dtype=dtype.as_numpy_dtype)


class _RestHandler(http.server.BaseHTTPRequestHandler):
    """The /v1/models/<name>[/versions/<v>|/labels/<l>][/metadata|:predict] subset."""

    # Set on a subclass per server.
    predictor = None
    max_body_bytes = DEFAULT_MAX_REST_BODY_BYTES
    # socketserver applies it to the connection: a read that waits longer
    # (headers, or a body shorter than its Content-Length) raises TimeoutError.
    timeout = DEFAULT_REST_TIMEOUT_SECONDS
    _PATH = re.compile(
        r"^/v1/models/(?P<name>[^/:]+)"
        r"(?:/versions/(?P<version>[^/:]*)|/labels/(?P<label>[^/:]+))?"
        r"(?P<verb>/metadata|:predict)?$"
    )

    def log_message(self, format, *args):  # pylint: disable=redefined-builtin
        logging.debug("REST %s", format % args)

    def _reply(self, code, body):
        data = json.dumps(body).encode("utf-8")
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, error, http_code=None):
        http_code = http_code or {
            grpc.StatusCode.INVALID_ARGUMENT: 400,
            grpc.StatusCode.NOT_FOUND: 404,
            grpc.StatusCode.UNAVAILABLE: 503,
        }.get(error.code, 500)
        self._reply(http_code, {"error": error.message})

    def _spec(self):
        match = self._PATH.match(self.path)
        if not match:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND, f"Malformed request: {self.path}"
            )
        spec = model_pb2.ModelSpec(name=match["name"])
        if match["version"] is not None:
            version = match["version"]
            if not version.isdigit() or not 0 < int(version) <= MAX_VERSION:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Version in {self.path[:200]} must be an integer in "
                    f"1..{MAX_VERSION}. Received: {version[:40]!r}",
                )
            spec.version.value = int(version)
        if match["label"]:
            spec.version_label = match["label"]
        return spec, match["verb"]

    def do_GET(self):  # pylint: disable=invalid-name
        self._guarded(self._get)

    def do_POST(self):  # pylint: disable=invalid-name
        self._guarded(self._post)

    def _guarded(self, handler):
        try:
            handler()
        except TimeoutError:
            # The client sent less than it announced; answer and hang up
            # instead of holding this thread.
            self.close_connection = True
            self._error(
                RequestError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"Request body not received within {self.timeout:g} s "
                    "(shorter than its Content-Length?)",
                ),
                http_code=408,
            )
        except Exception as e:  # pylint: disable=broad-except
            # Answer 500 rather than dropping the connection, which a client
            # would take for an unreachable server and retry.
            logging.exception("REST handler failed")
            self._error(
                RequestError(
                    grpc.StatusCode.INTERNAL,
                    f"{type(e).__name__} while handling the request; see the "
                    "server log",
                )
            )

    def _read_body(self):
        """The request body, within `max_body_bytes` (413 above it)."""
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise _HttpError(411, "Send a Content-Length; chunked bodies are not read")
        value = self.headers.get("Content-Length")
        if value is None:
            self.close_connection = True
            raise _HttpError(411, "A POST needs a Content-Length header")
        if not value.strip().isdigit():
            self.close_connection = True
            raise _HttpError(
                400, f"Content-Length must be a byte count. Received: {value[:40]!r}"
            )
        length = int(value)
        if length > self.max_body_bytes:
            # The body stays unread: the connection cannot be reused.
            self.close_connection = True
            raise _HttpError(
                413,
                f"Request body of {length} bytes is over the limit of "
                f"{self.max_body_bytes} bytes; send fewer images per request",
            )
        return self.rfile.read(length)

    def _get(self):
        try:
            spec, verb = self._spec()
            servable = self.predictor.store.resolve(spec)
            if verb == "/metadata":
                signature_map = get_model_metadata_pb2.SignatureDefMap()
                for key, value in servable.signature_defs.items():
                    signature_map.signature_def[key].CopyFrom(value)
                self._reply(
                    200,
                    {
                        "model_spec": {
                            "name": spec.name,
                            "signature_name": "",
                            "version": str(servable.version),
                        },
                        "metadata": {
                            "signature_def": json_format.MessageToDict(signature_map)
                        },
                    },
                )
            elif verb is None:
                self._reply(
                    200,
                    {
                        "model_version_status": [
                            {
                                "version": str(servable.version),
                                "state": "AVAILABLE",
                                "status": {"error_code": "OK", "error_message": ""},
                            }
                        ]
                    },
                )
            else:
                raise RequestError(grpc.StatusCode.NOT_FOUND, "Use POST for :predict")
        except RequestError as e:
            self._error(e)

    def _post(self):
        try:
            spec, verb = self._spec()
            if verb != ":predict":
                raise RequestError(
                    grpc.StatusCode.NOT_FOUND, f"Unsupported POST {self.path}"
                )
            servable = self.predictor.store.resolve(spec)
            try:
                body = json.loads(self._read_body())
            except ValueError as e:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"Body is not JSON: {e}"
                ) from None
            if not isinstance(body, dict):
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "Body must be a JSON object with 'instances' or 'inputs'",
                )
            name, signature_def = self.predictor.signature(
                servable, body.get("signature_name", "")
            )
            keys = list(signature_def.inputs)
            try:
                if not keys and "instances" in body:
                    raise ValueError(
                        f"signature {name!r} takes no inputs: send "
                        '{"inputs": {}} instead of "instances"'
                    )
                if "instances" in body:
                    instances = body["instances"]
                    if not isinstance(instances, list):
                        raise ValueError("'instances' must be a list")
                    if len(keys) == 1 and not (
                        instances
                        and isinstance(instances[0], dict)
                        and keys[0] in instances[0]
                    ):
                        columns = {keys[0]: instances}
                    else:
                        columns = {k: [inst[k] for inst in instances] for k in keys}
                    row_format = True
                elif "inputs" in body:
                    inputs = body["inputs"]
                    columns = inputs if isinstance(inputs, dict) else {keys[0]: inputs}
                    row_format = False
                else:
                    raise ValueError("body needs 'instances' or 'inputs'")
                arrays = {
                    k: _json_to_array(v, signature_def.inputs[k])
                    for k, v in columns.items()
                    if k in signature_def.inputs
                }
                for k in columns:
                    if k not in signature_def.inputs:
                        arrays[k] = np.asarray(columns[k])
            except (ValueError, KeyError, TypeError) as e:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"Bad request body: {e}"
                ) from None
            _, outputs = self.predictor.run(servable, name, arrays)
            lists = {k: v.tolist() for k, v in outputs.items()}
            for k, v in outputs.items():
                if v.dtype == object or v.dtype.kind == "S":
                    lists[k] = np.vectorize(lambda b: b.decode("utf-8", "replace"))(
                        v
                    ).tolist()
            if row_format:
                batch = len(next(iter(arrays.values())))
                self._reply(
                    200,
                    {
                        "predictions": [
                            {k: lists[k][i] for k in lists} for i in range(batch)
                        ]
                    },
                )
            else:
                self._reply(200, {"outputs": lists})
        except RequestError as e:
            self._error(e)
        except _HttpError as e:
            self._reply(e.http_code, {"error": e.message})


class _HttpError(Exception):
    """A REST refusal with no gRPC counterpart (411, 413)."""

    def __init__(self, http_code, message):
        super().__init__(message)
        self.http_code = http_code
        self.message = message


class LocalServer:
    """The gRPC (and optional REST) server; see the module docstring."""

    def __init__(
        self,
        model_base_path,
        port=8500,
        model_name="cxr",
        host="127.0.0.1",
        max_batch_size=64,
        poll_seconds=1.0,
        ssl_cert=None,
        ssl_key=None,
        max_workers=8,
        rest_api_port=None,
        version_labels=None,
        max_rest_body_bytes=DEFAULT_MAX_REST_BODY_BYTES,
        rest_timeout_seconds=DEFAULT_REST_TIMEOUT_SECONDS,
    ):
        """Builds the server; `start()` loads the newest version and listens.

        Args:
          model_base_path: directory of numeric SavedModel versions.
          port: gRPC port (0 = pick a free one; read `.port` after start).
          model_name: the model name requests must use.
          host: interface to bind ("127.0.0.1" = loopback only).
          max_batch_size: largest batch accepted (INVALID_ARGUMENT above it).
          poll_seconds: how often to look for a newer version.
          ssl_cert: PEM certificate file for TLS (with `ssl_key`).
          ssl_key: PEM private key file.
          max_workers: gRPC worker threads.
          rest_api_port: also answer the REST subset on this port (0 = free).
          version_labels: optional `{label: version}`.
          max_rest_body_bytes: largest REST request body read (413 above).
          rest_timeout_seconds: how long a REST handler waits for a client
            that has stopped sending (408 for a body cut short).

        Raises:
          ValueError: only one of ssl_cert / ssl_key, a missing file, or a
            non-positive limit.
        """
        if bool(ssl_cert) != bool(ssl_key):
            raise ValueError(
                "`ssl_cert` and `ssl_key` go together. Received: "
                f"ssl_cert={ssl_cert!r}, ssl_key={ssl_key!r}"
            )
        for path in (ssl_cert, ssl_key):
            if path and not os.path.isfile(path):
                raise ValueError(f"TLS file not found: {path}")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(
                "`max_batch_size` must be a positive int. "
                f"Received: max_batch_size={max_batch_size}"
            )
        for name, value in (
            ("max_rest_body_bytes", max_rest_body_bytes),
            ("rest_timeout_seconds", rest_timeout_seconds),
        ):
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(
                    f"`{name}` must be a positive number. Received: {name}={value!r}"
                )
        self.max_rest_body_bytes = max_rest_body_bytes
        self.rest_timeout_seconds = rest_timeout_seconds
        self.store = ServableStore(model_base_path, model_name, version_labels)
        self.predictor = Predictor(self.store, max_batch_size)
        self.host = host
        self.requested_port = port
        self.poll_seconds = poll_seconds
        self.ssl_cert = ssl_cert
        self.ssl_key = ssl_key
        self.max_workers = max_workers
        self.rest_api_port = rest_api_port
        self.port = None
        self._server = None
        self._http = None

    def start(self):
        """Loads the newest version (if any), then listens.

        Returns:
          self.

        Raises:
          RuntimeError: the port cannot be bound.
        """
        self.store.poll_once()
        self.store.start_polling(self.poll_seconds)
        self._server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(max_workers=self.max_workers),
            options=[
                ("grpc.max_receive_message_length", 256 * 1024 * 1024),
                ("grpc.max_send_message_length", 256 * 1024 * 1024),
                ("grpc.so_reuseport", 0),
            ],
        )
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            PredictionServicer(self.predictor), self._server
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(
            ModelServicer(self.store), self._server
        )
        address = f"{self.host}:{self.requested_port}"
        if self.ssl_cert:
            with open(self.ssl_key, "rb") as f:
                key = f.read()
            with open(self.ssl_cert, "rb") as f:
                cert = f.read()
            credentials = grpc.ssl_server_credentials([(key, cert)])
            self.port = self._server.add_secure_port(address, credentials)
        else:
            self.port = self._server.add_insecure_port(address)
        if not self.port:
            raise RuntimeError(f"Could not bind the gRPC port {address}")
        self._server.start()
        if self.rest_api_port is not None:
            handler = type(
                "Handler",
                (_RestHandler,),
                {
                    "predictor": self.predictor,
                    "max_body_bytes": self.max_rest_body_bytes,
                    "timeout": self.rest_timeout_seconds,
                },
            )
            self._http = http.server.ThreadingHTTPServer(
                (self.host, self.rest_api_port), handler
            )
            self.rest_api_port = self._http.server_address[1]
            threading.Thread(
                target=self._http.serve_forever, name="rest", daemon=True
            ).start()
        logging.info(
            "local_server: model %r from %s on %s:%d%s",
            self.store.model_name,
            self.store.model_base_path,
            self.host,
            self.port,
            " (TLS)" if self.ssl_cert else "",
        )
        return self

    def stop(self, grace=None):
        """Stops listening and polling."""
        self.store.stop()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self._server is not None:
            self._server.stop(grace).wait()

    def wait(self):
        self._server.wait_for_termination()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _parse_labels(values):
    labels = {}
    for item in values or ():
        label, _, version = item.partition("=")
        if not label or not version.isdigit():
            raise ValueError(
                f"--version_label must be LABEL=VERSION. Received: {item!r}"
            )
        labels[label] = int(version)
    return labels


def main(argv=None):
    """The CLI (flags are defined here so importing this module defines none)."""
    from absl import flags  # pylint: disable=g-import-not-at-top

    from cxr_tf import cli  # pylint: disable=g-import-not-at-top
    from cxr_tf import errors  # pylint: disable=g-import-not-at-top

    _define_flags()

    def run(_):
        _check_flags()
        f = flags.FLAGS
        server = LocalServer(
            f.model_base_path,
            port=f.port,
            model_name=f.model_name,
            host=f.host,
            max_batch_size=f.max_batch_size,
            poll_seconds=f.poll_seconds,
            ssl_cert=f.ssl_cert,
            ssl_key=f.ssl_key,
            rest_api_port=f.rest_api_port,
            version_labels=_labels(f.version_label),
        ).start()
        # A machine-readable line so that a parent process can wait on it.
        print(
            json.dumps(
                {
                    "listening": f"{f.host}:{server.port}",
                    "rest_api_port": server.rest_api_port,
                    "version": (
                        server.store.current.version if server.store.current else None
                    ),
                }
            ),
            flush=True,
        )
        try:
            server.wait()
        except KeyboardInterrupt:
            server.stop(grace=1)

    def _labels(values):
        try:
            return _parse_labels(values)
        except ValueError as e:
            raise errors.UserValueError(
                str(e), "--version_label", "write LABEL=VERSION, e.g. stable=1"
            ) from None

    if argv is not None:
        sys.argv = list(argv)
    cli.run(run)


if __name__ == "__main__":
    main()
