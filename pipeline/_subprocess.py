"""Runs a step's library CLI in a child process that dies with the pipeline."""

import ctypes
import re
import signal
import subprocess
import sys

from absl import logging

from cxr_tf import errors

_PR_SET_PDEATHSIG = 1
# How a child reports a `cxr_tf.errors.UserError`: the CLIs' one-line form, or
# the last line of a traceback.
_USER_ERROR = re.compile(r"^(?:error: |cxr_tf\.errors\.User\w*Error: )(.+)$")


def _user_error_line(lines):
    for line in reversed(lines):
        match = _USER_ERROR.match(line.strip())
        if match:
            return match.group(1)
    return None


def _die_with_parent():
    # Linux: a SIGKILLed pipeline must not leave an orphaned trainer writing
    # into the step folder that the rerun resumes from.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(
            _PR_SET_PDEATHSIG, signal.SIGKILL
        )
    except OSError:
        pass


def run_module(module, args, log_path=None):
    """Runs `python -m module args...`; raises with the log tail when it fails.

    Args:
      module: a module name, e.g. "cxr_tf.train".
      args: list of command-line arguments.
      log_path: where the child's combined output is also written.

    Returns:
      The last 40 lines of the child's output.

    Raises:
      cxr_tf.errors.UserError: the child exited non-zero after reporting a
        user error (`error: ...`); the message is that line.
      RuntimeError: the child exited non-zero; the message has its last lines.
    """
    cmd = [sys.executable, "-m", module, *map(str, args)]
    logging.info("running: %s", " ".join(cmd))
    tail = []
    log = open(log_path, "a", encoding="utf-8") if log_path else None
    try:
        with subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            preexec_fn=_die_with_parent,
        ) as proc:
            for line in proc.stdout:
                sys.stdout.write(line)
                if log:
                    log.write(line)
                tail.append(line)
                del tail[:-40]
            rc = proc.wait()
    finally:
        if log:
            log.close()
    if rc != 0:
        user_line = _user_error_line(tail)
        if user_line:
            # The child refused bad input in one line: pass that line on.
            raise errors.UserError(user_line)
        raise RuntimeError(
            f"`python -m {module}` exited with status {rc}. Last output:\n"
            + "".join(tail)
        )
    return tail
