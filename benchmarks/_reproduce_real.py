"""reproduce.py on a real ChestX-ray14 folder: tables, ingest, the papers' configs.

The comparison on the real data set uses the project's own pieces: the
tables are found as `pipeline.ingest` finds them, the films are ingested by
`cxr_tf.data.ingest.run_ingest` (official train_val / test lists, validation
drawn by patient from train_val), and every method is trained from the
checked-in flagfile of its paper (`METHOD_FLAGFILES`), with only the data,
model folder, seed and (for `--smoke`) the size and step budget overridden.
"""

import json
import pathlib
import re

import gpu_estimate  # The script's own directory is on sys.path.

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"

# The paper's flagfile of each method. The PCAM paper compares the global
# poolings of its Table 1 on one setup: ResNet-34 at 1024 px; Wang et al.'s
# LSE baseline has a flagfile of its own (the same setup).
POOLING_FLAGFILE = "pcam_resnet34.flags"
METHOD_FLAGFILES = {"lse": "lse_resnet34.flags"}
INFOMASK_FLAGFILE = "infomask.flags"

# What --smoke changes in every paper config besides size and steps: no
# downloads, one device, no XLA, one validation batch.
SMOKE_TRAIN_OVERRIDES = (
    "--weights=none",
    "--strategy=default",
    "--jit_compile=false",
    "--mixed_precision=none",
    "--validation_steps=1",
    "--num_overlay_images=0",
)

# Ingest skips of these reasons are bad films or rows, counted against
# --max_skip_fraction; a film absent from --data_dir is not (a subset of
# the data set is a valid input and the report says how large it is).
MISSING_FILE = "missing_file"
_REVISION = re.compile(r"_v(\d+)\.csv$", re.IGNORECASE)


def flagfile_of(run):
    """The checked-in flagfile of a planned run (dict with backbone, pooling)."""
    if run["backbone"] == "infomask":
        return CONFIGS / INFOMASK_FLAGFILE
    return CONFIGS / METHOD_FLAGFILES.get(run["pooling"], POOLING_FLAGFILE)


def read_flagfile(path):
    """name -> value of the `--name=value` lines of a flagfile (comments skipped)."""
    return gpu_estimate.read_flagfile(path)


def resolve_tables(data_dir, given):
    """The four tables of `data_dir`: given paths first, else found ones.

    ChestX-ray14 circulates with two revisions of Data_Entry side by side
    (Data_Entry_2017.csv and Data_Entry_2017_v2020.csv, as in the sample);
    when several are found and none is given, the newest revision is used
    and the choice is returned as a note for the report.

    Args:
      data_dir: the data set folder.
      given: dict table key -> path or None (reproduce.py's table flags).

    Returns:
      (tables, images, notes): table key -> path (None: optional table
      absent); film name -> sorted paths (`ingest.scan_data_dir`); and a
      list of sentences on choices made.

    Raises:
      cxr_tf.errors.UserFileError: a given table does not exist, or no
        Data_Entry table or official split list is found.
      cxr_tf.data.ingest.AmbiguousTableError: another table is ambiguous.
    """
    from cxr_tf import errors
    from cxr_tf.data import ingest

    found, images = ingest.scan_data_dir(data_dir)
    notes = []
    given = dict(given)
    candidates = found.get("data_entry", [])
    if not given.get("data_entry") and len(candidates) > 1:
        newest = max(candidates, key=_revision)
        given["data_entry"] = newest
        notes.append(
            f"{len(candidates)} Data_Entry tables were found ("
            + ", ".join(pathlib.Path(c).name for c in candidates)
            + f"); the newest revision, {pathlib.Path(newest).name}, was used "
            "(`--data_entry` chooses another)."
        )
    # An ambiguous table other than Data_Entry is refused by the ingest's
    # own rule, naming the candidates and the flag (reproduce.py's too).
    config = ingest.IngestConfig(data_dir=data_dir, output_dir=".", **given)
    tables = ingest.resolve_tables(config, found)
    if not tables.get("test_list") or not tables.get("train_val_list"):
        raise errors.UserFileError(
            "no official split (train_val_list.txt and test_list.txt) found",
            data_dir,
            "put the two lists of the NIH release in the folder or pass "
            "--train_val_list and --test_list",
        )
    return tables, images, notes


def _revision(path):
    match = _REVISION.search(str(path))
    return (int(match.group(1)) if match else 0, str(path))


