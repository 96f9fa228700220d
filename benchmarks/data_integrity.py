"""What checking record files costs: sha256 (pipeline cache) vs a full TF read.

    python benchmarks/data_integrity.py [--megabytes=200] [--output=FILE.json]

Writes GZIP TFRecord shards of incompressible bytes (like stored PNGs), then
times, per MB: the pipeline's sha256 of a step's outputs (`base.checksum_outputs`,
run before every reuse), the per-file read that names a damaged shard
(`input_pipeline.find_damaged_files`, run only after a DataLossError), and,
for scale, one pass of the training input pipeline's reading (what checking
every shard up front before each run would add). Prints JSON.
"""

import argparse
import json
import os
import platform
import tempfile
import time


def _write_shards(folder, megabytes, shards=4, record_bytes=60_000):
    import tensorflow as tf

    options = tf.io.TFRecordOptions(compression_type="GZIP")
    per_shard = max(1, megabytes * (1 << 20) // record_bytes // shards)
    paths = []
    for shard in range(shards):
        path = os.path.join(folder, f"train-{shard:05d}-of-{shards:05d}.tfrecord.gz")
        with tf.io.TFRecordWriter(path, options) as writer:
            for _ in range(per_shard):
                writer.write(os.urandom(record_bytes))
        paths.append(path)
    return paths


def _timed(fn, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=200)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    import tensorflow as tf

    from cxr_tf.data import input_pipeline
    from pipeline import base

    with tempfile.TemporaryDirectory() as folder:
        paths = _write_shards(folder, args.megabytes)
        size_mb = sum(os.path.getsize(p) for p in paths) / (1 << 20)
        sha = _timed(lambda: base.checksum_outputs(folder))
        check = _timed(lambda: input_pipeline.find_damaged_files(paths))
        raw = tf.data.TFRecordDataset(paths, compression_type="GZIP")
        read = _timed(lambda: raw.reduce(0, lambda n, _: n + 1))
    result = {
        "benchmark": "data_integrity",
        "megabytes": round(size_mb, 1),
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "machine": platform.machine(),
        "seconds": {
            "sha256_all_outputs": round(sha, 3),
            "find_damaged_files": round(check, 3),
            "tf_read_all_records": round(read, 3),
        },
        "mb_per_second": {
            "sha256_all_outputs": round(size_mb / sha, 1),
            "find_damaged_files": round(size_mb / check, 1),
            "tf_read_all_records": round(size_mb / read, 1),
        },
        "note": "best of 3, files in the page cache; a busy shared 2-core "
        "machine when measured",
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
