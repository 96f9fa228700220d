"""Training-step and inference time per image of a localizer on this machine.

    taskset -c 0,1 python benchmarks/train_step.py --backbone=densenet121 \
        --pooling=pcam --image_size=512 --batch_size=4 --steps=5
    taskset -c 0,1 python benchmarks/train_step.py --plain ...   # baseline
    taskset -c 0,1 python benchmarks/train_step.py --compare_pooling=avg ...

A training step is forward + backward + Adam(1e-4) update of
`build_model(ModelConfig(...))` on one fixed synthetic batch with the
balanced BCE on the logits, run through `model.compile(...)` and
`train_on_batch` as `cxr_tf.train_lib` does. Inference is `predict_on_batch`
(all three outputs). Times are medians over --steps steps after
--warmup_steps untimed ones (the first includes tracing and compiling).

Tuned (default): TensorFlow's oneDNN kernels on (TF_ENABLE_ONEDNN_OPTS=1;
TensorFlow leaves them off on CPUs without AVX-512 VNNI/BF16/AMX, such as
AVX2-only AMD EPYC), graph mode without XLA, one inter-op thread and one
intra-op thread per core the process may use. XLA (--jit_compile) measured
slower on CPU, and compiling a DenseNet training step took minutes.
`--plain`: the Keras defaults on CPU (`jit_compile="auto"`, which is no XLA
on a CPU-only machine; TensorFlow's default thread pools; the environment's
TF_ENABLE_ONEDNN_OPTS), the like-for-like "plain Keras" baseline.

With --compare_pooling=P a second model with pooling P is built and its
steps are interleaved with the first model's, so both see the same machine
load; the JSON then has `compare` with its figures and the relative cost.

Prints one JSON object. FLOPs are counted on the frozen inference graph
at batch 1 by the TensorFlow profiler (convolutions, matmuls and the
element-wise ops it has statistics for); a training step is counted as
3x the forward FLOPs (forward, plus gradients with respect to activations
and to weights, each about one forward).
"""

import json
import os
import pathlib
import sys

from absl import flags
from absl import logging

import _common  # The script's own directory is on sys.path.
from cxr_tf import choices
from cxr_tf import cli
from cxr_tf import errors

_BACKBONE = flags.DEFINE_enum(
    "backbone", "densenet121", list(choices.BACKBONES), "ModelConfig.backbone."
)
_POOLING = flags.DEFINE_enum(
    "pooling", "pcam", list(choices.POOLING_NAMES), "ModelConfig.pooling."
)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 512, "Input side S (multiple of 32).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 4, "Images per step.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (training and inference).")
_WARMUP_STEPS = flags.DEFINE_integer(
    "warmup_steps", 1, "Untimed steps first (the first traces and compiles)."
)
_PLAIN = flags.DEFINE_bool(
    "plain",
    False,
    "Keras defaults on CPU: no XLA, default threading (overrides --jit_compile, "
    "--intra_op_threads and --inter_op_threads).",
)
_JIT_COMPILE = flags.DEFINE_bool(
    "jit_compile", False, "Compile the train and predict steps with XLA."
)
_INTRA_OP = flags.DEFINE_integer(
    "intra_op_threads", -1, "Intra-op threads (-1: the cores this process may use)."
)
_INTER_OP = flags.DEFINE_integer("inter_op_threads", 1, "Inter-op threads.")
_ONEDNN = flags.DEFINE_enum(
    "onednn",
    "on",
    ["default", "on", "off"],
    "TF_ENABLE_ONEDNN_OPTS for this run ('default': leave the environment as "
    "is; --plain always does).",
)
_XLA_FLAGS = flags.DEFINE_string(
    "xla_flags", "", "Extra XLA_FLAGS, e.g. '--xla_cpu_enable_fast_math=true'."
)
_MIXED_PRECISION = flags.DEFINE_enum(
    "mixed_precision",
    "off",
    ["off", "mixed_float16", "mixed_bfloat16"],
    "Keras dtype policy for the run.",
)
_COMPARE_POOLING = flags.DEFINE_string(
    "compare_pooling", None, "Second pooling timed interleaved with the first."
)
_TRAIN = flags.DEFINE_bool("train", True, "Time the training step.")
_INFER = flags.DEFINE_bool("infer", True, "Time inference.")
_FLOPS = flags.DEFINE_bool("flops", True, "Count the forward FLOPs.")
_CHANNELS = flags.DEFINE_integer("channels", 1, "Input channels.")

TRAIN_FLOPS_FACTOR = 3
FLOPS_CONVENTION = (
    "forward FLOPs (multiply and add counted separately) of the inference "
    "graph at batch 1 from the TensorFlow profiler; training step = 3x forward"
)


def _configure_environment():
    """Environment read when TensorFlow loads: set before importing it."""
    if _ONEDNN.value != "default" and not _PLAIN.value:
        os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1" if _ONEDNN.value == "on" else "0"
    if _XLA_FLAGS.value:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " " + _XLA_FLAGS.value
        ).strip()


def _configure_threads(tf):
    """Sets TF's thread pools; returns (intra, inter) as TF reports them."""
    if not _PLAIN.value:
        intra = _INTRA_OP.value if _INTRA_OP.value >= 0 else _common.cores()
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(_INTER_OP.value)
    # 0 means "TensorFlow chooses" (one per core it sees).
    return (
        tf.config.threading.get_intra_op_parallelism_threads(),
        tf.config.threading.get_inter_op_parallelism_threads(),
    )


