"""Input-pipeline throughput from ingested TFRecords, with training augmentation.

    taskset -c 0 python benchmarks/input_pipeline.py --image_size=256

Makes its own data (synthetic films if `cxr_tf.data.synthetic` is there, else
noise-textured PNGs) at the requested size, ingests it with
--image_size=S through `cxr_tf.data.ingest`, then times --num_batches
training batches after --warmup_batches. Prints one JSON line:
images_per_second, image_size, cores, batch_size, ...
"""

import json
import os
import pathlib
import sys
import tempfile
import time

from absl import flags
from absl import logging

from cxr_tf import cli

_IMAGE_SIZE = flags.DEFINE_integer("image_size", 256, "Network input side S.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Batch size.")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 60, "Batches timed.")
_WARMUP_BATCHES = flags.DEFINE_integer("warmup_batches", 10, "Batches not timed.")
_NUM_PATIENTS = flags.DEFINE_integer(
    "num_patients", 150, "Patients of the generated data (about 1.7 films each)."
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Ingested records to read instead of generating data."
)
_WORK_DIR = flags.DEFINE_string(
    "work_dir", None, "Where generated data and records go (default: a temp dir)."
)
_AUGMENT = flags.DEFINE_bool("augment", True, "Training augmentation on.")
_PRIVATE_THREADS = flags.DEFINE_integer(
    "private_threadpool_size", 0, "tf.data private thread pool (0: shared pool)."
)


def _write_noise_dataset(data_dir, num_patients, image_size):
    """Fallback data: smooth random films and a minimal Data_Entry table."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    from PIL import Image  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(0)
    images = data_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for patient in range(1, num_patients + 1):
        image_id = f"{patient:08d}_000.png"
        coarse = rng.integers(0, 256, (image_size // 16, image_size // 16), np.uint8)
        film = Image.fromarray(coarse).resize((image_size, image_size), Image.BICUBIC)
        noise = rng.integers(0, 24, (image_size, image_size), np.uint8)
        pixels = np.clip(np.asarray(film, np.int16) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / image_id)
        rows.append(
            f"{image_id},No Finding,0,{patient},50,M,PA,{image_size},"
            f"{image_size},0.143,0.143"
        )
    (data_dir / "Data_Entry_2017.csv").write_text(
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,"
        "Patient Gender,View Position,OriginalImage[Width,Height],"
        "OriginalImagePixelSpacing[x,y]\n" + "\n".join(rows) + "\n"
    )
    return "noise"


def _make_records(work_dir, image_size, num_patients):
    from cxr_tf.data import ingest  # pylint: disable=import-outside-toplevel

    data_dir = work_dir / f"data_{image_size}"
    records = work_dir / f"records_{image_size}"
    source_file = work_dir / f"source_{image_size}.txt"
    if (records / "ingest_report.json").exists() and source_file.exists():
        return records, source_file.read_text() + " (reused)"
    try:
        from cxr_tf.data import synthetic  # pylint: disable=import-outside-toplevel

        synthetic.generate_dataset(
            synthetic.SyntheticConfig(
                output_dir=str(data_dir),
                num_patients=num_patients,
                image_size=image_size,
                seed=0,
            )
        )
        source = "synthetic"
    except ImportError:
        source = _write_noise_dataset(data_dir, num_patients, image_size)
    ingest.run_ingest(
        ingest.IngestConfig(
            data_dir=str(data_dir),
            output_dir=str(records),
            image_size=image_size,
            running_mode="in_memory",
            num_workers=1,
            overwrite=True,
            images_per_shard=64,
        )
    )
    source_file.write_text(source)
    return records, source


def main(argv):
    del argv
    if _DATA_DIR.value:
        cli.check_dir(_DATA_DIR, contains=bool, hint="run pipeline.ingest first")
    if _WORK_DIR.value:
        cli.check_writable_dir(_WORK_DIR)
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    from cxr_tf.data import input_pipeline  # pylint: disable=import-outside-toplevel

    size = _IMAGE_SIZE.value
    if _DATA_DIR.value:
        records, source = pathlib.Path(_DATA_DIR.value), "given"
    else:
        work_dir = pathlib.Path(
            _WORK_DIR.value or tempfile.mkdtemp(prefix="cxr_input_bench_")
        )
        records, source = _make_records(work_dir, size, _NUM_PATIENTS.value)
    config = input_pipeline.InputConfig(
        image_size=size,
        batch_size=_BATCH_SIZE.value,
        augment=_AUGMENT.value,
        shuffle_buffer=256,
        private_threadpool_size=_PRIVATE_THREADS.value,
    )
    dataset = input_pipeline.build_dataset(records, "train", config, training=True)
    iterator = iter(dataset)
    for _ in range(_WARMUP_BATCHES.value):
        next(iterator)
    start = time.perf_counter()
    cpu_start = time.process_time()
    checksum = 0.0
    for _ in range(_NUM_BATCHES.value):
        images, _ = next(iterator)
        checksum += float(images[0, 0, 0, 0])  # forces the batch to exist
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    images_seen = _NUM_BATCHES.value * _BATCH_SIZE.value
    result = {
        "images_per_second": round(images_seen / elapsed, 1),
        # On a shared machine the wall-clock rate depends on the neighbours;
        # images per CPU-second of this process is what one free core gives.
        "images_per_cpu_second": round(images_seen / cpu, 1),
        "image_size": size,
        "cores": len(os.sched_getaffinity(0)),
        "batch_size": _BATCH_SIZE.value,
        "num_batches": _NUM_BATCHES.value,
        "augment": _AUGMENT.value,
        "data": source,
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "tensorflow": tf.__version__,
    }
    logging.info("checksum %s", checksum)
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
    cli.run(main)
