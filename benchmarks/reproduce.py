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

Trainings and evaluations run in one worker process
(`_reproduce_stages.py`), which imports TensorFlow once.

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

import datetime
import json
import os
import pathlib
import platform
import shlex
import subprocess
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

from cxr_tf import choices  # noqa: E402 pylint: disable=g-import-not-at-top
from cxr_tf import cli  # noqa: E402 pylint: disable=g-import-not-at-top
from cxr_tf.data import schema  # noqa: E402 pylint: disable=g-import-not-at-top

sys.path.insert(0, str(ROOT / "benchmarks"))
import _reproduce_real  # noqa: E402 pylint: disable=g-import-not-at-top
import _reproduce_stages  # noqa: E402 pylint: disable=g-import-not-at-top

# From the TF-free registries (cxr_tf.choices): the one home of the names.
POOLING_NAMES = choices.POOLING_NAMES
INFOMASK_VARIANTS = choices.INFOMASK_VARIANTS
IOBB_THRESHOLDS = (0.1, 0.25, 0.5, 0.75, 0.9)
RESULTS_JSON = "results.json"
# Below this best mean AUC the report says the comparison is not informative.
NEAR_CHANCE_AUC = 0.6
FIGURE2 = "figure2.png"
INFOMASK_FIGURE = "infomask_maps.png"
ABBREVIATIONS = {
    "Atelectasis": "AT",
    "Cardiomegaly": "CM",
    "Effusion": "EF",
    "Infiltration": "IF",
    "Mass": "MS",
    "Nodule": "ND",
    "Pneumonia": "PMN",
    "Pneumothorax": "PMT",
}
POOLING_TITLES = {
    "pcam": "PCAM",
    "avg": "Average",
    "max": "Max",
    "linear": "Linear",
    "exp": "Exponential",
    "lse": "LSE",
    "lse_lba": "LSE-LBA",
    "attention": "Attention",
}
INFOMASK_TITLES = {
    "gradcam": "GradCAM",
    "featuremask": "FeatureMask",
    "regl1": "RegL1",
    "infomask": "InfoMask",
}

# The papers' own figures (ChestX-ray14 official test set), for comparison
# only: PCAM paper Tables 2 and 3, InfoMask paper Table 1.
PAPER_AUC = {
    "PCAM": (0.772, 0.864, 0.825, 0.694, 0.813, 0.783, 0.721, 0.868, 0.732, 0.833)
    + (0.931, 0.819, 0.788, 0.784),
    "LSE [Wang]": (0.700, 0.810, 0.759, 0.661, 0.693, 0.669, 0.658, 0.799, 0.703)
    + (0.805, 0.833, 0.786, 0.684, 0.872),
    "LSE-LBA": (0.733, 0.856, 0.806, 0.673, 0.777, 0.718, 0.684, 0.805, 0.711)
    + (0.806, 0.842, 0.743, 0.724, 0.775),
}
PAPER_IOBB05 = {
    "PCAM": (0.3500, 0.9657, 0.5359, 0.7642, 0.4118, 0.0759, 0.7667, 0.1939),
    "LSE [Wang]": (0.2833, 0.8767, 0.3333, 0.4227, 0.1411, 0.0126, 0.3833, 0.1836),
}
PAPER_AFP05 = {
    "PCAM": (0.867, 0.021, 1.137, 1.805, 1.000, 1.228, 1.200, 1.684),
    "LSE [Wang]": (1.020, 0.563, 0.927, 0.659, 0.694, 0.619, 1.013, 0.529),
}
# IoP, FPR, FNR, accuracy, AUC (pneumonia only).
PAPER_INFOMASK = {
    "GradCAM": (0.12, 0.196, 0.20, 0.8221, 0.8333),
    "FeatureMask": (0.19, 0.095, 0.81, 0.8236, 0.8375),
    "RegL1": (0.11, 0.010, 0.99, 0.8170, 0.8306),
    "CheXCAM": (0.34, 0.077, 0.71, 0.8400, 0.8644),
    "InfoMask": (0.44, 0.025, 0.80, 0.8248, 0.8251),
}

# Output stride of each backbone the pooling runs may use (not InfoMask's
# network, which has its own runs).
BACKBONE_STRIDES = {
    name: spec.stride for name, spec in choices.BACKBONE_REGISTRY.items() if spec.trunk
}
BACKBONE_TITLES = {
    name: choices.BACKBONE_REGISTRY[name].description for name in BACKBONE_STRIDES
}

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
    sorted(BACKBONE_STRIDES),
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
# Subprocess stages.


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def run_stage(name, argv, stage_dir, reuse):
    """Runs `python -m ...` once per distinct argument list; logs to a file.

    Args:
      name: stage name for messages.
      argv: the module and its arguments (after `python -m`).
      stage_dir: directory whose `reproduce_stage.json` records the finished
        stage (argv, wall time).
      reuse: skip the stage when the record shows the same argv finished.

    Returns:
      dict with "argv", "wall_s", "reused".

    Raises:
      RuntimeError: the subprocess failed (its log's tail is in the message).
    """
    stage_dir = pathlib.Path(stage_dir)
    record_path = stage_dir / "reproduce_stage.json"
    if reuse and record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("argv") == argv:
            logging.info("Reusing %s (%s)", name, stage_dir)
            return {**record, "reused": True}
    stage_dir.mkdir(parents=True, exist_ok=True)
    log_path = stage_dir / "reproduce_stage.log"
    command = [sys.executable, "-m"] + argv
    logging.info("Running %s: %s", name, shlex.join(command))
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run(
            command, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT
        )
    wall = time.time() - start
    if proc.returncode:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(
            f"Stage {name} failed with exit status {proc.returncode} after "
            f"{wall:.0f} s: {shlex.join(command)}\nLog {log_path} ends:\n{tail}"
        )
    record = {"argv": argv, "wall_s": round(wall, 1)}
    record_path.write_text(json.dumps(record, indent=2))
    logging.info("%s done in %.0f s", name, wall)
    return {**record, "reused": False}


