"""StatisticsGen + SchemaGen + ExampleValidator: a Beam job over the TFRecords.

Computes counts, label prevalence, image size and intensity summaries, box
counts and the patients of each split; then checks them against a schema and
stops the pipeline, naming each anomaly, when the data is not fit to train on.

    python -m pipeline.statistics --examples_dir=T --output_dir=S [--image_size=N]
"""

import io
import json
import os
import pathlib

import numpy as np
from absl import flags, logging

from cxr_tf import cli

from cxr_tf.data import schema
from pipeline import base

STATISTICS_FILE = "statistics.json"
SCHEMA_FILE = "schema.json"
ANOMALIES_FILE = "anomalies.json"
_MAX_LISTED = 20
_LOCAL_RUNNER = "apache_beam.runners.portability.fn_api_runner.FnApiRunner"


def default_schema(image_size=None):
    """The ChestX-ray14 schema: every finding in every split, labels in {0, 1}.

    Args:
      image_size: the longer image side the records must have (the ingest
        `--image_size`), or None to accept any size.

    Returns:
      A JSON-serialisable dict.
    """
    return {
        "findings": list(schema.FINDINGS),
        "required_splits": list(schema.SPLITS),
        "required_findings_per_split": list(schema.FINDINGS),
        "label_domain": [0, 1],
        "image_max_side": image_size,
        "patient_disjoint_splits": True,
    }


class _ExampleStats:
    """Per-example summary: small, so combining millions of them is cheap."""

    @staticmethod
    def from_serialized(serialized):
        # Imported here: Beam workers unpickle this module without TF loaded.
        import tensorflow as tf  # pylint: disable=import-outside-toplevel
        from PIL import Image  # pylint: disable=import-outside-toplevel

        ex = tf.train.Example.FromString(serialized)
        f = ex.features.feature

        def ints(key):
            return list(f[key].int64_list.value) if key in f else []

        def floats(key):
            return list(f[key].float_list.value) if key in f else []

        def text(key):
            v = f[key].bytes_list.value if key in f else []
            return v[0].decode("utf-8", "replace") if v else ""

        labels = ints(schema.KEY_LABELS) or floats(schema.KEY_LABELS)
        pixels = None
        encoded = f[schema.KEY_IMAGE].bytes_list.value if schema.KEY_IMAGE in f else []
        if encoded:
            try:
                with Image.open(io.BytesIO(encoded[0])) as im:
                    pixels = np.asarray(im.convert("L"), dtype=np.float64)
            except Exception:  # pylint: disable=broad-except
                pixels = None
        heights = ints(schema.KEY_HEIGHT)
        widths = ints(schema.KEY_WIDTH)
        return {
            "image_id": text(schema.KEY_IMAGE_ID),
            "patient_id": text(schema.KEY_PATIENT_ID),
            "labels": [float(v) for v in labels],
            "height": (
                heights[0]
                if heights
                else (pixels.shape[0] if pixels is not None else 0)
            ),
            "width": (
                widths[0] if widths else (pixels.shape[1] if pixels is not None else 0)
            ),
            "decodable": pixels is not None,
            "mean": float(pixels.mean()) if pixels is not None else 0.0,
            "std": float(pixels.std()) if pixels is not None else 0.0,
            "box_labels": ints(schema.KEY_BBOX_LABEL),
        }


def _new_accumulator():
    return {
        "count": 0,
        "label_sum": [0.0] * schema.NUM_FINDINGS,
        "bad_labels": [],
        "bad_label_count": 0,
        "no_finding": 0,
        "multi_finding": 0,
        "height_min": None,
        "height_max": None,
        "width_min": None,
        "width_max": None,
        "mean_sum": 0.0,
        "mean_sq_sum": 0.0,
        "std_sum": 0.0,
        "undecodable": [],
        "undecodable_count": 0,
        "images_with_boxes": 0,
        "boxes": 0,
        "boxes_per_finding": [0] * schema.NUM_FINDINGS,
        "sizes": {},
        "patients": [],
    }


