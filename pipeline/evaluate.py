"""Evaluator: evaluates the trained model, then blesses it or says why not.

A model is blessed when it clears the absolute thresholds (mean AUC, mean
localization accuracy at IoBB > 0.5 over the boxed findings) and is not worse
than the model pushed last.

    python -m pipeline.evaluate --model_dir=M --examples_dir=T --output_dir=E
"""

import json
import pathlib

from absl import flags

from cxr_tf import child
from cxr_tf import cli
from cxr_tf import evaluate as evaluate_cli

from pipeline import base

BLESSING_FILE = "blessing.json"


def summarize(metrics):
    """The two figures a blessing compares, from an evaluation's metrics.json.

    Args:
      metrics: the parsed metrics.json of `cxr_tf.evaluate`.

    Returns:
      dict with `mean_auc` and `localization_accuracy` (mean over the boxed
      findings that have ground truth of accuracy at IoBB > 0.5), each a
      float or None when the data could not measure it.
    """
    classification = metrics.get("classification", {})
    sections = metrics.get("localization", {})
    accuracy = None
    if sections:
        # The first section is the map threshold the model's boxes use by
        # default (0.9 for probability maps, 180 for CAMs).
        first = next(iter(sections.values()))
        if first.get("num_classes_with_boxes"):
            accuracy = first["mean"]["iobb"].get("0.5")
    return {
        "mean_auc": classification.get("mean_auc"),
        "localization_accuracy": accuracy,
    }


def bless(candidate, baseline, min_mean_auc, min_localization_accuracy, tolerance=0.0):
    """Decides whether `candidate` may replace `baseline`.

    Args:
      candidate: `summarize` of the new model.
      baseline: `summarize` of the last pushed model, or None.
      min_mean_auc: absolute floor for the mean AUC.
      min_localization_accuracy: absolute floor for the localization accuracy.
      tolerance: how much worse than the baseline a figure may be.

    Returns:
      dict {"blessed": bool, "reasons": [str], "candidate", "baseline"}.
    """
    reasons = []
    for key, floor in (
        ("mean_auc", min_mean_auc),
        ("localization_accuracy", min_localization_accuracy),
    ):
        value = candidate.get(key)
        if floor is None:
            continue
        if value is None:
            reasons.append(f"{key} could not be measured (need >= {floor})")
        elif value < floor:
            reasons.append(f"{key} {value:.4f} is below the threshold {floor:.4f}")
    if baseline:
        for key in ("mean_auc", "localization_accuracy"):
            new, old = candidate.get(key), baseline.get(key)
            if new is not None and old is not None and new < old - tolerance:
                reasons.append(
                    f"{key} {new:.4f} is worse than the pushed model's {old:.4f} "
                    f"(version {baseline.get('version')}, tolerance {tolerance})"
                )
    return {
        "blessed": not reasons,
        "reasons": reasons or ["clears every threshold and the pushed model"],
        "candidate": candidate,
        "baseline": baseline,
    }


def last_pushed(pipeline_root):
    """The summary of the newest pushed model whose version still exists, or None."""
    best = None
    for path in pathlib.Path(pipeline_root).glob(f"push/*/{base.RECORD_FILE}"):
        record = json.loads(path.read_text(encoding="utf-8"))
        out = record.get("outputs", {})
        if record.get("status") != "succeeded" or not out.get("pushed"):
            continue
        if not pathlib.Path(out["version_dir"]).is_dir():
            continue
        if best is None or record["end_time"] > best["end_time"]:
            best = record
    if best is None:
        return None
    return dict(best["outputs"]["summary"], version=best["outputs"]["version"])


def run_evaluate(
    output_dir,
    model,
    examples,
    pipeline_root,
    min_mean_auc=None,
    min_localization_accuracy=None,
    tolerance=0.0,
    extra_args=(),
):
    """Evaluates the model on the test split in a child process; writes a blessing.

    Args:
      output_dir: the step's folder.
      model: the train artifact (or model dir).
      examples: the ingest artifact (or TFRecord folder).
      pipeline_root: where earlier push records are found.
      min_mean_auc, min_localization_accuracy: absolute floors (None: no floor).
      tolerance: allowed drop against the pushed model.
      extra_args: more `--flag=value` strings of `cxr_tf.evaluate` (read
        here, by that command's own flag code, into its `EvalConfig`).

    Returns:
      dict with `metrics`, `blessing` (paths), `blessed` and `summary`.
    """
    model_dir = getattr(model, "uri", model)
    examples_dir = getattr(examples, "uri", examples)
    eval_dir = pathlib.Path(output_dir) / "evaluation"
    config = evaluate_cli.config_from_argv(
        [
            f"--model_dir={model_dir}",
            f"--data_dir={examples_dir}",
            f"--output_dir={eval_dir}",
            *extra_args,
        ]
    )
    from cxr_tf import evaluate_lib  # pylint: disable=import-outside-toplevel

    child.run(
        evaluate_lib.evaluate,
        config,
        log_path=pathlib.Path(output_dir) / "evaluate.log",
        name="evaluation",
    )
    metrics_path = eval_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    summary = summarize(metrics)
    blessing = bless(
        summary,
        last_pushed(pipeline_root),
        min_mean_auc,
        min_localization_accuracy,
        tolerance,
    )
    # Push exports the model these metrics name (metrics["source"]["model"]).
    blessing["metrics"] = str(metrics_path)
    blessing_path = pathlib.Path(output_dir) / BLESSING_FILE
    blessing_path.write_text(json.dumps(blessing, indent=2), encoding="utf-8")
    return {
        "metrics": str(metrics_path),
        "blessing": str(blessing_path),
        "blessed": blessing["blessed"],
        "summary": summary,
        "reasons": blessing["reasons"],
    }


def main(argv):
    cli.check_dir(_MODEL_DIR, contains=bool, hint="run the train step first")
    cli.check_dir(_EXAMPLES_DIR, contains=bool, hint="run pipeline.ingest first")
    cli.check_writable_dir(_OUTPUT_DIR)
    out = run_evaluate(
        _OUTPUT_DIR.value,
        _MODEL_DIR.value,
        _EXAMPLES_DIR.value,
        _PIPELINE_ROOT.value,
        _MIN_AUC.value,
        _MIN_LOC.value,
        extra_args=argv[1:],
    )
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    _MODEL_DIR = flags.DEFINE_string("model_dir", None, "Trained model dir.")
    _EXAMPLES_DIR = flags.DEFINE_string("examples_dir", None, "Ingested TFRecords.")
    _OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where to write.")
    _PIPELINE_ROOT = flags.DEFINE_string("pipeline_root", "", "For the pushed model.")
    _MIN_AUC = flags.DEFINE_float("min_mean_auc", None, "Mean AUC floor.")
    _MIN_LOC = flags.DEFINE_float("min_localization_accuracy", None, "Loc. floor.")
    flags.mark_flags_as_required(["model_dir", "examples_dir", "output_dir"])
    cli.run(main, flags_parser=cli.parse_known_flags)
