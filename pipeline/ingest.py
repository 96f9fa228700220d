"""ExampleGen: ChestX-ray14 tables + images -> TFRecords, as a Beam job (thin CLI).

    python -m pipeline.ingest --data_dir=D --output_dir=T [--image_size=512]
        [--data_entry=F] [--bbox_list=F] [--train_val_list=F] [--test_list=F]
        [--max_skip_fraction=0.01] [Beam options: --runner=..., ...]

Flags this module does not know are Beam pipeline options and are passed on
unparsed, so the same job runs on the DirectRunner, Flink, Spark or Dataflow.
Exits with status 1 (after writing ingest_report.json) when more than
--max_skip_fraction of the Data_Entry rows were skipped.
"""

import json
import os

from absl import flags
from absl import logging

from cxr_tf import cli
from cxr_tf import errors

_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Folder with the tables and images (any layout)."
)
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Where the TFRecords and ingest_report.json go."
)
_DATA_ENTRY = flags.DEFINE_string(
    "data_entry", None, "Data_Entry_2017*.csv to use (default: search data_dir)."
)
_BBOX_LIST = flags.DEFINE_string(
    "bbox_list", None, "BBox_List_2017.csv to use (default: search data_dir)."
)
_TRAIN_VAL_LIST = flags.DEFINE_string(
    "train_val_list", None, "train_val_list.txt to use (default: search)."
)
_TEST_LIST = flags.DEFINE_string(
    "test_list", None, "test_list.txt to use (default: search)."
)
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size",
    1024,
    "Longer side of the stored images (aspect kept, area resampling, never "
    "upscaled); 0 keeps the files' resolution.",
    lower_bound=0,
)
_VAL_FRACTION = flags.DEFINE_float(
    "val_fraction", 0.1, "Fraction of train/val patients drawn for validation."
)
_TEST_FRACTION = flags.DEFINE_float(
    "test_fraction", 0.2, "Fraction of patients drawn for test without a test list."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the patient draw.", lower_bound=0)
_MAX_SKIP_FRACTION = flags.DEFINE_float(
    "max_skip_fraction",
    0.01,
    "Fail (after writing the report) when more than this fraction of rows is "
    "skipped.",
    lower_bound=0.0,
    upper_bound=1.0,
)
_IMAGES_PER_SHARD = flags.DEFINE_integer(
    "images_per_shard",
    0,
    "Images per record file; 0: about 128 MB files.",
    lower_bound=0,
)
_NUM_WORKERS = flags.DEFINE_integer(
    "num_workers",
    0,
    "DirectRunner worker processes; 0: one per CPU core.",
    lower_bound=0,
)
_RUNNING_MODE = flags.DEFINE_enum(
    "running_mode",
    "multi_processing",
    ["multi_processing", "multi_threading", "in_memory"],
    "DirectRunner running mode.",
)
_DICOM_ORIENTATION = flags.DEFINE_enum(
    "dicom_orientation",
    "auto",
    ["auto", "header"],
    "auto: follow PhotometricInterpretation, but invert a chest DICOM whose "
    "content is plainly a negative (wrong header; listed in the report). "
    "header: follow PhotometricInterpretation only.",
)
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace records already in output_dir."
)

flags.mark_flags_as_required(["data_dir", "output_dir"])


def config_from_flags():
    """The `IngestConfig` of the parsed flags."""
    from cxr_tf.data import ingest  # pylint: disable=import-outside-toplevel

    return cli.make_config(
        ingest.IngestConfig,
        data_dir=_DATA_DIR.value,
        output_dir=_OUTPUT_DIR.value,
        data_entry=_DATA_ENTRY.value,
        bbox_list=_BBOX_LIST.value,
        train_val_list=_TRAIN_VAL_LIST.value,
        test_list=_TEST_LIST.value,
        image_size=_IMAGE_SIZE.value,
        val_fraction=_VAL_FRACTION.value,
        test_fraction=_TEST_FRACTION.value,
        seed=_SEED.value,
        max_skip_fraction=_MAX_SKIP_FRACTION.value,
        images_per_shard=_IMAGES_PER_SHARD.value,
        num_workers=_NUM_WORKERS.value,
        running_mode=_RUNNING_MODE.value,
        overwrite=_OVERWRITE.value,
        dicom_orientation=_DICOM_ORIENTATION.value,
    )


def check_paths():
    """Checks the input tables and folders before Beam and TF load."""
    cli.check_dir(
        _DATA_DIR,
        contains=bool,
        hint="give the folder holding Data_Entry_2017.csv and the images",
    )
    for holder in (_DATA_ENTRY, _BBOX_LIST, _TRAIN_VAL_LIST, _TEST_LIST):
        cli.check_file(holder)
    cli.check_writable_dir(_OUTPUT_DIR)


def main(argv):
    check_paths()
    # TensorFlow and Beam are imported late so mistakes are answered fast.
    from cxr_tf.data import ingest  # pylint: disable=import-outside-toplevel

    pipeline_args = argv[1:]
    config = config_from_flags()
    logging.info("Beam pipeline options: %s", pipeline_args)
    where = f"--data_dir={_DATA_DIR.value}"
    try:
        with (
            cli.user_errors(FileNotFoundError, where, "check the tables"),
            cli.user_errors(FileExistsError, where, "pass --overwrite"),
        ):
            report = ingest.run_ingest(config, pipeline_args=pipeline_args)
    except ingest.SkipFractionExceededError as e:
        raise errors.UserValueError(
            f"ingest failed: {e}",
            os.path.join(_OUTPUT_DIR.value, "ingest_report.json"),
            "see the report's skipped rows, or raise --max_skip_fraction",
        ) from None
    summary = {
        key: report[key]
        for key in (
            "rows_read",
            "rows_written",
            "rows_skipped",
            "written",
            "skipped_by_reason",
        )
    }
    print(json.dumps(summary, sort_keys=True))


if __name__ == "__main__":
    # Unknown flags are Beam pipeline options: kept for the runner.
    cli.run(main, flags_parser=cli.parse_known_flags)