def ingest_real(data_dir, tables, records_dir, image_size, seed, max_skip_fraction,
                smoke, reuse):
    """Ingests the films once per distinct setting; returns (report, reused).

    Args:
      data_dir: the data set folder.
      tables: from `resolve_tables`.
      records_dir: output folder of the TFRecords.
      image_size: stored longer side (the largest input of the runs).
      seed: seed of the patient draw of validation.
      max_skip_fraction: most rows that may be skipped for a bad film or row
        (films absent from the folder are not counted).
      smoke: DirectRunner in memory (no worker processes to start).
      reuse: keep records written earlier with the same settings.

    Raises:
      cxr_tf.errors.UserValueError: more than `max_skip_fraction` of the
        rows with a film were skipped, or no film of the test or train
        split was ingested.
    """
    from cxr_tf import errors
    from cxr_tf.data import ingest
    from cxr_tf.data import schema

    config = ingest.IngestConfig(
        data_dir=str(data_dir),
        output_dir=str(records_dir),
        image_size=image_size,
        seed=seed,
        max_skip_fraction=1.0,
        running_mode="in_memory" if smoke else "multi_processing",
        overwrite=True,
        **{key: tables[key] for key in ("data_entry", "bbox_list",
                                        "train_val_list", "test_list")},
    )
    record_path = pathlib.Path(records_dir) / "reproduce_ingest.json"
    report_path = pathlib.Path(records_dir) / schema.INGEST_REPORT
    wanted = config.to_dict()
    if reuse and record_path.is_file() and report_path.is_file():
        if json.loads(record_path.read_text()) == wanted:
            return json.loads(report_path.read_text()), True
    report = ingest.run_ingest(config)
    by_reason = report["skipped_by_reason"]
    bad = sum(n for reason, n in by_reason.items() if reason != MISSING_FILE)
    with_film = report["rows_read"] - by_reason.get(MISSING_FILE, 0)
    if with_film and bad / with_film > max_skip_fraction:
        raise errors.UserValueError(
            f"{bad} of {with_film} rows with a film were skipped "
            f"({ {r: n for r, n in by_reason.items() if r != MISSING_FILE} })",
            str(report_path),
            "see the report's skipped rows, or raise --max_skip_fraction",
        )
    for split in ("train", "test"):
        if not report["written"].get(split):
            raise errors.UserValueError(
                f"no film of the {split} split was ingested "
                f"(written: {report['written']})",
                f"--data_dir={data_dir}",
                "the folder must hold films of both official lists",
            )
    record_path.write_text(json.dumps(wanted, indent=1, sort_keys=True))
    return report, False


def ingested_test_ids(tables, report):
    """Ids of the test films the ingest wrote (listed, present, readable)."""
    from cxr_tf.data import metadata

    entries, _ = metadata.read_data_entry(tables["data_entry"])
    skipped = {s.get("image_id") for s in report.get("skipped", [])}
    test = set(metadata.read_image_list(tables["test_list"]))
    return {i for i in entries["image_id"] if i in test and i not in skipped}


def train_argv(settings, run, records_dir, model_dir):
    """cxr_tf.train flags of one run: the paper's flagfile, then overrides."""
    argv = [
        f"--flagfile={flagfile_of(run)}",
        f"--data_dir={records_dir}",
        f"--model_dir={model_dir}",
        f"--seed={run['seed']}",
        f"--infomask_variant={run['variant'] or 'infomask'}",
        # One line per epoch: the log is a file, not a terminal.
        "--verbose=2",
    ]
    if run["backbone"] != "infomask":
        argv += [f"--backbone={run['backbone']}", f"--pooling={run['pooling']}"]
    if settings["smoke"]:
        argv += list(SMOKE_TRAIN_OVERRIDES)
    if settings.get("jit_compile") is not None:
        argv.append(f"--jit_compile={settings['jit_compile']}")
    steps = run.get("steps", settings.get("steps"))
    for name, value in (
        ("image_size", settings.get("image_size")),
        ("batch_size", run.get("batch_size", settings.get("batch_size"))),
        ("learning_rate", settings.get("learning_rate")),
    ):
        if value is not None:
            argv.append(f"--{name}={value}")
    if steps is not None:
        argv += ["--epochs=1", f"--steps_per_epoch={steps}", f"--backup_every_steps={steps}"]
    return argv
