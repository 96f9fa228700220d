"""Reproduces the PCAM and InfoMask papers' comparisons (synthetic or real films).

    python benchmarks/reproduce.py --output_dir=docs/results
    python benchmarks/reproduce.py --data_dir=CHESTXRAY14 --output_dir=OUT

Without --data_dir, on one synthetic data set (`cxr_tf.data.synthetic`,
ingested by `pipeline.ingest`), with one step budget and one seed, it trains
every global pooling of the PCAM paper's Table 1 plus PCAM
(`cxr_tf.layers.POOLING_NAMES`) on one backbone (`--backbone`, default the
demo's compact stride-8 trunk; `resnet34` for the paper's network), and the
InfoMask network with its three mask variants (InfoMask, FeatureMask,
RegL1); the InfoMask paper's GradCAM baseline is the Grad-CAM map of the
plain average-pooling classifier. PCAM is trained again with other seeds
(`--noise_seeds`) to measure the run-to-run spread.

With --data_dir (a ChestX-ray14 folder: Data_Entry, BBox_List, the official
train_val / test lists and the films, any layout), the films are ingested
(official split, validation drawn by patient from train_val) and every
method is trained from its paper's checked-in flagfile (`_reproduce_real`),
evaluated on the official test films against the NIH boxes. Films absent
from the folder are reported, not an error: the report says how many of
the tables' rows it ran on, and which findings have no positive or no box
among them (n/a).

Every stage runs a library function with a frozen config in a child
process (`cxr_tf.child`); trainings and evaluations share one worker
(`_reproduce_stages.run_stages`), which imports TensorFlow once.
RESULTS.md, a pure function of results.json, is written by
`_reproduce_report.py`.

Writes to --output_dir: `results.json` (settings, data counts, timings and
every evaluation's metrics), `figure2.png` (the PCAM paper's Figure 2 layout:
image with truth boxes, LSE CAM with boxes, PCAM map with boxes, for a fixed
set of test films) and `infomask_maps.png` (the InfoMask paper's Figure 3
layout), and `RESULTS.md` (default: next to --output_dir without --data_dir,
inside it with --data_dir) with the tables shaped like the papers' and where
they agree or not. Finished trainings and evaluations in --work_dir are
reused when their arguments are unchanged (`--noreuse` redoes everything);
`--report_only` rewrites RESULTS.md from results.json. `--smoke` shrinks
everything for a quick end-to-end check.
"""

import dataclasses
import datetime
import json
import os
import pathlib
import platform
import shlex
import sys
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    # Runs from a checkout without `pip install -e .`.
    sys.path.insert(0, str(ROOT))

from cxr_tf import child  # noqa: E402 pylint: disable=g-import-not-at-top
from cxr_tf import choices  # noqa: E402 pylint: disable=g-import-not-at-top
from cxr_tf import cli  # noqa: E402 pylint: disable=g-import-not-at-top
from cxr_tf import errors  # noqa: E402 pylint: disable=g-import-not-at-top
from cxr_tf import model_dir as model_dir_lib  # noqa: E402 pylint: disable=g-import-not-at-top
from cxr_tf.data import schema  # noqa: E402 pylint: disable=g-import-not-at-top
from pipeline import ingest as ingest_step  # noqa: E402 pylint: disable=g-import-not-at-top

sys.path.insert(0, str(ROOT / "benchmarks"))
import _reproduce_real  # noqa: E402 pylint: disable=g-import-not-at-top
import _reproduce_report  # noqa: E402 pylint: disable=g-import-not-at-top
import _reproduce_stages  # noqa: E402 pylint: disable=g-import-not-at-top