def _check_flags():
    for name, value, low in (
        ("image_size", _IMAGE_SIZE.value, 32),
        ("batch_size", _BATCH_SIZE.value, 1),
        ("steps", _STEPS.value, 1),
        ("warmup_steps", _WARMUP_STEPS.value, 0),
        ("channels", _CHANNELS.value, 1),
    ):
        if value < low:
            raise errors.UserValueError(
                f"--{name} must be >= {low}", f"--{name}={value}", "give a larger value"
            )
    cli.check_image_size(_IMAGE_SIZE, _BACKBONE.value)


def _build(pooling, jit_compile):
    import keras  # pylint: disable=import-outside-toplevel

    from cxr_tf import losses  # pylint: disable=import-outside-toplevel
    from cxr_tf.models import ModelConfig  # pylint: disable=import-outside-toplevel
    from cxr_tf.models import build_model  # pylint: disable=import-outside-toplevel

    model = build_model(
        ModelConfig(
            backbone=_BACKBONE.value,
            pooling=pooling,
            image_size=_IMAGE_SIZE.value,
            channels=_CHANNELS.value,
        )
    )
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=1e-4),
        loss={"logits": losses.get_loss("balanced_bce")},
        jit_compile=jit_compile,
    )
    return model


def main(argv):
    cli.reject_arguments(argv)
    _check_flags()
    _configure_environment()
    import keras  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    intra, inter = _configure_threads(tf)
    jit = "auto" if _PLAIN.value else _JIT_COMPILE.value
    if _MIXED_PRECISION.value != "off":
        keras.mixed_precision.set_global_policy(_MIXED_PRECISION.value)
    keras.utils.set_random_seed(0)

    size, batch, channels = _IMAGE_SIZE.value, _BATCH_SIZE.value, _CHANNELS.value
    rng = np.random.default_rng(0)
    images = tf.constant(
        rng.standard_normal((batch, size, size, channels), dtype=np.float32)
    )
    labels = rng.integers(0, 2, (batch, 14)).astype(np.float32)
    # At least one positive and one negative per batch for the balanced BCE.
    labels[0, 0], labels[-1, 1] = 1.0, 0.0
    targets = {"logits": tf.constant(labels)}

    poolings = [_POOLING.value]
    if _COMPARE_POOLING.value:
        poolings.append(_COMPARE_POOLING.value)
    models = [_build(p, jit) for p in poolings]
    logging.info("Built %s; timing.", ", ".join(m.name for m in models))

    load_start = os.getloadavg()
    result = {
        "backbone": _BACKBONE.value,
        "pooling": _POOLING.value,
        "size": size,
        "batch": batch,
        "threads": intra or _common.cores(),
        "intra_op_threads": intra,
        "inter_op_threads": inter,
        "cores": _common.cores(),
        "mode": "plain" if _PLAIN.value else "tuned",
        "jit_compile": models[0].jit_compile,
        "mixed_precision": _MIXED_PRECISION.value,
        "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset"),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "steps": _STEPS.value,
        "warmup_steps": _WARMUP_STEPS.value,
    }
    per_model = [{} for _ in models]

    def time_steps(kind, fns):
        # The models' steps interleaved; figures under "<kind>_..." per model.
        first, timed, cpu = _common.run_interleaved(
            fns, _WARMUP_STEPS.value, _STEPS.value
        )
        for out, f, ms, cpu_ms in zip(per_model, first, timed, cpu):
            out.update(_common.summarize(kind, ms, batch, cpu_ms))
            out[f"{kind}_first_step_s"] = round(f / 1000.0, 1)
        return timed

    if _TRAIN.value:
        timed = time_steps(
            "train",
            [
                (lambda m=m: m.train_on_batch(images, targets, return_dict=True))
                for m in models
            ],
        )
        logging.info("Training steps done (ms): %s", timed)
    if _INFER.value:
        timed = time_steps(
            "infer", [(lambda m=m: m.predict_on_batch(images)) for m in models]
        )
        logging.info("Inference steps done (ms): %s", timed)
    load_end = os.getloadavg()
    if _FLOPS.value:
        for out, model in zip(per_model, models):
            flops = _common.forward_flops(model, (size, size, channels))
            out["forward_gflops_per_img"] = round(flops / 1e9, 3)
            out["train_gflops_per_img"] = round(TRAIN_FLOPS_FACTOR * flops / 1e9, 3)
            if "train_ms_per_img" in out:
                out["train_gflops_per_s"] = round(
                    TRAIN_FLOPS_FACTOR * flops / 1e6 / out["train_ms_per_img"], 1
                )
            if "infer_ms_per_img" in out:
                out["infer_gflops_per_s"] = round(
                    flops / 1e6 / out["infer_ms_per_img"], 1
                )
        result["flops_convention"] = FLOPS_CONVENTION
    result.update(per_model[0])
    if len(models) > 1:
        other = dict(per_model[1], pooling=poolings[1])
        # How much more (negative: less) the first pooling's step costs.
        for key in ("train", "infer"):
            for unit in ("ms", "cpu_ms"):
                name = f"{key}_{unit}_per_img"
                if name in other:
                    extra = 100.0 * (per_model[0][name] / other[name] - 1.0)
                    other[f"{poolings[0]}_extra_{key}_{unit}_pct"] = round(extra, 1)
        result["compare"] = other
    result["load_avg_start"] = [round(v, 2) for v in load_start]
    result["load_avg_end"] = [round(v, 2) for v in load_end]
    result["tensorflow"] = tf.__version__
    result["keras"] = keras.__version__
    result["python"] = sys.version.split()[0]
    print(json.dumps(result))


if __name__ == "__main__":
    # Run as a script from anywhere: the package is the checkout's.
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cli.run(main)
