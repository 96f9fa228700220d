"""Tests of cxr_tf.train / train_lib: config, resume after SIGKILL, strategies."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from cxr_tf import evaluate_lib
from cxr_tf import model_dir as model_dir_lib
from cxr_tf import train_lib
from cxr_tf.data import schema
from cxr_tf.models import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_tiny_records(directory, counts=None, size=64, seed=0, shapes=None):
    """Writes GZIP TFRecords of random films with labels and boxes.

    Args:
      directory: output folder.
      counts: examples per split (default train 16, val 8, test 8).
      size: longer side of the stored images.
      seed: random seed.
      shapes: optional list of (h, w) cycled through (non-square films).

    Returns:
      dict split -> list of (image_id, labels, boxes_xyxy_norm, box_labels, hw).
    """
    import tensorflow as tf

    from cxr_tf.data import tfrecord

    counts = counts or {"train": 16, "val": 8, "test": 8}
    shapes = shapes or [(size, size)]
    rng = np.random.RandomState(seed)
    os.makedirs(directory, exist_ok=True)
    written = {}
    index = 0
    for split, count in counts.items():
        rows = []
        path = os.path.join(directory, f"{split}-00000-of-00001.tfrecord.gz")
        with tf.io.TFRecordWriter(
            path, tf.io.TFRecordOptions(compression_type="GZIP")
        ) as w:
            for i in range(count):
                h, w_ = shapes[i % len(shapes)]
                pixels = rng.randint(0, 255, (h, w_, 1)).astype(np.uint8)
                labels = (rng.rand(schema.NUM_FINDINGS) < 0.3).astype(int)
                labels[i % schema.NUM_FINDINGS] = 1
                boxes, box_labels = [], []
                for k in np.flatnonzero(labels[:8]):
                    x0, y0 = rng.uniform(0, 0.6, 2)
                    boxes.append([x0, y0, x0 + 0.3, y0 + 0.3])
                    box_labels.append(int(k))
                image_id = f"{index:08d}_000.png"
                index += 1
                example = tfrecord.make_example(
                    image=tf.io.encode_png(pixels).numpy(),
                    image_id=image_id,
                    labels=labels.tolist(),
                    height=h,
                    width=w_,
                    patient_id=f"{index:08d}",
                    original_height=h * 4,
                    original_width=w_ * 4,
                    boxes=boxes or None,
                    box_labels=box_labels or None,
                )
                w.write(example.SerializeToString())
                rows.append((image_id, labels, boxes, box_labels, (h * 4, w_ * 4)))
        written[split] = rows
    return written


def _config(tmp_path, model=None, **kw):
    defaults = dict(data_dir=str(tmp_path / "data"), model_dir=str(tmp_path / "model"))
    defaults.update(kw)
    if model is not None:
        defaults["model"] = ModelConfig(**model)
    return train_lib.TrainConfig(**defaults)


# ---------------------------------------------------------------------------
# Fast tests.


def test_config_validates_and_round_trips(tmp_path):
    config = _config(
        tmp_path,
        findings=["Pneumonia", "Infiltrate"],
        model={"num_classes": 2, "pooling": "lse", "pooling_options": {"gamma": 10.0}},
        lr_decay_epochs=[2, 4],
    )
    # Canonical names in the canonical order, whatever was given.
    assert config.findings == ("Infiltration", "Pneumonia")
    assert config.model.pooling_options == (("gamma", 10.0),)
    written = json.loads(json.dumps(config.to_dict()))
    # The model settings have one home: the nested ModelConfig's dict.
    assert written["model"] == config.model.to_dict()
    assert not {"backbone", "pooling", "image_size"} & set(written)
    again = train_lib.TrainConfig.from_dict(written)
    assert again == config and isinstance(again.model, ModelConfig)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"optimizer": "lamb"}, "optimizer"),
        ({"strategy": "tpu"}, "strategy"),
        ({"findings": ["Pneumonia", "Pneumonia"]}, "duplicates"),
        ({"findings": ["Flu"]}, "Flu"),
        ({"model": {"backbone": "vgg"}}, "backbone"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"num_cpu_devices": -1}, "num_cpu_devices"),
        # What training asks of the model beyond its own checks.
        ({"findings": ["Pneumonia"]}, r"model.num_classes.*1: Pneumonia.*=14"),
        ({"model": {"channels": 3}}, "model.channels"),
    ],
)
def test_config_errors_name_the_value(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        _config(tmp_path, **kw)


def test_config_refuses_a_model_that_is_no_model_config():
    with pytest.raises(ValueError, match="unknown_field"):
        train_lib.TrainConfig.from_dict(
            {"data_dir": "d", "model_dir": "m", "model": {"unknown_field": 1}}
        )
    with pytest.raises(ValueError, match="ModelConfig"):
        train_lib.TrainConfig(data_dir="d", model_dir="m", model="resnet34")


def test_parse_pooling_options():
    parse_options = train_lib.parse_options
    assert parse_options(["gamma=10", "r=0.5", "mode=x"]) == {
        "gamma": 10,
        "r": 0.5,
        "mode": "x",
    }
    with pytest.raises(ValueError, match="name=value"):
        parse_options(["gamma"])


def test_count_examples_from_report_and_files(tmp_path):
    data = tmp_path / "data"
    write_tiny_records(str(data), counts={"train": 5, "val": 3})
    assert train_lib.count_examples(str(data), "train") == 5
    (data / schema.INGEST_REPORT).write_text(json.dumps({"written": {"val": 7}}))
    assert train_lib.count_examples(str(data), "val") == 7
    with pytest.raises(FileNotFoundError, match="test"):
        train_lib.count_examples(str(data), "test")


def test_learning_rate_schedules(tmp_path):
    step = train_lib.make_learning_rate(
        _config(tmp_path, lr_schedule="step", lr_decay_epochs=[1], epochs=2), 10
    )
    assert float(step(9)) == pytest.approx(1e-4)
    assert float(step(11)) == pytest.approx(1e-5)
    cosine = train_lib.make_learning_rate(
        _config(tmp_path, lr_schedule="cosine", lr_warmup_steps=5, epochs=1), 20
    )
    assert float(cosine(0)) == pytest.approx(0.0)
    assert float(cosine(5)) == pytest.approx(1e-4)
    assert float(cosine(20)) < 1e-5
    with pytest.raises(ValueError, match="lr_decay_epochs"):
        train_lib.make_learning_rate(_config(tmp_path, lr_schedule="step"), 10)


def test_resolve_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model_dir_lib.resolve(str(tmp_path / "nope"))
    model_dir = tmp_path / "m"
    (model_dir / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="final"):
        model_dir_lib.resolve(str(model_dir))
    (model_dir / "checkpoints" / "best.keras").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="config.json"):
        model_dir_lib.resolve(str(model_dir))
    (model_dir / "config.json").write_text("{}")
    # "final" falls back to the best checkpoint of an unfinished run.
    keras_path, config_path = model_dir_lib.resolve(str(model_dir))
    assert keras_path.endswith(os.path.join("checkpoints", "best.keras"))
    assert config_path == str(model_dir / "config.json")
    assert model_dir_lib.resolve(keras_path)[1] == config_path


_RESOLVE_FLAGFILES = """
import json, sys
from cxr_tf import train
out = {}
for path in sys.argv[1:]:
    config = train.config_from_argv(
        [f"--flagfile={path}", "--data_dir=d", "--model_dir=m", "--seed=7"],
        paths=False,
    )
    out[path] = config.to_dict()