def _merge(a, b):
    out = dict(a)
    for key in (
        "count",
        "no_finding",
        "multi_finding",
        "mean_sum",
        "mean_sq_sum",
        "std_sum",
        "images_with_boxes",
        "boxes",
        "bad_label_count",
        "undecodable_count",
    ):
        out[key] = a[key] + b[key]
    out["label_sum"] = [x + y for x, y in zip(a["label_sum"], b["label_sum"])]
    out["boxes_per_finding"] = [
        x + y for x, y in zip(a["boxes_per_finding"], b["boxes_per_finding"])
    ]
    for key, pick in (
        ("height_min", min),
        ("width_min", min),
        ("height_max", max),
        ("width_max", max),
    ):
        vals = [v for v in (a[key], b[key]) if v is not None]
        out[key] = pick(vals) if vals else None
    out["bad_labels"] = (a["bad_labels"] + b["bad_labels"])[:_MAX_LISTED]
    out["undecodable"] = (a["undecodable"] + b["undecodable"])[:_MAX_LISTED]
    sizes = dict(a["sizes"])
    for k, v in b["sizes"].items():
        sizes[k] = sizes.get(k, 0) + v
    out["sizes"] = sizes
    out["patients"] = sorted(set(a["patients"]) | set(b["patients"]))
    return out


def _accumulate(acc, ex):
    one = _new_accumulator()
    one["count"] = 1
    labels = ex["labels"]
    valid = len(labels) == schema.NUM_FINDINGS and all(v in (0.0, 1.0) for v in labels)
    if valid:
        one["label_sum"] = list(labels)
        positives = int(sum(labels))
        one["no_finding"] = int(positives == 0)
        one["multi_finding"] = int(positives > 1)
    else:
        one["bad_label_count"] = 1
        one["bad_labels"] = [{"image_id": ex["image_id"], "labels": labels}]
    h, w = int(ex["height"]), int(ex["width"])
    one.update(height_min=h, height_max=h, width_min=w, width_max=w)
    one["sizes"] = {f"{h}x{w}": 1}
    if ex["decodable"]:
        one["mean_sum"] = ex["mean"]
        one["mean_sq_sum"] = ex["mean"] ** 2
        one["std_sum"] = ex["std"]
    else:
        one["undecodable_count"] = 1
        one["undecodable"] = [ex["image_id"]]
    if ex["box_labels"]:
        one["images_with_boxes"] = 1
        one["boxes"] = len(ex["box_labels"])
        for label in ex["box_labels"]:
            if 0 <= label < schema.NUM_FINDINGS:
                one["boxes_per_finding"][label] += 1
    one["patients"] = [ex["patient_id"]]
    return _merge(acc, one)


def _combine_fn():
    import apache_beam as beam  # pylint: disable=import-outside-toplevel

    class SplitStatsFn(beam.CombineFn):
        """Folds per-example summaries into one split summary."""

        def create_accumulator(self):
            return _new_accumulator()

        def add_input(self, acc, ex):
            return _accumulate(acc, ex)

        def merge_accumulators(self, accs):
            accs = list(accs)
            out = accs[0]
            for a in accs[1:]:
                out = _merge(out, a)
            return out

        def extract_output(self, acc):
            return acc

    return SplitStatsFn()


def _finalise(split, acc):
    n = acc["count"]
    valid = max(n - acc["bad_label_count"], 1)
    decoded = max(n - acc["undecodable_count"], 1)
    mean = acc["mean_sum"] / decoded
    return {
        "split": split,
        "num_examples": n,
        "num_patients": len(acc["patients"]),
        "label_counts": dict(zip(schema.FINDINGS, [int(v) for v in acc["label_sum"]])),
        "label_prevalence": dict(
            zip(schema.FINDINGS, [round(v / valid, 6) for v in acc["label_sum"]])
        ),
        "no_finding_fraction": round(acc["no_finding"] / valid, 6),
        "multi_finding_fraction": round(acc["multi_finding"] / valid, 6),
        "invalid_label_examples": acc["bad_label_count"],
        "invalid_label_samples": acc["bad_labels"],
        "image_height": {"min": acc["height_min"], "max": acc["height_max"]},
        "image_width": {"min": acc["width_min"], "max": acc["width_max"]},
        "image_sizes": acc["sizes"],
        "intensity": {
            "mean_of_means": round(mean, 4),
            "std_of_means": round(
                float(np.sqrt(max(acc["mean_sq_sum"] / decoded - mean**2, 0.0))), 4
            ),
            "mean_of_stds": round(acc["std_sum"] / decoded, 4),
        },
        "undecodable_images": acc["undecodable_count"],
        "undecodable_samples": acc["undecodable"],
        "images_with_boxes": acc["images_with_boxes"],
        "num_boxes": acc["boxes"],
        "boxes_per_finding": dict(
            zip(schema.FINDINGS, [int(v) for v in acc["boxes_per_finding"]])
        ),
        "patients": acc["patients"],
    }