# From the TF-free registries (cxr_tf.choices): the one home of the names.
POOLING_NAMES = choices.POOLING_NAMES
INFOMASK_VARIANTS = choices.INFOMASK_VARIANTS
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Where results.json and the figures go (docs/results)."
)
_RESULTS_MD = flags.DEFINE_string(
    "results_md",
    None,
    "The report (default: RESULTS.md next to --output_dir; inside it with "
    "--data_dir).",
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir",
    None,
    "A ChestX-ray14 folder (tables, official lists, films): run the comparison "
    "on it with the papers' configs instead of on synthetic films.",
)
_DATA_ENTRY = flags.DEFINE_string(
    "data_entry", None, "Data_Entry table (default: found; the newest revision)."
)
_BBOX_LIST = flags.DEFINE_string("bbox_list", None, "BBox_List (default: found).")
_TRAIN_VAL_LIST = flags.DEFINE_string(
    "train_val_list", None, "train_val_list.txt (default: found)."
)
_TEST_LIST = flags.DEFINE_string("test_list", None, "test_list.txt (default: found).")
_MAX_SKIP_FRACTION = flags.DEFINE_float(
    "max_skip_fraction",
    0.01,
    "--data_dir: most rows with a film that may be skipped as unreadable or "
    "malformed (films absent from the folder are reported, not counted).",
    lower_bound=0.0,
    upper_bound=1.0,
)
_WORK_DIR = flags.DEFINE_string(
    "work_dir",
    "/tmp/cxr_reproduce",
    "Data, records, models and evaluations (large; reused when unchanged).",
)
_SEED = flags.DEFINE_integer(
    "seed", 0, "Seed of the synthetic data, the patient split and the training."
)
_NUM_PATIENTS = flags.DEFINE_integer(
    "num_patients", 800, "Synthetic patients (about 1.7 films each)."
)
_DATA_IMAGE_SIZE = flags.DEFINE_integer(
    "data_image_size", 128, "Side of the synthetic films (px; the demo's 128)."
)
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", 128, "Network input side (px, multiple of 32); also stored size."
)
# The demo's training setup (configs/demo.flags: batch 32, Adam 3e-3 with
# cosine decay) for ~740 steps, the demo's step budget, on 800 patients.
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Training batch size.")
_STEPS = flags.DEFINE_integer("steps", 744, "Training steps of every run.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 3e-3, "Adam learning rate.")
# The InfoMask network keeps 64 filters at full resolution in its encoder and
# classifier: ~10x the compact trunk's cost per image, so its three variants
# share a smaller budget of their own (stated in the report).
_INFOMASK_STEPS = flags.DEFINE_integer(
    "infomask_steps", 150, "Training steps of each InfoMask-network run."
)
_INFOMASK_BATCH_SIZE = flags.DEFINE_integer(
    "infomask_batch_size", 16, "Batch size of the InfoMask-network runs."
)
_JIT_COMPILE = flags.DEFINE_enum(
    "jit_compile", "auto", ["auto", "true", "false"], "XLA for training steps."
)
_BACKBONE = flags.DEFINE_enum(
    "backbone",
    "compact",
    sorted(_reproduce_report.BACKBONE_STRIDES),
    "Backbone of the pooling runs (compact: the demo's stride-8 trunk, which "
    "learns these films on a CPU budget; resnet34: the PCAM paper's, stride 32).",
)
_POOLINGS = flags.DEFINE_list(
    "poolings", list(POOLING_NAMES), "Poolings of the --backbone runs."
)
_INFOMASK_VARIANTS = flags.DEFINE_list(
    "infomask_variants",
    list(INFOMASK_VARIANTS),
    "InfoMask-network runs (backbone=infomask); empty: none.",
)
_GRADCAM_RUN = flags.DEFINE_string(
    "gradcam_run",
    "avg",
    "Pooling run whose Grad-CAM maps are the InfoMask table's GradCAM "
    "baseline ('' to skip).",
)
_NOISE_SEEDS = flags.DEFINE_list(
    "noise_seeds", ["1"], "Extra training seeds of PCAM for the spread estimate."
)
_NUM_FIGURE_IMAGES = flags.DEFINE_integer(
    "num_figure_images", 4, "Test films in the figures."
)
_REUSE = flags.DEFINE_bool(
    "reuse", True, "Reuse finished stages in --work_dir with identical arguments."
)
_REPORT_ONLY = flags.DEFINE_bool(
    "report_only", False, "Only rewrite RESULTS.md from --output_dir/results.json."
)
_RERUN_OF = flags.DEFINE_string(
    "rerun_of",
    None,
    "results.json of a rerun of this command with the same seed (another "
    "--work_dir): its differences to this run go into the report.",
)
_SMOKE = flags.DEFINE_bool(
    "smoke",
    False,
    "Tiny end-to-end check: 24 patients at 64 px, 2 steps of batch 4, PCAM "
    "and LSE, InfoMask only, no noise seeds (flags given explicitly win).",
)

# --smoke with --data_dir: every method of both papers, a few steps each.
REAL_SMOKE_SETTINGS = {
    # The methods are the heads: the compact trunk stands in for ResNet-34,
    # whose graph alone takes ~30 s to build per run on a loaded 2-core CPU.
    "backbone": "compact",
    "image_size": 64,
    "batch_size": 4,
    "steps": 2,
    "poolings": list(POOLING_NAMES),
    "infomask_variants": list(INFOMASK_VARIANTS),
    "gradcam_run": "avg",
    "noise_seeds": [],
    "num_figure_images": 2,
    "infomask_steps": 2,
    "infomask_batch_size": 4,
}
SMOKE_BOX_WORK_SIZE = 256
# With --data_dir these come from the papers' flagfiles unless given.
FLAGFILE_SETTINGS = (
    "image_size",
    "batch_size",
    "steps",
    "learning_rate",
    "infomask_steps",
    "infomask_batch_size",
    "jit_compile",
    "backbone",
)

SMOKE_SETTINGS = {
    "num_patients": 24,
    "data_image_size": 64,
    "image_size": 64,
    "batch_size": 4,
    "steps": 2,
    "poolings": ["pcam", "lse"],
    "infomask_variants": ["infomask"],
    "gradcam_run": "lse",
    "noise_seeds": [],
    "num_figure_images": 2,
    "infomask_steps": 2,
    "infomask_batch_size": 4,
}


# ---------------------------------------------------------------------------
# Settings.


def resolve_settings():
    """The run's settings from the flags (with --smoke defaults applied)."""
    names = (
        "seed backbone num_patients data_image_size image_size batch_size steps "
        "learning_rate jit_compile poolings infomask_variants gradcam_run "
        "infomask_steps infomask_batch_size "
        "noise_seeds num_figure_images"
    ).split()
    settings = {name: flags.FLAGS[name].value for name in names}
    real = bool(_DATA_DIR.value)
    if real:
        # The papers' flagfiles decide these; None passes nothing over them.
        for name in FLAGFILE_SETTINGS:
            if not flags.FLAGS[name].present:
                settings[name] = None
        for name in ("num_patients", "data_image_size"):
            settings.pop(name)
    if _SMOKE.value:
        for name, value in (REAL_SMOKE_SETTINGS if real else SMOKE_SETTINGS).items():
            if not flags.FLAGS[name].present:
                settings[name] = value
    settings["data_dir"] = os.path.abspath(_DATA_DIR.value) if real else None
    if real and settings["backbone"] is None:
        settings["backbone"] = _reproduce_real.read_flagfile(
            _reproduce_real.CONFIGS / _reproduce_real.POOLING_FLAGFILE
        )["backbone"]
    settings["poolings"] = [p for p in settings["poolings"] if p]
    settings["infomask_variants"] = [v for v in settings["infomask_variants"] if v]
    settings["noise_seeds"] = [int(s) for s in settings["noise_seeds"] if s != ""]
    for name in settings["poolings"]:
        if name not in POOLING_NAMES:
            raise app.UsageError(
                f"--poolings must name poolings of {POOLING_NAMES}. Received: {name!r}"
            )
    for name in settings["infomask_variants"]:
        if name not in INFOMASK_VARIANTS:
            raise app.UsageError(
                f"--infomask_variants must be of {INFOMASK_VARIANTS}. "
                f"Received: {name!r}"
            )
    if settings["gradcam_run"] and settings["gradcam_run"] not in settings["poolings"]:
        raise app.UsageError(
            "--gradcam_run must be one of the trained --poolings "
            f"{settings['poolings']}. Received: {settings['gradcam_run']!r}"
        )
    if settings["noise_seeds"] and "pcam" not in settings["poolings"]:
        raise app.UsageError("--noise_seeds needs pcam among --poolings.")
    if settings["seed"] in settings["noise_seeds"]:
        raise app.UsageError(
            f"--noise_seeds must differ from --seed={settings['seed']}. "
            f"Received: {settings['noise_seeds']}"
        )
    if settings["image_size"] is not None and (
        settings["image_size"] % 32 or settings["image_size"] < 32
    ):
        raise app.UsageError(
            "--image_size must be a positive multiple of 32. "
            f"Received: {settings['image_size']}"
        )
    for name in (
        "steps",
        "batch_size",
        "num_patients",
        "infomask_steps",
        "infomask_batch_size",
    ):
        if settings.get(name) is not None and settings[name] < 1:
            raise app.UsageError(f"--{name} must be >= 1. Received: {settings[name]}")
    return settings


def plan_runs(settings):
    """The trainings: name -> dict(backbone, pooling, variant, seed)."""
    runs = {}
    for pooling in settings["poolings"]:
        runs[pooling] = {
            "backbone": settings["backbone"],
            "pooling": pooling,
            "variant": None,
            "seed": settings["seed"],
        }
    for seed in settings["noise_seeds"]:
        runs[f"pcam_seed{seed}"] = {
            "backbone": settings["backbone"],
            "pooling": "pcam",
            "variant": None,
            "seed": seed,
        }
    for variant in settings["infomask_variants"]:
        runs[f"infomask_{variant}"] = {
            "backbone": "infomask",
            "pooling": "avg",
            "variant": variant,
            "seed": settings["seed"],
            "steps": settings["infomask_steps"],
            "batch_size": settings["infomask_batch_size"],
        }
    return runs


def run_order(runs, settings):
    """Training order: PCAM, LSE, the Grad-CAM run, noise seeds, InfoMask, rest."""
    first = ["pcam", "lse", settings["gradcam_run"]]
    first += [n for n in runs if n.startswith("pcam_seed")]
    first += [n for n in runs if n.startswith("infomask_")]
    order = [n for n in dict.fromkeys(first) if n in runs]
    return order + [n for n in runs if n not in order]


def plan_evaluations(settings, runs):
    """The evaluations: name -> dict(run, map_source)."""
    evals = {name: {"run": name, "map_source": "model"} for name in runs}
    if settings["gradcam_run"]:
        evals["gradcam"] = {"run": settings["gradcam_run"], "map_source": "gradcam"}
    return evals


# ---------------------------------------------------------------------------
# Stages in child processes.


def run_stage(name, fn, config, stage_dir, reuse):
    """Runs `fn(config)` in a child process once per distinct config; logs to a file.

    Args:
      name: stage name for messages.
      fn: the library function (`cxr_tf.child.run`).
      config: its frozen dataclass config.
      stage_dir: directory whose `reproduce_stage.json` records the finished
        stage (config, wall time).
      reuse: skip the stage when the record shows the same config finished.

    Returns:
      dict with "config", "wall_s", "reused".

    Raises:
      RuntimeError: the stage failed (its log's tail is in the message).
    """
    spec = json.loads(json.dumps(dataclasses.asdict(config)))
    stage_dir = pathlib.Path(stage_dir)
    record_path = stage_dir / "reproduce_stage.json"
    if reuse and record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("config") == spec:
            logging.info("Reusing %s (%s)", name, stage_dir)
            return {**record, "reused": True}
    stage_dir.mkdir(parents=True, exist_ok=True)
    log_path = stage_dir / "reproduce_stage.log"
    if log_path.exists():
        log_path.unlink()
    logging.info("Running %s: %s", name, json.dumps(spec, sort_keys=True))
    start = time.time()
    try:
        child.run(fn, config, log_path=log_path, name=name, echo=_quiet)
    except (errors.UserError, RuntimeError) as e:
        raise RuntimeError(
            f"Stage {name} failed after {time.time() - start:.0f} s: {e}\n"
            f"Log: {log_path}"
        ) from e
    wall = time.time() - start
    record = {"config": spec, "wall_s": round(wall, 1)}
    record_path.write_text(json.dumps(record, indent=2))
    logging.info("%s done in %.0f s", name, wall)
    return {**record, "reused": False}


def _quiet(line):
    # A stage's output goes to its log only.
    del line
    return False


def make_data(settings, work_dir, reuse):
    """Synthetic films, then TFRecords; returns (synthetic dir, records dir, timings)."""
    from cxr_tf.data import synthetic  # pylint: disable=import-outside-toplevel

    synthetic_dir = work_dir / "synthetic"
    records_dir = work_dir / "records"
    timings = {}
    timings["synthetic"] = run_stage(
        "synthetic data",
        synthetic.generate_dataset,
        synthetic.SyntheticConfig(
            output_dir=str(synthetic_dir),
            num_patients=settings["num_patients"],
            image_size=settings["data_image_size"],
            seed=settings["seed"],
        ),
        work_dir / "stage_synthetic",
        reuse,
    )
    # pipeline.ingest's own flag code: the config `python -m pipeline.ingest`
    # would run with these flags.
    ingest_config, _ = ingest_step.config_from_argv(
        [
            f"--data_dir={synthetic_dir}",
            f"--output_dir={records_dir}",
            f"--image_size={settings['image_size']}",
            f"--seed={settings['seed']}",
            "--overwrite",
        ]
    )
    timings["ingest"] = run_stage(
        "ingest",
        ingest_step.ingest,
        ingest_config,
        work_dir / "stage_ingest",
        # New films mean new records even if the ingest arguments match.
        reuse and timings["synthetic"]["reused"],
    )
    return synthetic_dir, records_dir, timings


def train_argv(settings, records_dir, model_dir, run):
    """`python -m cxr_tf.train` arguments of one run."""
    steps = run.get("steps", settings["steps"])
    argv = [
        "cxr_tf.train",
        f"--data_dir={records_dir}",
        f"--model_dir={model_dir}",
        f"--backbone={run['backbone']}",
        f"--pooling={run['pooling']}",
        f"--image_size={settings['image_size']}",
        f"--batch_size={run.get('batch_size', settings['batch_size'])}",
        "--epochs=1",
        f"--steps_per_epoch={steps}",
        "--optimizer=adam",
        f"--learning_rate={settings['learning_rate']}",
        # configs/demo.flags' setup: cosine decay and no augmentation
        # converge fastest on a budget this small.
        "--lr_schedule=cosine",
        "--augment=false",
        "--strategy=default",
        "--loss=balanced_bce",
        f"--seed={run['seed']}",
        f"--jit_compile={settings['jit_compile']}",
        # One backup at the end: a killed run restarts its only epoch.
        f"--backup_every_steps={steps}",
        "--num_overlay_images=0",
        "--verbose=2",
    ]
    if run["variant"]:
        argv.append(f"--infomask_variant={run['variant']}")
    return argv


def evaluate_config(records_dir, model_dir, output_dir, map_source, cam,
                    smoke=False):
    """`cxr_tf.evaluate_lib.EvalConfig` keyword arguments of one evaluation.

    Args:
      records_dir: the ingested records.
      model_dir: the trained run.
      output_dir: where metrics.json goes.
      map_source: "model" or "gradcam".
      cam: the maps are CAMs: boxes at 180 only (the papers' threshold; the
        evaluator's second default, 60, is not reported and costs time).
      smoke: find regions at 256 px instead of the film's size (boxes are
        still scored in film pixels against the truth; 16x less work on a
        1024 px film).

    Returns:
      dict of EvalConfig fields (JSON-serialisable).
    """
    extra = {"work_size": SMOKE_BOX_WORK_SIZE} if smoke else {}
    return {
        **extra,
        "model_dir": str(model_dir),
        "checkpoint": "final",
        "data_dir": str(records_dir),
        "split": "test",
        "val_split": "val",
        "map_source": map_source,
        "output_dir": str(output_dir),
        "iobb_thresholds": list(_reproduce_report.IOBB_THRESHOLDS),
        "box_thresholds": [180.0] if cam else [],
        # The figures are drawn here; evaluate's overlays are not used.
        "num_overlays": 0,
    }


def plan_stages(settings, runs, evaluation_plan, source, work_dir):
    """Every training, each followed by its evaluations, in `run_order`."""
    stages = []
    records_dir = source["records_dir"]
    for name in run_order(runs, settings):
        run = runs[name]
        model_dir = work_dir / "runs" / name
        if settings.get("data_dir"):
            argv = _reproduce_real.train_argv(settings, run, records_dir, model_dir)
        else:
            argv = train_argv(settings, records_dir, model_dir, run)[1:]
        stages.append(
            {"name": name, "kind": "train", "dir": str(model_dir), "argv": argv}
        )
        for eval_name, spec in evaluation_plan.items():
            if spec["run"] != name:
                continue
            cam = spec["map_source"] == "gradcam" or (
                run["backbone"] != "infomask" and run["pooling"] != "pcam"
            )
            eval_dir = work_dir / "eval" / eval_name
            stages.append(
                {
                    "name": eval_name,
                    "kind": "evaluate",
                    "dir": str(eval_dir),
                    "run": name,
                    "config": evaluate_config(
                        records_dir,
                        model_dir,
                        eval_dir,
                        spec["map_source"],
                        cam,
                        settings["smoke"],
                    ),
                }
            )
    return stages


def _finished(stage):
    record_path = pathlib.Path(stage["dir"]) / _reproduce_stages.STAGE_RECORD
    if not record_path.is_file():
        return False
    record = json.loads(record_path.read_text())
    spec = _reproduce_stages.stage_spec(stage)
    if {k: record.get(k) for k in spec} != json.loads(json.dumps(spec)):
        return False
    if stage["kind"] == "train":
        return (pathlib.Path(stage["dir"]) / "model.keras").is_file()
    return (pathlib.Path(stage["dir"]) / "metrics.json").is_file()


def execute_stages(stages, work_dir, reuse):
    """Runs the stages not finished before in one worker process.

    A training is reused when `reuse` (the same records) and its record
    shows the same arguments; an evaluation when its training was reused
    and its record shows the same config. Sets each stage's "reused".

    Returns:
      None, or the failure message (with the worker log's tail).
    """
    todo, reused_runs = [], set()
    for stage in stages:
        if stage["kind"] == "train":
            stage["reused"] = reuse and _finished(stage)
            if stage["reused"]:
                reused_runs.add(stage["name"])
        else:
            stage["reused"] = stage["run"] in reused_runs and _finished(stage)
        if stage["reused"]:
            logging.info("Reusing %s %s (%s)", stage["kind"], stage["name"], stage["dir"])
        else:
            # A stale record must not be read as this run's result.
            stale = pathlib.Path(stage["dir"]) / _reproduce_stages.STAGE_RECORD
            if stale.is_file():
                stale.unlink()
            todo.append(stage)
    if not todo:
        return None
    plan_path = work_dir / "stages.json"
    plan_path.write_text(json.dumps(todo, indent=1))
    # Read here, before the worker starts: a training's flags by
    # cxr_tf.train's own flag code, an evaluation's EvalConfig.
    frozen = [_reproduce_stages.with_config(stage) for stage in todo]
    log_path = work_dir / "stages.log"
    if log_path.exists():
        log_path.unlink()
    logging.info(
        "Running %d stages in one worker (log: %s): %s",
        len(todo),
        log_path,
        ", ".join(f"{s['kind']} {s['name']}" for s in todo),
    )
    start = time.time()
    try:
        child.run(
            _reproduce_stages.run_stages,
            frozen,
            log_path=log_path,
            name="the stage worker",
            echo=_quiet,
        )
    except (errors.UserError, RuntimeError) as e:
        logging.info("Stages failed after %.0f s", time.time() - start)
        return f"{e}\nLog: {log_path}"
    logging.info("Stages done in %.0f s", time.time() - start)
    return None


def run_config(model_dir):
    """The settings of a finished training that the report states.

    Model settings come from config.json's "model" (the `ModelConfig`), the
    rest from its "train" (the `TrainConfig`), so model directories written
    before TrainConfig nested its ModelConfig read the same.
    """
    path = pathlib.Path(model_dir) / model_dir_lib.CONFIG_FILE
    if not path.is_file():
        return {}
    payload = model_dir_lib.read_config(str(path))
    model, train = payload["model"], payload.get("train") or {}
    keys = ("backbone", "pooling", "image_size", "batch_size", "epochs",
            "steps_per_epoch", "learning_rate", "lr_schedule", "optimizer",
            "loss", "weights", "findings", "mixed_precision", "strategy")
    return {
        k: model[k] if k in model else train[k]
        for k in keys
        if k in model or k in train
    }


# ---------------------------------------------------------------------------
# Data facts and extra metrics.


def prepare_data(settings, work_dir, reuse):
    """The records and the tables behind them, synthetic or real.

    Returns:
      dict with "kind" ("synthetic" or "chestxray14"), "tables" (table key
      -> path), "records_dir", "test_ids" (ingested test films), "image_paths"
      (film id -> path, for the figures), "notes" (choices the report
      states) and "timings" (stage -> {"wall_s", "reused"}).
    """
    if not settings.get("data_dir"):
        synthetic_dir, records_dir, timings = make_data(settings, work_dir, reuse)
        tables = {
            "data_entry": str(synthetic_dir / "Data_Entry_2017.csv"),
            "bbox_list": str(synthetic_dir / "BBox_List_2017.csv"),
            "train_val_list": str(synthetic_dir / "train_val_list.txt"),
            "test_list": str(synthetic_dir / "test_list.txt"),
        }
        from cxr_tf.data import metadata

        test_ids = set(metadata.read_image_list(tables["test_list"]))
        return {
            "kind": "synthetic",
            "tables": tables,
            "records_dir": records_dir,
            "test_ids": test_ids,
            "image_paths": {
                i: str(synthetic_dir / "images" / i) for i in sorted(test_ids)
            },
            "notes": [],
            "timings": timings,
        }
    given = {
        "data_entry": _DATA_ENTRY.value,
        "bbox_list": _BBOX_LIST.value,
        "train_val_list": _TRAIN_VAL_LIST.value,
        "test_list": _TEST_LIST.value,
    }
    tables, images, notes = _reproduce_real.resolve_tables(settings["data_dir"], given)
    records_dir = work_dir / "records"
    image_size = settings["image_size"] or max(
        int(_reproduce_real.read_flagfile(_reproduce_real.CONFIGS / name)["image_size"])
        for name in (
            _reproduce_real.POOLING_FLAGFILE,
            _reproduce_real.INFOMASK_FLAGFILE,
            *_reproduce_real.METHOD_FLAGFILES.values(),
        )
    )
    start = time.time()
    report, reused = _reproduce_real.ingest_real(
        settings["data_dir"],
        tables,
        records_dir,
        image_size,
        settings["seed"],
        _MAX_SKIP_FRACTION.value,
        settings["smoke"],
        reuse,
    )
    timings = {"ingest": {"wall_s": round(time.time() - start, 1), "reused": reused}}
    missing = report["skipped_by_reason"].get(_reproduce_real.MISSING_FILE, 0)
    if missing:
        notes.append(
            f"{missing} of the {report['rows_read']} Data_Entry rows have no film "
            f"in the data folder: the comparison ran on the {report['rows_written']} "
            "films present, a subset of ChestX-ray14."
        )
    test_ids = _reproduce_real.ingested_test_ids(tables, report)
    return {
        "kind": "chestxray14",
        "tables": tables,
        "records_dir": records_dir,
        "test_ids": test_ids,
        "image_paths": {i: images[i][0] for i in sorted(test_ids) if images.get(i)},
        "notes": notes,
        "timings": timings,
    }


def data_summary(source):
    """Split sizes, labels and boxes of the ingested test films, from the tables."""
    from cxr_tf.data import metadata

    tables = source["tables"]
    report = json.loads(
        (pathlib.Path(source["records_dir"]) / schema.INGEST_REPORT).read_text()
    )
    entries, _ = metadata.read_data_entry(tables["data_entry"])
    test_ids = source["test_ids"]
    test_entries = entries[entries["image_id"].isin(test_ids)]
    labels = np.stack(test_entries["labels"].to_numpy()) if len(test_entries) else None
    test_boxes = _boxes_of(tables, test_ids)
    return {
        "kind": source["kind"],
        "tables": tables,
        "notes": source["notes"],
        "rows_read": report.get("rows_read"),
        "written": report.get("written"),
        "patients": report.get("patients"),
        "test_positives": {
            f: int(labels[:, k].sum()) if labels is not None else 0
            for k, f in enumerate(schema.FINDINGS)
        },
        "test_boxes": {
            f: int((test_boxes["finding"] == f).sum()) for f in schema.BOXED_FINDINGS
        },
        "test_images_with_boxes": {
            f: int(test_boxes[test_boxes["finding"] == f]["image_id"].nunique())
            for f in schema.BOXED_FINDINGS
        },
    }


def _boxes_of(tables, image_ids):
    """The box table's rows of `image_ids` (empty without a box table)."""
    import pandas as pd

    from cxr_tf.data import metadata

    if not tables.get("bbox_list"):
        return pd.DataFrame({"image_id": [], "finding": []})
    boxes = metadata.read_bbox_list(str(tables["bbox_list"]))
    return boxes[boxes["image_id"].isin(image_ids)]


def labels_by_image(data_entry):
    """image id -> (14,) float labels, from a Data_Entry table."""
    from cxr_tf.data import metadata

    entries, _ = metadata.read_data_entry(str(data_entry))
    return {
        i: np.asarray(l, np.float64)
        for i, l in zip(entries["image_id"], entries["labels"])
    }


def accuracy_per_class(predictions_path, labels, threshold=0.5):
    """Classification accuracy per finding at probability >= threshold.

    Args:
      predictions_path: predictions.jsonl as `cxr_tf.evaluate` writes it.
      labels: image id -> (14,) labels.
      threshold: decision threshold on the probability.

    Returns:
      dict finding -> accuracy (None for a finding the model does not output).
    """
    correct, total = {}, {}
    with open(predictions_path) as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            truth = labels.get(record["image"])
            if truth is None:
                continue
            for finding, p in record["probabilities"].items():
                k = schema.FINDINGS.index(finding)
                hit = float(p >= threshold) == truth[k]
                correct[finding] = correct.get(finding, 0) + int(hit)
                total[finding] = total.get(finding, 0) + 1
    return {f: correct[f] / total[f] for f in total}


# ---------------------------------------------------------------------------
# Figures.


def choose_figure_images(bbox_list, test_ids, count):
    """A fixed set of test films: the first (by id) with a box of each finding.

    Args:
      bbox_list: the box table (None: no figures).
      test_ids: ids of the ingested test films.
      count: number of films.

    Returns:
      list of (image_id, finding shown); findings in canonical order, one
      film each, cycling until `count` distinct films are chosen.
    """
    boxes = _boxes_of({"bbox_list": bbox_list}, set(test_ids))
    candidates = {
        f: sorted(boxes[boxes["finding"] == f]["image_id"].unique())
        for f in schema.BOXED_FINDINGS
    }
    chosen, used = [], set()
    while len(chosen) < count:
        added = False
        for finding in schema.BOXED_FINDINGS:
            for image_id in candidates[finding]:
                if image_id not in used:
                    chosen.append((image_id, finding))
                    used.add(image_id)
                    added = True
                    break
            if len(chosen) == count:
                break
        if not added:
            break
    return chosen


def _gt_boxes(bbox_list, image_ids):
    out = {}
    for row in _boxes_of({"bbox_list": bbox_list}, set(image_ids)).itertuples():
        out.setdefault(row.image_id, {}).setdefault(row.finding, []).append(
            (row.x, row.y, row.w, row.h)
        )
    return out


def _panel_map(score_map, hw, image_size, map_kind):
    """A map cropped to the film, scaled as thresholded, upsampled to (H, W)."""
    from cxr_tf import localization
    from cxr_tf import predict_lib

    cropped = predict_lib.crop_map_to_image(score_map, hw, image_size)
    if map_kind == "cam":
        cropped = localization.normalize_cam(cropped)
        if cropped is None:
            cropped = np.zeros((1, 1), np.float32)
    return localization.resize_bilinear(cropped, hw)


def _draw(axes, image, heat=None, vmax=1.0, truth=(), pred=(), title="", mask=None):
    from matplotlib import patches

    axes.imshow(image, cmap="gray")
    if heat is not None:
        axes.imshow(heat, cmap="jet", alpha=0.4, vmin=0.0, vmax=vmax)
    if mask is not None and mask.any() and not mask.all():
        axes.contour(
            mask.astype(np.float32), levels=[0.5], colors="white", linewidths=1
        )
    for color, style, items in (("#00d000", "-", truth), ("#1f5cff", "-", pred)):
        for box in items:
            x, y, w, h = (float(v) for v in tuple(box)[:4])
            axes.add_patch(
                patches.Rectangle(
                    (x, y), w, h, fill=False, edgecolor=color, lw=1.5, ls=style
                )
            )
    axes.set_title(title, fontsize=8)
    axes.set_axis_off()


def make_figures(settings, source, work_dir, output_dir, evaluations):
    """Writes figure2.png (and infomask_maps.png); returns their names."""
    from matplotlib import figure as mpl_figure
    from matplotlib.backends import backend_agg

    from cxr_tf import predict_lib
    from cxr_tf import model_dir
    from cxr_tf.data import preprocess
    from cxr_tf.data import images as cxr_images

    bbox_list = source["tables"].get("bbox_list")
    test_ids = set(source["image_paths"])
    chosen = choose_figure_images(bbox_list, test_ids, settings["num_figure_images"])
    if not chosen:
        logging.warning("No test film with boxes: no figures.")
        return {"files": [], "images": []}
    gt = _gt_boxes(bbox_list, [i for i, _ in chosen])
    films = {
        image_id: cxr_images.read_image(source["image_paths"][image_id])
        for image_id, _ in chosen
    }
    cache, models = {}, {}

    def maps_of(run, map_source):
        key = (run, map_source)
        if key not in cache:
            if run not in models:
                models[run] = model_dir.load(str(work_dir / "runs" / run), "final")
            loaded = models[run]
            computer = predict_lib.MapComputer(loaded, map_source)
            inputs = np.stack(
                [
                    preprocess.preprocess_pixels(
                        films[i],
                        loaded.image_size,
                        loaded.normalization,
                        loaded.ingest_size,
                    )
                    for i, _ in chosen
                ]
            )
            probs, maps = computer(inputs)
            cache[key] = (loaded, computer.map_kind, probs, maps)
        return cache[key]

    def panel(axes, row, run, map_source, label, threshold=None, mask_threshold=None):
        image_id, finding = chosen[row]
        loaded, kind, probs, maps = maps_of(run, map_source)
        # A one-finding model (InfoMask on Pneumonia) shows its own map.
        names = list(loaded.findings)
        k = names.index(finding) if finding in names else 0
        film = films[image_id]
        hw = film.shape
        heat = _panel_map(maps[row, ..., k], hw, loaded.image_size, kind)
        pred = []
        if threshold is not None:
            pred = predict_lib.boxes_in_original(
                maps[row, ..., k],
                hw,
                loaded.image_size,
                kind,
                threshold,
                ingest_size=loaded.ingest_size,
            )
        mask = None if mask_threshold is None else heat >= mask_threshold
        _draw(
            axes,
            film,
            heat,
            255.0 if kind == "cam" else 1.0,
            gt.get(image_id, {}).get(finding, []),
            pred,
            f"{label}: {names[k]} p={probs[row, k]:.2f}",
            mask,
        )

    written = []

    def new_grid(num_columns):
        # One row per chosen film: the truth, then one panel per column.
        fig = mpl_figure.Figure(figsize=(3.0 * (1 + num_columns), 3.1 * len(chosen)))
        backend_agg.FigureCanvasAgg(fig)
        return fig, fig.subplots(len(chosen), 1 + num_columns, squeeze=False)

    def save(fig, title, name):
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(output_dir / name, dpi=90)
        written.append(name)

    columns = []
    if "lse" in settings["poolings"]:
        columns.append(("lse", "LSE CAM (>=180)", 180.0))
    if "pcam" in settings["poolings"]:
        columns.append(("pcam", "PCAM map (>=0.9)", 0.9))
    if columns:
        fig, grid = new_grid(len(columns))
        for row, (image_id, finding) in enumerate(chosen):
            truth = [b for boxes in gt.get(image_id, {}).values() for b in boxes]
            names = ", ".join(sorted(gt.get(image_id, {})))
            _draw(
                grid[row, 0], films[image_id], truth=truth, title=f"{image_id}\n{names}"
            )
            for col, (run, label, threshold) in enumerate(columns, 1):
                panel(grid[row, col], row, run, "model", label, threshold)
        save(
            fig,
            "Truth boxes green, predicted boxes blue (shown finding's boxes only)",
            _reproduce_report.FIGURE2,
        )

    columns = []
    if settings["gradcam_run"]:
        columns.append((settings["gradcam_run"], "gradcam", "GradCAM", "gradcam"))
    for variant in settings["infomask_variants"]:
        columns.append(
            (
                f"infomask_{variant}",
                "model",
                _reproduce_report.INFOMASK_TITLES[variant],
                f"infomask_{variant}",
            )
        )
    if columns:
        fig, grid = new_grid(len(columns))
        for row, (image_id, finding) in enumerate(chosen):
            _draw(
                grid[row, 0],
                films[image_id],
                truth=gt.get(image_id, {}).get(finding, []),
                title=f"{image_id}\n{finding} truth",
            )
            for col, (run, source, label, eval_name) in enumerate(columns, 1):
                mask_threshold = (
                    evaluations.get(eval_name, {}).get("mask", {}).get("threshold")
                )
                panel(grid[row, col], row, run, source, label, None, mask_threshold)
        save(
            fig,
            "Maps with the validation-chosen mask threshold (white contour)",
            _reproduce_report.INFOMASK_FIGURE,
        )
    return {"files": written, "images": [list(c) for c in chosen]}


# ---------------------------------------------------------------------------
# Main.


def _machine(load):
    import keras
    import tensorflow as tf

    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "load_start": list(load),
    }


