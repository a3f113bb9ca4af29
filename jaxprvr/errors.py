"""The one exception type for user mistakes (bad files, bad configs, bad arguments).

Every error names *where* (a file, a config key), what was *expected* and what was *found*, so the
CLIs can print it as one line and exit non-zero without a traceback.
"""

from __future__ import annotations

import os


class JaxprvrError(Exception):
    """A user-facing error: ``where: expected <expected>, found <found>``."""

    def __init__(self, where: str | os.PathLike, expected: str, found: str, hint: str | None = None):
        self.where = str(where)
        self.expected = expected
        self.found = found
        self.hint = hint
        msg = f"{self.where}: expected {expected}, found {found}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)
