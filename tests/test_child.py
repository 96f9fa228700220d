"""Tests of cxr_tf.child: a library function run in a spawned child process."""

import dataclasses
import os

import pytest

from cxr_tf import child
from cxr_tf import errors


@dataclasses.dataclass(frozen=True)
class _Config:
    value: int
    where: str = "/d/train-1.gz"


def _double(config):
    print(f"doubling {config.value}")
    return {"value": 2 * config.value, "pid": os.getpid()}


def _refuse(config):
    print("some progress")
    raise errors.UserFileError("damaged TFRecord file", config.where, "rerun ingest")


def _crash(config):
    print("before the bug")
    raise RuntimeError(f"a bug with {config.value}")


def _die(config):
    print("about to die", flush=True)
    os._exit(config.value)  # pylint: disable=protected-access


def test_returns_the_value_and_tees_the_output(tmp_path, capsys):
    log = tmp_path / "step.log"
    got = child.run(_double, _Config(21), log_path=log)
    assert got["value"] == 42 and got["pid"] != os.getpid()
    assert "doubling 21" in log.read_text()
    assert "doubling 21" in capsys.readouterr().out


def test_a_user_error_in_the_child_is_one_line_in_the_parent(tmp_path):
    with pytest.raises(errors.UserError) as info:
        child.run(_refuse, _Config(1), log_path=tmp_path / "log")
    assert str(info.value) == "damaged TFRecord file (/d/train-1.gz): rerun ingest"
    assert "\n" not in str(info.value)
    # The log keeps what the child printed, the one-line error included.
    text = (tmp_path / "log").read_text()
    assert "some progress" in text and "error: damaged TFRecord file" in text


def test_a_crash_is_a_runtime_error_with_the_tail():
    with pytest.raises(RuntimeError, match="a bug with 7") as info:
        child.run(_crash, _Config(7))
    assert not isinstance(info.value, errors.UserError)
    assert "before the bug" in str(info.value) and "Traceback" in str(info.value)


def test_a_child_that_dies_is_a_runtime_error_with_its_status():
    with pytest.raises(RuntimeError, match="exit status 3") as info:
        child.run(_die, _Config(3))
    assert "about to die" in str(info.value)
