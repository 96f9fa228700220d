"""Real mistakes across the commands: one line, no traceback, seconds not minutes.

Each case runs the command as a user would (a subprocess, without the test
suite's TF_CPP_MIN_LOG_LEVEL) and checks the exit status, that no traceback
is printed, that stderr ends in one `error: ...` line naming the flag or file,
and, for the mistakes the flags and the file system can tell, that the answer
comes before TensorFlow is imported (the process records the modules it
loaded). How many seconds that takes is measured by
`benchmarks/cli_errors.py`, not here.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
NOISE = ("Traceback", "cuInit", "cudart", "CUDA", "apitools", "bigquery")


# A sitecustomize that writes, at exit, the top-level modules the process
# imported: how a test tells an answer given before TensorFlow loads.
_RECORD_IMPORTS = """
import atexit, os, sys

def _record():
    with open(os.environ["CXR_TF_TEST_MODULES"], "w") as f:
        f.write("\\n".join(sorted({m.split(".")[0] for m in sys.modules})))

atexit.register(_record)
"""


@pytest.fixture(scope="module")
def recorder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("record_imports")
    (folder / "sitecustomize.py").write_text(_RECORD_IMPORTS)
    return folder


def _env(recorder=None, modules_file=None):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if recorder is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(recorder), str(REPO)])
        env["CXR_TF_TEST_MODULES"] = str(modules_file)
    # The user's view: our CLI decides what TensorFlow prints.
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    env.pop("CXR_TF_QUIET_LOG_LEVEL", None)
    return env


def _run(argv, cwd, timeout=300, recorder=None):
    """Runs `python argv`; returns the process and the modules it imported."""
    modules_file = None
    if recorder is not None:
        modules_file = recorder / f"modules_{os.getpid()}_{len(list(recorder.iterdir()))}"
    proc = subprocess.run(
        [sys.executable, *argv],
        cwd=cwd,
        env=_env(recorder, modules_file),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    modules = None
    if modules_file is not None:
        assert modules_file.exists(), f"the process left no module record: {proc.stderr}"
        modules = set(modules_file.read_text().split())
    return proc, modules


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(path):
    from PIL import Image  # pylint: disable=import-outside-toplevel

    Image.new("L", (32, 32), 128).save(path)
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Folders each mistake needs: empty, records, a final-only model, ..."""
    root = tmp_path_factory.mktemp("cli_errors")
    (root / "empty").mkdir()
    records = root / "records"
    records.mkdir()
    # Names are all the fast check reads; the contents are never opened.
    for split in ("train", "val", "test"):
        (records / f"{split}-00000-of-00001.tfrecord.gz").write_bytes(b"")
    (root / "a_file").write_text("not a folder\n")
    # A model folder as training leaves it when validation never improved:
    # model.keras and config.json, no checkpoints/best.keras.
    final_only = root / "final_only"
    (final_only / "checkpoints").mkdir(parents=True)
    (final_only / "model.keras").write_bytes(b"PK")
    (final_only / "checkpoints" / "latest.keras").write_bytes(b"PK")
    (final_only / "config.json").write_text(json.dumps({"model": {}}))
    _png(root / "film.png")
    return root


