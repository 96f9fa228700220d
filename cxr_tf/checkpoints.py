"""Atomic model saves, step-exact backups and their stale temporaries."""

import json
import os
import re
import shutil
import tempfile

from absl import logging

from cxr_tf import errors
from cxr_tf import model_dir as model_dir_lib


BACKUP_DIR = "backup"


def check_keras_file(path):
    """Raises when `path` is not a whole `.keras` archive (cut or corrupt).

    Keras itself answers "File not found" for a `.keras` file that is not a
    zip archive; this names the file as damaged instead. Every member's CRC
    is checked (a read of the file).

    Raises:
      cxr_tf.errors.UserFileError: the file is truncated or corrupt.
    """
    import zipfile

    
    fix = (
        "the file is truncated or corrupt: train again (a rerun of the same "
        "command rewrites it from the backup), or load another checkpoint "
        "(best or latest)"
    )
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise errors.UserFileError(
            f"damaged .keras model ({type(e).__name__}: {e})", path, fix
        ) from e
    if bad is not None:
        raise errors.UserFileError(
            f"damaged .keras model (member {bad} fails its CRC)", path, fix
        )


def save_model_atomic(model, path):
    """Saves a `.keras` file via a temporary name so a kill never leaves half."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path[:-len('.keras')]}.tmp-{os.getpid()}.keras"
    model.save(tmp)
    os.replace(tmp, path)


_TEMPORARY = re.compile(r"^tmp-(\d+)\.weights\.h5$|\.tmp-(\d+)(?:\.keras)?$")


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # Someone else's live process.
        return True
    return True


def remove_stale_temporaries(directory, started=True):
    """Deletes the temporary files a killed save left in `directory`.

    Saves write `tmp-<pid>.weights.h5`, `<name>.tmp-<pid>.keras` or
    `<name>.tmp-<pid>` and rename it into place; a kill in between leaves
    the temporary file. One is stale when its process is gone, or, before
    this process has saved anything (`started=False`), when it carries this
    process's id (a restarted container can hand out the same id).

    Args:
      directory: folder to clean (nothing happens when it does not exist).
      started: False at the start of a run, before this process saved.

    Returns:
      The paths removed.
    """
    if not os.path.isdir(directory):
        return []
    removed = []
    for name in sorted(os.listdir(directory)):
        match = _TEMPORARY.search(name)
        if not match:
            continue
        pid = int(match.group(1) or match.group(2))
        if pid == os.getpid() and started:
            continue
        if pid != os.getpid() and _process_alive(pid):
            continue
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            os.remove(path)
            removed.append(path)
    if removed:
        logging.info("Removed temporary files of an interrupted save: %s", removed)
    return removed


def save_backup(model, backup_dir, step, write=True):
    """Writes the fault-tolerance state (weights, optimizer, step) atomically.

    The weights go to `tmp-<pid>.weights.h5`, renamed to
    `step-<step>.weights.h5`; then `state.json` is replaced to point at it,
    and older weights and stale temporary files are deleted.

    Args:
      model: the compiled, built model.
      backup_dir: directory of the backup.
      step: the global step reached.
      write: False on non-chief workers (they save to a scratch dir).
    """
    target = backup_dir if write else tempfile.mkdtemp(prefix="cxr_backup_")
    os.makedirs(target, exist_ok=True)
    weights = os.path.join(target, f"step-{step}.weights.h5")
    tmp = os.path.join(target, f"tmp-{os.getpid()}.weights.h5")
    try:
        model.save_weights(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, weights)
    model_dir_lib.atomic_write_text(
        os.path.join(target, "state.json"),
        json.dumps({"step": step, "weights": os.path.basename(weights)}),
    )
    # Only after state.json points at the new file is the old one removable.
    for name in os.listdir(target):
        if name.startswith("step-") and name != os.path.basename(weights):
            os.remove(os.path.join(target, name))
    remove_stale_temporaries(target)
    if not write:
        shutil.rmtree(target, ignore_errors=True)


def restore_backup(model, backup_dir):
    """Loads the last backup into a compiled model; returns its step (0 if none).

    Raises:
      cxr_tf.errors.UserFileError: the backup is unreadable, incomplete or
        inconsistent; the message names the file.
    """

    state_path = os.path.join(backup_dir, "state.json")
    if not os.path.isfile(state_path):
        return 0
    fix = (
        f"delete {backup_dir} to train from the start (checkpoints/ keeps the "
        "model of the last finished epoch)"
    )
    try:
        with open(state_path) as f:
            state = json.load(f)
        weights = os.path.join(backup_dir, state["weights"])
        expected_step = int(state["step"])
    except (ValueError, KeyError, TypeError) as e:
        raise errors.UserFileError(
            f"unreadable backup state ({type(e).__name__}: {e})", state_path, fix
        ) from e
    if not os.path.isfile(weights):
        raise errors.UserFileError(
            f"backup weights named by {state_path} are missing", weights, fix
        )
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    try:
        model.load_weights(weights)
    except (OSError, ValueError, KeyError) as e:
        raise errors.UserFileError(
            f"corrupt backup weights ({type(e).__name__}: {e})", weights, fix
        ) from e
    step = int(model.optimizer.iterations.numpy())
    if step != expected_step:
        raise errors.UserFileError(
            f"backup weights hold step {step} but {state_path} says {expected_step}",
            weights,
            fix,
        )
    return step
