"""Runs the whole pipeline: (synthetic data ->) ingest -> statistics -> train -> evaluate -> push.

    python -m pipeline.run --flagfile=configs/pipeline_demo.flags \
        [--pipeline_root=DIR] [--serving_model_dir=DIR] [--force] \
        [--runner=DirectRunner --direct_num_workers=2 | Flink/Spark/Dataflow options]

Each step's output lives in PIPELINE_ROOT/<step>/<run_id>/ with a record.json.
A step whose inputs, parameters and code did not change is not run again; a
failed step stops the run, and the next run resumes from it. Flags this module
does not know are Beam pipeline options and go to the Beam steps unchanged.
"""

import dataclasses
import functools
import json
import os
import pathlib
import time

from absl import flags, logging

from cxr_tf import child
from cxr_tf import cli
from cxr_tf import errors
from cxr_tf.data import synthetic
from pipeline import base, evaluate, push, statistics, train
from pipeline import ingest as ingest_step

# The code each step runs, found from its imports (`base.module_sources`).
# Editing any file they import reruns that step (and those after it). The
# synthetic and ingest steps are closures below: their code is the module
# whose function they run in a child process, and that runner.
STEP_MODULES = {
    "synthetic": ("cxr_tf.child", "cxr_tf.data.synthetic"),
    "ingest": ("cxr_tf.child", "pipeline.ingest"),
    "statistics": ("pipeline.statistics",),
    "train": ("pipeline.train",),
    "evaluate": ("pipeline.evaluate",),
    "push": ("pipeline.push",),
}
SOURCES = {step: base.module_sources(*m) for step, m in STEP_MODULES.items()}


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Everything one pipeline run needs (the flags, frozen)."""

    pipeline_root: str
    serving_model_dir: str
    train_flagfile: str
    data_dir: str | None = None
    synthetic_patients: int = 0
    synthetic_image_size: int = 256
    synthetic_seed: int = 0
    image_size: int = 256
    max_skip_fraction: float = 0.01
    ingest_args: tuple = ()
    train_args: tuple = ()
    evaluate_args: tuple = ()
    export_args: tuple = ()
    schema: str | None = None
    min_mean_auc: float | None = None
    min_localization_accuracy: float | None = None
    tolerance: float = 0.0
    force: bool = False
    force_steps: tuple = ()
    beam_args: tuple = ()


def _data_signature(data_dir):
    """A cheap fingerprint of a raw data folder: file count, bytes, newest mtime."""
    count = size = newest = 0
    for root, _, files in os.walk(data_dir):
        for name in files:
            st = os.stat(os.path.join(root, name))
            count, size = count + 1, size + st.st_size
            newest = max(newest, int(st.st_mtime))
    return {"files": count, "bytes": size, "newest_mtime": newest}


REPORT_FILE = "last_run.json"


class _Progress:
    """Times each step, logs what runs, and keeps the rows of the summary."""

    def __init__(self, steps):
        self.steps = steps
        self.rows = {}

    def run(self, root, step, *args, **kwargs):
        """`base.run_step(root, step, ...)`, logged and timed."""
        index = self.steps.index(step) + 1
        logging.info("pipeline step %d/%d: %s", index, len(self.steps), step)
        started = time.monotonic()
        self.rows[step] = {"action": "running", "seconds": None}
        try:
            artifact = base.run_step(root, step, *args, **kwargs)
        except BaseException:
            seconds = round(time.monotonic() - started, 1)
            self.rows[step] = {"action": "failed", "seconds": seconds}
            raise
        seconds = round(time.monotonic() - started, 1)
        self.rows[step] = {"action": artifact.action, "seconds": seconds}
        if artifact.reason:
            self.rows[step]["reason"] = artifact.reason
        logging.info(
            "pipeline step %d/%d: %s %s in %.1f s",
            index,
            len(self.steps),
            step,
            artifact.action,
            seconds,
        )
        return artifact

    def table(self):
        """The summary: one line per step with what happened and how long."""
        lines = [f"{'step':<12} {'action':<8} {'seconds':>9}"]
        for step in self.steps:
            row = self.rows.get(step, {"action": "not run", "seconds": None})
            seconds = "" if row["seconds"] is None else f"{row['seconds']:.1f}"
            lines.append(f"{step:<12} {row['action']:<8} {seconds:>9}")
        return "\n".join(lines)


def _write_report(root, report):
    path = pathlib.Path(root) / REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def run_pipeline(config):
    """Runs every step in order, reusing the cached ones.

    Writes PIPELINE_ROOT/last_run.json whether the run succeeds or fails:
    `status`, `failed_step` and `error`, what each step did (`runs`: ran,
    reused, reran or failed, with seconds) and the artifacts so far.

    Args:
      config: a `PipelineConfig`.

    Returns:
      dict step name -> `base.Artifact`.

    Raises:
      cxr_tf.errors.UserError: the training flagfile or `train_args` hold a
        bad flag or value (before any step runs).
      base.StepFailedError: a step failed (its record says why).
      base.AnomaliesFoundError: the statistics step found anomalies.
    """
    unknown = set(config.force_steps) - set(SOURCES)
    if unknown:
        raise ValueError(
            f"Unknown steps in --force_steps: {sorted(unknown)}; "
            f"expected some of {list(SOURCES)}"
        )
    # Read before any step starts or anything is written: a bad value in the
    # training flagfile fails with the training command's one line.
    train_config = train.config_from_flagfile(config.train_flagfile, config.train_args)
    steps = [s for s in SOURCES if s != "synthetic" or config.synthetic_patients]
    progress = _Progress(steps)
    artifacts = {}
    started = time.time()
    report = {"status": "running", "failed_step": None, "error": None}
    try:
        _run_steps(config, train_config, progress, artifacts, report)
    except BaseException as e:
        failed = [s for s, row in progress.rows.items() if row["action"] == "failed"]
        report.update(
            status="interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
            failed_step=failed[0] if failed else None,
            error=(
                str(e)
                if isinstance(e, errors.UserError)
                else f"{type(e).__name__}: {e}"
            ),
        )
        raise
    else:
        report["status"] = "succeeded"
    finally:
        report["wall_seconds"] = round(time.time() - started, 1)
        report["runs"] = progress.rows
        report["steps"] = {
            name: {
                "run_id": a.run_id,
                "uri": a.uri,
                "start": a.record["start_time"],
                "end": a.record["end_time"],
            }
            for name, a in artifacts.items()
        }
        _write_report(config.pipeline_root, report)
        logging.info("pipeline %s; steps:\n%s", report["status"], progress.table())
    logging.info("pipeline finished: %s", json.dumps(report["pushed"]))
    return artifacts


def _run_steps(config, train_config, progress, artifacts, report):
    root = config.pipeline_root

    def step(name, fn, params, inputs=None, **kwargs):
        # The step's name keys its cache, its code (SOURCES) and --force_steps.
        artifacts[name] = progress.run(
            root,
            name,
            fn,
            params,
            inputs or {},
            force=config.force or name in config.force_steps,
            sources=SOURCES[name],
            **kwargs,
        )
        return artifacts[name]

    if config.synthetic_patients:
        params = {
            "num_patients": config.synthetic_patients,
            "image_size": config.synthetic_image_size,
            "seed": config.synthetic_seed,
        }

        def make_data(out):
            child.run(
                synthetic.generate_dataset,
                synthetic.SyntheticConfig(output_dir=out, **params),
                name="synthetic data",
            )
            return {"data_dir": out}

        data_dir = step("synthetic", make_data, params).uri
    elif config.data_dir:
        if not pathlib.Path(config.data_dir).is_dir():
            raise FileNotFoundError(f"--data_dir does not exist: {config.data_dir}")
        data_dir = str(pathlib.Path(config.data_dir).resolve())
    else:
        raise ValueError(
            "Give --data_dir (ChestX-ray14 layout) or " "--synthetic_patients > 0."
        )

    ingest_params = {
        "data_dir": data_dir,
        "data": (
            _data_signature(data_dir) if not config.synthetic_patients else "synthetic"
        ),
        "image_size": config.image_size,
        "max_skip_fraction": config.max_skip_fraction,
        "ingest_args": list(config.ingest_args),
    }

    def ingest(out):
        # --ingest_arg flags are pipeline.ingest's; the rest are Beam options.
        ingest_config, beam_args = ingest_step.config_from_argv(
            [
                f"--data_dir={data_dir}",
                f"--output_dir={out}",
                f"--image_size={config.image_size}",
                f"--max_skip_fraction={config.max_skip_fraction}",
                *config.ingest_args,
                *config.beam_args,
            ]
        )
        child.run(
            functools.partial(ingest_step.ingest, pipeline_args=beam_args),
            ingest_config,
            log_path=pathlib.Path(out) / "ingest.log",
            name="ingest",
        )
        return {"examples_dir": out}

    examples = step("ingest", ingest, ingest_params)

    stats = step(
        "statistics",
        lambda out, examples: statistics.run_statistics(
            out, examples.uri, config.image_size, config.schema, config.beam_args
        ),
        {"image_size": config.image_size, "schema": config.schema},
        {"examples": examples},
    )

    model = step(
        "train",
        lambda out, examples, statistics: train.run_train(out, examples, train_config),
        {"config": train.parameters(train_config)},
        {"examples": examples, "statistics": stats},
        keep=True,
    )

    evaluation = step(
        "evaluate",
        lambda out, model, examples: evaluate.run_evaluate(
            out,
            model,
            examples,
            root,
            config.min_mean_auc,
            config.min_localization_accuracy,
            config.tolerance,
            config.evaluate_args,
        ),
        {
            "min_mean_auc": config.min_mean_auc,
            "min_localization_accuracy": config.min_localization_accuracy,
            "tolerance": config.tolerance,
            "evaluate_args": list(config.evaluate_args),
        },
        {"model": model, "examples": examples},
    )

    pushed = step(
        "push",
        lambda out, model, evaluation: push.run_push(
            out, model, evaluation, config.serving_model_dir, config.export_args
        ),
        {
            "serving_model_dir": str(pathlib.Path(config.serving_model_dir).resolve()),
            "export_args": list(config.export_args),
        },
        {"model": model, "evaluation": evaluation},
    )

    report.update(
        evaluation=evaluation.outputs.get("summary"),
        blessed=evaluation.outputs.get("blessed"),
        blessing_reasons=evaluation.outputs.get("reasons"),
        pushed=pushed.outputs,
    )


_PIPELINE_ROOT = flags.DEFINE_string(
    "pipeline_root", "pipeline_root", "Root folder of every step's artifacts."
)
_SERVING_MODEL_DIR = flags.DEFINE_string(
    "serving_model_dir",
    "serving_models/cxr",
    "TF Serving model base path the push step writes numbered versions into.",
)
_TRAIN_FLAGFILE = flags.DEFINE_string(
    "train_flagfile", "configs/demo.flags", "Flagfile of the training step."
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Raw data in the ChestX-ray14 layout."
)
_SYNTHETIC_PATIENTS = flags.DEFINE_integer(
    "synthetic_patients",
    0,
    "If > 0, generate this many synthetic patients as the "
    "raw data instead of reading --data_dir.",
)
_SYNTHETIC_IMAGE_SIZE = flags.DEFINE_integer(
    "synthetic_image_size", 256, "Synthetic film size in pixels."
)
_SYNTHETIC_SEED = flags.DEFINE_integer("synthetic_seed", 0, "Synthetic data seed.")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", 256, "Longer image side stored by ingest."
)
_MAX_SKIP = flags.DEFINE_float(
    "max_skip_fraction", 0.01, "Ingest fails above this skipped-row fraction."
)
_INGEST_ARGS = flags.DEFINE_multi_string(
    "ingest_arg", [], "Extra flag for pipeline.ingest."
)
_TRAIN_ARGS = flags.DEFINE_multi_string(
    "train_arg",
    [],
    "Extra flag for cxr_tf.train, e.g. --train_arg=--epochs=3 or "
    "--train_arg=--strategy=multi_worker; wins over the flagfile.",
)
_EVALUATE_ARGS = flags.DEFINE_multi_string(
    "evaluate_arg", [], "Extra flag for cxr_tf.evaluate."
)
_EXPORT_ARGS = flags.DEFINE_multi_string(
    "export_arg", [], "Extra flag for cxr_tf.export."
)
_SCHEMA = flags.DEFINE_string("schema", None, "Curated data schema JSON.")
_MIN_AUC = flags.DEFINE_float("min_mean_auc", None, "Blessing floor: mean AUC.")
_MIN_LOC = flags.DEFINE_float(
    "min_localization_accuracy",
    None,
    "Blessing floor: mean localization accuracy at IoBB > 0.5.",
)
_TOLERANCE = flags.DEFINE_float(
    "tolerance", 0.0, "Allowed drop against the pushed model."
)
_FORCE = flags.DEFINE_bool("force", False, "Rerun every step, cached or not.")
_FORCE_STEPS = flags.DEFINE_list(
    "force_steps", [], "Rerun these steps (e.g. evaluate,push), cached or not."
)


def check_flags():
    """Checks flags and paths before any step runs."""
    flagfile = _TRAIN_FLAGFILE.value
    if not pathlib.Path(flagfile).is_file():
        raise errors.UserFileError(
            "no such flagfile", f"--train_flagfile={flagfile}", "check the path"
        )
    if _SYNTHETIC_PATIENTS.value <= 0:
        if not _DATA_DIR.value:
            raise errors.UserValueError(
                "no data to ingest",
                "--data_dir",
                "give --data_dir (ChestX-ray14 layout) or --synthetic_patients > 0",
            )
        cli.check_dir(_DATA_DIR, contains=bool, hint="give the ChestX-ray14 folder")
    cli.check_file(_SCHEMA)
    unknown = sorted(set(_FORCE_STEPS.value) - set(SOURCES))
    if unknown:
        raise errors.UserValueError(
            f"unknown step(s) {unknown}",
            "--force_steps",
            f"use some of {', '.join(SOURCES)}",
        )
    cli.check_writable_dir(_PIPELINE_ROOT)
    cli.check_writable_dir(_SERVING_MODEL_DIR)


def main(argv):
    beam_args = tuple(argv[1:])
    for arg in beam_args:
        if not arg.startswith("--"):
            raise errors.UserValueError(
                f"unexpected argument {arg!r}", "arguments", "flags start with --"
            )
    check_flags()
    config = PipelineConfig(
        pipeline_root=_PIPELINE_ROOT.value,
        serving_model_dir=_SERVING_MODEL_DIR.value,
        train_flagfile=_TRAIN_FLAGFILE.value,
        data_dir=_DATA_DIR.value,
        synthetic_patients=_SYNTHETIC_PATIENTS.value,
        synthetic_image_size=_SYNTHETIC_IMAGE_SIZE.value,
        synthetic_seed=_SYNTHETIC_SEED.value,
        image_size=_IMAGE_SIZE.value,
        max_skip_fraction=_MAX_SKIP.value,
        ingest_args=tuple(_INGEST_ARGS.value),
        train_args=tuple(_TRAIN_ARGS.value),
        evaluate_args=tuple(_EVALUATE_ARGS.value),
        export_args=tuple(_EXPORT_ARGS.value),
        schema=_SCHEMA.value,
        min_mean_auc=_MIN_AUC.value,
        min_localization_accuracy=_MIN_LOC.value,
        tolerance=_TOLERANCE.value,
        force=_FORCE.value,
        force_steps=tuple(_FORCE_STEPS.value),
        beam_args=beam_args,
    )
    logging.info("pipeline config: %s", json.dumps(dataclasses.asdict(config)))
    with cli.user_errors(
        base.AnomaliesFoundError,
        _PIPELINE_ROOT.value,
        "fix the data or pass a curated --schema",
        errors.UserValueError,
    ):
        run_pipeline(config)
    # A step the user can fix raises base.StepUserError, a UserError: one
    # line. Any other step failure is a bug and keeps its traceback.

if __name__ == "__main__":
    cli.run(main, flags_parser=cli.parse_known_flags)
