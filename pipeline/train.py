"""Trainer: trains a model on the ingested records with a training flagfile.

python -m pipeline.train --examples_dir=T --flagfile_train=F --output_dir=M [--epochs=3 ...]
"""

import dataclasses
import pathlib

from absl import flags

from cxr_tf import child
from cxr_tf import cli
from cxr_tf import train as train_cli
from cxr_tf import train_lib

# Stands for the folders the step sets (the ingest output, the step's own);
# a flagfile's --data_dir and --model_dir lose to them.
_STEP_SETS = "<set by the train step>"


def config_from_flagfile(flagfile, overrides=()):
    """The `TrainConfig` of a training flagfile, read as `cxr_tf.train` reads it.

    Runs in the pipeline's process, so a bad value fails with the training
    command's one-line error before any step starts.

    Args:
      flagfile: the training flagfile.
      overrides: extra `--flag=value` strings (they win over the flagfile).

    Returns:
      A `TrainConfig` whose `data_dir` and `model_dir` `run_train` sets.

    Raises:
      cxr_tf.errors.UserError: a flag or a value is wrong.
    """
    return train_cli.config_from_argv(
        [
            f"--flagfile={pathlib.Path(flagfile).resolve()}",
            *overrides,
            f"--data_dir={_STEP_SETS}",
            f"--model_dir={_STEP_SETS}",
        ],
        paths=False,
    )


def parameters(config):
    """The settings of `config` that the step's cache key holds (not its folders)."""
    d = config.to_dict()
    del d["data_dir"], d["model_dir"]
    return d


def run_train(output_dir, examples, config):
    """Trains `config` in a child process; model dir = this step's folder.

    Training resumes from its own backup when the folder holds one, so
    rerunning a killed pipeline continues the same run.

    Args:
      output_dir: the step's folder (the model dir).
      examples: the ingest artifact (or its folder).
      config: a `TrainConfig` (`config_from_flagfile`).

    Returns:
      dict with `model_dir`.
    """
    config = dataclasses.replace(
        config,
        data_dir=str(getattr(examples, "uri", examples)),
        model_dir=str(output_dir),
    )
    child.run(
        train_lib.train,
        config,
        log_path=pathlib.Path(output_dir) / "train.log",
        name="training",
    )
    return {"model_dir": str(output_dir)}


def main(argv):
    cli.check_dir(_EXAMPLES_DIR, contains=bool, hint="run pipeline.ingest first")
    cli.check_file(_FLAGFILE_TRAIN)
    cli.check_writable_dir(_OUTPUT_DIR)
    config = config_from_flagfile(_FLAGFILE_TRAIN.value, argv[1:])
    run_train(_OUTPUT_DIR.value, _EXAMPLES_DIR.value, config)


if __name__ == "__main__":
    _EXAMPLES_DIR = flags.DEFINE_string("examples_dir", None, "Ingested TFRecords.")
    _FLAGFILE_TRAIN = flags.DEFINE_string("flagfile_train", None, "Training flagfile.")
    _OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Model dir.")
    flags.mark_flags_as_required(["examples_dir", "flagfile_train", "output_dir"])
    cli.run(main, flags_parser=cli.parse_known_flags)
