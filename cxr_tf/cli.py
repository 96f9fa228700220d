"""Shared CLI plumbing: a quiet start, one-line user errors, checks before TF.

Every command ends with `cli.run(main)` instead of `absl.app.run(main)`:

- A mistake the user can fix (a `cxr_tf.errors.UserError`, an absl flag or
  usage error, a flagfile that does not exist) ends the command with one line
  on stderr, `error: <what> (<flag or file>): <how to fix>`, and exit
  status 1, without a traceback. Any other exception keeps its traceback.
  `--debug` or `--verbosity=1` prints the traceback for every error.
- Unless the user asks for more (`--verbosity >= 1`, `--debug`, or their own
  TF_CPP_MIN_LOG_LEVEL), third-party start-up noise is dropped at its source:
  TensorFlow's C++ lines (CUDA probing on a machine without a GPU, CPU
  feature notes) by a line filter on file descriptor 2, and the Beam, BigQuery
  and SavedModel warnings by `logging` filters on the loggers that emit them.
- The `check_*` helpers validate flags and paths with the standard library
  only, so a command can answer a mistake before it imports TensorFlow.
"""

import atexit
import contextlib
import logging as std_logging
import os
import re
import select
import signal
import sys
import traceback

from absl import app
from absl import flags
from absl import logging

from cxr_tf import errors

_DEBUG = flags.DEFINE_bool(
    "debug", False, "Print the traceback of any error, a user's mistake included."
)

EXIT_USER_ERROR = 1

# Lines TensorFlow's C++ runtime writes to fd 2 on a CPU-only machine. The
# cudart_stub line is written before absl::InitializeLog, so no
# TF_CPP_MIN_LOG_LEVEL hides it; the cuInit line is an ERROR, hidden only by
# level 3, which would hide real errors too (docs/design/cli.md).
CPP_NOISE = (
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called",
    r"cudart_stub\.cc:\d+\] Could not find cuda drivers",
    r"cuda_platform\.cc:\d+\] failed call to cuInit",
    r"cuda_(?:dnn|fft|blas)\.cc:\d+\] Unable to register cu\w+ factory",
    r"computation_placer\.cc:\d+\] computation placer already registered",
    r"cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized",
    r"^To enable the following instructions: .* rebuild TensorFlow",
    r"oneDNN custom operations are on",
)

# (logger name, message pattern) of Python records that tell a user nothing
# actionable; "" drops every record below WARNING of that logger. A logger
# filter sees every record created on that logger (docs/design/cli.md).
PYTHON_NOISE = (
    # apache_beam/io/gcp/internal/clients/bigquery: a root-logger warning.
    ("root", r"apitools not found"),
    # apache_beam/io/gcp/bigquery.py (bigquery_storage_v1) and the
    # DirectRunner's own INFO chatter: servers started, worker log lines
    # relayed by local_job_service (the second copy of each worker line).
    ("apache_beam", ""),
    ("apache_beam.runners.portability.local_job_service", r"semi_persistent"),
    # SavedModel export (absl.logging.info in signature_serialization.py).
    ("absl", r"contains input name\(s\) .* with unsupported characters"
     r"|^Sharding callback duration|^Writing fingerprint to|^Assets written to"),
)
# Lines a Beam worker process prints itself (Python's default log format;
# our own processes log in absl's format).
WORKER_NOISE = (
    r"^(?:INFO|DEBUG):[\w.]+:",
    r"^WARNING:root:apitools not found",
    r"^WARNING:__main__:No semi_persistent_directory",
)

_quiet = {"installed": False}
# Set next to TF_CPP_MIN_LOG_LEVEL when we set it, so a child process knows
# the value is ours, not the user's.
_QUIET_ENV = "CXR_TF_QUIET_LOG_LEVEL"


# ---------------------------------------------------------------------------
# Running a command.


def run(main, flags_parser=None):
    """`absl.app.run(main)` with one-line user errors and a quiet start.

    Args:
      main: the command's `main(argv)`.
      flags_parser: as in `app.run` (e.g. `parse_known_flags` for commands
        that pass unknown flags on to Beam).
    """
    parser = flags_parser or (lambda argv: flags.FLAGS(argv))
    app.run(_wrap(main), flags_parser=lambda argv: _parse(parser, argv))


def reject_arguments(argv):
    """Raises `app.UsageError` when a command's `main(argv)` got more than flags.

    Our commands take flags only; under `run` the error is one line.
    """
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")


def parse_known_flags(argv):
    """The `flags_parser` of commands that pass flags they do not define on.

    Returns:
      argv without the flags this program defines: the program name, then
      the unknown flags (Beam pipeline options, a step's extra flags).
    """
    return flags.FLAGS(argv, known_only=True)