# (id, argv, words the error line must contain, flag-level?)
CASES = [
    (
        "train_pooling_typo",
        ["-m", "cxr_tf.train", "--pooling=pcma", "--dry_run"],
        ["--pooling", "pcam", "lse_lba"],
        True,
    ),
    (
        "train_backbone_typo",
        ["-m", "cxr_tf.train", "--backbone=resnet43", "--data_dir={records}",
         "--model_dir={tmp}/m"],
        ["--backbone", "resnet34"],
        True,
    ),
    (
        "train_image_size_rejected",
        ["-m", "cxr_tf.train", "--image_size=100", "--data_dir={records}",
         "--model_dir={tmp}/m"],
        ["--image_size=100", "96 or 128"],
        True,
    ),
    (
        "train_no_findings",
        ["-m", "cxr_tf.train", "--findings=", "--data_dir={records}",
         "--model_dir={tmp}/m"],
        ["--findings", "no finding given"],
        True,
    ),
    (
        "train_missing_flagfile",
        ["-m", "cxr_tf.train", "--flagfile={tmp}/nope.flags"],
        ["--flagfile", "nope.flags"],
        True,
    ),
    (
        "train_empty_data_dir",
        ["-m", "cxr_tf.train", "--data_dir={empty}", "--model_dir={tmp}/m"],
        ["--data_dir", "train-*.tfrecord.gz"],
        True,
    ),
    (
        "train_output_not_writable",
        ["-m", "cxr_tf.train", "--data_dir={records}", "--model_dir={a_file}/model"],
        ["--model_dir", "a_file"],
        True,
    ),
    (
        "evaluate_folder_without_model",
        ["-m", "cxr_tf.evaluate", "--model_dir={empty}", "--data_dir={records}",
         "--output_dir={tmp}/eval"],
        ["--model_dir", "best"],
        True,
    ),
    (
        "predict_best_when_only_final",
        ["-m", "cxr_tf.predict", "--model={final_only}", "--checkpoint=best",
         "--output_dir={tmp}/pred", "{film}"],
        ["--checkpoint=best", "final"],
        True,
    ),
    (
        "predict_missing_file",
        ["-m", "cxr_tf.predict", "--model={final_only}", "--output_dir={tmp}/pred",
         "{tmp}/no_such_film.png"],
        ["no_such_film.png"],
        True,
    ),
    (
        "ingest_empty_folder",
        ["-m", "pipeline.ingest", "--data_dir={empty}", "--output_dir={tmp}/ing"],
        ["--data_dir", "empty"],
        True,
    ),
    (
        "export_folder_without_model",
        ["-m", "cxr_tf.export", "--model={empty}", "--export_dir={tmp}/exp"],
        ["--model", "empty"],
        True,
    ),
    (
        "local_server_no_versions",
        ["-m", "serving.local_server", "--model_base_path={empty}", "--port=0"],
        ["--model_base_path", "saved_model.pb"],
        True,
    ),
    (
        "pipeline_missing_train_flagfile",
        ["-m", "pipeline.run", "--train_flagfile={tmp}/nope.flags",
         "--synthetic_patients=4", "--pipeline_root={tmp}/root"],
        ["--train_flagfile", "nope.flags"],
        True,
    ),
    (
        # Read by the training command's own flag code, before any step.
        "pipeline_train_flag_typo",
        ["-m", "pipeline.run", "--train_flagfile=configs/demo.flags",
         "--train_arg=--pooling=pcma", "--synthetic_patients=4",
         "--pipeline_root={tmp}/root"],
        ["--pooling", "pcam", "lse_lba"],
        True,
    ),
    (
        "synthetic_output_under_a_file",
        ["-m", "cxr_tf.data.synthetic", "--output_dir={a_file}/syn"],
        ["--output_dir", "a_file"],
        True,
    ),
    (
        "client_stopped_server",
        ["serving/client.py", "--server=127.0.0.1:{port}", "--timeout=3", "{film}"],
        ["--server=127.0.0.1", "DEADLINE_EXCEEDED"],
        False,
    ),
]


@pytest.mark.parametrize(
    "argv, words, flag_level", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_mistake_is_one_line_without_traceback(work, recorder, argv, words, flag_level):
    fill = {
        "tmp": work,
        "empty": work / "empty",
        "records": work / "records",
        "a_file": work / "a_file",
        "final_only": work / "final_only",
        "film": work / "film.png",
        "port": _free_port(),
    }
    argv = [a.format(**fill) for a in argv]
    proc, modules = _run(argv, cwd=REPO, recorder=recorder)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "Traceback" not in output, output
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
    for word in words:
        assert word in errors[0], errors[0]
    for noise in NOISE:
        assert noise not in output, output
    if flag_level:  # Told from flags and files, before TensorFlow loads.
        assert "tensorflow" not in modules, errors[0]
        assert "keras" not in modules, errors[0]
        assert "scipy" not in modules, errors[0]  # SciPy alone costs seconds.
    # Nothing was written where a mistake was refused.
    for name in ("m", "eval", "pred", "ing", "exp", "root"):
        assert not (work / name).exists()


def test_debug_shows_the_traceback_of_a_user_error(work):
    proc, _ = _run(
        ["-m", "cxr_tf.train", "--data_dir=" + str(work / "empty"),
         f"--model_dir={work}/m", "--debug"],
        cwd=REPO,
    )
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


def test_unexpected_failure_keeps_its_traceback(tmp_path):
    script = tmp_path / "boom.py"
    script.write_text(
        textwrap.dedent(
            """
            from cxr_tf import cli

            def main(argv):
                raise KeyError("a bug, not a user's mistake")

            cli.run(main)
            """
        )
    )
    proc, _ = _run([str(script)], cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "KeyError" in proc.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "cxr_tf.predict", "--help"],
        ["-m", "cxr_tf.train", "--dry_run", "--data_dir=d", "--model_dir=m",
         "--backbone=compact", "--image_size=64"],
    ],
    ids=["predict_help", "train_dry_run"],
)
def test_help_and_dry_run_print_no_cuda_lines(argv, recorder):
    proc, modules = _run(argv, cwd=REPO, recorder=recorder)
    output = proc.stdout + proc.stderr
    assert "cuInit" not in output and "cuda" not in output.lower(), output
    assert "Traceback" not in output
    if "--dry_run" in argv:
        assert proc.returncode == 0, output
        assert json.loads(proc.stdout)["model"]["backbone"] == "compact"
    assert "tensorflow" not in modules  # No TensorFlow import behind them.


