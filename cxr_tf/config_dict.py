"""Config dataclasses <-> the JSON dicts of config.json."""

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
