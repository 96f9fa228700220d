"""Throughput of predict and evaluate against a bare forward loop; prints JSON.

  python -m benchmarks.predict_throughput --model=M [--images=DIR]
      [--records=DIR --split=test] [--baseline_commit=REV]
      [--memory_films=5000] [--overlay_films=N] [--repeats=2] [--output=F.json]

Predict: `predict_lib.predict` on a folder of films (boxes on, overlays off;
then overlays on) against the floor of the same work, a bare sequential
loop that decodes each film, resizes it to the network input and runs one
batched forward pass per `batch_size` films (no boxes, no output). The
command line (`python -m cxr_tf.predict`, overlays off and on, a fresh
process each) is timed against the same bare loop in a fresh process,
startup included.
Runs are interleaved (floor, predict, floor, ...) and the medians kept, so
load from other processes on a shared machine hits both sides alike.

Evaluate (with --records): `evaluate_lib.evaluate` on a split of ingested
TFRecords against a bare loop that reads the split with the input pipeline
and runs the forward pass; with --baseline_commit, that commit (a `git
archive` copy) against this tree: the `evaluate_lib.evaluate` call alone
(fresh process, timed after TensorFlow's import and a first model load) and
the `cxr_tf.evaluate` command (startup included), and whether their
metrics.json agree. The call is also timed on a copy of the model directory
without the IoP threshold that training stores (a model trained before it
was stored), which makes evaluate run the validation split again.

Memory (with --memory_films=N): predict on N small films written to a
temporary folder, the process's resident memory (VmRSS) sampled every
second, reported at ten checkpoints of the run; flat = no growth with N.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_IMAGES = os.path.join(os.path.dirname(_REPO), "shared", "cxr14_sample", "images")


def bare_loop(model_path, images, batch_size=8):
    """The floor: decode, resize to S, normalise, one forward per batch.

    Args:
      model_path: model directory or .keras file.
      images: film paths.
      batch_size: films per forward pass.

    Returns:
      number of films run.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    from cxr_tf import model_dir  # pylint: disable=import-outside-toplevel
    from cxr_tf.data import images as images_lib  # pylint: disable=import-outside-toplevel
    from cxr_tf.data import preprocess  # pylint: disable=import-outside-toplevel

    loaded = model_dir.load(model_path, "final")
    model = loaded.model
    size = loaded.image_size
    norm = loaded.normalization

    @tf.function(reduce_retracing=True)
    def forward(x):
        return model(x, training=False)["logits"]

    done = 0
    for start in range(0, len(images), batch_size):
        batch = []
        for path in images[start : start + batch_size]:
            pixels = images_lib.read_image(path)
            stored = preprocess.resize_longer_side(pixels, size)
            batch.append((stored.astype(np.float32) - norm.mean) / norm.std)
        forward(np.stack(batch)[..., np.newaxis]).numpy()
        done += len(batch)
    return done


def _films(folder):
    from cxr_tf import predict_lib  # pylint: disable=import-outside-toplevel

    listed, _ = predict_lib.list_images([folder])
    return [i.path for i in listed]


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _python(args, env_path=_REPO, stdout=None):
    """Seconds `python *args` took in a fresh process of the tree `env_path`.

    With `stdout` (a list), its standard output is appended to it.
    """
    env = dict(os.environ, PYTHONPATH=env_path, TF_CPP_MIN_LOG_LEVEL="2")
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, cwd=env_path
    )
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{args} in {env_path} failed:\n{done.stderr[-3000:]}")
    if stdout is not None:
        stdout.append(done.stdout)
    return seconds


def _summary(name, seconds, films):
    median = statistics.median(seconds)
    return {
        f"{name}_seconds": [round(s, 2) for s in seconds],
        f"{name}_median_seconds": round(median, 2),
        f"{name}_films_per_second": round(films / median, 2),
    }


