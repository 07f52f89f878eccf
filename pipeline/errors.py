"""The one exception type for a problem with the user's data (not with our code)."""

from __future__ import annotations


class DataError(Exception):
    """A record, file or media problem; `code` is the stable snake_case finding code."""

    def __init__(self, code: str, message: str, hint: str = ""):
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint
