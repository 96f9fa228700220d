"""Tests of cxr_tf.config_dict."""

import dataclasses

import pytest

from cxr_tf import config_dict
from cxr_tf import errors


@dataclasses.dataclass(frozen=True)
class _Config:
    size: int = 1


def test_from_dict_refuses_unknown_fields():
    assert config_dict.from_dict(_Config, {"size": 3}) == _Config(3)
    with pytest.raises(ValueError, match=r"Unknown _Config fields \['sise'\]"):
        config_dict.from_dict(_Config, {"sise": 3})


@pytest.mark.parametrize(
    "value, minimum, optional",
    [(1, 1, False), (0, 0, False), (32, 32, False), (None, 1, True), (5, 1, True)],
)
def test_check_int_accepts(value, minimum, optional):
    config_dict.check_int("n", value, minimum, optional)


@pytest.mark.parametrize(
    "value, minimum, optional, message",
    [
        (0, 1, False, "`n` must be a positive int. Received: n=0"),
        (-1, 0, False, "`n` must be a non-negative int. Received: n=-1"),
        (31, 32, False, "`n` must be an int >= 32. Received: n=31"),
        (None, 1, False, "`n` must be a positive int. Received: n=None"),
        (0, 1, True, "`n` must be None or a positive int. Received: n=0"),
        (True, 1, False, "`n` must be a positive int. Received: n=True"),
        (2.0, 1, False, "`n` must be a positive int. Received: n=2.0"),
    ],
)
def test_check_int_names_the_field_and_value(value, minimum, optional, message):
    with pytest.raises(ValueError) as info:
        config_dict.check_int("n", value, minimum, optional)
    assert str(info.value) == message


def test_check_int_raises_the_given_error():
    with pytest.raises(errors.UserValueError, match="non-negative"):
        config_dict.check_int("n", -1, 0, error=errors.UserValueError)
