"""Step records and caching: what every pipeline step shares (TFX's metadata store)."""

import contextlib
import dataclasses
import datetime
import ast
import hashlib
import json
import os
import pathlib
import shutil
import time
import traceback

from absl import logging

import cxr_tf
from cxr_tf import model_dir
from cxr_tf import errors

RECORD_FILE = "record.json"
CHECKSUM_ALGORITHM = "sha256"
_CHUNK_BYTES = 1 << 20
_CODE_ROOTS = ("cxr_tf", "pipeline")


class StepFailedError(RuntimeError):
    """A pipeline step failed; the message names the step and its record."""


class StepUserError(StepFailedError, errors.UserError):
    """A step failed on something the user can fix (bad data, a missing file)."""

    def __init__(self, step, cause, record_path):
        errors.UserError.__init__(
            self,
            f"step {step!r} failed: {cause.what}",
            cause.where,
            "; ".join(x for x in (cause.fix, f"record: {record_path}") if x),
        )


class AnomaliesFoundError(RuntimeError):
    """Data validation found anomalies; the message names each one."""


@dataclasses.dataclass(frozen=True)
class Artifact:
    """A finished step's output: where it lives and its record."""

    step: str
    run_id: str
    uri: str
    record: dict
    action: str = "ran"  # "ran", "reused" or "reran" (cached output changed)
    reason: str | None = None  # why a cached output was not reused

    @property
    def outputs(self):
        return self.record["outputs"]


_OWN_PACKAGES = ("cxr_tf", "pipeline", "serving")


def _module_file(top, name):
    """The .py file of module `name` under `top`, or None when it is not ours."""
    parts = name.split(".")
    if parts[0] not in _OWN_PACKAGES:
        return None
    as_package = top.joinpath(*parts, "__init__.py")
    if as_package.is_file():
        return as_package
    as_module = top.joinpath(*parts[:-1], parts[-1] + ".py")
    return as_module if as_module.is_file() else None


