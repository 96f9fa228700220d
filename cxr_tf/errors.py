"""User-facing errors: one line, `error: <what> (<where>): <how to fix>`.

A `UserError` is a mistake the user can fix (a bad flag, a missing or wrong
file, unreadable data, an unreachable server, no model). The CLIs print it as
one line on stderr and exit non-zero without a traceback; any other exception
is a bug and keeps its traceback. The subclasses keep the built-in exception
types that callers and tests already catch.
"""


class UserError(Exception):
    """A mistake the user can fix.

    Args:
      what: what is wrong, naming the bad value.
      where: the flag, file, row or field it concerns.
      fix: how to fix it.
    """

    def __init__(self, what, where="", fix=""):
        self.what = str(what)
        self.where = str(where)
        self.fix = str(fix)
        super().__init__(self.line())

    def line(self):
        """The message without the `error: ` prefix."""
        text = self.what
        if self.where:
            text += f" ({self.where})"
        if self.fix:
            text += f": {self.fix}"
        return text

    def __str__(self):
        return self.line()


class UserValueError(UserError, ValueError):
    """A bad value: a flag, a field, a row."""


class UserFileError(UserError, FileNotFoundError):
    """A file or folder that is missing or not what was expected."""