def make_data(settings, work_dir, reuse):
    """Synthetic films, then TFRecords; returns (synthetic dir, records dir, timings)."""
    synthetic_dir = work_dir / "synthetic"
    records_dir = work_dir / "records"
    timings = {}
    timings["synthetic"] = run_stage(
        "synthetic data",
        [
            "cxr_tf.data.synthetic",
            f"--output_dir={synthetic_dir}",
            f"--num_patients={settings['num_patients']}",
            f"--image_size={settings['data_image_size']}",
            f"--seed={settings['seed']}",
        ],
        work_dir / "stage_synthetic",
        reuse,
    )
    timings["ingest"] = run_stage(
        "ingest",
        [
            "pipeline.ingest",
            f"--data_dir={synthetic_dir}",
            f"--output_dir={records_dir}",
            f"--image_size={settings['image_size']}",
            f"--seed={settings['seed']}",
            "--overwrite",
        ],
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
        "iobb_thresholds": list(IOBB_THRESHOLDS),
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
    log_path = work_dir / "stages.log"
    command = [sys.executable, str(ROOT / "benchmarks" / "_reproduce_stages.py"),
               str(plan_path)]
    logging.info(
        "Running %d stages in one worker (log: %s): %s",
        len(todo),
        log_path,
        ", ".join(f"{s['kind']} {s['name']}" for s in todo),
    )
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run(
            command, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT
        )
    logging.info("Stages done in %.0f s (exit status %d)", time.time() - start,
                 proc.returncode)
    if proc.returncode:
        tail = log_path.read_text(errors="replace")[-3000:]
        return (
            f"The stage worker failed with exit status {proc.returncode}: "
            f"{shlex.join(command)}\nLog {log_path} ends:\n{tail}"
        )
    return None


def run_config(model_dir):
    """The settings of a finished training that the report states."""
    path = pathlib.Path(model_dir) / "config.json"
    if not path.is_file():
        return {}
    config = json.loads(path.read_text())
    config = config.get("train", config)
    keys = ("backbone", "pooling", "image_size", "batch_size", "epochs",
            "steps_per_epoch", "learning_rate", "lr_schedule", "optimizer",
            "loss", "weights", "findings", "mixed_precision", "strategy")
    return {k: config[k] for k in keys if k in config}


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


def compact_metrics(metrics):
    """The parts of an evaluate metrics dict the report uses."""
    out = {"num_images": metrics.get("num_images"), "source": metrics.get("source")}
    cls = metrics.get("classification", {})
    out["auc"] = {f: v.get("auc") for f, v in cls.get("per_class", {}).items()}
    out["mean_auc"] = cls.get("mean_auc")
    out["localization"] = {}
    for threshold, section in metrics.get("localization", {}).items():
        out["localization"][threshold] = {
            "per_class": {
                f: {k: v[k] for k in ("iobb", "iou", "afp", "num_gt_boxes") if k in v}
                for f, v in section["per_class"].items()
            },
            "mean": section["mean"],
        }
    if "mask" in metrics:
        out["mask"] = metrics["mask"]
    return out


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
            FIGURE2,
        )

    columns = []
    if settings["gradcam_run"]:
        columns.append((settings["gradcam_run"], "gradcam", "GradCAM", "gradcam"))
    for variant in settings["infomask_variants"]:
        columns.append(
            (
                f"infomask_{variant}",
                "model",
                INFOMASK_TITLES[variant],
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
            INFOMASK_FIGURE,
        )
    return {"files": written, "images": [list(c) for c in chosen]}


# ---------------------------------------------------------------------------
# Noise.


def noise_summary(evaluations, noise_seeds, seed):
    """Differences between the PCAM runs of different training seeds."""
    names = ["pcam"] + [f"pcam_seed{s}" for s in noise_seeds]
    names = [n for n in names if n in evaluations]
    if len(names) < 2:
        return None

    def figures(e):
        loc = e["localization"].get("0.9", next(iter(e["localization"].values())))
        mask = e.get("mask", {}).get("mean", {})
        return {
            "mean_auc": e["mean_auc"],
            "mean_iobb_acc_0.5": loc["mean"]["iobb"]["0.5"],
            "mean_iobb_acc_0.1": loc["mean"]["iobb"]["0.1"],
            "mean_afp_0.5": loc["mean"]["afp"]["0.5"],
            "mean_iop": mask.get("iop"),
        }

    values = {n: figures(evaluations[n]) for n in names}
    spread = {}
    for key in values[names[0]]:
        xs = [values[n][key] for n in names if values[n][key] is not None]
        if len(xs) >= 2:
            spread[key] = {
                "range": float(max(xs) - min(xs)),
                "std": float(np.std(xs, ddof=1)),
            }
    auc_diffs = []
    for finding in schema.FINDINGS:
        xs = [evaluations[n]["auc"].get(finding) for n in names]
        if all(x is not None for x in xs):
            auc_diffs.append(max(xs) - min(xs))
    acc_diffs = []
    for finding in schema.BOXED_FINDINGS:
        xs = []
        for n in names:
            loc = evaluations[n]["localization"].get("0.9", {})
            xs.append(
                loc.get("per_class", {}).get(finding, {}).get("iobb", {}).get("0.5")
            )
        if all(x is not None for x in xs):
            acc_diffs.append(max(xs) - min(xs))
    return {
        "runs": names,
        "seeds": [seed] + list(noise_seeds),
        "values": values,
        "spread": spread,
        "per_class_auc_range": {
            "mean": float(np.mean(auc_diffs)) if auc_diffs else None,
            "max": float(np.max(auc_diffs)) if auc_diffs else None,
        },
        "per_class_iobb05_range": {
            "mean": float(np.mean(acc_diffs)) if acc_diffs else None,
            "max": float(np.max(acc_diffs)) if acc_diffs else None,
        },
    }


def rerun_summary(results, other_path):
    """Differences between this run and a same-seed rerun of the command.

    Args:
      results: this run's results dict.
      other_path: the rerun's results.json.

    Returns:
      dict with per-evaluation differences and a sentence for the report.

    Raises:
      ValueError: the rerun used other settings or another seed.
    """
    other = json.loads(pathlib.Path(other_path).read_text())
    mine, theirs = results["settings"], other["settings"]
    for key in (
        "seed",
        "num_patients",
        "data_image_size",
        "image_size",
        "batch_size",
        "steps",
        "learning_rate",
    ):
        if mine.get(key) != theirs.get(key):
            raise ValueError(
                f"{other_path} is not a rerun of these settings: {key} is "
                f"{theirs.get(key)!r} there, {mine.get(key)!r} here."
            )
    diffs = {}
    for name, e in results["evaluations"].items():
        o = other["evaluations"].get(name)
        if o is None:
            continue
        auc = [
            abs(e["auc"][f] - o["auc"][f])
            for f in e["auc"]
            if e["auc"][f] is not None and o["auc"].get(f) is not None
        ]
        loc_e, _ = _box_section(e)
        loc_o, _ = _box_section(o)
        diffs[name] = {
            "mean_auc": abs(e["mean_auc"] - o["mean_auc"]),
            "max_class_auc": max(auc) if auc else None,
            "mean_iobb_acc_0.5": abs(
                loc_e["mean"]["iobb"]["0.5"] - loc_o["mean"]["iobb"]["0.5"]
            ),
        }
    if not diffs:
        raise ValueError(f"{other_path} shares no evaluation with this run.")
    worst_auc = max(d["mean_auc"] for d in diffs.values())
    worst_acc = max(d["mean_iobb_acc_0.5"] for d in diffs.values())
    worst_class = max((d["max_class_auc"] or 0.0) for d in diffs.values())
    text = (
        "Same-seed rerun (`"
        + other["command"]
        + "`, a fresh work dir): for "
        + ", ".join(sorted(diffs))
        + f", mean AUC differs by at most {worst_auc:.4f} (any one finding's "
        f"AUC by at most {worst_class:.4f}) and mean accuracy at IoBB > 0.5 by "
        f"at most {worst_acc:.4f}"
        + (
            ": the command reproduces its numbers exactly."
            if worst_auc == 0 and worst_acc == 0 and worst_class == 0
            else ": TensorFlow's multithreaded CPU kernels are not bitwise "
            "deterministic, so a rerun lands near, not on, these numbers."
        )
    )
    return {"other": str(other_path), "differences": diffs, "text": text}


# ---------------------------------------------------------------------------
# The report.


def _fmt(value, digits=3):
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _box_section(evaluation):
    """The localization section used in the tables: the paper's threshold."""
    loc = evaluation["localization"]
    kind = evaluation["source"]["map_kind"]
    key = "0.9" if kind == "probability" else "180"
    return loc.get(key) or next(iter(loc.values())), key


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _compare(ours_a, ours_b, noise):
    """'higher' / 'lower' / 'tie within noise' for a - b against the noise."""
    if ours_a is None or ours_b is None:
        return "n/a"
    diff = ours_a - ours_b
    if diff == 0:
        return "equal"
    if noise is not None and abs(diff) <= noise:
        return f"within the seed spread ({diff:+.3f}, spread {noise:.3f})"
    return f"{'higher' if diff > 0 else 'lower'} ({diff:+.3f})"


def _test_counts(data):
    """The Data bullets' end: test boxes and test positives per finding."""
    boxes = data["test_boxes"]
    return (
        ", ".join(f"{ABBREVIATIONS[f]} {boxes[f]}" for f in schema.BOXED_FINDINGS)
        + f" ({sum(boxes.values())} in all). Test positives per finding: "
        + ", ".join(f"{f} {data['test_positives'][f]}" for f in schema.FINDINGS)
        + ".\n"
    )


def _setup_synthetic(w, s, data, backbone, map_cells):
    """The Setup bullets on data and training of a synthetic-data run."""
    written = data.get("written") or {}
    w(
        f"- **Data**: `python -m cxr_tf.data.synthetic --num_patients="
        f"{s['num_patients']} --image_size={s['data_image_size']} --seed="
        f"{s['seed']}`"
        + (
            " (the demo's data set)"
            if (s["num_patients"], s["data_image_size"]) == (1200, 128)
            else ""
        )
        + ", ingested with `python -m "
        f"pipeline.ingest --image_size={s['image_size']}`: "
        f"{written.get('train', '?')} train / {written.get('val', '?')} val / "
        f"{written.get('test', '?')} test films, split by patient. Test boxes "
        "per finding: "
        + _test_counts(data)
    )
    n_train = max(written.get("train", 1), 1)
    # Results written before the InfoMask budget existed used one budget.
    im_steps = s.get("infomask_steps", s["steps"])
    im_batch = s.get("infomask_batch_size", s["batch_size"])
    w(
        f"- **Training** (every pooling run): {s['steps']} steps of batch "
        f"{s['batch_size']} ({s['steps'] * s['batch_size'] / n_train:.1f} "
        f"epochs); InfoMask-network runs: {im_steps} steps of batch {im_batch} "
        f"({im_steps * im_batch / n_train:.1f} epochs"
        + (
            "; a smaller budget because that network keeps 64 filters at full "
            "resolution, ~10x the compact trunk's cost per film"
            if im_steps * im_batch < s["steps"] * s["batch_size"]
            else ""
        )
        + f"). Every run: {s['image_size']} px input, Adam lr {s['learning_rate']:g} "
        "with cosine decay to 0, batch-balanced BCE (Wang et al.), no "
        "augmentation (as configs/demo.flags), "
        "random initialisation (no ImageNet weights), all 14 findings. Poolings "
        f"on the {BACKBONE_TITLES[backbone]} (feature map {map_cells}x{map_cells}"
        + ("; configs/demo.flags' backbone" if backbone == "compact" else "")
        + "); InfoMask "
        "variants on "
        f"the InfoMask paper's network (map {s['image_size'] // 4}x"
        f"{s['image_size'] // 4}). The papers: ResNet-34 at 1024 px, batch 36, "
        "10 epochs of ~78k films (PCAM); InfoMask on ~20k films.\n"
    )


def _setup_real(w, results):
    """The Setup bullets of a run on ChestX-ray14: tables, split, each run's config."""
    s, data = results["settings"], results["data"]
    written = data.get("written") or {}
    tables = ", ".join(
        f"{k} `{os.path.basename(v)}`" for k, v in data["tables"].items() if v
    )
    w(
        f"- **Data**: ChestX-ray14 at `{s['data_dir']}` ({tables}), ingested by "
        "`cxr_tf.data.ingest` (the official train_val / test lists; validation "
        f"drawn by patient from train_val with seed {s['seed']}): "
        f"{written.get('train', 0)} train / {written.get('val', 0)} val / "
        f"{written.get('test', 0)} test films. Test boxes (NIH, BBox_List) per "
        "finding: "
        + _test_counts(data)
    )
    for note in data.get("notes", []):
        w(f"- {note}\n")
    absent = missing_findings(data)
    if absent:
        w(f"- **n/a below**: {absent}\n")
    rows = []
    for name, run in results["runs"].items():
        c = run.get("config", {})
        steps = c.get("steps_per_epoch")
        rows.append(
            [
                name,
                os.path.basename(str(_reproduce_real.flagfile_of(run))),
                c.get("backbone", run["backbone"]),
                c.get("image_size", ""),
                c.get("batch_size", ""),
                f"{c.get('epochs', '')} x {steps} steps" if steps else
                f"{c.get('epochs', '')} epochs",
                c.get("learning_rate", ""),
                ",".join(c.get("findings", [])) if len(c.get("findings", [])) < 14
                else "all 14",
            ]
        )
    w(
        "- **Training**: each method from its paper's checked-in flagfile "
        "(`configs/`), with the data, model folder and seed set"
        + (
            "; `--smoke` also sets a tiny input, a few steps, the compact trunk "
            "for the poolings, one device and no XLA"
            if s.get("smoke")
            else ""
        )
        + ". As trained (from each model's config.json):\n"
    )
    w(
        _table(
            ["run", "flagfile", "backbone", "px", "batch", "budget", "lr",
             "findings"],
            rows,
        )
        + "\n"
    )


def missing_findings(data):
    """A sentence naming findings without test positives or boxes ("" if none)."""
    no_pos = [f for f in schema.FINDINGS if not data["test_positives"].get(f)]
    no_box = [f for f in schema.BOXED_FINDINGS if not data["test_boxes"].get(f)]
    parts = []
    if no_pos:
        parts.append(
            "no positive test film for " + ", ".join(no_pos) + " (AUC undefined)"
        )
    if no_box:
        parts.append(
            "no test box for " + ", ".join(no_box) + " (localization undefined)"
        )
    return "; ".join(parts) + "." if parts else ""


def write_report(results, md_path, output_dir):
    """Writes RESULTS.md from the results dict."""
    s = results["settings"]
    ev = results["evaluations"]
    poolings = [p for p in s["poolings"] if p in ev]
    # Results written before --backbone existed trained ResNet-34.
    backbone = s.get("backbone", "resnet34")
    real = results["data"].get("kind") == "chestxray14"
    image_size = s["image_size"] or next(
        (
            r["config"]["image_size"]
            for r in results["runs"].values()
            if r["backbone"] != "infomask" and r.get("config", {}).get("image_size")
        ),
        1024,
    )
    map_cells = image_size // BACKBONE_STRIDES[backbone]
    rel = os.path.relpath(output_dir, os.path.dirname(os.path.abspath(md_path)))
    noise = results.get("noise")
    spread = (noise or {}).get("spread", {})
    auc_noise = (spread.get("mean_auc") or {}).get("range")
    acc_noise = (spread.get("mean_iobb_acc_0.5") or {}).get("range")
    afp_noise = (spread.get("mean_afp_0.5") or {}).get("range")
    iop_noise = (spread.get("mean_iop") or {}).get("range")
    data = results["data"]
    out = []
    w = out.append
    w(
        "# Reproducing the papers' comparisons on "
        + ("ChestX-ray14 (real films)\n" if real else "synthetic films\n")
    )
    w(
        "Generated by `benchmarks/reproduce.py`; do not edit by hand. Every "
        "number below comes from `"
        + rel
        + "/"
        + RESULTS_JSON
        + "`, written by the same run.\n"
    )
    if not results.get("complete", True):
        done = sorted(results["runs"])
        missing = [n for n in results.get("planned_runs", []) if n not in done]
        w(
            f"**Partial results: {len(done)} of {len(done) + len(missing)} "
            "trainings finished when this was written; missing: "
            + (", ".join(missing) or "none (figures pending)")
            + ".**\n"
        )
    if s.get("smoke"):
        w(
            "**This is a `--smoke` run (a few steps on tiny data): the numbers "
            "test the script, they mean nothing.**\n"
        )
    w("## Command, seed, time\n")
    w("```\n" + results["command"] + "\n```\n")
    machine = results["machine"]
    w(
        f"- Data seed = split seed = training seed = **{s['seed']}**; PCAM also "
        f"with training seed(s) {s['noise_seeds'] or 'none'} for the noise "
        "estimate (same data).\n"
        f"- Wall time: **{results['wall_time_s'] / 60:.1f} min** in all "
        f"({results['started_utc']} to {results['finished_utc']} UTC) on "
        f"{machine['cpu_count']} CPU cores, TensorFlow {machine['tensorflow']}, "
        f"Keras {machine['keras']}. Load average (1 min) at start "
        f"{machine['load_start'][0]:.1f}, at end {machine['load_end'][0]:.1f}"
        + (
            ": **the machine was shared with other jobs, so the times are "
            "inflated**; the metrics do not depend on load."
            if max(machine["load_start"][0], machine["load_end"][0])
            > machine["cpu_count"] + 0.5
            else "."
        )
        + "\n"
    )
    timing_rows = []
    order = [n for n in results.get("planned_runs", []) if n in results["runs"]]
    for name in order + sorted(set(results["runs"]) - set(order)):
        run = results["runs"][name]
        e = results["evaluations"].get(name, {})
        timing_rows.append(
            [
                name,
                run["backbone"],
                run.get("variant") or run["pooling"],
                run["seed"],
                _fmt(run["train_wall_s"], 0) + (" (reused)" if run["reused"] else ""),
                _fmt(e.get("eval_wall_s"), 0),
            ]
        )
    if "gradcam" in ev:
        timing_rows.append(
            [
                "gradcam",
                "(of " + ev["gradcam"]["run"] + ")",
                "Grad-CAM",
                "",
                "",
                _fmt(ev["gradcam"]["eval_wall_s"], 0),
            ]
        )
    stages = results.get("data_stages", {})
    if stages:
        w(
            "- Data stages: "
            + ", ".join(
                f"{name} {_fmt(st.get('wall_s'), 0)} s"
                + (
                    " (reused from an earlier invocation, not in the total)"
                    if st.get("reused")
                    else ""
                )
                for name, st in stages.items()
            )
            + ".\n"
        )
    w("<details><summary>Per-run wall times (s)</summary>\n")
    w(_table(["run", "backbone", "head", "seed", "train", "evaluate"], timing_rows))
    w("\n</details>\n")

    w("## Setup\n")
    written = data.get("written") or {}
    boxes = data["test_boxes"]
    # Results written before the InfoMask budget existed used one budget.
    im_steps = s.get("infomask_steps", s["steps"])
    if data.get("kind") == "chestxray14":
        _setup_real(w, results)
    else:
        _setup_synthetic(w, s, data, backbone, map_cells)
    w(
        "- **Evaluation** (`python -m cxr_tf.evaluate --checkpoint=final "
        "--split=test --val_split=val`): AUROC per finding on the test split; "
        "boxes from the PCAM probability map at 0.9, from the CAM of the "
        "other poolings normalised per image to [0, 255] at 180 (the papers' "
        "thresholds); a truth box is localized when a predicted box of its "
        "finding has IoBB > T. **AFP** (average false positives; the papers "
        "give no formula): predicted boxes of the finding on the films with a "
        "truth box of that finding whose IoBB with every truth box is <= T, "
        "per such film. InfoMask's IoP / FPR / FNR are pixelwise on the map "
        "thresholded at the value that minimises (FPR + FNR) / 2 on the "
        "validation split (per run), averaged over test (film, finding) pairs "
        "with a truth box.\n"
    )

    # Table 2.
    w("## Classification: AUROC per finding (cf. PCAM paper, Table 2)\n")
    header = (
        ["Finding"]
        + [POOLING_TITLES[p] for p in poolings]
        + [f"paper: {m}" for m in PAPER_AUC]
    )
    rows = []
    for k, finding in enumerate(schema.FINDINGS):
        ours = [ev[p]["auc"].get(finding) for p in poolings]
        best = max((v for v in ours if v is not None), default=None)
        cells = [
            (f"**{_fmt(v)}**" if v is not None and v == best else _fmt(v)) for v in ours
        ]
        rows.append([finding] + cells + [_fmt(PAPER_AUC[m][k]) for m in PAPER_AUC])
    rows.append(
        ["**mean**"]
        + [_fmt(ev[p]["mean_auc"]) for p in poolings]
        + [_fmt(float(np.mean(PAPER_AUC[m]))) for m in PAPER_AUC]
    )
    w(_table(header, rows) + "\n")

    # Table 3.
    w(
        "## Localization: accuracy and average false positives at IoBB > 0.5 "
        "(cf. PCAM paper, Table 3)\n"
    )
    header = ["Method"] + [ABBREVIATIONS[f] for f in schema.BOXED_FINDINGS] + ["mean"]

    def loc_rows(metric, t, paper=None):
        rows = []
        for p in poolings:
            section, key = _box_section(ev[p])
            values = [
                section["per_class"].get(f, {}).get(metric, {}).get(t)
                for f in schema.BOXED_FINDINGS
            ]
            rows.append(
                [f"{POOLING_TITLES[p]} (map >= {key})"]
                + [_fmt(v) for v in values]
                + [_fmt(_mean(values))]
            )
        for name, values in (paper or {}).items():
            rows.append(
                [f"paper: {name}"]
                + [_fmt(v) for v in values]
                + [_fmt(float(np.mean(values)))]
            )
        return rows

    w("**Localization accuracy, IoBB > 0.5**\n")
    w(_table(header, loc_rows("iobb", "0.5", PAPER_IOBB05)) + "\n")
    w("**Average false positives, IoBB > 0.5**\n")
    w(_table(header, loc_rows("afp", "0.5", PAPER_AFP05)) + "\n")
    for t in ("0.1", "0.25", "0.75", "0.9"):
        w(f"**Localization accuracy, IoBB > {t}**\n")
        w(_table(header, loc_rows("iobb", t)) + "\n")
        w(f"<details><summary>Average false positives, IoBB > {t}</summary>\n")
        w(_table(header, loc_rows("afp", t)) + "\n\n</details>\n")
    w("**Localization accuracy, IoU > T (mean over the 8 findings)**\n")
    rows = []
    for p in poolings:
        section, key = _box_section(ev[p])
        rows.append(
            [f"{POOLING_TITLES[p]} (map >= {key})"]
            + [_fmt(section["mean"]["iou"].get(f"{t:g}")) for t in IOBB_THRESHOLDS]
        )
    w(_table(["Method"] + [f"T={t:g}" for t in IOBB_THRESHOLDS], rows) + "\n")

    # InfoMask Table 1.
    im_methods = [
        m
        for m in ("gradcam", "featuremask", "regl1", "infomask")
        if (m if m == "gradcam" else f"infomask_{m}") in ev
    ]
    if im_methods:
        w(
            "## InfoMask comparison: IoP, FPR, FNR, accuracy, AUC (cf. InfoMask "
            "paper, Table 1)\n"
        )
        gradcam_of = ev.get("gradcam", {}).get("run")
        w(
            "GradCAM = Grad-CAM of the plain "
            + (
                POOLING_TITLES.get(gradcam_of, str(gradcam_of))
                + f"-pooling run on the {BACKBONE_TITLES[backbone]}"
            )
            + " (a CAM classifier like the paper's CheXCAM rather than the "
            "InfoMask network without mask); FeatureMask, RegL1 and InfoMask are "
            "the InfoMask network with the respective mask. "
            + (
                "The InfoMask network is trained on Pneumonia alone "
                "(configs/infomask.flags, as the paper), GradCAM's classifier on "
                f"the 14 findings; pneumonia has {boxes.get('Pneumonia', 0)} test "
                "boxes here, and the table is "
                if real
                else "All are trained on the 14 findings (pneumonia alone has only "
                f"{boxes.get('Pneumonia', 0)} test boxes here), and the table is "
            )
            + "given for **Pneumonia** (the paper's finding) and as the **mean "
            "over the 8 boxed findings**. The InfoMask mask is one map for all "
            "findings (class-agnostic), so against one finding's boxes it also "
            "pays for the other findings' lesions it covers; Grad-CAM maps are "
            "per finding. Accuracy: probability >= 0.5 (the balanced loss "
            "leaves probabilities uncalibrated). ± is the standard error over "
            "the test films; n/a for IoP means the thresholded map was empty "
            "on every film (IoP undefined).\n"
        )
        header = ["Method", "IoP", "FPR", "FNR", "Acc.", "AUC", "threshold"]
        for scope in ("Pneumonia", "mean"):
            rows = []
            for m in im_methods:
                e = ev[m if m == "gradcam" else f"infomask_{m}"]
                mask = e.get("mask", {})
                if scope == "mean":
                    values = [
                        mask.get("mean", {}).get(k) for k in ("iop", "fpr", "fnr")
                    ]
                    acc = _mean([e["accuracy"].get(f) for f in schema.BOXED_FINDINGS])
                    auc = _mean([e["auc"].get(f) for f in schema.BOXED_FINDINGS])
                    cells = [_fmt(v) for v in values]
                else:
                    pc = mask.get("per_class", {}).get(scope, {})
                    cells = [
                        _fmt(pc.get(k))
                        + (
                            f" ± {pc[k + '_sem']:.3f}"
                            if pc.get(k + "_sem") is not None
                            else ""
                        )
                        for k in ("iop", "fpr", "fnr")
                    ]
                    acc = e["accuracy"].get(scope)
                    auc = e["auc"].get(scope)
                rows.append(
                    [INFOMASK_TITLES[m]]
                    + cells
                    + [_fmt(acc), _fmt(auc), _fmt(mask.get("threshold"), 2)]
                )
            if scope == "Pneumonia":
                for name, values in PAPER_INFOMASK.items():
                    rows.append(
                        [f"paper: {name}"] + [_fmt(v, 3) for v in values] + [""]
                    )
            title = (
                "**Pneumonia**"
                if scope == "Pneumonia"
                else "**Mean over the 8 boxed findings**"
            )
            w(title + "\n")
            w(_table(header, rows) + "\n")

    # Figures.
    figures = results.get("figures") or {}
    if figures.get("files"):
        w("## Figures\n")
        images = ", ".join(f"{i} ({f})" for i, f in figures["images"])
        w(
            "The same test films in both (the first film by id with a box of "
            f"each boxed finding, in canonical order): {images}. Green: truth "
            "boxes; blue: predicted boxes of the shown finding.\n"
        )
        if FIGURE2 in figures["files"]:
            w(
                "PCAM paper, Figure 2 layout: film with truth boxes, LSE class "
                "activation map (normalised to [0, 255], boxes at 180), PCAM "
                "probability map (boxes at 0.9).\n"
            )
            w(f"![Figure 2 layout]({rel}/{FIGURE2})\n")
        if INFOMASK_FIGURE in figures["files"]:
            w(
                "InfoMask paper, Figure 3 layout: Grad-CAM and the three masks "
                "(class-agnostic), with the validation-chosen threshold as a "
                "white contour.\n"
            )
            w(f"![InfoMask maps]({rel}/{INFOMASK_FIGURE})\n")

    # Noise.
    w("## Run-to-run noise\n")
    if noise:
        v = noise["values"]
        rows = [
            [n, sd]
            + [
                _fmt(v[n][k])
                for k in (
                    "mean_auc",
                    "mean_iobb_acc_0.5",
                    "mean_iobb_acc_0.1",
                    "mean_afp_0.5",
                    "mean_iop",
                )
            ]
            for n, sd in zip(noise["runs"], noise["seeds"])
        ]
        w(
            "PCAM trained with different training seeds on the same data and "
            "budget (the data seed fixed):\n"
        )
        w(
            _table(
                [
                    "run",
                    "training seed",
                    "mean AUC",
                    "mean acc IoBB>0.5",
                    "mean acc IoBB>0.1",
                    "mean AFP 0.5",
                    "mean IoP",
                ],
                rows,
            )
            + "\n"
        )
        w(
            f"Spread (max - min) between seeds: mean AUC {_fmt(auc_noise)}, mean "
            f"accuracy at IoBB > 0.5 {_fmt(acc_noise)}, mean AFP {_fmt(afp_noise)}, "
            f"mean IoP {_fmt(iop_noise)}; per finding, AUC differs by "
            f"{_fmt(noise['per_class_auc_range']['mean'])} on average (at most "
            f"{_fmt(noise['per_class_auc_range']['max'])}) and accuracy at IoBB > "
            f"0.5 by {_fmt(noise['per_class_iobb05_range']['mean'])} (at most "
            f"{_fmt(noise['per_class_iobb05_range']['max'])}). Differences between "
            "methods smaller than these are not resolved by this run, and a rerun "
            "of the command with the same seed is expected to land within them "
            f"(see `{rel}/{RESULTS_JSON}` `rerun` when present).\n"
        )
    else:
        w("No noise seeds were run (`--noise_seeds`).\n")
    rerun = results.get("rerun")
    if rerun:
        w(rerun["text"] + "\n")

    # Agreement.
    w("## Where we agree with the papers, and where not\n")
    lines = agreement_lines(results, auc_noise, acc_noise, afp_noise, iop_noise)
    w("\n".join(f"- {line}" for line in lines) + "\n")
    if real:
        total = sum(v for v in written.values() if isinstance(v, int))
        w(
            "Why results may differ from the papers: this run used "
            f"{total} films"
            + (" (a subset of the ~112k)" if total < 100000 else "")
            + ", the validation split is drawn by patient (the PCAM paper split "
            "train_val randomly 75/25), every method is trained once per seed, "
            "and the box thresholds are the papers' (0.9, 180) except the "
            "InfoMask masks', chosen on validation, which has no box in the "
            "official split (all NIH boxes are on test films), so those fall "
            "back to the map kind's default (see each evaluation's "
            "`threshold_source` in results.json). The paper's LSE row is Wang et "
            "al.'s number (ResNet-50, their thresholds), not a rerun.\n"
        )
    else:
        w(
            "Why results may differ from the papers: the films are synthetic "
            "(procedural lesions with their own contrast and sizes, not "
            "radiologists' findings), there are "
            f"{sum(v for v in written.values() if isinstance(v, int)) or 'a few thousand'} "
            "of them instead of ~112k, every network trains from scratch for "
            f"{s['steps']} steps (the InfoMask network {im_steps}; the papers: 10 "
            "epochs of ChestX-ray14), and the "
            f"input is {s['image_size']} px instead of 1024, so the "
            f"map of the {BACKBONE_TITLES[backbone]} is {map_cells}x{map_cells}: one cell spans "
            f"{1024 // map_cells} px of a 1024 film"
            + (
                ", larger than a nodule or a small mass, which caps IoBB for small "
                "findings"
                if 1024 // map_cells > 60
                else " (the paper's ResNet-34 at 1024 px: 32 px)"
            )
            + ". The "
            "test split has only a handful of boxes per finding, so one box moves "
            "a finding's accuracy by 1/n. The paper's LSE row is Wang et al.'s "
            "number (ResNet-50, their thresholds), not a rerun.\n"
        )
    kept = _hand_collected_section(md_path)
    pathlib.Path(md_path).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(md_path).write_text("\n".join(out) + kept)


# RESULTS.md ends with measurements taken outside this script; rewriting the
# report keeps everything from this marker on.
HAND_COLLECTED_MARKER = "<!-- hand-collected:"


def _hand_collected_section(md_path):
    """The hand-collected tail of an existing report ("" when there is none)."""
    try:
        text = pathlib.Path(md_path).read_text()
    except FileNotFoundError:
        return ""
    start = text.find(HAND_COLLECTED_MARKER)
    return "" if start < 0 else "\n" + text[start:]


def _paper_wins(a, b, table=None):
    """On how many findings the paper's method a scores above method b."""
    table = PAPER_AUC if table is None else table
    return int(sum(x > y for x, y in zip(table[a], table[b])))


def agreement_lines(results, auc_noise, acc_noise, afp_noise, iop_noise):
    """Plain statements comparing our ordering of methods with the papers'."""
    ev = results["evaluations"]
    lines = []
    aucs = [
        ev[p]["mean_auc"]
        for p in results["settings"]["poolings"]
        if p in ev and ev[p]["mean_auc"] is not None
    ]
    if aucs and max(aucs) < NEAR_CHANCE_AUC:
        lines.append(
            f"**At this budget every pooling classifies near chance** (mean AUC "
            f"{min(aucs):.3f} to {max(aucs):.3f}, all below {NEAR_CHANCE_AUC}; "
            "chance is 0.5): the networks have not learned the findings yet, so "
            "the orderings below are not evidence for or against the papers. "
            "configs/demo.flags trains ~740 steps of the same setup to a mean "
            "AUC near 0.95 on these films; rerun with a larger `--steps`."
        )
    masks = [
        (name, ev[name]["mean_auc"])
        for name in ev
        if name.startswith("infomask_") and ev[name]["mean_auc"] is not None
    ]
    if masks and max(auc for _, auc in masks) < NEAR_CHANCE_AUC:
        lines.append(
            "**The InfoMask network did not leave chance on its budget** (mean AUC: "
            + ", ".join(f"{n[len('infomask_'):]} {auc:.3f}" for n, auc in masks)
            + "): its masks and their IoP / FPR / FNR below describe an "
            "untrained network, not the method. It has no normalisation "
            "layers and trains from scratch; it needs a longer budget "
            "(`--infomask_steps`) than this run could give it."
        )
    if "pcam" in ev:
        ranked = sorted(
            (p for p in results["settings"]["poolings"] if p in ev),
            key=lambda p: -(ev[p]["mean_auc"] or -1),
        )
        rank = ranked.index("pcam") + 1
        lines.append(
            f"Classification: PCAM's mean AUC ({_fmt(ev['pcam']['mean_auc'])}) "
            f"ranks {rank} of {len(ranked)} poolings (best: "
            f"{POOLING_TITLES[ranked[0]]}, {_fmt(ev[ranked[0]]['mean_auc'])}). "
            "The paper reports PCAM above Wang et al.'s LSE on "
            f"{_paper_wins('PCAM', 'LSE [Wang]')} of 14 findings and above "
            f"LSE-LBA on {_paper_wins('PCAM', 'LSE-LBA')} of 14 (means: "
            + ", ".join(f"{m} {np.mean(PAPER_AUC[m]):.3f}" for m in PAPER_AUC)
            + ")."
            + (
                f" Ours vs LSE: {_compare(ev['pcam']['mean_auc'], ev['lse']['mean_auc'], auc_noise)}."
                if "lse" in ev
                else ""
            )
        )
    if "pcam" in ev and "lse" in ev:
        pc, _ = _box_section(ev["pcam"])
        ls, _ = _box_section(ev["lse"])
        wins, ties, n = 0, 0, 0
        afp_higher = 0
        for f in schema.BOXED_FINDINGS:
            a = pc["per_class"].get(f, {}).get("iobb", {}).get("0.5")
            b = ls["per_class"].get(f, {}).get("iobb", {}).get("0.5")
            if a is None or b is None:
                continue
            n += 1
            wins += a > b
            ties += a == b
            fa = pc["per_class"][f]["afp"]["0.5"]
            fb = ls["per_class"][f]["afp"]["0.5"]
            afp_higher += fa > fb
        lines.append(
            "Localization at IoBB > 0.5: the paper has PCAM above the LSE "
            f"baseline on {_paper_wins('PCAM', 'LSE [Wang]', PAPER_IOBB05)} of 8 "
            f"findings (mean {np.mean(PAPER_IOBB05['PCAM']):.3f} vs "
            f"{np.mean(PAPER_IOBB05['LSE [Wang]']):.3f}). Ours: PCAM above "
            f"LSE on {wins} of {n} findings ({ties} ties); mean accuracy "
            f"{_fmt(pc['mean']['iobb']['0.5'])} vs {_fmt(ls['mean']['iobb']['0.5'])}, "
            f"PCAM {_compare(pc['mean']['iobb']['0.5'], ls['mean']['iobb']['0.5'], acc_noise)}."
        )
        lines.append(
            "Average false positives at IoBB > 0.5: the paper has PCAM's AFP "
            f"above LSE's on {_paper_wins('PCAM', 'LSE [Wang]', PAPER_AFP05)} of 8 "
            "findings (it notes that PCAM's maps enlarge regions). Ours: "
            f"above on {afp_higher} of {n}; mean "
            f"{_fmt(pc['mean']['afp']['0.5'])} vs {_fmt(ls['mean']['afp']['0.5'])}, "
            f"PCAM {_compare(pc['mean']['afp']['0.5'], ls['mean']['afp']['0.5'], afp_noise)}."
        )
        best = max(
            (p for p in results["settings"]["poolings"] if p in ev),
            key=lambda p: _box_section(ev[p])[0]["mean"]["iobb"]["0.5"] or -1,
        )
        lines.append(
            "Best mean localization accuracy at IoBB > 0.5 among our poolings: "
            f"{POOLING_TITLES[best]} "
            f"({_fmt(_box_section(ev[best])[0]['mean']['iobb']['0.5'])})."
        )
    if "infomask_infomask" in ev and "gradcam" in ev:
        im = ev["infomask_infomask"].get("mask", {}).get("mean", {})
        gc = ev["gradcam"].get("mask", {}).get("mean", {})
        lines.append(
            "InfoMask vs GradCAM (mean over boxed findings): the paper has "
            "InfoMask's IoP far above GradCAM's (.44 vs .12) and its FPR far "
            f"lower (.025 vs .196). Ours: IoP {_fmt(im.get('iop'))} vs "
            f"{_fmt(gc.get('iop'))} (InfoMask "
            f"{_compare(im.get('iop'), gc.get('iop'), iop_noise)}), FPR "
            f"{_fmt(im.get('fpr'))} vs {_fmt(gc.get('fpr'))}, FNR "
            f"{_fmt(im.get('fnr'))} vs {_fmt(gc.get('fnr'))} (paper .80 vs .20)."
        )
    others = [m for m in ("featuremask", "regl1") if f"infomask_{m}" in ev]
    if "infomask_infomask" in ev and others:
        im = ev["infomask_infomask"].get("mask", {}).get("mean", {})
        parts = []
        for m in others:
            o = ev[f"infomask_{m}"].get("mask", {}).get("mean", {})
            parts.append(
                f"{INFOMASK_TITLES[m]} IoP {_fmt(o.get('iop'))} "
                f"(InfoMask {_compare(im.get('iop'), o.get('iop'), iop_noise)})"
            )
        lines.append(
            "InfoMask vs its ablations: the paper has InfoMask's IoP above "
            "FeatureMask's (.19) and RegL1's (.11). Ours: " + "; ".join(parts) + "."
        )
    if "pcam" in ev:
        lines.append(
            "Absolute levels: our mean AUC and accuracies are not comparable "
            "with the papers' (different data); only the orderings are."
        )
    return lines


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
        results = json.loads((output_dir / RESULTS_JSON).read_text())
        if results["settings"].get("data_dir") and not _RESULTS_MD.value:
            md_path = str(output_dir / "RESULTS.md")
        if _RERUN_OF.value:
            results["rerun"] = rerun_summary(results, _RERUN_OF.value)
            (output_dir / RESULTS_JSON).write_text(
                json.dumps(results, indent=1, sort_keys=True)
            )
        write_report(results, md_path, output_dir)
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
            "noise": noise_summary(
                evaluations, settings["noise_seeds"], settings["seed"]
            ),
        }
        if _RERUN_OF.value:
            results["rerun"] = rerun_summary(results, _RERUN_OF.value)
        text = json.dumps(results, indent=1, sort_keys=True)
        (output_dir / RESULTS_JSON).write_text(text)
        # The report reads what was written, so --report_only gives the same.
        write_report(json.loads(text), md_path, output_dir)
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
            **compact_metrics(metrics),
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