print(json.dumps(out))
"""


def test_checked_in_flagfiles_resolve():
    # A subprocess: a clean import of the CLI module, as a user runs it.
    # Every checked-in flagfile: one added later cannot be forgotten here.
    names = sorted(
        n[: -len(".flags")] for n in os.listdir(os.path.join(REPO, "configs"))
        if n.endswith(".flags") and not n.startswith("pipeline_")  # pipeline.run's
    )
    assert {"pcam_resnet34", "lse_resnet34", "infomask", "demo"} <= set(names)
    paths = [os.path.join(REPO, "configs", f"{n}.flags") for n in names]
    run = subprocess.run(
        [sys.executable, "-c", _RESOLVE_FLAGFILES, *paths],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    configs = json.loads(run.stdout.strip().splitlines()[-1])
    for name, path in zip(names, paths):
        config = configs[path]
        # Later flags override the file.
        assert config["seed"] == 7 and config["data_dir"] == "d", name
        assert train_lib.TrainConfig.from_dict(config).to_dict() == config
    by_name = {name: configs[path] for name, path in zip(names, paths)}
    pcam = by_name["pcam_resnet34"]
    assert (pcam["model"]["image_size"], pcam["batch_size"], pcam["epochs"]) == (
        1024, 36, 10
    )
    assert pcam["model"]["pooling"] == "pcam" and pcam["learning_rate"] == 1e-4
    assert pcam["loss"] == "balanced_bce"
    assert by_name["lse_resnet34"]["model"]["pooling"] == "lse"
    assert by_name["infomask"]["findings"] == ["Pneumonia"]
    assert by_name["infomask"]["model"]["num_classes"] == 1
    assert by_name["chexpert_densenet121"]["model"]["backbone"] == "densenet121"


# ---------------------------------------------------------------------------
# End-to-end runs (subprocesses: device layouts are fixed at TF start-up).


def _train_cmd(data, model_dir, *extra):
    return [
        sys.executable,
        "-m",
        "cxr_tf.train",
        f"--data_dir={data}",
        f"--model_dir={model_dir}",
        "--image_size=64",
        "--batch_size=4",
        "--verbose=2",
        "--num_overlay_images=2",
        "--jit_compile=false",
        *extra,
    ]


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    data = tmp_path_factory.mktemp("records")
    write_tiny_records(str(data))
    return str(data)


def _steps(model_dir):
    with open(os.path.join(model_dir, "history.json")) as f:
        return json.load(f)["steps"]


def _load(model_dir):
    loaded = model_dir_lib.load(model_dir)
    out = loaded.model(np.zeros((1, 64, 64, 1), np.float32))
    assert set(out) >= {"logits", "probabilities", "localization_maps"}
    return loaded


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_finishes_planned_steps(tiny_data, tmp_path):
    model_dir = str(tmp_path / "model")
    cmd = _train_cmd(
        tiny_data,
        model_dir,
        "--epochs=2",
        "--steps_per_epoch=6",
        "--backup_every_steps=1",
    )
    state = os.path.join(model_dir, "backup", "state.json")
    proc = subprocess.Popen(
        cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    killed_at = None
    deadline = time.time() + 600
    # Kill as soon as a backup from inside the first epoch exists.
    while proc.poll() is None and time.time() < deadline:
        if os.path.isfile(state):
            with open(state) as f:
                try:
                    step = json.load(f)["step"]
                except ValueError:
                    continue
            if 1 <= step < 6:
                proc.send_signal(signal.SIGKILL)
                killed_at = step
                break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert killed_at is not None, proc.stderr.read()[-3000:]
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.isfile(os.path.join(model_dir, "model.keras"))

    rerun = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _steps(model_dir) == 12
    assert "Trained 12 steps" in rerun.stdout
    # The rerun resumed: it ran fewer than the 12 planned steps itself.
    ran = int(rerun.stdout.split("(")[1].split(" in this run")[0])
    assert ran <= 12 - killed_at
    _load(model_dir)
    for name in ("config.json", "checkpoints/latest.keras", "checkpoints/best.keras"):
        assert os.path.isfile(os.path.join(model_dir, name)), name
    # Evaluate's IoP threshold was chosen on val for the final and best files.
    with open(os.path.join(model_dir, "config.json")) as f:
        payload = json.load(f)
    # The run's TrainConfig nests the very ModelConfig the model was built from.
    assert payload["train"]["model"] == payload["model"]
    choices = payload["mask_threshold_choices"]
    digests = {c["model_sha256"] for c in choices}
    for name in ("model.keras", "checkpoints/best.keras"):
        assert model_dir_lib.file_sha256(os.path.join(model_dir, name)) in digests
    assert {c["records"]["split"] for c in choices} == {"val"}
    assert os.listdir(os.path.join(model_dir, "logs", "validation"))
    # No temporary file of the killed save is left; progress was logged.
    assert sorted(os.listdir(os.path.join(model_dir, "backup"))) == [
        "state.json",
        "step-12.weights.h5",
    ]
    assert "steps/s" in rerun.stderr and "run ETA" in rerun.stderr
    with open(os.path.join(model_dir, "history.json")) as f:
        history = json.load(f)
    assert history["epochs"] == [1, 2] and len(history["history"]["val_mean_auc"]) == 2

    # Rerunning the finished training keeps the history.
    again = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Trained 12 steps (0 in this run)" in again.stdout
    with open(os.path.join(model_dir, "history.json")) as f:
        assert json.load(f) == history


@pytest.mark.slow
def test_cut_shard_fails_with_one_line_naming_the_file(tmp_path):
    data = tmp_path / "records"
    write_tiny_records(str(data), counts={"train": 24, "val": 4})
    shard = data / "train-00000-of-00001.tfrecord.gz"
    content = shard.read_bytes()
    shard.write_bytes(content[: len(content) // 3])
    cmd = _train_cmd(
        str(data), str(tmp_path / "model"), "--epochs=1", "--steps_per_epoch=4"
    )
    run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode != 0
    assert "damaged TFRecord file: truncated record at" in run.stderr
    assert str(shard) in run.stderr
    assert "DataLossError" not in run.stderr.splitlines()[-1]


@pytest.mark.slow
def test_mirrored_over_two_logical_cpus(tiny_data, tmp_path):
    model_dir = str(tmp_path / "model")
    cmd = _train_cmd(
        tiny_data,
        model_dir,
        "--epochs=1",
        "--steps_per_epoch=2",
        "--strategy=mirrored",
        "--num_cpu_devices=2",
    )
    run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 replica(s)" in run.stderr
    # Progress inside the epoch works under MirroredStrategy.
    assert "Epoch 1/1 step 1/2 (step 1/2 of the run)" in run.stderr
    assert _steps(model_dir) == 2
    _load(model_dir)


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def run_local_workers(cmd, workers, timeout):
    """Runs `cmd` once per worker address with its TF_CONFIG; all must succeed.

    Returns:
      The (stdout, stderr) of each worker, in task order.
    """
    procs = []
    for index in range(len(workers)):
        tf_config = {
            "cluster": {"worker": workers},
            "task": {"type": "worker", "index": index},
        }
        procs.append(
            subprocess.Popen(
                cmd,
                env=_env(TF_CONFIG=json.dumps(tf_config)),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    return outputs


@pytest.mark.slow
def test_multi_worker_over_two_local_processes(tiny_data, tmp_path):
    model_dir = str(tmp_path / "model")
    workers = [f"localhost:{p}" for p in _free_ports(2)]
    cmd = _train_cmd(
        tiny_data,
        model_dir,
        "--epochs=1",
        "--steps_per_epoch=2",
        "--strategy=multi_worker",
    )
    outputs = run_local_workers(cmd, workers, timeout=600)
    assert "2 replica(s)" in outputs[0][1]
    assert _steps(model_dir) == 2
    _load(model_dir)


@pytest.mark.slow
def test_nan_loss_stops_with_message_and_keeps_good_state(tiny_data, tmp_path):
    model_dir = str(tmp_path / "model")
    cmd = _train_cmd(
        tiny_data,
        model_dir,
        "--epochs=3",
        "--steps_per_epoch=2",
        "--optimizer=sgd",
        "--learning_rate=1e30",
        "--backup_every_steps=1",
    )
    run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 3, run.stderr[-3000:]
    assert "the loss became" in run.stderr
    assert not os.path.isfile(os.path.join(model_dir, "model.keras"))
    state = os.path.join(model_dir, "backup", "state.json")
    if os.path.isfile(state):
        import keras

        loaded = (
            model_dir_lib.load(model_dir, "latest")
            if os.path.isfile(os.path.join(model_dir, "checkpoints", "latest.keras"))
            else None
        )
        if loaded is not None:
            for w in loaded.model.weights:
                assert np.all(np.isfinite(keras.ops.convert_to_numpy(w)))


@pytest.mark.parametrize(
    "strategy, num_cpu_devices, inter_op",
    [("default", 0, 1), ("mirrored", 2, 0), ("multi_worker", 0, 0)],
)
def test_cpu_tuning_sets_onednn_and_one_inter_op_thread_for_one_device(
    strategy, num_cpu_devices, inter_op
):
    # A fresh process: oneDNN is chosen when TensorFlow is imported, and the
    # thread pools when its runtime starts.
    code = (
        "import os, types\n"
        "from cxr_tf import train\n"
        f"train.tune_for_cpu(types.SimpleNamespace(strategy={strategy!r}, "
        f"num_cpu_devices={num_cpu_devices}))\n"
        "import tensorflow as tf\n"
        "print(os.environ['TF_ENABLE_ONEDNN_OPTS'], "
        "tf.config.threading.get_inter_op_parallelism_threads())\n"
    )
    env = _env()
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["1", str(inter_op)]


@pytest.mark.slow
def test_infomask_training_stores_a_box_threshold_chosen_on_val(tiny_data, tmp_path):
    model_dir = str(tmp_path / "model")
    run = subprocess.run(
        _train_cmd(
            tiny_data,
            model_dir,
            "--backbone=infomask",
            "--epochs=1",
            "--steps_per_epoch=2",
            "--num_overlay_images=0",
        ),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = _load(model_dir)
    # Chosen on val, one per finding above the prior's mask: predict and
    # export use them with no flag.
    thresholds = loaded.box_threshold.as_dict()
    assert set(thresholds) == set(loaded.findings)
    assert min(thresholds.values()) > 0.5 - loaded.model_config.infomask_tau
