"""Load test of serving.local_server over loopback gRPC; prints JSON figures.

Usage:
  python benchmarks/serving_load.py [--model_base_path=E] [--requests=500]
      [--threads=8] [--garbage=50] [--images=DIR] [--image_size=128]
      [--output=docs/benchmarks/serving_load.json]

Without --model_base_path it exports a randomly initialised ResNet-34 + PCAM
model (`--image_size`, boxes found at `--box_work_size`) to a temporary
directory. It then starts `python -m serving.local_server` in a subprocess
and runs two phases from `--threads` client threads, one image per request:

1. `--requests` good requests (PNG films from --images): errors, p50/p99
   latency and throughput.
2. the same good requests with `--garbage` bad ones mixed in, every kind
   of `GARBAGE_KINDS` at least once (random bytes, PNG-signature garbage,
   truncated PNG, a sound PNG header over a corrupt IDAT, empty string,
   decompression bombs: a 16000x16000 all-zero PNG of about 240 KB and JPEG,
   GIF and BMP headers declaring 20000x20000; wrong dtype, empty batch,
   oversized batch, unknown input): every bad request must get
   INVALID_ARGUMENT and every good one succeed.
3. the PNG bomb alone, `BOMB_REPEATS` times: each must be answered within
   `BOMB_SECONDS`.

The server's peak resident memory (VmHWM of its process) must stay under
`MAX_SERVER_PEAK_BYTES`. Prints one JSON object per phase, then a summary
(and writes them as a JSON list to --output); exits 1 when a criterion
fails. Loopback only (the server binds 127.0.0.1).
"""

import argparse
import json
import os
import queue
import random
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
DEFAULT_IMAGES = os.path.join(os.path.dirname(REPO), "shared", "cxr14_sample", "images")
BOMB_SECONDS = 2.0
BOMB_REPEATS = 5
MAX_SERVER_PEAK_BYTES = 2 * 1024**3


def export_random_model(directory, image_size, box_work_size):
    """Builds, saves and exports a random-weight model; returns the base path."""
    from cxr_tf import export_lib  # pylint: disable=g-import-not-at-top
    from cxr_tf.models import ModelConfig, build_model

    config = ModelConfig(image_size=image_size)
    model_dir = os.path.join(directory, "model")
    os.makedirs(model_dir)
    build_model(config).save(os.path.join(model_dir, "model.keras"))
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        f.write(config.to_json())
    base = os.path.join(directory, "serving")
    export_lib.export_saved_model(
        export_lib.ExportConfig(model_dir, base, version=1, box_work_size=box_work_size)
    )
    return base


def start_server(base_path, max_batch_size, timeout=300):
    """Starts local_server on a free port; returns (process, port)."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "serving.local_server",
            f"--model_base_path={base_path}",
            "--port=0",
            f"--max_batch_size={max_batch_size}",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    lines = queue.Queue()
    threading.Thread(
        target=lambda: [lines.put(l) for l in process.stdout], daemon=True
    ).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            if process.poll() is not None:
                raise RuntimeError(f"local_server exited with {process.returncode}")
            continue
        try:
            info = json.loads(line)
        except ValueError:
            continue
        if "listening" in info:
            return process, int(info["listening"].rsplit(":", 1)[1])
    process.kill()
    raise RuntimeError(f"local_server did not start within {timeout} s")


def png_zeros(width, height):
    """A valid all-zero 8-bit gray PNG, compressed row by row (a bomb when large)."""

    def chunk(kind, data):
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)
    body = b"".join(compressor.compress(row) for _ in range(height))
    body += compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", body)
        + chunk(b"IEND", b"")
    )


def _header_bombs(side):
    """JPEG, GIF and BMP files whose headers declare side x side pixels."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    small = np.zeros((8, 8, 1), np.uint8)
    jpeg = bytearray(tf.io.encode_jpeg(small).numpy())
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = struct.pack(">HH", side, side)
    # Logical screen side x side, then one 8x8 frame and the trailer.
    gif = b"GIF89a" + struct.pack("<HH", side, side) + b"\x00\x00\x00"
    gif += b"," + struct.pack("<HHHH", 0, 0, 8, 8) + b"\x00\x02\x02\x44\x01\x00;"
    header = b"BM" + struct.pack("<IHHI", 54 + 64, 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, side, side, 1, 8, 0, 64, 0, 0, 0, 0)
    bmp = header + info + bytes(64)
    return bytes(jpeg), gif, bmp


