"""Devices and distribution strategies of a training run (one or many machines)."""


from absl import logging

from cxr_tf import train_config



def configure_devices(num_cpu_devices):
    """Splits the CPU into logical devices; must run before TF touches devices.

    Args:
      num_cpu_devices: number of logical CPU devices (0 leaves the default).

    Raises:
      RuntimeError: devices were already initialised with another layout.
    """
    import tensorflow as tf

    if not num_cpu_devices:
        return
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0],
            [tf.config.LogicalDeviceConfiguration() for _ in range(num_cpu_devices)],
        )
    except RuntimeError as e:
        existing = tf.config.list_logical_devices("CPU")
        if len(existing) != num_cpu_devices:
            raise RuntimeError(
                f"Cannot create {num_cpu_devices} logical CPU devices: TensorFlow "
                f"already initialised {len(existing)}. Set `num_cpu_devices` before "
                "anything runs on a device."
            ) from e


def make_strategy(name, num_cpu_devices=0):
    """Creates the distribution strategy.

    Args:
      name: "mirrored", "multi_worker" or "default".
      num_cpu_devices: logical CPU devices to mirror over when > 0 (testing).

    Returns:
      A `tf.distribute.Strategy`.
    """
    import tensorflow as tf

    train_config.check_choice("strategy", name, train_config.STRATEGIES)
    if name == "multi_worker":
        # Before devices initialise: the strategy starts the collective server.
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        configure_devices(num_cpu_devices)
        return strategy
    configure_devices(num_cpu_devices)
    if name == "default":
        return tf.distribute.get_strategy()
    if num_cpu_devices:
        devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    else:
        devices = [d.name for d in tf.config.list_logical_devices("GPU")]
    if len(devices) <= 1:
        # One device: mirroring would only add overhead.
        logging.info("One device (%s): not distributing.", devices or "CPU")
        return tf.distribute.get_strategy()
    return tf.distribute.MirroredStrategy(devices=devices)


def is_chief(strategy):
    """True on the worker that writes outputs (always true outside multi-worker)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "cluster_spec", None):
        return True
    spec = resolver.cluster_spec().as_dict()
    if not spec:
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type == "chief":
        return True
    return "chief" not in spec and task_type == "worker" and task_id == 0


# ---------------------------------------------------------------------------
# Data.


def resolve_jit_compile(config, strategy):
    """The `jit_compile` argument of `model.compile` for this run."""
    if config.jit_compile == "false":
        return False
    if config.jit_compile == "true":
        return True
    return "auto"


# ---------------------------------------------------------------------------
# Callbacks.


def prebuild_for_multi_worker(model, strategy, dataset):
    """Builds the compiled loss from a local batch, then skips Keras's build.

    Keras 3.15's `fit` all-reduces the first distributed batch to build the
    compiled loss/metrics symbolically (`_maybe_symbolic_build`); under
    MultiWorkerMirroredStrategy that reduce fails ("Attempt to convert a
    value (PerReplica ...)"). Only the shapes matter, so a local batch does.
    Also reshapes the step's logs for Keras's multi-worker reduce (below).
    """
    for batch in dataset.take(1):
        with strategy.scope():
            model._symbolic_build(data_batch=batch)  # pylint: disable=protected-access
    model._maybe_symbolic_build = (  # pylint: disable=protected-access
        lambda iterator=None, data_batch=None: None
    )
    # Keras then reduces every per-replica log value with
    # `strategy.reduce("MEAN", v, axis=0)`, which rejects scalars: give each
    # value a length-1 axis (the reduce returns the scalar mean).
    import tensorflow as tf

    train_step = model.train_step

    def train_step_with_vector_logs(data):
        logs = train_step(data)
        return {k: tf.reshape(v, [1]) for k, v in logs.items()}

    model.train_step = train_step_with_vector_logs
