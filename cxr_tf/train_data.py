"""What a training run reads: split counts, the stored size check, datasets."""

import dataclasses
import json
import os

from absl import logging
import numpy as np

from cxr_tf import errors
from cxr_tf import model_dir as model_dir_lib
from cxr_tf.data import schema


def count_examples(data_dir, split):
    """Counts the records of one split, preferring the ingest report.

    Args:
      data_dir: directory of ingested TFRecords.
      split: "train", "val" or "test".

    Returns:
      The number of examples.

    Raises:
      FileNotFoundError: no TFRecord of the split.
    """
    import tensorflow as tf

    report = os.path.join(data_dir, schema.INGEST_REPORT)
    if os.path.isfile(report):
        with open(report) as f:
            payload = json.load(f)
        count = _find_split_count(payload, split)
        if count is not None:
            return count
    files = tf.io.gfile.glob(
        os.path.join(data_dir, schema.TFRECORD_PATTERN.format(split=split))
    )
    if not files:
        raise FileNotFoundError(
            f"No {schema.TFRECORD_PATTERN.format(split=split)} files in {data_dir}"
        )
    ds = tf.data.TFRecordDataset(sorted(files), compression_type="GZIP")
    return int(ds.reduce(np.int64(0), lambda n, _: n + 1).numpy())


def _find_split_count(payload, split):
    # The ingest report format belongs to the ingest helper; accept the
    # plausible layouts rather than failing when it changes.
    for key in ("written", "splits", "split_counts", "counts", "examples"):
        value = payload.get(key) if isinstance(payload, dict) else None
        if isinstance(value, dict) and split in value:
            entry = value[split]
            if isinstance(entry, int):
                return entry
            if isinstance(entry, dict):
                for sub in ("examples", "count", "num_examples", "images"):
                    if isinstance(entry.get(sub), int):
                        return entry[sub]
    return None


def input_config(config, training):
    """The `InputConfig` of the input pipeline for this run."""
    from cxr_tf.data import input_pipeline

    return input_pipeline.InputConfig(
        image_size=config.model.image_size,
        batch_size=config.batch_size,
        normalization=config.model.normalization,
        augment=bool(config.augment and training),
        flip=bool(config.flip and training),
        shuffle_buffer=config.shuffle_buffer,
        seed=config.seed,
    )


def finding_indices(findings):
    """Columns of `findings` in the 14-finding label vector."""
    return [schema.FINDINGS.index(f) for f in findings]


def select_labels(labels, findings):
    """Keeps the label columns of `findings` (a TF op, usable in tf.data)."""
    import tensorflow as tf

    if tuple(findings) == schema.FINDINGS:
        return labels
    return tf.gather(labels, finding_indices(findings), axis=-1)


def make_dataset(config, split, training, with_info=False, batch_size=None):
    """The run's dataset of (image, {"logits": labels}) (or with_info features).

    Args:
      config: a `TrainConfig`.
      split: "train", "val" or "test".
      training: shuffle, augment and repeat.
      with_info: pass the input pipeline's info features through.
      batch_size: overrides the config's batch size.

    Returns:
      A `tf.data.Dataset`.
    """
    import tensorflow as tf

    from cxr_tf.data import input_pipeline

    cfg = input_config(config, training)
    if batch_size is not None:
        cfg = dataclasses.replace(cfg, batch_size=batch_size)
    ds = input_pipeline.build_dataset(
        config.data_dir, split, cfg, training=training, with_info=with_info
    )
    findings = config.findings

    if with_info:
        ds = ds.map(lambda f, y: (f, select_labels(y, findings)))
    else:
        ds = ds.map(lambda x, y: (x, {"logits": select_labels(y, findings)}))
    if training:
        if ds.cardinality() != tf.data.INFINITE_CARDINALITY:
            ds = ds.repeat()
        options = tf.data.Options()
        # Small data sets have fewer files than workers: shard by element.
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA
        )
        ds = ds.with_options(options)
    return ds.prefetch(tf.data.AUTOTUNE)


# ---------------------------------------------------------------------------
# Optimizer and schedule.


def check_stored_size(config):
    """Checks the records' stored size against the network size.

    Records stored larger than `model.image_size` are letterboxed down, as in the
    papers' setup (films stored at 1024, fed at 512); the stored size goes
    into config.json so predict and the served model shrink raw films the
    same way. Records stored smaller would be upscaled: refused unless
    `allow_upscale`, since it usually means a mistaken `--image_size`.

    Args:
      config: a `TrainConfig`.

    Returns:
      `model_dir.training_data(config.data_dir)`.

    Raises:
      UserValueError: records stored smaller than `model.image_size`.
    """
    data = model_dir_lib.training_data(config.data_dir)
    stored = data["ingest_image_size"]
    if stored is not None and stored < config.model.image_size:
        message = (
            f"records are stored at {stored} px, smaller than "
            f"--image_size={config.model.image_size}"
        )
        if not config.allow_upscale:
            raise errors.UserValueError(
                f"{message}: training would upscale them",
                f"--data_dir={config.data_dir}",
                f"re-ingest with --image_size>={config.model.image_size}, train with "
                f"--image_size<={stored}, or pass --allow_upscale",
            )
        logging.warning("%s; upscaling them (--allow_upscale).", message)
    elif stored is not None and stored != config.model.image_size:
        logging.info(
            "Records stored at %d px, letterboxed to %d px; config.json records "
            "the stored size for predict and export.",
            stored,
            config.model.image_size,
        )
    return data
