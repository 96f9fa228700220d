"""The README's main job: synthetic data -> ingest -> train -> evaluate -> export.

`python -m cxr_tf.demo --output_dir=demo_output` runs each step's library
with the config its command would build from the same flags (so a training
flagfile means what it means to `python -m cxr_tf.train`), each in a child
process (`cxr_tf.child`). It trains PCAM and the LSE baseline of Wang et al.
with the same budget (configs/demo.flags), evaluates both on the synthetic
test split, exports the PCAM model, draws overlays for a few test films, and
prints and writes summary.json.
"""

import functools
import json
import os
import time

from absl import flags
from absl import logging

from cxr_tf import child
from cxr_tf import cli
from cxr_tf import evaluate as evaluate_cli
from cxr_tf import export as export_cli
from cxr_tf import train as train_cli
from cxr_tf import train_lib

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_OUTPUT_DIR = flags.DEFINE_string("output_dir", "demo_output", "Output directory.")
_TRAIN_FLAGFILE = flags.DEFINE_string(
    "train_flagfile",
    os.path.join(_REPO, "configs", "demo.flags"),
    "Training flagfile shared by the PCAM and LSE runs.",
)
_NUM_PATIENTS = flags.DEFINE_integer(
    "num_patients", 1200, "Synthetic patients (about 1.7 films each)."
)
_FILM_SIZE = flags.DEFINE_integer(
    "film_size",
    128,
    "Side of the synthetic films: the ingest size, so ingest does not resample "
    "and rendering is 4x cheaper than at 256.",
)
_INGEST_SIZE = flags.DEFINE_integer(
    "ingest_size",
    128,
    "Longer side of the ingested images: the training size of configs/demo.flags, "
    "so the input pipeline never resizes.",
)
_LSE_OPTIONS = flags.DEFINE_string(
    "lse_pooling_options", "", "Extra --pooling_options of the LSE run (e.g. r=10)."
)
_TRAIN_ARGS = flags.DEFINE_list(
    "train_args",
    [],
    "Extra train flags for both runs, e.g. epochs=1,steps_per_epoch=2.",
)
_NUM_OVERLAYS = flags.DEFINE_integer("num_overlays", 8, "Test films to draw.")
_EXPORT = flags.DEFINE_bool("export", True, "Export the PCAM model for serving.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic data.")
_SKIP_EXISTING = flags.DEFINE_bool(
    "skip_existing", True, "Reuse finished steps of an earlier run in output_dir."
)

SUMMARY_FILE = "summary.json"


def _shown(line):
    # Progress bars and the steps' own summaries; not TF chatter.
    return not line.startswith(("WARNING", "I0000", "E0000", "W0000"))


def _run(step, fn, config, log_dir):
    """Runs `fn(config)` in a child process, teeing output to log_dir/step.log."""
    logging.info("[%s] %s", step, config)
    print(f"\n=== {step}", flush=True)
    start = time.time()
    log_path = os.path.join(log_dir, f"{step}.log")
    if os.path.exists(log_path):
        os.remove(log_path)
    try:
        child.run(fn, config, log_path, name=f"demo step {step!r}", echo=_shown)
    except RuntimeError as e:
        raise RuntimeError(f"Demo step {step!r} failed; see {log_path}\n{e}") from e
    seconds = time.time() - start
    print(f"=== {step} done in {seconds:.0f} s", flush=True)
    return seconds


def _boxed_test_images(synthetic_dir, count):
    from cxr_tf.data import metadata

    test = set(metadata.read_image_list(os.path.join(synthetic_dir, "test_list.txt")))
    boxes = metadata.read_bbox_list(os.path.join(synthetic_dir, "BBox_List_2017.csv"))
    boxed = sorted(set(boxes["image_id"]) & test)
    return [os.path.join(synthetic_dir, "images", i) for i in boxed[:count]]