def garbage_kinds(max_batch_size, seed=0):
    """(name, make inputs) for every kind of bad request; each is INVALID_ARGUMENT."""
    rng = np.random.default_rng(seed)
    png_head = b"\x89PNG\r\n\x1a\n"
    bomb = png_zeros(16000, 16000)
    sound_header = png_zeros(40, 30)[:33]  # Signature and IHDR.
    jpeg_bomb, gif_bomb, bmp_bomb = _header_bombs(20000)

    def one(data):
        return lambda: {"image_bytes": np.array([data], object)}

    return [
        ("random bytes", lambda: {"image_bytes": np.array([rng.bytes(200)], object)}),
        ("PNG-signature garbage", one(b"\x89PNG not really")),
        (
            "truncated PNG",
            lambda: {"image_bytes": np.array([png_head + rng.bytes(64)], object)},
        ),
        (
            "PNG header, corrupt IDAT",
            one(sound_header + b"\x00\x00\x00\x08IDAT" + rng.bytes(12)),
        ),
        ("empty string", one(b"")),
        ("PNG bomb 16000x16000", one(bomb)),
        ("JPEG header 20000x20000", one(jpeg_bomb)),
        ("GIF header 20000x20000", one(gif_bomb)),
        ("BMP header 20000x20000", one(bmp_bomb)),
        ("wrong dtype", lambda: {"image_bytes": np.zeros((1,), np.float32)}),
        ("empty batch", lambda: {"image_bytes": np.array([], object)}),
        (
            "oversized batch",
            lambda: {"image_bytes": np.array([b"x"] * (max_batch_size + 1), object)},
        ),
        ("unknown input", lambda: {"pixels": np.zeros((1, 4), np.float32)}),
    ]


def _garbage_requests(count, max_batch_size, seed=0):
    """`count` bad requests (at least one of each kind), cycling the kinds."""
    makers = garbage_kinds(max_batch_size, seed)
    return [makers[i % len(makers)] for i in range(max(count, len(makers)))]


