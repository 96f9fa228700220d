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
import types

from absl import flags
from absl import logging

from cxr_tf import cli
from cxr_tf import errors

def define_flags(fv):
    """Defines the flags of `pipeline.ingest` on the registry `fv`; returns holders.

    The command defines them on `flags.FLAGS`; `config_from_argv` on a
    registry of its own, for a process whose own flags share names.

    Returns:
      A namespace with one `FlagHolder` per flag, named after the flag.
    """
    f = types.SimpleNamespace()
    f.data_dir = flags.DEFINE_string(
        "data_dir", None, "Folder with the tables and images (any layout).",
        flag_values=fv,
    )
    f.output_dir = flags.DEFINE_string(
        "output_dir", None, "Where the TFRecords and ingest_report.json go.",
        flag_values=fv,
    )
    f.data_entry = flags.DEFINE_string(
        "data_entry", None, "Data_Entry_2017*.csv to use (default: search data_dir).",
        flag_values=fv,
    )
    f.bbox_list = flags.DEFINE_string(
        "bbox_list", None, "BBox_List_2017.csv to use (default: search data_dir).",
        flag_values=fv,
    )
    f.train_val_list = flags.DEFINE_string(
        "train_val_list", None, "train_val_list.txt to use (default: search).",
        flag_values=fv,
    )
    f.test_list = flags.DEFINE_string(
        "test_list", None, "test_list.txt to use (default: search).",
        flag_values=fv,
    )
    f.image_size = flags.DEFINE_integer(
        "image_size",
        1024,
        "Longer side of the stored images (aspect kept, area resampling, never "
        "upscaled); 0 keeps the files' resolution.",
        lower_bound=0,
        flag_values=fv,
    )
    f.val_fraction = flags.DEFINE_float(
        "val_fraction", 0.1, "Fraction of train/val patients drawn for validation.",
        flag_values=fv,
    )
    f.test_fraction = flags.DEFINE_float(
        "test_fraction",
        0.2,
        "Fraction of patients drawn for test without a test list.",
        flag_values=fv,
    )
    f.seed = flags.DEFINE_integer(
        "seed", 0, "Seed of the patient draw.", lower_bound=0,
        flag_values=fv,
    )
    f.max_skip_fraction = flags.DEFINE_float(
        "max_skip_fraction",
        0.01,
        "Fail (after writing the report) when more than this fraction of rows is "
        "skipped.",
        lower_bound=0.0,
        upper_bound=1.0,
        flag_values=fv,
    )
    f.images_per_shard = flags.DEFINE_integer(
        "images_per_shard",
        0,
        "Images per record file; 0: about 128 MB files.",
        lower_bound=0,
        flag_values=fv,
    )
    f.num_workers = flags.DEFINE_integer(
        "num_workers",
        0,
        "DirectRunner worker processes; 0: one per CPU core.",
        lower_bound=0,
        flag_values=fv,
    )
    f.running_mode = flags.DEFINE_enum(
        "running_mode",
        "multi_processing",
        ["multi_processing", "multi_threading", "in_memory"],
        "DirectRunner running mode.",
        flag_values=fv,
    )
    f.dicom_orientation = flags.DEFINE_enum(
        "dicom_orientation",
        "auto",
        ["auto", "header"],
        "auto: follow PhotometricInterpretation, but invert a chest DICOM whose "
        "content is plainly a negative (wrong header; listed in the report). "
        "header: follow PhotometricInterpretation only.",
        flag_values=fv,
    )
    f.overwrite = flags.DEFINE_bool(
        "overwrite",
        False,
        "Replace records already in output_dir.",
        flag_values=fv,
    )
    return f


def check_paths(f):
    """Checks the input tables and folders before Beam and TF load."""
    cli.require(f.data_dir)
    cli.require(f.output_dir)
    cli.check_dir(
        f.data_dir,
        contains=bool,
        hint="give the folder holding Data_Entry_2017.csv and the images",
    )
    for holder in (f.data_entry, f.bbox_list, f.train_val_list, f.test_list):
        cli.check_file(holder)
    cli.check_writable_dir(f.output_dir)


def config_from_flags(f):
    """Checks the paths and builds the `IngestConfig` of parsed flags `f`."""
    check_paths(f)
    # TensorFlow and Beam are imported late so mistakes are answered fast.
    from cxr_tf.data import ingest  # pylint: disable=import-outside-toplevel

    return cli.make_config(
        ingest.IngestConfig,
        data_dir=f.data_dir.value,
        output_dir=f.output_dir.value,
        data_entry=f.data_entry.value,
        bbox_list=f.bbox_list.value,
        train_val_list=f.train_val_list.value,
        test_list=f.test_list.value,
        image_size=f.image_size.value,
        val_fraction=f.val_fraction.value,
        test_fraction=f.test_fraction.value,
        seed=f.seed.value,
        max_skip_fraction=f.max_skip_fraction.value,
        images_per_shard=f.images_per_shard.value,
        num_workers=f.num_workers.value,
        running_mode=f.running_mode.value,
        overwrite=f.overwrite.value,
        dicom_orientation=f.dicom_orientation.value,
    )


def config_from_argv(argv):
    """What `python -m pipeline.ingest ARGV` would run: (IngestConfig, Beam options).

    Flags this command does not define are Beam pipeline options, returned
    unparsed.

    Raises:
      cxr_tf.errors.UserError: a flag, a value or a path is wrong; the
        message is the line the command would print.
    """
    f, beam_args = cli.parse_argv(
        define_flags, argv, "pipeline.ingest", known_only=True
    )
    return config_from_flags(f), tuple(beam_args)


def ingest(config, pipeline_args=()):
    """Runs the ingest job as the command does; returns its summary dict.

    Raises:
      cxr_tf.errors.UserError: tables missing, records already there, or
        too many rows skipped; one line naming the folder or the report.
    """
    # pylint: disable-next=import-outside-toplevel
    from cxr_tf.data import ingest as ingest_lib

    logging.info("Beam pipeline options: %s", list(pipeline_args))
    where = f"--data_dir={config.data_dir}"
    try:
        with (
            cli.user_errors(FileNotFoundError, where, "check the tables"),
            cli.user_errors(FileExistsError, where, "pass --overwrite"),
        ):
            report = ingest_lib.run_ingest(config, pipeline_args=list(pipeline_args))
    except ingest_lib.SkipFractionExceededError as e:
        raise errors.UserValueError(
            f"ingest failed: {e}",
            os.path.join(config.output_dir, "ingest_report.json"),
            "see the report's skipped rows, or raise --max_skip_fraction",
        ) from None
    return {
        key: report[key]
        for key in (
            "rows_read",
            "rows_written",
            "rows_skipped",
            "written",
            "skipped_by_reason",
        )
    }


def main(argv):
    summary = ingest(config_from_flags(_FLAGS), argv[1:])
    print(json.dumps(summary, sort_keys=True))


if __name__ == "__main__":
    _FLAGS = define_flags(flags.FLAGS)
    flags.mark_flags_as_required(["data_dir", "output_dir"])
    # Unknown flags are Beam pipeline options: kept for the runner.
    cli.run(main, flags_parser=cli.parse_known_flags)