def predict_section(model, folder, repeats, workdir, overlay_films=0):
    """Interleaved in-process and command-line timings of predict vs the floor."""
    from cxr_tf import predict_lib  # pylint: disable=import-outside-toplevel

    films = _films(folder)
    n = len(films)
    # Warm-up: traces, imports and the page cache count on neither side.
    bare_loop(model, films[:8])
    predict_lib.predict(
        predict_lib.PredictConfig(model, os.path.join(workdir, "warm"), overlays=False),
        films[:8],
    )
    # Overlays on may be timed on the first `overlay_films` films only (a
    # matplotlib overlay costs seconds), against the floor of those films.
    few = films[:overlay_films] if overlay_films else films
    runs = {
        "floor": [], "predict_overlays_off": [],
        "floor_overlay_films": [], "predict_overlays_on": [],
    }
    for r in range(repeats):
        runs["floor"].append(_timed(lambda: bare_loop(model, films)))
        config = predict_lib.PredictConfig(
            model, os.path.join(workdir, f"predict_overlays_off_{r}"), overlays=False
        )
        runs["predict_overlays_off"].append(
            _timed(lambda c=config: predict_lib.predict(c, [folder]))
        )
        runs["floor_overlay_films"].append(_timed(lambda: bare_loop(model, few)))
        config = predict_lib.PredictConfig(
            model, os.path.join(workdir, f"predict_overlays_on_{r}"), overlays=True
        )
        runs["predict_overlays_on"].append(
            _timed(lambda c=config: predict_lib.predict(c, few))
        )
    out = {"films": n, "overlay_films": len(few)}
    for key, seconds in runs.items():
        films_timed = len(few) if key in ("floor_overlay_films", "predict_overlays_on") else n
        out.update(_summary(key, seconds, films_timed))
    out["ratio_overlays_off"] = round(
        out["predict_overlays_off_median_seconds"] / out["floor_median_seconds"], 3
    )
    out["ratio_overlays_on"] = round(
        out["predict_overlays_on_median_seconds"]
        / out["floor_overlay_films_median_seconds"], 3
    )
    with open(os.path.join(workdir, "predict_overlays_off_0", "predictions.jsonl")) as f:
        records = [json.loads(line) for line in f]
    out["positive_findings_per_film"] = round(
        float(np.mean([sum(p >= 0.5 for p in r["probabilities"].values()) for r in records])), 2
    )
    out["boxes_per_film"] = round(float(np.mean([len(r["boxes"]) for r in records])), 2)

    cli = {"cli_predict_overlays_off": [], "cli_floor": [], "cli_predict_overlays_on": []}
    for r in range(repeats):
        cli["cli_floor"].append(
            _python(["-m", "benchmarks.predict_throughput", "--bare_loop_only",
                     f"--model={model}", f"--images={folder}"])
        )
        cli["cli_predict_overlays_off"].append(
            _python(["-m", "cxr_tf.predict", f"--model={model}", "--overlays=false",
                     f"--output_dir={os.path.join(workdir, f'cli_{r}')}", folder])
        )
        cli["cli_predict_overlays_on"].append(
            _python(["-m", "cxr_tf.predict", f"--model={model}", "--overlays=true",
                     f"--output_dir={os.path.join(workdir, f'cli_on_{r}')}", folder])
        )
    for key, seconds in cli.items():
        out.update(_summary(key, seconds, n))
    out["ratio_cli_overlays_off"] = round(
        out["cli_predict_overlays_off_median_seconds"] / out["cli_floor_median_seconds"], 3
    )
    out["ratio_cli_overlays_on"] = round(
        out["cli_predict_overlays_on_median_seconds"] / out["cli_floor_median_seconds"], 3
    )
    return out


