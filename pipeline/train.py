"""Trainer: trains a model on the ingested records with a training flagfile.

python -m pipeline.train --examples_dir=T --flagfile_train=F --output_dir=M
"""

import pathlib

from absl import flags

from cxr_tf import cli

from pipeline import _subprocess


def read_flagfile(path):
    """Returns the flag lines of an absl flagfile (comments and blanks dropped).

    Raises:
      FileNotFoundError: `path` does not exist, naming it.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Training flagfile not found: {path}")
    lines = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", "//")):
            lines.append(line)
    return lines


def run_train(output_dir, examples, flagfile, overrides=()):
    """Trains with `python -m cxr_tf.train`, model dir = this step's folder.

    The training CLI resumes from its own backup when the folder holds one, so
    rerunning a killed pipeline continues the same run.

    Args:
      output_dir: the step's folder (the model dir).
      examples: the ingest artifact (or its folder).
      flagfile: the training flagfile.
      overrides: extra `--flag=value` strings (they win over the flagfile).

    Returns:
      dict with `model_dir` and `model` (the final .keras file).
    """
    examples_dir = getattr(examples, "uri", examples)
    args = [
        f"--flagfile={pathlib.Path(flagfile).resolve()}",
        *overrides,
        f"--data_dir={examples_dir}",
        f"--model_dir={output_dir}",
    ]
    _subprocess.run_module(
        "cxr_tf.train", args, log_path=pathlib.Path(output_dir) / "train.log"
    )
    return {"model_dir": str(output_dir)}


def main(argv):
    cli.check_dir(_EXAMPLES_DIR, contains=bool, hint="run pipeline.ingest first")
    cli.check_file(_FLAGFILE_TRAIN)
    cli.check_writable_dir(_OUTPUT_DIR)
    run_train(
        _OUTPUT_DIR.value,
        _EXAMPLES_DIR.value,
        _FLAGFILE_TRAIN.value,
        overrides=argv[1:],
    )


if __name__ == "__main__":
    _EXAMPLES_DIR = flags.DEFINE_string("examples_dir", None, "Ingested TFRecords.")
    _FLAGFILE_TRAIN = flags.DEFINE_string("flagfile_train", None, "Training flagfile.")
    _OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Model dir.")
    flags.mark_flags_as_required(["examples_dir", "flagfile_train", "output_dir"])
    cli.run(main, flags_parser=cli.parse_known_flags)