def compute_statistics(examples_dir, pipeline_args=()):
    """Runs the Beam statistics job over every split's TFRecords.

    Args:
      examples_dir: folder with `{split}-*.tfrecord.gz` files (ingest output).
      pipeline_args: Beam pipeline options (`--runner`, `--direct_num_workers`, ...).

    Returns:
      dict split -> statistics dict (see `_finalise`); splits without files
      are absent.

    Raises:
      FileNotFoundError: `examples_dir` has no TFRecords at all.
    """
    import apache_beam as beam  # pylint: disable=import-outside-toplevel
    from apache_beam.io.filesystem import (
        CompressionTypes,
    )  # pylint: disable=import-outside-toplevel
    from apache_beam.options.pipeline_options import (
        PipelineOptions,
    )  # pylint: disable=import-outside-toplevel

    examples_dir = pathlib.Path(examples_dir)
    splits = [
        s
        for s in schema.SPLITS
        if list(examples_dir.glob(schema.TFRECORD_PATTERN.format(split=s)))
    ]
    if not splits:
        raise FileNotFoundError(
            f"No TFRecords matching {schema.TFRECORD_PATTERN} under {examples_dir}"
        )
    out_path = examples_dir / ".statistics_tmp"
    results = {}
    args = list(pipeline_args)
    if not any(a.startswith("--runner") for a in args):
        # Beam's engine named outright: `DirectRunner` first tries to download
        # and start Prism, which needs the network.
        args.append("--runner=" + _LOCAL_RUNNER)
    with beam.Pipeline(options=PipelineOptions(args)) as p:
        per_split = []
        for split in splits:
            pattern = str(examples_dir / schema.TFRECORD_PATTERN.format(split=split))
            per_split.append(
                p
                | f"Read_{split}"
                >> beam.io.ReadFromTFRecord(
                    pattern, compression_type=CompressionTypes.GZIP
                )
                | f"Summarise_{split}" >> beam.Map(_ExampleStats.from_serialized)
                | f"Key_{split}" >> beam.Map(lambda ex, s=split: (s, ex))
            )
        _ = (
            per_split
            | "Flatten" >> beam.Flatten()
            | "Combine" >> beam.CombinePerKey(_combine_fn())
            | "Finalise" >> beam.MapTuple(_finalise)
            | "ToJson" >> beam.Map(json.dumps)
            | "Write" >> beam.io.WriteToText(str(out_path), shard_name_template="")
        )
    with open(out_path, encoding="utf-8") as f:
        for line in f:
            stats = json.loads(line)
            results[stats["split"]] = stats
    os.remove(out_path)
    return results