def bare_eval_loop(model_path, records, split, batch_size=8):
    """The evaluate floor: the split's records through the input pipeline and
    the forward pass, nothing else. Returns the number of images."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    from cxr_tf import model_dir  # pylint: disable=import-outside-toplevel
    from cxr_tf.data import input_pipeline  # pylint: disable=import-outside-toplevel

    loaded = model_dir.load(model_path, "best")
    model = loaded.model
    cfg = input_pipeline.InputConfig(
        image_size=loaded.image_size,
        batch_size=batch_size,
        normalization=loaded.normalization,
        augment=False,
    )
    ds = input_pipeline.build_dataset(records, split, cfg, training=False)

    @tf.function(reduce_retracing=True)
    def forward(x):
        out = model(x, training=False)
        return out["logits"], out["localization_maps"]

    count = 0
    for images, _ in ds:
        logits, _ = forward(images)
        count += int(logits.shape[0])
    return count


def _metrics_without_paths(path):
    with open(path) as f:
        metrics = json.load(f)
    metrics.pop("source", None)
    metrics.pop("overlays", None)
    return metrics


def _without_stored_mask_thresholds(model, workdir):
    """A copy of model directory `model` whose config.json has no stored
    IoP threshold choices."""
    from cxr_tf import model_dir  # pylint: disable=import-outside-toplevel

    copy = os.path.join(workdir, "model_threshold_not_stored")
    shutil.copytree(model, copy, ignore=shutil.ignore_patterns("backup", "logs"))
    path = os.path.join(copy, model_dir.CONFIG_FILE)
    payload = model_dir.read_config(path)
    payload.pop(model_dir.MASK_THRESHOLD_CHOICES, None)
    model_dir.atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True))
    return copy


def evaluate_section(model, records, split, repeats, workdir, baseline_commit):
    """Evaluate vs its floor in process; this tree vs `baseline_commit` as CLIs."""
    from cxr_tf import evaluate_lib  # pylint: disable=import-outside-toplevel

    bare_eval_loop(model, records, split)
    runs = {"eval_floor": [], "evaluate": []}
    count = 0
    for r in range(repeats):
        runs["eval_floor"].append(
            _timed(lambda: bare_eval_loop(model, records, split))
        )
        config = evaluate_lib.EvalConfig(
            output_dir=os.path.join(workdir, f"eval_{r}"),
            model_dir=model,
            data_dir=records,
            split=split,
        )
        start = time.perf_counter()
        metrics = evaluate_lib.evaluate(config)
        runs["evaluate"].append(time.perf_counter() - start)
        count = metrics["num_images"]
    out = {"images": count}
    for key, seconds in runs.items():
        out.update(_summary(key, seconds, count))
    out["ratio_evaluate_to_floor"] = round(
        out["evaluate_median_seconds"] / out["eval_floor_median_seconds"], 3
    )
    if baseline_commit:
        old = os.path.join(workdir, "baseline_tree")
        os.makedirs(old)
        archive = subprocess.run(
            ["git", "-C", _REPO, "archive", baseline_commit],
            capture_output=True, check=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", old], input=archive, check=True)
        # The same model without the IoP threshold stored at training (a
        # model trained before it was stored): evaluate runs val again.
        unstored = _without_stored_mask_thresholds(model, workdir)
        work = {
            "evaluate_call_baseline": [],
            "evaluate_call": [],
            "evaluate_call_threshold_not_stored": [],
        }
        for r in range(repeats):
            for key, tree, chosen in (
                ("evaluate_call_baseline", old, model),
                ("evaluate_call", _REPO, model),
                ("evaluate_call_threshold_not_stored", _REPO, unstored),
            ):
                work[key].append(
                    _evaluate_call_seconds(
                        tree, chosen, records, split, os.path.join(workdir, f"{key}_{r}")
                    )
                )
        for key, seconds in work.items():
            out.update(_summary(key, seconds, count))
        out["speedup_of_the_evaluate_call_vs_baseline"] = round(
            out["evaluate_call_baseline_median_seconds"]
            / out["evaluate_call_median_seconds"], 2
        )
        out["speedup_of_the_evaluate_call_vs_baseline_threshold_not_stored"] = round(
            out["evaluate_call_baseline_median_seconds"]
            / out["evaluate_call_threshold_not_stored_median_seconds"], 2
        )
        with open(os.path.join(workdir, "evaluate_call_0", "metrics.json")) as f:
            out["mask_threshold_stored_at_training"] = json.load(f)["source"].get(
                "mask_threshold_stored_at_training"
            )
        out["metrics_equal_threshold_not_stored"] = _metrics_without_paths(
            os.path.join(workdir, "evaluate_call_0", "metrics.json")
        ) == _metrics_without_paths(
            os.path.join(workdir, "evaluate_call_threshold_not_stored_0", "metrics.json")
        )
        cli = {"cli_evaluate_baseline": [], "cli_evaluate": []}
        for r in range(repeats):
            for key, tree in (("cli_evaluate_baseline", old), ("cli_evaluate", _REPO)):
                cli[key].append(
                    _python(
                        ["-m", "cxr_tf.evaluate", f"--model_dir={model}",
                         f"--data_dir={records}", f"--split={split}",
                         f"--output_dir={os.path.join(workdir, f'{key}_{r}')}"],
                        env_path=tree,
                    )
                )
        for key, seconds in cli.items():
            out.update(_summary(key, seconds, count))
        out["baseline_commit"] = baseline_commit
        out["speedup_vs_baseline"] = round(
            out["cli_evaluate_baseline_median_seconds"]
            / out["cli_evaluate_median_seconds"], 2
        )
        out["metrics_equal_to_baseline"] = _metrics_without_paths(
            os.path.join(workdir, "cli_evaluate_baseline_0", "metrics.json")
        ) == _metrics_without_paths(os.path.join(workdir, "cli_evaluate_0", "metrics.json"))
    return out


_EVALUATE_CALL = """
import sys, time
from cxr_tf import evaluate_lib, model_dir
model, records, split, out = sys.argv[1:5]
model_dir.load(model, "best")  # imports and the first model load: not timed
config = evaluate_lib.EvalConfig(
    output_dir=out, model_dir=model, data_dir=records, split=split
)
start = time.perf_counter()
evaluate_lib.evaluate(config)
print("SECONDS", time.perf_counter() - start)
"""


def _evaluate_call_seconds(tree, model, records, split, output_dir):
    """Seconds of one `evaluate_lib.evaluate` call of `tree`, in a fresh
    process, after TensorFlow's import and a first model load."""
    printed = []
    _python(
        ["-c", _EVALUATE_CALL, model, records, split, output_dir], tree, stdout=printed
    )
    return float(printed[0].split("SECONDS")[-1])


