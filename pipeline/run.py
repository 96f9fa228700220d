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
import json
import os
import pathlib
import re
import time

from absl import flags, logging

from cxr_tf import cli
from cxr_tf import errors
from pipeline import _subprocess, base, evaluate, push, statistics, train

# The code each step runs: editing it reruns that step (and those after it).
_BASE_CODE = (
    "cxr_tf/__init__.py",
    "cxr_tf/data/__init__.py",
    "pipeline/base.py",
    "pipeline/_subprocess.py",
)
_MODEL_CODE = _BASE_CODE + ("cxr_tf",)
SOURCES = {
    "synthetic": _BASE_CODE
    + ("cxr_tf/data/schema.py", "cxr_tf/data/synthetic.py", "cxr_tf/data/_phantom.py"),
    "ingest": _BASE_CODE
    + tuple(
        f"cxr_tf/data/{m}.py"
        for m in ("schema", "metadata", "images", "tfrecord", "ingest")
    )
    + ("pipeline/ingest.py",),
    "statistics": _BASE_CODE + ("cxr_tf/data/schema.py", "pipeline/statistics.py"),
    "train": _MODEL_CODE + ("pipeline/train.py",),
    "evaluate": _MODEL_CODE + ("pipeline/evaluate.py",),
    "push": _MODEL_CODE + ("pipeline/push.py",),
}


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


def run_pipeline(config):
    """Runs every step in order, reusing the cached ones.

    Args:
      config: a `PipelineConfig`.

    Returns:
      dict step name -> `base.Artifact`.

    Raises:
      base.StepFailedError: a step failed (its record says why).
      base.AnomaliesFoundError: the statistics step found anomalies.
    """
    root = config.pipeline_root
    unknown = set(config.force_steps) - set(SOURCES)
    if unknown:
        raise ValueError(
            f"Unknown steps in --force_steps: {sorted(unknown)}; "
            f"expected some of {list(SOURCES)}"
        )

    def force(step):
        return config.force or step in config.force_steps

    artifacts = {}
    started = time.time()

    if config.synthetic_patients:
        params = {
            "num_patients": config.synthetic_patients,
            "image_size": config.synthetic_image_size,
            "seed": config.synthetic_seed,
        }

        def make_data(out):
            _subprocess.run_module(
                "cxr_tf.data.synthetic",
                [f"--output_dir={out}", *(f"--{k}={v}" for k, v in params.items())],
            )
            return {"data_dir": out}

        raw = base.run_step(
            root,
            "synthetic",
            make_data,
            params,
            {},
            force=force("synthetic"),
            sources=SOURCES["synthetic"],
        )
        artifacts["synthetic"] = raw
        data_dir = raw.uri
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
        _subprocess.run_module(
            "pipeline.ingest",
            [
                f"--data_dir={data_dir}",
                f"--output_dir={out}",
                f"--image_size={config.image_size}",
                f"--max_skip_fraction={config.max_skip_fraction}",
                *config.ingest_args,
                *config.beam_args,
            ],
            log_path=pathlib.Path(out) / "ingest.log",
        )
        return {"examples_dir": out}

    examples = base.run_step(
        root,
        "ingest",
        ingest,
        ingest_params,
        {},
        force=force("ingest"),
        sources=SOURCES["ingest"],
    )
    artifacts["ingest"] = examples

    stats = base.run_step(
        root,
        "statistics",
        lambda out, examples: statistics.run_statistics(
            out, examples.uri, config.image_size, config.schema, config.beam_args
        ),
        {"image_size": config.image_size, "schema": config.schema},
        {"examples": examples},
        force=force("statistics"),
        sources=SOURCES["statistics"],
    )
    artifacts["statistics"] = stats

    train_params = {
        "flags": train.read_flagfile(config.train_flagfile),
        "overrides": list(config.train_args),
    }
    model = base.run_step(
        root,
        "train",
        lambda out, examples, statistics: train.run_train(
            out, examples, config.train_flagfile, config.train_args
        ),
        train_params,
        {"examples": examples, "statistics": stats},
        force=force("train"),
        sources=SOURCES["train"],
        keep=True,
    )
    artifacts["train"] = model

    evaluation = base.run_step(
        root,
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
        force=force("evaluate"),
        sources=SOURCES["evaluate"],
    )
    artifacts["evaluate"] = evaluation

    pushed = base.run_step(
        root,
        "push",
        lambda out, model, evaluation: push.run_push(
            out, model, evaluation, config.serving_model_dir, config.export_args
        ),
        {
            "serving_model_dir": str(pathlib.Path(config.serving_model_dir).resolve()),
            "export_args": list(config.export_args),
        },
        {"model": model, "evaluation": evaluation},
        force=force("push"),
        sources=SOURCES["push"],
    )
    artifacts["push"] = pushed

    report = {
        "wall_seconds": round(time.time() - started, 1),
        "steps": {
            name: {
                "run_id": a.run_id,
                "uri": a.uri,
                "start": a.record["start_time"],
                "end": a.record["end_time"],
            }
            for name, a in artifacts.items()
        },
        "evaluation": evaluation.outputs.get("summary"),
        "blessed": evaluation.outputs.get("blessed"),
        "blessing_reasons": evaluation.outputs.get("reasons"),
        "pushed": pushed.outputs,
    }
    report_path = pathlib.Path(root) / "last_run.json"
    report_path.write_text(json.dumps(report, indent=2), encoding="utf-8")
    logging.info("pipeline finished: %s", json.dumps(report["pushed"]))
    return artifacts


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


def step_error(e):
    """The `UserError` of a failed step, or None when the step hit a bug.

    A step whose command ended with our one-line `error: ...` (a user's
    mistake, reported by the step's own CLI) is answered with that line; a
    step that crashed with a traceback keeps it.
    """
    text = str(e)
    if "Traceback (most recent call last)" in text:
        return None
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    reported = [l for l in lines if l.startswith("error: ")]
    what = reported[-1][len("error: ") :] if reported else lines[0]
    record = re.search(r"\(record: (.*?)\)", text)
    return errors.UserError(
        what,
        record.group(1) if record else "pipeline",
        "fix it and rerun; finished steps are reused",
    )


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
    try:
        run_pipeline(config)
    except base.AnomaliesFoundError as e:
        raise errors.UserValueError(
            str(e), _PIPELINE_ROOT.value, "fix the data or pass a curated --schema"
        ) from None
    except base.StepFailedError as e:
        error = step_error(e)
        if error is None:
            raise
        raise error from None


if __name__ == "__main__":
    cli.run(main, flags_parser=lambda argv: flags.FLAGS(argv, known_only=True))
