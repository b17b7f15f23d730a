"""The one exception type the CLI turns into a one-line message and an exit status."""

from __future__ import annotations


class QsimError(Exception):
    """A user-facing failure: bad input, a refused option, a missing tool.

    ``status`` is the process exit status the CLI uses: 1 for a failure, 2 for a usage error.
    """

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


class UsageError(QsimError):
    """A malformed or contradictory command line (exit status 2)."""

    def __init__(self, message: str):
        super().__init__(message, status=2)