_NOISY_MAIN = """
import logging, os, sys
from absl import logging as absl_logging
from cxr_tf import cli

def main(argv):
    logging.warning("apitools not found, and bigquery client libraries are not "
                    "available despite the import not raising an ImportError.")
    logging.getLogger("apache_beam.io.gcp.bigquery").info(
        "No module named google.cloud.bigquery_storage_v1. As a result, ...")
    absl_logging.info("Function `_serve_bytes` contains input name(s) resource "
                      "with unsupported characters which will be renamed to x")
    # What a Beam worker process and TensorFlow's C++ runtime write to fd 2.
    os.write(2, b"WARNING:__main__:No semi_persistent_directory found: x\\n")
    os.write(2, b"INFO:apache_beam.runners.worker.sdk_worker:Control channel\\n")
    os.write(2, b"E0000 00:00:1.2 5 cuda_platform.cc:52] failed call to cuInit: "
                b"INTERNAL: CUDA error\\n")
    os.write(2, b"I0000 00:00:1.2 5 cudart_stub.cc:31] Could not find cuda drivers "
                b"on your machine, GPU will not be used.\\n")
    absl_logging.warning("kept: a warning of ours")
    os.write(2, b"ERROR:root:kept: a worker error\\n")

cli.run(main)
"""


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbosity_1"])
def test_third_party_noise_is_dropped_unless_asked(tmp_path, verbose):
    script = tmp_path / "noisy.py"
    script.write_text(_NOISY_MAIN)
    proc, _ = _run([str(script)] + (["--verbosity=1"] if verbose else []), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "kept: a warning of ours" in proc.stderr
    assert "kept: a worker error" in proc.stderr
    noise = ("apitools", "bigquery", "semi_persistent", "cuInit",
             "unsupported characters", "cuda drivers", "Control channel")
    found = [n for n in noise if n in proc.stderr]
    if verbose:
        assert found == list(noise), proc.stderr
    else:
        assert found == [], proc.stderr


@pytest.mark.slow
def test_tensorflow_start_up_is_quiet_on_a_cpu_machine(tmp_path):
    script = tmp_path / "tf_devices.py"
    script.write_text(
        "from cxr_tf import cli\n"
        "def main(argv):\n"
        "    import tensorflow as tf\n"
        "    print(len(tf.config.list_physical_devices()))\n"
        "cli.run(main)\n"
    )
    proc, _ = _run([str(script)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.split()[-1]) >= 1
    for line in proc.stderr.splitlines():
        assert "cuInit" not in line and "cuda" not in line.lower(), proc.stderr


_CLIENT_IMPORTS = """
import sys
from serving import client
client._load_apis()
assert "tensorflow.python" not in sys.modules, "TensorFlow itself was imported"
request = client.predict_pb2.PredictRequest()
request.inputs["image_bytes"].CopyFrom(client._make_tensor_proto([b"x"]))
print(request.ByteSize())
if sys.argv[1:] == ["real"]:  # predict_pixels: the real TensorFlow, after the protos.
    import tensorflow as tf
    assert tf.make_ndarray(request.inputs["image_bytes"]).tolist() == [b"x"]
    print(float(tf.constant(2.0) * 2))
"""


def test_client_loads_its_protos_without_tensorflow(tmp_path):
    proc, _ = _run(["-c", _CLIENT_IMPORTS], cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.split()[0]) > 0


@pytest.mark.slow
def test_real_tensorflow_imports_after_the_client_protos(tmp_path):
    proc, _ = _run(["-c", _CLIENT_IMPORTS, "real"], cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-1] == "4.0"


def test_user_errors_turns_a_library_error_into_one_user_error():
    from cxr_tf import cli
    from cxr_tf import errors

    with pytest.raises(errors.UserFileError) as info:
        with cli.user_errors(FileNotFoundError, "--model=m", "give a model"):
            raise FileNotFoundError("no config.json in m")
    assert info.value.line() == "no config.json in m (--model=m): give a model"
    assert info.value.__cause__ is None and info.value.__suppress_context__

    own = errors.UserValueError("bad row 3", "table.csv", "fix the row")
    with pytest.raises(errors.UserValueError) as info:
        with cli.user_errors(ValueError, "--model=m", "give a model"):
            raise own
    assert info.value is own
    with pytest.raises(KeyError):
        with cli.user_errors(ValueError, "--m", "fix", errors.UserValueError):
            raise KeyError("a bug keeps its type")