def _figures(metrics):
    """Mean test AUC and mean accuracy at IoBB > 0.5 over the boxed findings."""
    from cxr_tf.data import schema

    from cxr_tf import evaluate_lib

    # The paper's threshold of the map kind: 0.9 for PCAM, 180 for CAMs.
    kind = metrics["source"].get("map_kind")
    primary = f"{evaluate_lib.DEFAULT_BOX_THRESHOLDS[kind][0]:g}" if kind else None
    if primary not in metrics["localization"]:
        primary = next(iter(metrics["localization"]))
    loc_name, loc = primary, metrics["localization"][primary]
    per_class = loc["per_class"]
    accs = [
        per_class[f]["iobb"]["0.5"]
        for f in schema.BOXED_FINDINGS
        if f in per_class and per_class[f].get("num_gt_boxes")
    ]
    return {
        "mean_auc": metrics["classification"].get("mean_auc"),
        "box_threshold": loc_name,
        "loc_acc_iobb_0.5": sum(accs) / len(accs) if accs else None,
        "loc_acc_iobb_0.5_per_class": {
            f: per_class[f]["iobb"]["0.5"]
            for f in schema.BOXED_FINDINGS
            if f in per_class and per_class[f].get("num_gt_boxes")
        },
        "boxed_findings_evaluated": len(accs),
    }


def _train_configs(records, output_dir):
    """The PCAM and LSE `TrainConfig`s, read as `cxr_tf.train` reads the flags.

    Raises:
      cxr_tf.errors.UserError: a bad value in the flagfile or --train_args,
        before any step starts.
    """
    runs = {"pcam": [], "lse": ["--pooling=lse"]}
    if _LSE_OPTIONS.value:
        runs["lse"].append(f"--pooling_options={_LSE_OPTIONS.value}")
    extra = [f"--{a}" for a in _TRAIN_ARGS.value]
    return {
        name: train_cli.config_from_argv(
            [
                f"--flagfile={_TRAIN_FLAGFILE.value}",
                f"--data_dir={records}",
                f"--model_dir={os.path.join(output_dir, f'model_{name}')}",
                "--verbose=2",
                *args,
                *extra,
            ],
            paths=False,
        )
        for name, args in runs.items()
    }


