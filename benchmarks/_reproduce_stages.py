"""Runs reproduce.py's trainings and evaluations in one process (its worker).

reproduce.py runs `run_stages` in a child process (`cxr_tf.child`), or by
hand: `python benchmarks/_reproduce_stages.py PLAN.json`.

A stage is {"name", "kind", "dir", ...}:
- kind "train": "argv", the `python -m cxr_tf.train` flags (a flagfile and
  overrides), read by cxr_tf.train's own flag code into its `TrainConfig`
  (`with_config`, in the calling process), so a checked-in flagfile means
  here what it means on the command line;
- kind "evaluate": "config", the keyword arguments of
  `cxr_tf.evaluate_lib.EvalConfig`.

TensorFlow is imported once for all stages: on a CPU its import and the
runtime's start cost more than a smoke run's few steps, paid once per
subprocess. A stage that finishes writes `DIR/reproduce_stage.json` (its
spec and wall time), so a rerun of reproduce.py skips it; the first stage
that fails ends the process with status 1 and its traceback on stderr.
"""

import json
import pathlib
import shutil
import sys
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STAGE_RECORD = "reproduce_stage.json"


def stage_spec(stage):
    """What identifies a stage's result: equal specs give equal outputs."""
    return {k: stage[k] for k in ("kind", "argv", "config") if k in stage}


def free_checkpoints(model_dir):
    """Deletes the per-epoch checkpoints and backups (model.keras stays).

    Each ResNet-34 .keras file with its Adam state is ~250 MB; evaluation
    and the figures read only model.keras.
    """
    for sub in ("checkpoints", "backup"):
        path = pathlib.Path(model_dir) / sub
        if path.is_dir():
            shutil.rmtree(path)


def with_config(stage):
    """The stage with "frozen", its config: a `TrainConfig` or an `EvalConfig`.

    Raises:
      cxr_tf.errors.UserError: a training's flags hold a bad flag, value or
        path (the line `python -m cxr_tf.train` would print).
    """
    if stage["kind"] == "train":
        from cxr_tf import train

        return {**stage, "frozen": train.config_from_argv(list(stage["argv"]))}
    from cxr_tf import evaluate_lib

    config = dict(stage["config"])
    for key in ("box_thresholds", "iobb_thresholds", "mask_thresholds"):
        if key in config:
            config[key] = tuple(config[key])
    return {**stage, "frozen": evaluate_lib.EvalConfig(**config)}


def _train(stage):
    from cxr_tf import train_lib

    train_lib.train(stage["frozen"])
    free_checkpoints(stage["dir"])


def _evaluate(stage):
    from cxr_tf import evaluate_lib

    evaluate_lib.evaluate(stage["frozen"])


def run_stages(stages):
    """Runs each stage (`with_config`) in order; writes its record when it finishes."""
    import keras

    for stage in stages:
        directory = pathlib.Path(stage["dir"])
        directory.mkdir(parents=True, exist_ok=True)
        print(f"=== {stage['kind']} {stage['name']}", file=sys.stderr, flush=True)
        start = time.time()
        {"train": _train, "evaluate": _evaluate}[stage["kind"]](stage)
        wall = round(time.time() - start, 1)
        record = {**stage_spec(stage), "wall_s": wall}
        (directory / STAGE_RECORD).write_text(json.dumps(record, indent=2))
        print(f"=== done {stage['name']} in {wall} s", file=sys.stderr, flush=True)
        # The next model starts from a fresh Keras graph and name scope.
        keras.backend.clear_session()


def main(argv):
    if len(argv) != 2:
        print(f"usage: {argv[0]} PLAN.json", file=sys.stderr)
        return 2
    stages = json.loads(pathlib.Path(argv[1]).read_text())
    try:
        run_stages([with_config(stage) for stage in stages])
    except Exception:  # pylint: disable=broad-except
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
