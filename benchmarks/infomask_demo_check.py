"""Scores a trained InfoMask model as a user would: predict's default boxes, as JSON.

    python benchmarks/infomask_demo_check.py --synthetic_dir=SYN \
        --records_dir=RECORDS --model_dir=MODEL --work_dir=OUT

SYN is a `cxr_tf.data.synthetic` set (ChestX-ray14 layout), RECORDS its
ingest, MODEL trained on RECORDS (configs/infomask_demo.flags). Steps, each
the command a user types:
  1. `python -m cxr_tf.predict --model=MODEL` with default flags on the
     films of SYN's test_list.txt (boxes only for findings with
     probability >= 0.5, at the box threshold stored in MODEL);
  2. `python -m cxr_tf.evaluate --predictions=...` against SYN's box list and
     label table: mean AUC and accuracy at IoBB > T of predict's boxes;
  3. `python -m cxr_tf.evaluate --model_dir=MODEL --data_dir=RECORDS`: the
     mask's IoP / FPR / FNR on the test split at the threshold chosen on val.
Plus the IoP of a constant mask (every pixel in: |G| / |film|, the same
mean over boxed findings as evaluate's), the floor a mask that carries the
lesions must beat.
"""

import collections
import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SYNTHETIC_DIR = flags.DEFINE_string("synthetic_dir", None, "Synthetic set (films).")
_RECORDS_DIR = flags.DEFINE_string("records_dir", None, "Its ingested records.")
_MODEL_DIR = flags.DEFINE_string("model_dir", None, "Trained InfoMask model dir.")
_WORK_DIR = flags.DEFINE_string("work_dir", None, "Where predict/evaluate write.")
_IOBB = "0.25"


def _run(args, log_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = _REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with open(log_path, "w") as log:
        proc = subprocess.run(
            [sys.executable, "-m", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if proc.returncode:
        raise RuntimeError(
            f"`{' '.join(args[:1])}` failed with exit code {proc.returncode}; "
            f"see {log_path}"
        )


def constant_mask_iop(synthetic_dir):
    """Mean IoP of an all-ones mask over the boxed test (image, finding) pairs."""
    import numpy as np
    from PIL import Image

    from cxr_tf.data import metadata
    from cxr_tf.data import schema
    from cxr_tf.metrics import localization as loc_metrics

    test = set(metadata.read_image_list(os.path.join(synthetic_dir, "test_list.txt")))
    boxes = metadata.read_bbox_list(os.path.join(synthetic_dir, "BBox_List_2017.csv"))
    pairs = collections.defaultdict(list)
    for row in boxes.itertuples(index=False):
        if row.image_id in test and row.finding in schema.BOXED_FINDINGS:
            pairs[(row.image_id, row.finding)].append((row.x, row.y, row.w, row.h))
    per_finding = collections.defaultdict(list)
    sizes = {}
    for (image_id, finding), gt in pairs.items():
        if image_id not in sizes:
            with Image.open(os.path.join(synthetic_dir, "images", image_id)) as im:
                sizes[image_id] = (im.height, im.width)
        mask = np.ones(sizes[image_id], bool)
        per_finding[finding].append(loc_metrics.mask_metrics(mask, gt)["iop"])
    means = [float(np.mean(v)) for v in per_finding.values()]
    return float(np.mean(means)) if means else None


def check(synthetic_dir, records_dir, model_dir, work_dir):
    """Runs predict and evaluate; returns the figures as a dict."""
    from cxr_tf.data import metadata
    from cxr_tf.data import schema

    os.makedirs(work_dir, exist_ok=True)
    test = metadata.read_image_list(os.path.join(synthetic_dir, "test_list.txt"))
    films = [os.path.join(synthetic_dir, "images", i) for i in test]
    start = time.time()
    predict_dir = os.path.join(work_dir, "predict")
    _run(
        ["cxr_tf.predict", f"--model={model_dir}", f"--output_dir={predict_dir}", *films],
        os.path.join(work_dir, "predict.log"),
    )
    predict_seconds = time.time() - start
    scored = os.path.join(work_dir, "eval_predictions")
    _run(
        [
            "cxr_tf.evaluate",
            f"--predictions={os.path.join(predict_dir, 'predictions.jsonl')}",
            f"--bbox_list={os.path.join(synthetic_dir, 'BBox_List_2017.csv')}",
            f"--data_entry={os.path.join(synthetic_dir, 'Data_Entry_2017.csv')}",
            f"--output_dir={scored}",
        ],
        os.path.join(work_dir, "eval_predictions.log"),
    )
    masked = os.path.join(work_dir, "eval_model")
    _run(
        [
            "cxr_tf.evaluate",
            f"--model_dir={model_dir}",
            f"--data_dir={records_dir}",
            f"--output_dir={masked}",
            "--num_overlays=4",
        ],
        os.path.join(work_dir, "eval_model.log"),
    )
    with open(os.path.join(scored, "metrics.json")) as f:
        pred_metrics = json.load(f)
    with open(os.path.join(masked, "metrics.json")) as f:
        model_metrics = json.load(f)
    with open(os.path.join(model_dir, "config.json")) as f:
        box_thresholds = json.load(f).get("box_thresholds")
    (section,) = pred_metrics["localization"].values()
    per_class = section["per_class"]
    accs = {
        f: per_class[f]["iobb"][_IOBB]
        for f in schema.BOXED_FINDINGS
        if per_class.get(f, {}).get("num_gt_boxes")
    }
    return {
        "predict": {
            "mean_auc": pred_metrics["classification"]["mean_auc"],
            f"acc_iobb_{_IOBB}": sum(accs.values()) / len(accs) if accs else None,
            f"acc_iobb_{_IOBB}_per_class": accs,
            "boxed_findings_evaluated": len(accs),
            "seconds": round(predict_seconds, 1),
        },
        "box_thresholds": box_thresholds,
        "evaluate": {
            "mean_auc": model_metrics["classification"]["mean_auc"],
            "mask": {
                "threshold": model_metrics["mask"]["threshold"],
                **model_metrics["mask"]["mean"],
            },
        },
        "constant_mask_iop": constant_mask_iop(synthetic_dir),
    }


def main(argv):
    del argv
    for holder in (_SYNTHETIC_DIR, _RECORDS_DIR, _MODEL_DIR, _WORK_DIR):
        if not holder.value:
            raise app.UsageError(f"--{holder.name} is required")
    figures = check(
        _SYNTHETIC_DIR.value, _RECORDS_DIR.value, _MODEL_DIR.value, _WORK_DIR.value
    )
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    app.run(main)