def run_demo(output_dir):
    """Runs the whole demo; returns the summary dict."""
    # pylint: disable=import-outside-toplevel
    from cxr_tf import evaluate_lib
    from cxr_tf import predict_lib
    from cxr_tf.data import synthetic as synthetic_lib

    # pylint: enable=import-outside-toplevel

    start = time.time()
    output_dir = os.path.abspath(output_dir)
    synthetic = os.path.join(output_dir, "synthetic")
    records = os.path.join(output_dir, "records")
    train_configs = _train_configs(records, output_dir)
    logs = os.path.join(output_dir, "logs")
    os.makedirs(logs, exist_ok=True)
    timings = {}

    def finished(done):
        # `done`: the file a finished run of a step leaves; with
        # --skip_existing, a step whose file exists is not run again.
        return done and _SKIP_EXISTING.value and os.path.isfile(done)

    def stage(step, fn, config, done=None):
        if not finished(done):
            timings[step] = _run(step, fn, config, logs)

    stage(
        "synthetic",
        synthetic_lib.generate_dataset,
        synthetic_lib.SyntheticConfig(
            output_dir=synthetic,
            num_patients=_NUM_PATIENTS.value,
            image_size=_FILM_SIZE.value,
            seed=_SEED.value,
            num_workers=os.cpu_count() or 1,
        ),
        done=os.path.join(synthetic, "test_list.txt"),
    )
    if not finished(os.path.join(records, "ingest_report.json")):
        # Imports Beam and TensorFlow: only when the step runs.
        from cxr_tf.data import ingest  # pylint: disable=import-outside-toplevel

        stage(
            "ingest",
            ingest.run_ingest,
            ingest.IngestConfig(
                data_dir=synthetic,
                output_dir=records,
                image_size=_INGEST_SIZE.value,
                overwrite=True,
            ),
        )

    results, evaluated = {}, {}
    for name, config in train_configs.items():
        eval_dir = os.path.join(output_dir, f"eval_{name}")
        stage(
            f"train_{name}",
            train_lib.train,
            config,
            done=os.path.join(config.model_dir, "model.keras"),
        )
        stage(
            f"evaluate_{name}",
            evaluate_lib.evaluate,
            evaluate_cli.config_from_argv(
                [
                    f"--model_dir={config.model_dir}",
                    f"--data_dir={records}",
                    f"--output_dir={eval_dir}",
                ]
            ),
        )
        with open(os.path.join(eval_dir, "metrics.json")) as f:
            metrics = json.load(f)
        results[name] = _figures(metrics)
        evaluated[name] = metrics["source"]["model"]

    # Export and draw with the very checkpoint evaluate scored (its default,
    # the best validation epoch), and carry its metrics on the model card.
    pcam_model = evaluated["pcam"]
    results_path = os.path.join(output_dir, "eval_pcam", "metrics.json")
    if _EXPORT.value:
        stage(
            "export",
            export_cli.export,
            export_cli.config_from_argv(
                [
                    f"--model={pcam_model}",
                    f"--metrics={results_path}",
                    f"--export_dir={os.path.join(output_dir, 'export')}",
                    "--version=1",
                    "--overwrite",
                ]
            ),
        )
    films = _boxed_test_images(synthetic, _NUM_OVERLAYS.value)
    if films:
        stage(
            "overlays",
            functools.partial(predict_lib.predict, inputs=films),
            predict_lib.PredictConfig(
                model=pcam_model,
                output_dir=os.path.join(output_dir, "predictions"),
                # The films' truth, drawn next to the predicted boxes.
                bbox_list=os.path.join(synthetic, "BBox_List_2017.csv"),
            ),
        )

    pcam, lse = results["pcam"], results["lse"]
    summary = {
        "pcam": pcam,
        "lse": lse,
        "pcam_beats_lse_on_localization": (
            pcam["loc_acc_iobb_0.5"] is not None
            and lse["loc_acc_iobb_0.5"] is not None
            and pcam["loc_acc_iobb_0.5"] > lse["loc_acc_iobb_0.5"]
        ),
        "targets": {
            "pcam_mean_auc>=0.85": (pcam["mean_auc"] or 0) >= 0.85,
            "pcam_loc_acc_iobb_0.5>=0.5": (pcam["loc_acc_iobb_0.5"] or 0) >= 0.5,
        },
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "wall_seconds": round(time.time() - start, 1),
        "cpu_count": os.cpu_count(),
        "outputs": {
            "model": pcam_model,
            "metrics": os.path.join(output_dir, "eval_pcam", "metrics.json"),
            "roc": os.path.join(output_dir, "eval_pcam", "roc.png"),
            "localization_plot": os.path.join(
                output_dir, "eval_pcam", "localization_accuracy.png"
            ),
            "overlays": os.path.join(output_dir, "predictions", "overlays"),
            "export": (
                os.path.join(output_dir, "export", "1") if _EXPORT.value else None
            ),
        },
    }
    with open(os.path.join(output_dir, SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def main(argv):
    cli.reject_arguments(argv)
    cli.check_file(_TRAIN_FLAGFILE)
    cli.check_writable_dir(_OUTPUT_DIR)
    summary = run_demo(_OUTPUT_DIR.value)
    pcam, lse = summary["pcam"], summary["lse"]

    def fmt(v):
        return "n/a" if v is None else f"{v:.3f}"

    print("\n=== Demo results (synthetic test split)")
    print(f"{'':6s} {'mean AUC':>9s} {'loc acc IoBB>0.5':>17s}")
    for name, r in (("PCAM", pcam), ("LSE", lse)):
        print(f"{name:6s} {fmt(r['mean_auc']):>9s} {fmt(r['loc_acc_iobb_0.5']):>17s}")
    print(
        f"PCAM beats LSE on localization: {summary['pcam_beats_lse_on_localization']}"
    )
    print(f"Wall time: {summary['wall_seconds']:.0f} s on {summary['cpu_count']} CPUs")
    print(f"Summary: {os.path.join(os.path.abspath(_OUTPUT_DIR.value), SUMMARY_FILE)}")


if __name__ == "__main__":
    cli.run(main)
