"""Config dataclasses <-> the JSON dicts of config.json, and their int check."""

import dataclasses


def from_dict(cls, d):
    """Builds dataclass `cls` from `d`, refusing keys it has no field for.

    Args:
      cls: a dataclass type (`ModelConfig`, `TrainConfig`).
      d: a mapping of field name to value, as `to_dict` wrote it.

    Returns:
      `cls(**d)`; the class checks the values.

    Raises:
      ValueError: `d` has keys that are not fields of `cls`.
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - fields
    if unknown:
        raise ValueError(
            f"Unknown {cls.__name__} fields {sorted(unknown)}; "
            f"expected a subset of {sorted(fields)}"
        )
    return cls(**d)


def check_int(name, value, minimum=1, optional=False, error=ValueError):
    """Raises `error` unless `value` is an int >= `minimum` (or None if `optional`).

    The one check of the config dataclasses' count fields, so each names the
    field and the value the same way. A bool is refused: True is no count.

    Args:
      name: the field's name.
      value: its value.
      minimum: the smallest value allowed.
      optional: whether None is allowed.
      error: the exception class (`errors.UserValueError` where the config
        is built from a user's flags).

    Raises:
      error: "`name` must be [None or ]a positive int. Received: name=value"
        ("a non-negative int" for minimum 0, "an int >= minimum" otherwise).
    """
    if optional and value is None:
        return
    if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
        return
    kind = {0: "a non-negative int", 1: "a positive int"}.get(
        minimum, f"an int >= {minimum}"
    )
    if optional:
        kind = f"None or {kind}"
    raise error(f"`{name}` must be {kind}. Received: {name}={value!r}")
