"""Evaluates a model: `python -m cxr_tf.evaluate --model_dir=M --data_dir=T --output_dir=E`.

Or a predictions file: `--predictions=P.jsonl --bbox_list=BBox_List_2017.csv
[--data_entry=Data_Entry_2017.csv] --output_dir=E`. Writes metrics.json,
roc.png, localization_accuracy.png and localization_accuracy_iou.png (and,
for a model, predictions.jsonl and overlays/ of boxed films with their truth).
"""

import fnmatch
import json
import types

from absl import flags

from cxr_tf import choices
from cxr_tf import cli
from cxr_tf import errors
from cxr_tf import model_dir
from cxr_tf.data import schema

# evaluate_lib.IOBB_THRESHOLDS, repeated so --help needs no SciPy import.
_DEFAULT_IOBB_THRESHOLDS = ("0.1", "0.25", "0.5", "0.75", "0.9")


def define_flags(fv):
    """Defines the flags of `cxr_tf.evaluate` on the registry `fv`; returns holders.

    The command defines them on `flags.FLAGS`; `config_from_argv` on a
    registry of its own, for a process whose own flags share names.

    Returns:
      A namespace with one `FlagHolder` per flag, named after the flag.
    """
    f = types.SimpleNamespace()
    f.model_dir = flags.DEFINE_string(
        "model_dir", None, "Trained model directory.",
        flag_values=fv,
    )
    f.checkpoint = flags.DEFINE_enum(
        "checkpoint", "best", list(model_dir.CHECKPOINTS), "Which model of model_dir.",
        flag_values=fv,
    )
    f.data_dir = flags.DEFINE_string(
        "data_dir", None, "Ingested TFRecords.",
        flag_values=fv,
    )
    f.split = flags.DEFINE_enum(
        "split", "test", list(schema.SPLITS), "Split.",
        flag_values=fv,
    )
    f.val_split = flags.DEFINE_string(
        "val_split", "val", "Split that chooses the IoP mask threshold ('' to skip).",
        flag_values=fv,
    )
    f.output_dir = flags.DEFINE_string(
        "output_dir", None, "Output directory.",
        flag_values=fv,
    )
    f.predictions = flags.DEFINE_string(
        "predictions", None, "predictions.jsonl to evaluate instead of a model.",
        flag_values=fv,
    )
    f.bbox_list = flags.DEFINE_string(
        "bbox_list", None, "Box list CSV (predictions).",
        flag_values=fv,
    )
    f.data_entry = flags.DEFINE_string(
        "data_entry", None, "Label table CSV (predictions; enables AUROC).",
        flag_values=fv,
    )
    f.map = flags.DEFINE_enum(
        "map", "model", list(choices.MAP_SOURCES), "Localization map source.",
        flag_values=fv,
    )
    f.box_thresholds = flags.DEFINE_list(
        "box_thresholds",
        [],
        "Map thresholds for boxes (default: the model's own, chosen on validation "
        "at training; else 0.9 probability maps, 180,60 CAMs).",
        flag_values=fv,
    )
    f.iobb_thresholds = flags.DEFINE_list(
        "iobb_thresholds",
        list(_DEFAULT_IOBB_THRESHOLDS),
        "T of the localization accuracy (IoBB > T, IoU > T).",
        flag_values=fv,
    )
    f.mask_thresholds = flags.DEFINE_list(
        "mask_thresholds", [], "Candidate IoP mask thresholds (default: a grid).",
        flag_values=fv,
    )
    f.batch_size = flags.DEFINE_integer(
        "batch_size", 32, "Images per forward pass.",
        flag_values=fv,
    )
    f.max_images = flags.DEFINE_integer(
        "max_images", None, "Evaluate at most N images.",
        flag_values=fv,
    )
    f.num_overlays = flags.DEFINE_integer(
        "num_overlays",
        8,
        "Overlays (maps, predicted and truth boxes) of N boxed images.",
        flag_values=fv,
    )
    return f


def _floats(holder):
    try:
        return tuple(float(t) for t in holder.value)
    except ValueError:
        raise errors.UserValueError(
            f"not a number in {holder.value}", f"--{holder.name}", "give numbers"
        ) from None


def check_paths(f):
    """Checks the model or predictions and the folders before TF loads."""
    cli.check_writable_dir(f.output_dir)
    if f.predictions.value:
        cli.check_file(f.predictions)
        cli.require(f.bbox_list)
        cli.check_file(f.bbox_list)
        cli.check_file(f.data_entry)
        return
    if not f.model_dir.value:
        raise errors.UserValueError(
            "nothing to evaluate",
            "--model_dir",
            "give --model_dir and --data_dir, or --predictions and --bbox_list",
        )
    cli.check_model(f.model_dir, f.checkpoint.value, "checkpoint")
    pattern = schema.TFRECORD_PATTERN.format(split=f.split.value)
    cli.check_dir(
        f.data_dir,
        contains=lambda names: any(fnmatch.fnmatch(n, pattern) for n in names),
        hint=f"expected {pattern} files; run `python -m pipeline.ingest` first",
    )


def config_from_flags(f):
    """Checks the paths and builds the `EvalConfig` of parsed flags `f`."""
    cli.require(f.output_dir)
    check_paths(f)
    box_thresholds = _floats(f.box_thresholds)
    iobb_thresholds = _floats(f.iobb_thresholds)
    mask_thresholds = _floats(f.mask_thresholds)
    from cxr_tf import evaluate_lib  # pylint: disable=import-outside-toplevel

    return cli.make_config(
        evaluate_lib.EvalConfig,
        output_dir=f.output_dir.value,
        model_dir=f.model_dir.value,
        checkpoint=f.checkpoint.value,
        data_dir=f.data_dir.value,
        split=f.split.value,
        val_split=f.val_split.value or None,
        predictions=f.predictions.value,
        bbox_list=f.bbox_list.value,
        data_entry=f.data_entry.value,
        map_source=f.map.value,
        box_thresholds=box_thresholds,
        iobb_thresholds=iobb_thresholds,
        mask_thresholds=mask_thresholds,
        batch_size=f.batch_size.value,
        max_images=f.max_images.value,
        num_overlays=f.num_overlays.value,
    )


def config_from_argv(argv):
    """The `EvalConfig` that `python -m cxr_tf.evaluate ARGV` would evaluate.

    As `cli.config_from_argv`: a mistake is a one-line `cxr_tf.errors.UserError`.
    """
    return cli.config_from_argv(
        define_flags, config_from_flags, argv, "cxr_tf.evaluate"
    )


def main(argv):
    cli.reject_arguments(argv)
    config = config_from_flags(_FLAGS)
    from cxr_tf import evaluate_lib  # pylint: disable=import-outside-toplevel

    metrics = evaluate_lib.evaluate(config)
    print(json.dumps(evaluate_lib.headline(metrics), indent=2))


if __name__ == "__main__":
    _FLAGS = define_flags(flags.FLAGS)
    flags.mark_flags_as_required(["output_dir"])
    cli.run(main)