def _command(argv):
    parts = ["python", "benchmarks/reproduce.py"] + list(argv[1:])
    return shlex.join(parts)


def main(argv):
    if not _REPORT_ONLY.value:
        cli.check_writable_dir(_OUTPUT_DIR)
        cli.check_writable_dir(_WORK_DIR)
    output_dir = pathlib.Path(_OUTPUT_DIR.value)
    # A run on real data writes its report inside --output_dir, never over
    # the repository's docs/RESULTS.md unless --results_md asks for it.
    md_path = _RESULTS_MD.value or str(
        (output_dir if _DATA_DIR.value else output_dir.parent) / "RESULTS.md"
    )
    if _REPORT_ONLY.value:
        results = json.loads((output_dir / _reproduce_report.RESULTS_JSON).read_text())
        if results["settings"].get("data_dir") and not _RESULTS_MD.value:
            md_path = str(output_dir / "RESULTS.md")
        if _RERUN_OF.value:
            results["rerun"] = _reproduce_report.rerun_summary(results, _RERUN_OF.value)
            (output_dir / _reproduce_report.RESULTS_JSON).write_text(
                json.dumps(results, indent=1, sort_keys=True)
            )
        _reproduce_report.write_report(results, md_path, output_dir)
        print(md_path)
        return
    settings = resolve_settings()
    settings["smoke"] = _SMOKE.value
    work_dir = pathlib.Path(_WORK_DIR.value).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    reuse = _REUSE.value
    start = time.time()
    started = datetime.datetime.now(datetime.timezone.utc)
    machine = _machine(os.getloadavg())
    logging.info("Settings: %s", settings)

    source = prepare_data(settings, work_dir, reuse)
    data_timings = source["timings"]
    data = data_summary(source)
    labels = labels_by_image(source["tables"]["data_entry"])
    runs = plan_runs(settings)
    evaluation_plan = plan_evaluations(settings, runs)
    # Trained models stay valid only on the very same records.
    data_reused = all(t["reused"] for t in data_timings.values())
    run_records, evaluations = {}, {}

    def results_so_far(figures, complete):
        machine["load_end"] = list(os.getloadavg())
        finished = datetime.datetime.now(datetime.timezone.utc)
        results = {
            "command": _command(sys.argv),
            "settings": settings,
            "complete": complete,
            "planned_runs": list(runs),
            "started_utc": started.strftime("%Y-%m-%d %H:%M"),
            "finished_utc": finished.strftime("%Y-%m-%d %H:%M"),
            "wall_time_s": round(time.time() - start, 1),
            "machine": machine,
            "data": data,
            "data_stages": data_timings,
            "runs": dict(run_records),
            "evaluations": dict(evaluations),
            "figures": figures,
            "noise": _reproduce_report.noise_summary(
                evaluations, settings["noise_seeds"], settings["seed"]
            ),
        }
        if _RERUN_OF.value:
            results["rerun"] = _reproduce_report.rerun_summary(results, _RERUN_OF.value)
        text = json.dumps(results, indent=1, sort_keys=True)
        (output_dir / _reproduce_report.RESULTS_JSON).write_text(text)
        # The report reads what was written, so --report_only gives the same.
        _reproduce_report.write_report(json.loads(text), md_path, output_dir)
        return results

    # The runs the papers' headline comparisons need come first, so a run cut
    # short still reports them (the tables keep the canonical order).
    stages = plan_stages(settings, runs, evaluation_plan, source, work_dir)
    failure = execute_stages(stages, work_dir, reuse and data_reused)
    for stage in stages:
        record_path = pathlib.Path(stage["dir"]) / _reproduce_stages.STAGE_RECORD
        if not record_path.is_file():
            continue
        record = json.loads(record_path.read_text())
        if stage["kind"] == "train":
            run = runs[stage["name"]]
            history = {}
            if (pathlib.Path(stage["dir"]) / "history.json").is_file():
                history = json.loads(
                    (pathlib.Path(stage["dir"]) / "history.json").read_text()
                )
            run_records[stage["name"]] = {
                **run,
                "train_wall_s": record["wall_s"],
                "reused": stage["reused"],
                "final_loss": (history.get("history", {}).get("loss") or [None])[-1],
                "config": run_config(stage["dir"]),
            }
            continue
        spec = evaluation_plan[stage["name"]]
        eval_dir = pathlib.Path(stage["dir"])
        metrics = json.loads((eval_dir / "metrics.json").read_text())
        evaluations[stage["name"]] = {
            **_reproduce_report.compact_metrics(metrics),
            "run": spec["run"],
            "map_source": spec["map_source"],
            "eval_wall_s": record["wall_s"],
            "accuracy": accuracy_per_class(eval_dir / "predictions.jsonl", labels),
        }
    if failure:
        results_so_far({"files": [], "images": []}, complete=False)
        raise RuntimeError(failure)
    figures = make_figures(settings, source, work_dir, output_dir, evaluations)
    results = results_so_far(figures, complete=True)
    print(
        json.dumps(
            {
                "results_md": md_path,
                "wall_time_s": results["wall_time_s"],
                "mean_auc": {n: e["mean_auc"] for n, e in evaluations.items()},
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    flags.mark_flag_as_required("output_dir")
    cli.run(main)
