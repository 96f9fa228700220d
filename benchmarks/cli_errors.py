"""How fast a command answers a mistake told from its flags and files; prints JSON.

  python -m benchmarks.cli_errors [--repeats=3] [--output=F.json]

Each mistake runs as a user would run it (a fresh `python -m ...` process)
and is timed against references timed in the same run, interleaved: a bare
`python -c pass`, `python -c "import numpy"`, and `python -c "import
tensorflow"`. The machine is shared, so the figures that carry over are the
ratios: a check done before TensorFlow loads costs a small fraction of
TensorFlow's import. tests/test_cli_errors.py checks the behaviour (one
line, no traceback, no TensorFlow imported); this script measures the time.
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent


def _cases(tmp):
    empty = os.path.join(tmp, "empty")
    os.makedirs(empty, exist_ok=True)
    return {
        "train --pooling=pcma": [
            "-m", "cxr_tf.train", "--pooling=pcma", "--dry_run",
            f"--data_dir={empty}", f"--model_dir={tmp}/m",
        ],
        "train --image_size=100": [
            "-m", "cxr_tf.train", "--image_size=100",
            f"--data_dir={empty}", f"--model_dir={tmp}/m",
        ],
        "train --data_dir=empty folder": [
            "-m", "cxr_tf.train", f"--data_dir={empty}", f"--model_dir={tmp}/m",
        ],
        "evaluate --model_dir without a model": [
            "-m", "cxr_tf.evaluate", f"--model_dir={empty}",
            f"--data_dir={empty}", f"--output_dir={tmp}/eval",
        ],
        "predict --model without a model": [
            "-m", "cxr_tf.predict", f"--model={empty}",
            f"--output_dir={tmp}/pred", f"{tmp}/missing.png",
        ],
        "export --model without a model": [
            "-m", "cxr_tf.export", f"--model={empty}", f"--export_dir={tmp}/exp",
        ],
    }


REFERENCES = {
    "python -c pass": ["-c", "pass"],
    "import numpy": ["-c", "import numpy"],
    "import tensorflow": ["-c", "import tensorflow"],
}


def _time(argv, expect_failure):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    if expect_failure and proc.returncode == 0:
        raise SystemExit(f"{argv}: expected a refused mistake, the command succeeded")
    if not expect_failure and proc.returncode != 0:
        raise SystemExit(f"{argv}: reference failed: {proc.stderr[-500:]}")
    return seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: ([], argv, False) for name, argv in REFERENCES.items()}
        runs.update({name: ([], argv, True) for name, argv in _cases(tmp).items()})
        for _ in range(args.repeats):  # Interleaved: load changes hit all alike.
            for times, command, expect_failure in runs.values():
                times.append(_time(command, expect_failure))
    median = {name: statistics.median(times) for name, (times, _, _) in runs.items()}
    tf_import = median["import tensorflow"]
    result = {
        "benchmark": "cli_errors",
        "repeats": args.repeats,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "reference_median_s": {name: round(median[name], 3) for name in REFERENCES},
        "mistakes": {
            name: {
                "median_s": round(median[name], 3),
                "ratio_to_tensorflow_import": round(median[name] / tf_import, 3),
                "ratio_to_numpy_import": round(median[name] / median["import numpy"], 2),
            }
            for name in runs
            if name not in REFERENCES
        },
    }
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if args.output:
        pathlib.Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