def _rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def memory_section(model, count, side, workdir):
    """Resident memory over a predict run on `count` small films."""
    from PIL import Image  # pylint: disable=import-outside-toplevel

    from cxr_tf import predict_lib  # pylint: disable=import-outside-toplevel

    folder = os.path.join(workdir, "many")
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for i in range(count):
        film = rng.integers(0, 256, (side, side), dtype=np.uint8)
        Image.fromarray(film).save(os.path.join(folder, f"{i:06d}.png"))
    samples = []
    stop = threading.Event()

    def sample():
        while not stop.wait(1.0):
            samples.append(_rss_mb())

    watcher = threading.Thread(target=sample, daemon=True)
    before = _rss_mb()
    watcher.start()
    start = time.perf_counter()
    predict_lib.predict(
        predict_lib.PredictConfig(model, os.path.join(workdir, "many_out"), overlays=False),
        [folder],
    )
    seconds = time.perf_counter() - start
    stop.set()
    watcher.join()
    checkpoints = [
        round(samples[min(len(samples) - 1, int(len(samples) * k / 10))], 1)
        for k in range(1, 11)
    ] if samples else []
    return {
        "films": count,
        "film_side": side,
        "seconds": round(seconds, 1),
        "rss_mb_before": round(before, 1),
        "rss_mb_at_tenths_of_the_run": checkpoints,
        "rss_mb_growth_second_half": (
            round(checkpoints[-1] - checkpoints[4], 1) if checkpoints else None
        ),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="Model directory or .keras file.")
    parser.add_argument("--images", default=DEFAULT_IMAGES, help="Folder of films.")
    parser.add_argument("--records", default=None, help="Ingested TFRecords (evaluate).")
    parser.add_argument("--split", default="test")
    parser.add_argument("--baseline_commit", default=None,
                        help="Also time this commit's evaluate command (git revision).")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--eval_repeats", type=int, default=1,
                        help="Repeats of the evaluate timings (minutes each).")
    parser.add_argument("--memory_films", type=int, default=0)
    parser.add_argument("--memory_side", type=int, default=64)
    parser.add_argument("--overlay_films", type=int, default=0,
                        help="Time overlays on with the first N films only (0: all).")
    parser.add_argument("--skip_predict", action="store_true")
    parser.add_argument("--bare_loop_only", action="store_true",
                        help="Run only the predict floor (the command-line timing).")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    for name in ("model", "images", "records"):
        value = getattr(args, name)
        if value is not None and not os.path.exists(value):
            parser.error(f"--{name}={value} does not exist; give an existing path.")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1. Received: --repeats={args.repeats}")
    if args.bare_loop_only:
        bare_loop(args.model, _films(args.images))
        return 0

    from benchmarks import _common  # pylint: disable=import-outside-toplevel

    result = {
        "what": __doc__.splitlines()[0],
        "model": os.path.abspath(args.model),
        "cores": _common.cores(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    def write():
        # After every section: a later section's failure keeps the figures.
        result["load_average_now"] = [round(x, 2) for x in os.getloadavg()]
        if args.output:
            with open(args.output, "w") as f:
                f.write(json.dumps(result, indent=2) + "\n")

    with tempfile.TemporaryDirectory() as workdir:
        if not args.skip_predict:
            result["predict"] = predict_section(
                args.model, args.images, args.repeats, workdir, args.overlay_films
            )
            write()
        if args.records:
            result["evaluate"] = evaluate_section(
                args.model, args.records, args.split, args.eval_repeats, workdir,
                args.baseline_commit,
            )
            write()
        if args.memory_films:
            result["memory"] = memory_section(
                args.model, args.memory_films, args.memory_side, workdir
            )
            write()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