def peak_rss_bytes(pid):
    """VmHWM (peak resident set) of process `pid`, from /proc."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def time_bomb(client_factory, bomb, repeats):
    """Sends the bomb alone `repeats` times; returns (codes, seconds)."""
    from serving.client import ServingError  # pylint: disable=g-import-not-at-top

    client = client_factory()
    codes, seconds = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        try:
            client.predict_raw({"image_bytes": np.array([bomb], object)})
            codes.append("OK")
        except ServingError as e:
            codes.append(e.code.name if e.code else str(e))
        seconds.append(time.perf_counter() - start)
    client.close()
    return codes, seconds


def run_phase(client_factory, good, garbage, threads):
    """Sends every request from `threads` threads; returns the phase record."""
    import grpc  # pylint: disable=g-import-not-at-top

    from serving.client import ServingError  # pylint: disable=g-import-not-at-top

    work = queue.Queue()
    for item in good:
        work.put(("good", item))
    for item in garbage:
        work.put(("garbage", item))
    items = []
    while not work.empty():
        items.append(work.get())
    random.Random(0).shuffle(items)
    for item in items:
        work.put(item)
    latencies, errors, garbage_ok, garbage_wrong = [], [], 0, []
    garbage_seconds = {}
    lock = threading.Lock()

    def worker():
        nonlocal garbage_ok
        client = client_factory()
        while True:
            try:
                kind, payload = work.get_nowait()
            except queue.Empty:
                break
            start = time.perf_counter()
            try:
                if kind == "good":
                    out = client.predict_raw(
                        {"image_bytes": np.array([payload], object)}
                    )
                    if out["probabilities"].shape != (1, 14):
                        raise RuntimeError(f"bad shape {out['probabilities'].shape}")
                else:
                    client.predict_raw(payload[1]())
                    raise RuntimeError(f"garbage accepted: {payload[0]}")
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
            except ServingError as e:
                with lock:
                    if kind == "garbage":
                        elapsed = time.perf_counter() - start
                        garbage_seconds[payload[0]] = max(
                            elapsed, garbage_seconds.get(payload[0], 0.0)
                        )
                    if kind == "garbage" and e.code == grpc.StatusCode.INVALID_ARGUMENT:
                        garbage_ok += 1
                    elif kind == "garbage":
                        garbage_wrong.append(f"{payload[0]}: {e}")
                    else:
                        errors.append(str(e))
            except Exception as e:  # pylint: disable=broad-except
                with lock:
                    (garbage_wrong if kind == "garbage" else errors).append(str(e))
        client.close()

    start = time.perf_counter()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    wall = time.perf_counter() - start
    ms = np.array(latencies) * 1000.0
    return {
        "good_requests": len(good),
        "good_succeeded": len(latencies),
        "errors": len(errors),
        "first_errors": errors[:3],
        "garbage_requests": len(garbage),
        "garbage_invalid_argument": garbage_ok,
        "garbage_other": garbage_wrong[:3],
        "garbage_kinds": len({g[0] for g in garbage}),
        "garbage_max_s_by_kind": {
            k: round(v, 3) for k, v in sorted(garbage_seconds.items())
        },
        "threads": threads,
        "wall_s": round(wall, 3),
        "throughput_rps": round(len(latencies) / wall, 2) if wall else None,
        "latency_ms": {
            "p50": round(float(np.percentile(ms, 50)), 2) if len(ms) else None,
            "p90": round(float(np.percentile(ms, 90)), 2) if len(ms) else None,
            "p99": round(float(np.percentile(ms, 99)), 2) if len(ms) else None,
            "max": round(float(ms.max()), 2) if len(ms) else None,
        },
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model_base_path")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--garbage", type=int, default=50)
    parser.add_argument("--images", default=DEFAULT_IMAGES)
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--box_work_size", type=int, default=256)
    parser.add_argument("--max_batch_size", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--output", help="Also write the JSON records here.")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not os.path.isdir(args.images):
        parser.error(f"--images is not a directory: {args.images}")
    files = sorted(
        os.path.join(args.images, n)
        for n in os.listdir(args.images)
        if n.lower().endswith((".png", ".jpg", ".jpeg"))
    )
    if not files:
        parser.error(f"no PNG/JPEG images in {args.images}")
    good = []
    for i in range(args.requests):
        with open(files[i % len(files)], "rb") as f:
            good.append(f.read())

    from serving.client import CxrClient  # pylint: disable=g-import-not-at-top

    with tempfile.TemporaryDirectory() as tmp:
        base = args.model_base_path
        exported_here = base is None
        t0 = time.perf_counter()
        if exported_here:
            base = export_random_model(tmp, args.image_size, args.box_work_size)
        export_s = time.perf_counter() - t0
        process, port = start_server(base, args.max_batch_size)
        try:

            def factory():
                return CxrClient(f"127.0.0.1:{port}", timeout=args.timeout)

            # One request first so that graph optimisation is not timed.
            factory().predict_raw({"image_bytes": np.array(good[:1], object)})
            clean = run_phase(factory, good, [], args.threads)
            garbage = _garbage_requests(args.garbage, args.max_batch_size)
            mixed = run_phase(factory, good, garbage, args.threads)
            bomb_png = png_zeros(16000, 16000)
            codes, seconds = time_bomb(factory, bomb_png, BOMB_REPEATS)
            bomb = {
                "bomb": "16000x16000 all-zero PNG",
                "bytes": len(bomb_png),
                "repeats": BOMB_REPEATS,
                "codes": sorted(set(codes)),
                "max_s": round(max(seconds), 3),
                "limit_s": BOMB_SECONDS,
            }
            peak = peak_rss_bytes(process.pid)
        finally:
            process.terminate()
            process.wait(timeout=30)
    setup = {
        "server": "serving.local_server (loopback gRPC)",
        "model": (
            f"random-weight resnet34+pcam, {args.image_size} px, boxes at "
            f"box_work_size={args.box_work_size}"
            if exported_here
            else base
        ),
        "images": f"{len(files)} files from {args.images}, one per request",
        "export_s": round(export_s, 1) if exported_here else None,
        "cpu_count": os.cpu_count(),
    }
    clean_ok = clean["errors"] == 0 and clean["good_succeeded"] == args.requests
    mixed_ok = (
        mixed["errors"] == 0
        and mixed["good_succeeded"] == args.requests
        and mixed["garbage_invalid_argument"] == len(garbage)
    )
    bomb_ok = bomb["codes"] == ["INVALID_ARGUMENT"] and bomb["max_s"] < BOMB_SECONDS
    memory = {
        "server_peak_rss_mb": round(peak / 1024**2, 1),
        "limit_mb": round(MAX_SERVER_PEAK_BYTES / 1024**2, 1),
        "source": "VmHWM of the local_server process after all phases",
    }
    memory_ok = peak < MAX_SERVER_PEAK_BYTES
    records = [
        {"phase": "clean", **clean},
        {"phase": "mixed", **mixed},
        {"phase": "bomb", **bomb},
        {"memory": memory},
        {
            "setup": setup,
            "clean_ok": clean_ok,
            "mixed_ok": mixed_ok,
            "bomb_ok": bomb_ok,
            "memory_ok": memory_ok,
        },
    ]
    for record in records:
        print(json.dumps(record))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(records, f, indent=1)
            f.write("\n")
    return 0 if clean_ok and mixed_ok and bomb_ok and memory_ok else 1


if __name__ == "__main__":
    sys.exit(main())