def module_sources(*modules):
    """The source files the given modules run: their transitive imports of ours.

    Every `import` and `from ... import` in a file (at module level or inside
    a function, where this code defers TensorFlow) is followed when it names
    a module of cxr_tf, pipeline or serving; each module's enclosing
    `__init__.py` files come along, since Python runs them first. A step's
    cache key hashes exactly these files, so no hand-kept list can forget
    one.

    Args:
      *modules: dotted module names, e.g. "pipeline.train", "cxr_tf.train"
        (the module a step runs in a child process).

    Returns:
      Sorted paths relative to the repository root.
    """
    top = pathlib.Path(__file__).resolve().parent.parent
    seen, queue = set(), list(modules)
    while queue:
        name = queue.pop()
        path = _module_file(top, name)
        if path is None or path in seen:
            continue
        seen.add(path)
        parts = name.split(".")
        for i in range(1, len(parts)):
            queue.append(".".join(parts[:i]))
        package = name if path.name == "__init__.py" else ".".join(parts[:-1])
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                queue.extend(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                queue.append(source)
                # `from package import module` names a module too.
                queue.extend(f"{source}.{a.name}" for a in node.names)
    return tuple(sorted(str(p.relative_to(top)) for p in seen))


def code_version(sources=_CODE_ROOTS):
    """Returns the package version plus a hash of the source files a step runs.

    A step's cache key includes it, so editing the code a step runs reruns that
    step, and editing other code does not (TFX does the same through the
    component's spec and executor versions).

    Args:
      sources: paths relative to the repository root: folders (every .py file
        below them) or single files.
    """
    digest = hashlib.sha256()
    top = pathlib.Path(__file__).resolve().parent.parent
    for source in sources:
        root = top / source
        paths = sorted(root.rglob("*.py")) if root.is_dir() else [root]
        for path in paths:
            digest.update(str(path.relative_to(top)).encode())
            digest.update(path.read_bytes())
    return f"{cxr_tf.__version__}+{digest.hexdigest()[:12]}"


def fingerprint(step, parameters, inputs, code):
    """The cache key of a step run: step, parameters, upstream ids and code.

    Args:
      step: step name.
      parameters: JSON-serialisable dict of the step's parameters.
      inputs: dict of input name -> upstream `Artifact` or plain path string.
      code: the code version string.

    Returns:
      A 16-character hex string, used as the run id.
    """
    upstream = {
        name: (a.run_id if isinstance(a, Artifact) else str(a))
        for name, a in sorted(inputs.items())
    }
    blob = json.dumps(
        {"step": step, "parameters": parameters, "inputs": upstream, "code": code},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def read_record(step_dir):
    """Returns the record dict in `step_dir`, or None if there is none."""
    path = pathlib.Path(step_dir) / RECORD_FILE
    if not path.exists():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _output_files(step_dir):
    """Relative paths of the files a step wrote (its record excluded), sorted."""
    top = pathlib.Path(step_dir)
    found = []
    for root, dirs, files in os.walk(top):
        dirs.sort()
        for name in files:
            path = pathlib.Path(root) / name
            rel = path.relative_to(top).as_posix()
            if rel in (RECORD_FILE, RECORD_FILE + ".tmp") or not path.is_file():
                continue
            found.append(rel)
    return sorted(found)


# One streamed sha256 for the whole project: the model directory's.
file_sha256 = model_dir.file_sha256


def checksum_outputs(step_dir):
    """Size and sha256 of every file in a step's folder (the record excluded).

    Returns:
      {"algorithm": "sha256", "files": {relative path: {"bytes", "sha256"}}}.
    """
    files = {}
    for rel in _output_files(step_dir):
        path = pathlib.Path(step_dir) / rel
        files[rel] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    return {"algorithm": CHECKSUM_ALGORITHM, "files": files}


def verify_outputs(step_dir, checksums):
    """Compares a step's folder with the checksums recorded when it finished.

    Sizes are compared first (free), then every file is hashed.

    Args:
      step_dir: the step's folder.
      checksums: the record's `checksums` (None for records without one).

    Returns:
      A list of (relative path or None, what is wrong); empty when intact.
    """
    if not checksums or checksums.get("algorithm") != CHECKSUM_ALGORITHM:
        return [(None, "its record holds no sha256 checksums")]
    top = pathlib.Path(step_dir)
    expected = checksums["files"]
    problems = []
    present = set(_output_files(step_dir))
    for rel in sorted(present - set(expected)):
        problems.append((rel, f"{top / rel} was not written by the step"))
    for rel, want in sorted(expected.items()):
        path = top / rel
        if rel not in present:
            problems.append((rel, f"{path} is missing"))
            continue
        size = path.stat().st_size
        if size != want["bytes"]:
            problems.append(
                (rel, f"{path} has {size} bytes, {want['bytes']} when written")
            )
        elif file_sha256(path) != want["sha256"]:
            problems.append((rel, f"{path} changed (sha256 differs)"))
    return problems


def _write_record(step_dir, record):
    path = pathlib.Path(step_dir) / RECORD_FILE
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


def run_step(
    pipeline_root,
    step,
    fn,
    parameters,
    inputs,
    force=False,
    keep=False,
    sources=_CODE_ROOTS,
):
    """Runs `fn` once per distinct (parameters, inputs, code); reuses earlier output.

    The output folder is PIPELINE_ROOT/<step>/<run_id>/ with run_id the cache
    key, so a rerun after a crash lands in the same folder: a step that can
    resume (training) picks up where it stopped.

    A finished step records the size and sha256 of every file it wrote; a
    reuse first checks them. When a file changed, went missing or appeared,
    the step runs again and says which file and why (with `keep`, the files
    that changed are deleted and the step resumes from the intact rest).

    Args:
      pipeline_root: root folder of all artifacts.
      step: step name.
      fn: callable(output_dir, **inputs) -> dict of outputs (JSON-serialisable).
      parameters: dict of the step's parameters (part of the cache key).
      inputs: dict name -> upstream `Artifact` (or path), passed to `fn`.
      force: run even when a succeeded record exists.
      keep: when rerunning a failed or forced step, keep the folder's files
        (training resumes from its backup) instead of starting clean.
      sources: the code the step runs (see `code_version`).

    Returns:
      The step's `Artifact`.

    Raises:
      StepFailedError: `fn` raised; the record says `failed` with the error.
      StepUserError: `fn` raised a `cxr_tf.errors.UserError` (bad data, a
        missing file); one line naming the step and the file.
    """
    code = code_version(sources)
    run_id = fingerprint(step, parameters, inputs, code)
    out = pathlib.Path(pipeline_root) / step / run_id
    earlier = read_record(out)
    reason = None
    if earlier and earlier.get("status") == "succeeded" and not force:
        started = time.monotonic()
        problems = verify_outputs(out, earlier.get("checksums"))
        if not problems:
            logging.info(
                "%s: reusing %s (inputs, parameters and code unchanged; "
                "%d output files verified in %.1f s)",
                step,
                out,
                len(earlier["checksums"]["files"]),
                time.monotonic() - started,
            )
            return Artifact(step, run_id, str(out), earlier, action="reused")
        shown = "; ".join(text for _, text in problems[:3])
        if len(problems) > 3:
            shown += f"; and {len(problems) - 3} more"
        reason = f"cached output changed since it was written: {shown}"
        logging.warning("%s: %s. Running the step again.", step, reason)
        if keep:
            # Resume from what is intact; what changed is not trusted.
            for rel, _ in problems:
                if rel is not None and (out / rel).is_file():
                    (out / rel).unlink()
    if out.exists() and not keep:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "step": step,
        "run_id": run_id,
        "uri": str(out),
        "inputs": {
            k: (v.uri if isinstance(v, Artifact) else str(v)) for k, v in inputs.items()
        },
        "parameters": parameters,
        "code_version": code,
        "start_time": _now(),
        "end_time": None,
        "status": "running",
        "outputs": {},
        "rerun_reason": reason,
    }
    _write_record(out, record)
    logging.info("%s: running into %s", step, out)
    try:
        outputs = fn(str(out), **inputs)
    except BaseException as e:  # Recorded, then re-raised for the caller.
        record.update(
            status="failed",
            end_time=_now(),
            error=f"{type(e).__name__}: {e}",
            traceback=traceback.format_exc(),
        )
        _write_record(out, record)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        if isinstance(e, errors.UserError):
            raise StepUserError(step, e, out / RECORD_FILE) from e
        raise StepFailedError(
            f"Step {step!r} failed: {type(e).__name__}: {e} (record: {out / RECORD_FILE})"
        ) from e
    record.update(
        status="succeeded",
        end_time=_now(),
        outputs=outputs or {},
        checksums=checksum_outputs(out),
    )
    _write_record(out, record)
    return Artifact(
        step, run_id, str(out), record, action="reran" if reason else "ran", reason=reason
    )


@contextlib.contextmanager
def atomic_directory(final_path):
    """Yields a temporary sibling folder that is renamed to `final_path` on success.

    A reader watching the parent (TF Serving polling its base path) sees
    either nothing or the whole folder, never half of it.
    """
    final_path = pathlib.Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = final_path.parent / f".{final_path.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final_path.exists():
        raise FileExistsError(f"{final_path} already exists; refusing to overwrite it")
    os.rename(tmp, final_path)
