"""What both command lines share: exit codes, and flags made from a dataclass's fields.

`add_dataclass_flags(parser, cls)` adds one `--kebab-case` flag per field of a config dataclass,
typed from the annotation, with the docstring under the field (`field_docs`) as its help: the
dataclass stays the single source of truth for `xc-prep shard` and `xc-train`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from collections.abc import Collection, Mapping
from enum import IntEnum
from typing import Any, Literal


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


def add_dataclass_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    exclude: Collection[str] = (),
    none_defaults: bool = False,
    show_defaults: bool = False,
    positional: Collection[str] = (),
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """One `--kebab-case` flag per field of dataclass `cls` (in field order, dest = the field name),
    its help the field's docstring.

    The annotation decides the argument: `X | None` reads as X, a Literal gives choices, a tuple one
    or more values, a bool a switch (`--x`, or `--x/--no-x` where the default is not False).
    `none_defaults`: every default is None, so that a config file can fill what the command line
    leaves unset; otherwise the field's default is the flag's. `show_defaults` appends the field's
    default to the help, "(default X)" (not for None, an empty tuple, or a bool whose flag's
    default argparse shows itself); with `none_defaults` a bool's reads "(default --x)" or
    "(default --no-x)". Fields in `exclude` get no flag;
    fields in `positional` become positional arguments (optional when they have a default).
    `overrides[field]` are argparse keyword arguments that replace the derived ones (metavar,
    required, a default computed at run time with its help, ...).
    """
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        default = None if none_defaults else _field_default(f)
        kwargs: dict[str, Any] = {"default": default, "help": docs.get(f.name, "")}
        kwargs.update(_argument_kind(hints[f.name], default))
        if show_defaults:
            kwargs["help"] += _default_text(f, default, none_defaults)
        kwargs.update((overrides or {}).get(f.name, {}))
        if f.name in positional:
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                kwargs.setdefault("nargs", "?")
            parser.add_argument(f.name, metavar=kwargs.pop("metavar", f.name.upper()), **kwargs)
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kwargs)


def _default_text(f: dataclasses.Field[Any], flag_default: Any, none_defaults: bool) -> str:
    """' (default X)' for a field's help, or '' where there is nothing to show."""
    value = _field_default(f)
    if value is None or value == ():
        return ""
    if isinstance(value, bool):
        # BooleanOptionalAction prints a non-None default itself; store_true's False needs nothing.
        if not none_defaults:
            return ""
        name = f.name.replace("_", "-")
        return f" (default --{'' if value else 'no-'}{name})"
    if isinstance(value, tuple):
        value = " ".join(map(str, value))
    return f" (default {value})"


def _field_default(f: dataclasses.Field[Any]) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _argument_kind(annotation: Any, default: Any) -> dict[str, Any]:
    """argparse keyword arguments for a field's annotation (Path, int, float, str, bool, Literal, tuple)."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _argument_kind(args[0], default)
    if annotation is bool:
        return {"action": "store_true" if default is False else argparse.BooleanOptionalAction}
    if origin is Literal:
        return {"choices": typing.get_args(annotation)}
    if origin is tuple:
        return {"nargs": "+"}
    assert callable(annotation) and origin is None, f"no flag type for the annotation {annotation}"
    return {"type": annotation}
