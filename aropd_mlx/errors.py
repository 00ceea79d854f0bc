"""The one exception type for bad user input.

A `UserError` carries a single line that says what is wrong and where (file, line, field or
key). The CLI prints it without a traceback and exits non-zero; library callers can catch it.
"""


class UserError(Exception):
    """Bad input from the user: a file, a line, a field, a flag, a config key."""

    def __init__(self, message: str, *, where: str | None = None):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


_NOTED: set[str] = set()


def note(message: str) -> None:
    """A one-line note on stderr (`aropd-mlx: note: ...`), once per message per process: what
    was skipped or ignored, where the run goes on anyway."""
    import sys

    if message not in _NOTED:
        _NOTED.add(message)
        print(f"aropd-mlx: note: {message}", file=sys.stderr)
