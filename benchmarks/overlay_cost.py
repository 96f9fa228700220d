"""Time and peak memory of one predict overlay of a large film; prints JSON.

  python -m benchmarks.overlay_cost [--side=7000] [--panels=1] [--output=F.json]

Draws the overlay that `predict` writes for one film of side x side pixels
(a smooth synthetic film, a 16 x 16 map per shown finding, one predicted and
one truth box per finding) with `cxr_tf.predict_lib.write_overlay`, in a fresh
process, and reports the wall seconds of the call and the process's peak
resident memory before and after it (ru_maxrss).
"""

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=7000)
    parser.add_argument("--panels", type=int, default=1)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)

    from cxr_tf import predict_lib  # pylint: disable=import-outside-toplevel
    from cxr_tf.data import schema  # pylint: disable=import-outside-toplevel

    side, size = args.side, 64
    # uint8 throughout: no full-size float temporary raises the baseline.
    ramp = (np.arange(side, dtype=np.int64) * 127 // max(side - 1, 1)).astype(np.uint8)
    pixels = np.add.outer(ramp, ramp)
    findings = list(schema.FINDINGS)
    shown = findings[: args.panels]
    probs = {f: (0.9 if f in shown else 0.1) for f in findings}
    rng = np.random.default_rng(0)
    maps = rng.random((16, 16, len(findings)), dtype=np.float32)
    box = {"x": side * 0.2, "y": side * 0.3, "w": side * 0.25, "h": side * 0.2}
    record = {
        "image": "big.png",
        "height": side,
        "width": side,
        "probabilities": probs,
        "boxes": [dict(box, finding=f, score=0.95) for f in shown],
    }
    truth = {f: [(side * 0.25, side * 0.35, side * 0.2, side * 0.15)] for f in shown}
    before = _peak_rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "big.png")
        start = time.perf_counter()
        kwargs = {}
        if "gt_boxes" in predict_lib.write_overlay.__code__.co_varnames:
            kwargs["gt_boxes"] = truth
        predict_lib.write_overlay(
            path, pixels, record, maps, findings, size, "probability", 0.5, **kwargs
        )
        seconds = time.perf_counter() - start
        png_bytes = os.path.getsize(path)
    result = {
        "film_side": side,
        "panels": len(shown),
        "overlay_seconds": round(seconds, 2),
        "peak_rss_mb_before_overlay": round(before, 1),
        "peak_rss_mb_after_overlay": round(_peak_rss_mb(), 1),
        "overlay_png_bytes": png_bytes,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