def validate(statistics, data_schema):
    """ExampleValidator: the anomalies of `statistics` against `data_schema`.

    Args:
      statistics: dict split -> statistics (from `compute_statistics`).
      data_schema: dict (see `default_schema`).

    Returns:
      A list of anomaly dicts {"kind", "split", "message", ...}; empty when
      the data conforms.
    """
    anomalies = []
    for split in data_schema.get("required_splits", []):
        if split not in statistics:
            anomalies.append(
                {
                    "kind": "missing_split",
                    "split": split,
                    "message": f"split {split!r} has no examples",
                }
            )
    required = data_schema.get("required_findings_per_split", [])
    for split, stats in sorted(statistics.items()):
        missing = [f for f in required if stats["label_counts"].get(f, 0) == 0]
        for finding in missing:
            anomalies.append(
                {
                    "kind": "missing_finding",
                    "split": split,
                    "finding": finding,
                    "message": f"finding {finding!r} has no positive example in split "
                    f"{split!r}",
                }
            )
        if stats["invalid_label_examples"]:
            anomalies.append(
                {
                    "kind": "label_out_of_domain",
                    "split": split,
                    "count": stats["invalid_label_examples"],
                    "examples": stats["invalid_label_samples"],
                    "message": f"{stats['invalid_label_examples']} example(s) in split "
                    f"{split!r} have labels outside "
                    f"{data_schema.get('label_domain')} or not "
                    f"{schema.NUM_FINDINGS} long, e.g. "
                    f"{[e['image_id'] for e in stats['invalid_label_samples'][:5]]}",
                }
            )
        if stats["undecodable_images"]:
            anomalies.append(
                {
                    "kind": "undecodable_image",
                    "split": split,
                    "count": stats["undecodable_images"],
                    "message": f"{stats['undecodable_images']} image(s) in split {split!r} "
                    f"do not decode, e.g. {stats['undecodable_samples'][:5]}",
                }
            )
        side = data_schema.get("image_max_side")
        if side:
            wrong = {
                size: n
                for size, n in stats["image_sizes"].items()
                if max(int(v) for v in size.split("x")) != side
            }
            if wrong:
                anomalies.append(
                    {
                        "kind": "wrong_image_size",
                        "split": split,
                        "sizes": wrong,
                        "message": f"{sum(wrong.values())} image(s) in split {split!r} do "
                        f"not have longer side {side}: sizes {wrong}",
                    }
                )
    if data_schema.get("patient_disjoint_splits", True):
        names = [s for s in schema.SPLITS if s in statistics] + sorted(
            set(statistics) - set(schema.SPLITS)
        )
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                both = sorted(
                    set(statistics[a]["patients"]) & set(statistics[b]["patients"])
                )
                if both:
                    anomalies.append(
                        {
                            "kind": "patient_leak",
                            "splits": [a, b],
                            "patients": both,
                            "message": f"{len(both)} patient(s) appear in both {a!r} and "
                            f"{b!r}: {both[:_MAX_LISTED]}",
                        }
                    )
    return anomalies


def run_statistics(
    output_dir, examples_dir, image_size=None, schema_path=None, pipeline_args=()
):
    """The pipeline step: statistics, schema and anomalies, written as JSON.

    Args:
      output_dir: where statistics.json, schema.json and anomalies.json go.
      examples_dir: the ingest step's TFRecord folder.
      image_size: the expected longer image side, or None.
      schema_path: a curated schema JSON to use instead of the default one.
      pipeline_args: Beam pipeline options.

    Returns:
      dict of output paths.

    Raises:
      AnomaliesFoundError: the data does not conform; the message lists each
        anomaly (the files are written first).
    """
    output_dir = pathlib.Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if schema_path:
        with open(schema_path, encoding="utf-8") as f:
            data_schema = json.load(f)
    else:
        data_schema = default_schema(image_size)
    stats = compute_statistics(examples_dir, pipeline_args)
    anomalies = validate(stats, data_schema)
    paths = {
        "statistics": str(output_dir / STATISTICS_FILE),
        "schema": str(output_dir / SCHEMA_FILE),
        "anomalies": str(output_dir / ANOMALIES_FILE),
    }
    for key, obj in (
        ("statistics", stats),
        ("schema", data_schema),
        ("anomalies", anomalies),
    ):
        with open(paths[key], "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
    for split, s in sorted(stats.items()):
        logging.info(
            "%s: %d examples, %d patients, %d boxes",
            split,
            s["num_examples"],
            s["num_patients"],
            s["num_boxes"],
        )
    if anomalies:
        lines = "\n".join(f"  - {a['message']}" for a in anomalies)
        raise base.AnomaliesFoundError(
            f"{len(anomalies)} data anomaly(ies) found (see {paths['anomalies']}):\n"
            f"{lines}"
        )
    return paths


def main(argv):
    cli.check_dir(_EXAMPLES_DIR, contains=bool, hint="run pipeline.ingest first")
    cli.check_file(_SCHEMA)
    cli.check_writable_dir(_OUTPUT_DIR)
    run_statistics(
        _OUTPUT_DIR.value,
        _EXAMPLES_DIR.value,
        _IMAGE_SIZE.value,
        _SCHEMA.value,
        pipeline_args=argv[1:],
    )


if __name__ == "__main__":
    _EXAMPLES_DIR = flags.DEFINE_string("examples_dir", None, "Ingested TFRecords.")
    _OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where to write the JSON.")
    _IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "Expected longer side.")
    _SCHEMA = flags.DEFINE_string("schema", None, "A curated schema JSON.")
    flags.mark_flags_as_required(["examples_dir", "output_dir"])
    cli.run(main, flags_parser=cli.parse_known_flags)
