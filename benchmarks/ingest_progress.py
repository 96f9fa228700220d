"""Gaps between ingest's progress lines during a real multi-process Beam run.

    python benchmarks/ingest_progress.py --copies=3 --num_workers=2 \
        --output=docs/benchmarks/ingest_progress.json

Copies the real NIH sample films (../shared/cxr14_sample/images, 1024x1024)
--copies times under new image ids, writes a Data_Entry table for them, runs
`python -m pipeline.ingest` as a user would (DirectRunner, multi_processing)
and timestamps every stderr line as it arrives. Prints (and writes) one JSON
object: films, wall seconds, the progress lines with their times, and the
longest gap between two of them (the promise is at most 15 s).
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

from absl import flags

from cxr_tf import cli

REPO = pathlib.Path(__file__).resolve().parents[1]
_SAMPLE = flags.DEFINE_string(
    "sample_dir",
    str(REPO.parent / "shared" / "cxr14_sample" / "images"),
    "Folder of PNG films to copy.",
)
_COPIES = flags.DEFINE_integer("copies", 3, "Copies of each sample film.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 2, "Beam worker processes.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 512, "Stored longer side.")
_OUTPUT = flags.DEFINE_string("output", None, "Also write the JSON here.")

_PROGRESS = re.compile(r"ingest: (\d+)/(\d+) films")
_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
    "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n"
)


def _make_data(root, sample_dir, copies):
    films = sorted(pathlib.Path(sample_dir).glob("*.png"))
    if not films:
        raise SystemExit(f"no PNG films in {sample_dir}")
    images = root / "images"
    images.mkdir(parents=True)
    rows = []
    patient = 0
    for copy in range(copies):
        for film in films:
            patient += 1
            name = f"{patient:08d}_000.png"
            shutil.copyfile(film, images / name)
            rows.append(f"{name},No Finding,0,{patient},50,M,PA,1024,1024,0.14,0.14")
    (root / "Data_Entry_2017.csv").write_text(_HEADER + "\n".join(rows) + "\n")
    return len(rows)


def main(argv):
    del argv
    cli.check_dir(_SAMPLE, contains=bool, hint="give a folder of PNG films")
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        films = _make_data(root / "data", _SAMPLE.value, _COPIES.value)
        command = [
            sys.executable,
            "-m",
            "pipeline.ingest",
            f"--data_dir={root / 'data'}",
            f"--output_dir={root / 'out'}",
            f"--image_size={_IMAGE_SIZE.value}",
            f"--num_workers={_NUM_WORKERS.value}",
            "--running_mode=multi_processing",
        ]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        start = time.monotonic()
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True
        )
        lines = []
        config_logged = None
        for line in process.stderr:
            if config_logged is None and "Ingest config:" in line:
                config_logged = round(time.monotonic() - start, 1)
            match = _PROGRESS.search(line)
            if match:
                lines.append(
                    {
                        "t_s": round(time.monotonic() - start, 1),
                        "line": line[match.start():].strip(),
                    }
                )
        process.wait()
        wall = time.monotonic() - start
    times = [config_logged or 0.0] + [entry["t_s"] for entry in lines]
    gaps = [round(b - a, 1) for a, b in zip(times, times[1:])]
    result = {
        "films": films,
        "num_workers": _NUM_WORKERS.value,
        "image_size": _IMAGE_SIZE.value,
        "cores": len(os.sched_getaffinity(0)),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "exit_status": process.returncode,
        "wall_s": round(wall, 1),
        "config_logged_at_s": config_logged,
        "progress_lines": lines,
        "max_gap_s": max(gaps) if gaps else None,
        "note": "gaps run from the driver's first log line (`Ingest config`, "
        "after the TensorFlow and Beam imports) to the last progress line",
    }
    text = json.dumps(result, indent=1)
    print(text)
    if _OUTPUT.value:
        pathlib.Path(_OUTPUT.value).write_text(text + "\n")


if __name__ == "__main__":
    cli.run(main)
