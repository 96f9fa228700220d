"""Pusher: exports a blessed model as the next numbered serving version, atomically.

python -m pipeline.push --model_dir=M --blessing=B --serving_model_dir=S
"""

import json
import pathlib

from absl import flags

from cxr_tf import child
from cxr_tf import cli
from cxr_tf import export as export_cli


def run_push(output_dir, model, evaluation, serving_model_dir, export_args=()):
    """Exports the model into `serving_model_dir/<next version>` if it is blessed.

    The export runs in a child process; `cxr_tf.export` picks the next
    version and writes it atomically.

    Args:
      output_dir: the step's folder.
      model: the train artifact (or model dir).
      evaluation: the evaluate artifact (or a dict with `blessed`, `reasons`,
        `summary`).
      serving_model_dir: the TF Serving model base path.
      export_args: extra `--flag=value` strings of `cxr_tf.export` (read
        here, by that command's own flag code, into its `ExportConfig`).

    Returns:
      dict with `pushed`, and `version`/`version_dir` when pushed, or `reasons`.
    """
    outputs = getattr(evaluation, "outputs", evaluation)
    if not outputs["blessed"]:
        return {"pushed": False, "reasons": outputs["reasons"]}
    model_dir = getattr(model, "uri", model)
    # Export the very model file the evaluation scored and blessed (its
    # metrics name it and its sha256, which export checks), with those
    # metrics on the model card; the model directory only when the
    # evaluation did not record one.
    metrics_path = outputs.get("metrics")
    evaluated = None
    if metrics_path:
        with open(metrics_path, encoding="utf-8") as f:
            evaluated = (json.load(f).get("source") or {}).get("model")
    # Export numbers the version and writes it atomically (a hidden folder
    # renamed into place), so a server polling the base path never loads
    # half a model; it returns the version folder.
    config = export_cli.config_from_argv(
        [
            f"--model={evaluated or model_dir}",
            f"--export_dir={serving_model_dir}",
            *([f"--metrics={metrics_path}"] if metrics_path else []),
            *export_args,
        ]
    )
    final = pathlib.Path(
        child.run(
            export_cli.export,
            config,
            log_path=pathlib.Path(output_dir) / "export.log",
            name="export",
        )
    )
    if not (final.parent == pathlib.Path(serving_model_dir) and final.is_dir()):
        raise RuntimeError(
            f"cxr_tf.export did not write a version folder under "
            f"{serving_model_dir}: {final}"
        )
    version = int(final.name)
    return {
        "pushed": True,
        "version": version,
        "version_dir": str(final),
        "model": evaluated or model_dir,
        "summary": outputs["summary"],
    }


def main(argv):
    cli.check_dir(_MODEL_DIR, contains=bool, hint="run the train step first")
    cli.check_file(_BLESSING)
    cli.check_writable_dir(_SERVING_MODEL_DIR)
    with open(_BLESSING.value, encoding="utf-8") as f:
        blessing = json.load(f)
    evaluation = {
        "blessed": blessing["blessed"],
        "reasons": blessing["reasons"],
        "summary": blessing["candidate"],
        "metrics": blessing.get("metrics"),
    }
    print(
        json.dumps(
            run_push(
                _OUTPUT_DIR.value,
                _MODEL_DIR.value,
                evaluation,
                _SERVING_MODEL_DIR.value,
                argv[1:],
            ),
            indent=2,
        )
    )


if __name__ == "__main__":
    _MODEL_DIR = flags.DEFINE_string("model_dir", None, "Trained model dir.")
    _BLESSING = flags.DEFINE_string("blessing", None, "blessing.json of evaluate.")
    _SERVING_MODEL_DIR = flags.DEFINE_string("serving_model_dir", None, "Base path.")
    _OUTPUT_DIR = flags.DEFINE_string("output_dir", ".", "Where to write logs.")
    flags.mark_flags_as_required(["model_dir", "blessing", "serving_model_dir"])
    cli.run(main, flags_parser=cli.parse_known_flags)
