"""The one exception type for bad user input.

A `UserError` carries a single line that says what is wrong and where (file, line, field or
key). The CLI prints it without a traceback and exits non-zero; library callers can catch it.
"""


class UserError(Exception):
    """Bad input from the user: a file, a line, a field, a flag, a config key."""

    def __init__(self, message: str, *, where: str | None = None):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)
