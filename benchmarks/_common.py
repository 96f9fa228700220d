"""Helpers shared by the benchmark scripts: FLOP counting and step timing."""

import os
import statistics
import time


def cores():
    """Number of CPU cores this process may run on (its affinity mask)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # Not on Linux.
        return os.cpu_count() or 1


def forward_flops(model, input_shape):
    """Forward FLOPs of one example, from the model's frozen inference graph.

    The TensorFlow profiler counts the ops it has statistics for
    (convolutions, matmuls, bias adds and the common element-wise ops);
    a multiply-add counts as two FLOPs. Batch-norm, pooling and
    concatenation are not counted, which underestimates a conv net by well
    under 1%.

    Args:
      model: a Keras model taking one float32 input.
      input_shape: the input shape of one example, without the batch axis.

    Returns:
      The float-operation count (int) for batch 1.

    Raises:
      ValueError: `input_shape` has an unknown (None) dimension.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    from tensorflow.python.framework import (  # pylint: disable=import-outside-toplevel
        convert_to_constants,
    )

    if any(d is None for d in input_shape):
        raise ValueError(
            "`input_shape` must be fully known to count FLOPs. "
            f"Received: input_shape={input_shape!r}"
        )

    @tf.function
    def forward(inputs):
        return model(inputs, training=False)

    concrete = forward.get_concrete_function(
        tf.TensorSpec((1,) + tuple(input_shape), tf.float32)
    )
    # Freezing turns variable reads into constants, so every shape is static
    # and the profiler's per-op statistics can be computed.
    frozen = convert_to_constants.convert_variables_to_constants_v2(concrete)
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    info = tf.compat.v1.profiler.profile(graph=frozen.graph, options=options)
    return int(info.total_float_ops)


def run_interleaved(fns, warmup, steps):
    """Calls each of `fns` warmup + steps times, round-robin, timing each call.

    Interleaving gives the functions the same share of a machine whose load
    changes while they run. Each fn must block until its work is done.

    Args:
      fns: callables taking no arguments.
      warmup: untimed rounds first (the first call traces and compiles).
      steps: timed rounds.

    Returns:
      `(first_ms, timed_ms, cpu_ms)`: the first call of each fn in wall
      milliseconds, and per fn the lists of its `steps` timed calls in wall
      milliseconds and in process CPU milliseconds (all threads; less
      sensitive to other processes' load than wall time, but it includes
      the thread pools' spinning).
    """
    first = [None] * len(fns)
    timed = [[] for _ in fns]
    cpu = [[] for _ in fns]
    for step in range(warmup + steps):
        for i, fn in enumerate(fns):
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            ms = (time.perf_counter() - start) * 1000.0
            cpu_ms = (time.process_time() - start_cpu) * 1000.0
            if step == 0:
                first[i] = ms
            if step >= warmup:
                timed[i].append(ms)
                cpu[i].append(cpu_ms)
    return first, timed, cpu


def summarize(prefix, timed_ms, batch_size, cpu_ms=None):
    """Per-image medians (wall, and CPU if given) and the raw step times.

    Args:
      prefix: key prefix, e.g. "train".
      timed_ms: wall milliseconds of each timed step.
      batch_size: images per step.
      cpu_ms: optional process CPU milliseconds of each timed step.

    Returns:
      A dict: `{prefix}_ms_per_img` (median step / batch), `{prefix}_step_ms`,
      `{prefix}_step_ms_min`, and with `cpu_ms` `{prefix}_cpu_ms_per_img`.
    """
    summary = {
        f"{prefix}_ms_per_img": round(statistics.median(timed_ms) / batch_size, 1),
        f"{prefix}_step_ms": [round(m, 1) for m in timed_ms],
        f"{prefix}_step_ms_min": round(min(timed_ms), 1),
    }
    if cpu_ms is not None:
        summary[f"{prefix}_cpu_ms_per_img"] = round(
            statistics.median(cpu_ms) / batch_size, 1
        )
    return summary