def precheck(check, argv=None, flags_parser=None):
    """Parses the flags and runs `check()` before a module's heavy imports.

    For a module whose top level imports TensorFlow (serving.local_server):
    its `if __name__ == "__main__"` block, placed above those imports, calls
    this so a mistake costs a second. `run` parses the flags again later.

    Args:
      check: a callable raising `errors.UserError` on a mistake.
      argv: the command line (default `sys.argv`).
      flags_parser: as in `run`.
    """
    argv = sys.argv if argv is None else argv
    app.define_help_flags()  # --help, --helpfull as under `app.run`.
    _parse(flags_parser or (lambda a: flags.FLAGS(a)), argv)
    _wrap(lambda _: check())(argv)


def _parse(parser, argv):
    try:
        return parser(argv)
    except flags.Error as e:
        if _asked_for_traceback(argv):
            traceback.print_exc()
        _exit_with(flag_error(e))


def _wrap(main):
    def wrapped(argv):
        verbose = _verbose()
        if not verbose:
            quiet()
        try:
            return main(argv)
        except (errors.UserError, app.UsageError) as e:
            if verbose:
                traceback.print_exc()
            if isinstance(e, errors.UserError):
                _exit_with(e)
            _exit_with(errors.UserValueError(str(e), "", "see --helpfull"))

    return wrapped


def _verbose():
    return bool(_DEBUG.value) or flags.FLAGS["verbosity"].value >= 1


def _asked_for_traceback(argv):
    return any(
        a in ("--debug", "-v=1") or re.fullmatch(r"--verbosity=[1-9]\d*", a)
        for a in argv
    )


def _exit_with(error):
    sys.stderr.flush()
    print(f"error: {error.line()}", file=sys.stderr, flush=True)
    sys.exit(getattr(error, "exit_code", EXIT_USER_ERROR))


def flag_error(e):
    """The `UserError` of an absl flag error (bad value, unknown flag, flagfile)."""
    message = str(e).replace("ERROR:: ", "").strip()
    if isinstance(e, flags.CantOpenFlagFileError):
        path = re.search(r"directory: '(.*)'$", message)
        where = path.group(1) if path else "--flagfile"
        return errors.UserFileError(
            "cannot open the flagfile", f"--flagfile={where}", "check the path"
        )
    if isinstance(e, flags.UnrecognizedFlagError):
        return errors.UserValueError(
            f"unknown flag --{e.flagname}",
            f"--{e.flagname}",
            "check the spelling; --helpfull lists every flag",
        )
    enum = re.match(r"flag --(\w+)=(.*): value should be one of <(.*)>$", message)
    if enum:
        name, value, names = enum.groups()
        return errors.UserValueError(
            f"unknown value {value!r}",
            f"--{name}",
            f"use one of {', '.join(names.split('|'))}",
        )
    name = re.match(r"flag --(\w+)(?:=(.*?))?: (.*)$", message)
    where = f"--{name.group(1)}" if name else "flags"
    if "must have a value other than None" in message:
        return errors.UserValueError(
            "a required flag is missing", where, f"give {where}=..."
        )
    if name and name.group(2) is not None:
        message = f"bad value {name.group(2)!r}: {name.group(3)}"
    return errors.UserValueError(message, where, "see --helpfull for valid values")


def parse_argv(define_flags, argv, program, known_only=False):
    """Parses a command's flags on a registry of their own; returns their holders.

    For a process that runs a command's library with the config that command
    would build (a pipeline step, the demo): its own flags may share names
    with the command's, which one registry cannot hold. Flagfiles, later
    flags winning, and the one-line errors are those of the command line.

    Args:
      define_flags: the command's `define_flags(registry) -> holders`.
      argv: the flags, e.g. ["--flagfile=configs/demo.flags", "--epochs=1"].
      program: the command's name, for messages.
      known_only: flags the command does not define are passed on (Beam
        pipeline options), as with `parse_known_flags`.

    Returns:
      The holders; with `known_only`, (holders, the flags passed on).

    Raises:
      cxr_tf.errors.UserValueError, UserFileError: a bad flag or value, an
        unreadable flagfile, or an argument that is not a flag.
    """
    registry = flags.FlagValues()
    holders = define_flags(registry)
    try:
        rest = registry([program, *argv], known_only=known_only)
    except flags.Error as e:
        raise flag_error(e) from None
    if known_only:
        return holders, rest[1:]
    if len(rest) > 1:
        raise errors.UserValueError(
            f"unexpected argument {rest[1]!r}", "arguments", "flags start with --"
        )
    return holders


