"""Runs `fn(config)` in a child process that dies with its parent, output teed.

The orchestrators (pipeline, demo, reproduce) build a frozen config in their
own process, where a bad value fails before anything starts, and hand it to a
library function here. The child is started with multiprocessing's "spawn"
(TensorFlow is not fork-safe; each step gets a clean runtime, since device
and strategy setup happen once per process) and is SIGKILLed when the parent
dies (Linux PR_SET_PDEATHSIG), so a killed pipeline leaves no trainer behind
writing into the folder its rerun resumes from.
"""

import ctypes
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import traceback

from absl import logging

from cxr_tf import errors

_PR_SET_PDEATHSIG = 1
TAIL_LINES = 40


def _die_with_parent():
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(
            _PR_SET_PDEATHSIG, signal.SIGKILL
        )
    except OSError:  # Not Linux: the child may outlive a killed parent.
        pass


def _child_main(fn, config, output, results):
    """The child: stdout and stderr into `output`, then `fn(config)`."""
    _die_with_parent()
    fd = output.fileno()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    output.close()
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    from cxr_tf import cli  # pylint: disable=import-outside-toplevel

    logging.use_absl_handler()
    logging.set_verbosity(logging.INFO)
    cli.quiet()
    try:
        value = fn(config)
    except errors.UserError as e:
        print(f"error: {e.line()}", file=sys.stderr, flush=True)
        results.send(("user_error", e.line()))
    except BaseException:  # pylint: disable=broad-except
        traceback.print_exc()
        sys.stderr.flush()
        results.send(("error", None))
    else:
        results.send(("ok", value))
    finally:
        results.close()


def run(fn, config, log_path=None, name=None, echo=None):
    """Runs `fn(config)` in a spawned child; returns its return value.

    The child's stdout and stderr (its logs, progress bars, tracebacks) go
    through a pipe to this process, which writes them to `log_path` and to
    its own stdout.

    Args:
      fn: a module-level function (the child imports it by name).
      config: its argument, usually a frozen dataclass config (pickled).
      log_path: where the child's combined output is also written (appended).
      name: what error messages call the step (default: `fn`'s name).
      echo: callable(line) -> bool, whether a line goes to this process's
        stdout (default: every line).

    Returns:
      What `fn(config)` returned (it must pickle).

    Raises:
      cxr_tf.errors.UserError: `fn` raised one (a bad value, a missing or
        damaged file); the message is its one line.
      RuntimeError: `fn` raised anything else or the child died; the message
        has its last lines of output.
    """
    name = name or f"{fn.__module__}.{fn.__qualname__}"
    ctx = multiprocessing.get_context("spawn")
    read_fd, write_fd = os.pipe()
    output = multiprocessing.connection.Connection(write_fd, readable=False)
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(
        target=_child_main, args=(fn, config, output, send), name=name
    )
    logging.info("running %s in a child process", name)
    tail = []
    log = open(log_path, "a", encoding="utf-8") if log_path else None
    try:
        process.start()
        output.close()
        send.close()
        with open(read_fd, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                if echo is None or echo(line):
                    sys.stdout.write(line)
                if log:
                    log.write(line)
                    log.flush()
                tail.append(line)
                del tail[:-TAIL_LINES]
        try:
            outcome = receive.recv() if receive.poll() else None
        except EOFError:  # The child died before it could answer.
            outcome = None
        process.join()
    finally:
        if log:
            log.close()
        if process.is_alive():
            process.kill()
            process.join()
        receive.close()
    if outcome and outcome[0] == "ok":
        return outcome[1]
    if outcome and outcome[0] == "user_error":
        raise errors.UserError(outcome[1])
    raise RuntimeError(
        f"{name} failed in its child process (exit status {process.exitcode}). "
        "Last output:\n" + "".join(tail)
    )
