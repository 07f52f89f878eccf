"""What both command lines share: exit codes and the dataclass-field docstrings behind `--help`."""

from __future__ import annotations

import ast
import inspect
import textwrap
from enum import IntEnum


class ExitCode(IntEnum):
    """Exit status of `xc-prep` and `xc-train`."""

    OK = 0
    INVALID_DATA = 1
    """Bad input data, a halted run, a failed check: the message says what and where."""
    USAGE = 2
    """A flag or config value that cannot work: the message says the fix."""
    INTERRUPTED = 130
    """Ctrl-C or SIGTERM: the work done so far is kept; rerun the same command to resume."""


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each dataclass field: the one text for both the code and `--help`."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body  # type: ignore[attr-defined]
    return {
        node.target.id: " ".join(following.value.value.split())
        for node, following in zip(body, body[1:], strict=False)
        if isinstance(node, ast.AnnAssign)
        and isinstance(node.target, ast.Name)
        and isinstance(following, ast.Expr)
        and isinstance(following.value, ast.Constant)
        and isinstance(following.value.value, str)
    }