def config_from_argv(define_flags, config_from_flags, argv, program):
    """The config that `python -m PROGRAM ARGV` would run with.

    The flags are parsed on a registry of their own (`parse_argv`), then the
    command's `config_from_flags` checks them and builds its config, so a
    flagfile means here what it means on the command line.

    Args:
      define_flags: the command's `define_flags(registry) -> holders`.
      config_from_flags: the command's `config_from_flags(holders) -> config`.
      argv: the flags, e.g. ["--flagfile=configs/demo.flags", "--max_images=8"];
        later ones win.
      program: the command's name, for messages.

    Returns:
      The command's config.

    Raises:
      cxr_tf.errors.UserError: a flag, a value or a path is wrong; the
        message is the line the command would print.
    """
    return config_from_flags(parse_argv(define_flags, argv, program))


def make_config(cls, **fields):
    """`cls(**fields)` from flag values; a value the class refuses is a user error.

    Raises:
      cxr_tf.errors.UserValueError: the class raised ValueError (its message
        names the field and the value).
    """
    try:
        return cls(**fields)
    except ValueError as e:
        raise errors.UserValueError(str(e), "flags", "see --helpfull") from None


@contextlib.contextmanager
def user_errors(kinds, where, fix, error=errors.UserFileError):
    """Turns a library's exception of `kinds` into a one-line user error.

    An exception of `kinds` raised inside the block becomes
    `error(str(e), where, fix)`; one that already is a `UserError` (it names
    its own flag or file) passes unchanged, and so does any other exception.

    Args:
      kinds: an exception class or a tuple of them.
      where: the flag or file the mistake concerns (e.g. "--model=m").
      fix: how to fix it.
      error: the `UserError` class to raise.
    """
    try:
        yield
    except errors.UserError:
        raise
    except kinds as e:
        raise error(str(e), where, fix) from None


# ---------------------------------------------------------------------------
# Quiet start.


def quiet():
    """Drops third-party start-up noise for the rest of this process.

    The Python filters always apply. TensorFlow's C++ lines are left alone
    when the user set TF_CPP_MIN_LOG_LEVEL (they chose what TensorFlow
    prints). Child processes inherit the environment and the fd-2 filter; a
    child whose stderr goes elsewhere (a step's log file) installs its own.
    """
    if _quiet["installed"]:
        return
    _quiet["installed"] = True
    for name, pattern in PYTHON_NOISE:
        logger = std_logging.getLogger(None if name == "root" else name)
        if pattern:
            logger.addFilter(_PatternFilter(pattern))
        elif logger.level == std_logging.NOTSET or logger.level < std_logging.WARNING:
            logger.setLevel(std_logging.WARNING)  # Children inherit a level.
    ours = os.environ.get(_QUIET_ENV) == os.environ.get("TF_CPP_MIN_LOG_LEVEL")
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ and not ours:
        return
    # INFO lines (cpu_feature_guard, oneDNN) off; warnings and errors stay.
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = os.environ[_QUIET_ENV] = "1"
    _filter_fd2(CPP_NOISE + WORKER_NOISE)


class _PatternFilter(std_logging.Filter):
    def __init__(self, pattern):
        super().__init__()
        self._pattern = re.compile(pattern)

    def filter(self, record):
        try:
            message = record.getMessage()
        except Exception:  # pylint: disable=broad-except
            return True
        return not self._pattern.search(message)


def _filter_fd2(patterns):
    """Routes fd 2 through a forked filter that drops lines matching `patterns`.

    A forked process rather than a thread: it never waits for the GIL, so C++
    code writing to stderr while holding it cannot fill the pipe and block.
    """
    if os.name != "posix" or not hasattr(os, "fork"):
        return
    noise = re.compile("|".join(patterns).encode())
    try:
        sys.stderr.flush()
        read_end, write_end = os.pipe()
        original = os.dup(2)
        pid = os.fork()
    except OSError as e:
        logging.debug("stderr left unfiltered: %s", e)
        return
    if pid == 0:  # The filter.
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            os.close(write_end)
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)
            os.dup2(devnull, 1)
            _pump(read_end, original, noise)
        finally:
            os._exit(0)  # pylint: disable=protected-access
    os.close(read_end)
    os.dup2(write_end, 2)
    os.close(write_end)
    atexit.register(_restore_fd2, original, pid)


def _pump(read_fd, out_fd, noise):
    """Copies `read_fd` to `out_fd` line by line, without the noise lines."""
    pending = b""
    while True:
        # A partial line (a progress bar's \r update) goes out after 50 ms.
        ready, _, _ = select.select([read_fd], [], [], 0.05 if pending else None)
        if not ready:
            _write_all(out_fd, pending)
            pending = b""
            continue
        chunk = os.read(read_fd, 65536)
        if not chunk:
            _write_all(out_fd, pending)
            return
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        kept = [line for line in lines if not noise.search(line)]
        if kept:
            _write_all(out_fd, b"\n".join(kept) + b"\n")


def _write_all(fd, data):
    while data:
        data = data[os.write(fd, data) :]


def _restore_fd2(original, pid, wait_s=2.0):
    """Puts the real stderr back and lets the filter drain what it holds."""
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os.dup2(original, 2)
    os.close(original)
    # Children that outlive us keep the pipe open; do not wait for them.
    for _ in range(int(wait_s / 0.01)):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        select.select([], [], [], 0.01)


# ---------------------------------------------------------------------------
# Checks that need no TensorFlow.


def require(holder):
    """The flag's value; a `UserValueError` naming the flag when it is unset."""
    if holder.value in (None, "", []):
        raise errors.UserValueError(
            "a required flag is missing", f"--{holder.name}", f"give --{holder.name}=..."
        )
    return holder.value


def check_choice(holder, names, what=None):
    """The flag's value when it is one of `names`, else a `UserValueError`."""
    value = holder.value
    if value not in names:
        raise errors.UserValueError(
            f"unknown {what or holder.name} {value!r}",
            f"--{holder.name}",
            f"use one of {', '.join(names)}",
        )
    return value


def check_dir(holder, contains=None, hint=""):
    """The flag's folder, which must exist (and hold a file matching `contains`).

    Args:
      holder: the flag.
      contains: a callable `names -> bool` the folder's file names must pass.
      hint: how to fix a folder that fails `contains`.
    """
    path = require(holder)
    if "://" in path:
        return path
    if not os.path.isdir(path):
        what = "not a folder" if os.path.exists(path) else "no such folder"
        raise errors.UserFileError(what, f"--{holder.name}={path}", "check the path")
    if contains is not None and not contains(os.listdir(path)):
        raise errors.UserFileError(
            "the folder holds nothing to read", f"--{holder.name}={path}", hint
        )
    return path


def check_file(holder):
    """The flag's file, which must exist (unset flags pass: None)."""
    path = holder.value
    if not path or "://" in path:
        return path
    if not os.path.exists(path):
        raise errors.UserFileError(
            "no such file", f"--{holder.name}={path}", "check the path"
        )
    return path


def check_writable_dir(holder):
    """The flag's output folder: it exists and is writable, or can be made.

    The nearest existing ancestor must be a writable folder; a path under a
    regular file, or under a folder this user cannot write, is refused.
    `os.access` is asked, so a read-only mount is caught even for root.
    """
    path = require(holder)
    if "://" in path:
        return path
    where = f"--{holder.name}={path}"
    if os.path.exists(path) and not os.path.isdir(path):
        raise errors.UserFileError(
            "exists and is not a folder", where, "give a folder path"
        )
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise errors.UserFileError(
            f"cannot create a folder under the file {parent}",
            where,
            "give a path whose parents are folders",
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise errors.UserFileError(
            f"no write permission in {parent}", where, "choose a writable folder"
        )
    return path


def check_image_size(holder, backbone):
    """The flag's image side when `backbone` accepts it (`choices.IMAGE_SIZE`)."""
    from cxr_tf import choices  # pylint: disable=import-outside-toplevel

    size = holder.value
    problem = choices.image_size_problem(backbone, size)
    if problem:
        raise errors.UserValueError(
            problem, f"--{holder.name}={size}", choices.image_size_hint(size)
        )
    return size


def check_inputs(paths, what="image file or folder"):
    """Each of `paths` (positional arguments) exists; else a `UserFileError`."""
    if not paths:
        raise errors.UserValueError(
            f"no {what} given", "arguments", f"give at least one {what}"
        )
    for path in paths:
        if "://" not in path and not os.path.exists(path):
            raise errors.UserFileError("no such file or folder", path, "check the path")
    return paths


def check_model(holder, checkpoint="final", checkpoint_flag=None):
    """The flag's trained model (a model folder or its `.keras` file).

    Args:
      holder: the model flag.
      checkpoint: "final", "best" or "latest" (`model_dir.CHECKPOINTS`).
      checkpoint_flag: the name of the flag that chose `checkpoint`, if any.

    Returns:
      (keras_path, config_path), as `cxr_tf.model_dir.resolve` finds them.
    """
    from cxr_tf import model_dir  # pylint: disable=import-outside-toplevel

    path = require(holder)
    where = f"--{holder.name}={path}"
    if not os.path.exists(path):
        raise errors.UserFileError(
            "no such model", where, "give a folder written by `cxr_tf.train`"
        )
    try:
        return model_dir.resolve(path, checkpoint)
    except errors.UserError as e:
        if checkpoint_flag and checkpoint != "final":
            where += f" --{checkpoint_flag}={checkpoint}"
        raise type(e)(e.what, where, e.fix) from None
