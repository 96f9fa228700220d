"""Expected GPU step times of the papers' runs, from measured FLOPs per image.

    python benchmarks/gpu_estimate.py [--output=docs/benchmarks/gpu_estimate.json]

No GPU was measured: a step's time is its FLOPs over an assumed sustained
rate, `SUSTAINED_FRACTION` of each GPU's dense BF16 tensor-core peak. The
FLOPs per image are the ones `train_step.py` counted (docs/benchmarks/
r34.json, dn_pcam.json, infomask_512.json: forward FLOPs at batch 1, a
training step = 3x forward). The input pipeline must decode as fast as the
GPU consumes: CPU cores needed = films per second over the per-core rate
`input_pipeline.py` measured at 512 px (docs/benchmarks/input_pipeline_512.json),
scaled by pixel count for other sizes. N GPUs are assumed to scale
linearly (no communication cost): an upper bound.

Prints one JSON object; README.md's GPU-recipe table is this script's
`markdown_rows` (tests/test_gpu_recipe.py checks that they agree).
"""

import argparse
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "docs" / "benchmarks"

# The assumption: a well-fed conv net trains at about a quarter of the dense
# BF16 peak (MLPerf's ResNet-50 on A100: ~3,000 img/s x 24.6 GFLOP = 74
# TFLOP/s, 24% of 312). Keras without hand-tuned kernels may reach less.
SUSTAINED_FRACTION = 0.25
PEAK_BF16_TFLOPS = {"A100": 312.0, "H100 SXM": 989.0}
# Official train_val films (86,524) less the 10% of patients ingest draws
# for validation.
TRAIN_FILMS = 77_872

# name, flagfile (size, batch and epochs come from it), FLOPs JSON.
SETUPS = (
    ("PCAM paper: ResNet-34 + PCAM", "pcam_resnet34.flags", "r34.json"),
    ("PCAM public code: DenseNet-121 + PCAM", "chexpert_densenet121.flags",
     "dn_pcam.json"),
    ("InfoMask", "infomask.flags", "infomask_512.json"),
)


def read_flagfile(path):
    """name -> value of the `--name=value` lines of a flagfile."""
    values = {}
    for line in pathlib.Path(path).read_text().splitlines():
        line = line.strip()
        if line.startswith("--") and "=" in line:
            name, value = line[2:].split("=", 1)
            values[name] = value
    return values


def estimate():
    """The estimate of every setup on every GPU of `PEAK_BF16_TFLOPS`."""
    pipeline = json.loads((BENCHMARKS / "input_pipeline_512.json").read_text())
    per_core_512 = pipeline["images_per_cpu_second"]
    rows = []
    for name, flagfile, flops_json in SETUPS:
        flags = read_flagfile(ROOT / "configs" / flagfile)
        size, batch = int(flags["image_size"]), int(flags["batch_size"])
        epochs = int(flags["epochs"])
        measured = json.loads((BENCHMARKS / flops_json).read_text())
        if measured["size"] != size:
            raise ValueError(
                f"{flops_json} counted FLOPs at {measured['size']} px, "
                f"{flagfile} trains at {size} px: recount with train_step.py "
                f"--image_size={size}"
            )
        train_gflops = 3 * measured["forward_gflops_per_img"]
        per_core = per_core_512 * (512 / size) ** 2
        for gpu, peak in PEAK_BF16_TFLOPS.items():
            sustained = peak * SUSTAINED_FRACTION
            step_ms = batch * train_gflops / sustained
            films_per_s = 1000 * batch / step_ms
            steps = -(-TRAIN_FILMS // batch) * epochs
            rows.append(
                {
                    "setup": name,
                    "flagfile": flagfile,
                    "image_size": size,
                    "global_batch": batch,
                    "epochs": epochs,
                    "train_gflops_per_img": round(train_gflops, 1),
                    "gpu": gpu,
                    "sustained_tflops": sustained,
                    "step_ms_1_gpu": round(step_ms, 1),
                    "films_per_s_1_gpu": round(films_per_s),
                    "run_hours_1_gpu": round(steps * step_ms / 3.6e6, 2),
                    "cpu_cores_per_gpu": round(films_per_s / per_core, 1),
                }
            )
    return {
        "assumption": (
            f"sustained {SUSTAINED_FRACTION:.0%} of the dense BF16 peak "
            f"({', '.join(f'{g} {p:g} TFLOP/s' for g, p in PEAK_BF16_TFLOPS.items())}); "
            "N GPUs scale linearly (upper bound)"
        ),
        "train_films": TRAIN_FILMS,
        "input_pipeline_images_per_core_s_512": per_core_512,
        "rows": rows,
    }


def markdown_rows(result):
    """The README table's rows, one per setup and GPU."""
    return [
        f"| {r['setup']} | {r['image_size']} | {r['global_batch']} | "
        f"{r['train_gflops_per_img']:g} | {r['gpu']} | {r['step_ms_1_gpu']:g} | "
        f"{r['films_per_s_1_gpu']} | {r['run_hours_1_gpu']:g} | "
        f"{r['cpu_cores_per_gpu']:g} |"
        for r in result["rows"]
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", help="Also write the JSON here.")
    args = parser.parse_args()
    result = estimate()
    text = json.dumps(result, indent=1)
    if args.output:
        pathlib.Path(args.output).write_text(text + "\n")
    print(text)
    print("\n".join(markdown_rows(result)))


if __name__ == "__main__":
    main()
