"""RELIABILITY.md cites tests that exist: every fault row names at least one (or says `–`, none),
and every cited test function, with its cited parameter ids, is in the file it names."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CITATION = re.compile(r"(?:(tests/\w+\.py)|\b(\w+))?::(test_\w+)(?:\[([^\]]*)\])?")
"""`F::test_x`, `tests/test_y.py::test_z[a, b]`, or `::test_w` (the file cited just before)."""


def parametrized_tests(path: Path) -> dict[str, set[str]]:
    """Test functions of a file -> the str/int constants in their decorators (parameter ids)."""
    tree = ast.parse(path.read_text())
    return {
        node.name: {
            str(c.value)
            for d in node.decorator_list
            for c in ast.walk(d)
            if isinstance(c, ast.Constant) and type(c.value) in (str, int)
        }
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
    }


def fault_rows(doc: str) -> list[tuple[str, str]]:
    """(fault, injected-by cell) of every row of the tables whose header is `| fault | injected by |`."""
    rows, in_table = [], False
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if cells[:2] == ["fault", "injected by"]:
            in_table = True
        elif not cells:
            in_table = False
        elif in_table and not set(cells[0]) <= set("-"):
            rows.append((cells[0], cells[1]))
    return rows


def test_every_reliability_row_cites_tests_that_exist() -> None:
    doc = (REPO_ROOT / "RELIABILITY.md").read_text()
    files = dict(re.findall(r"`(\w+)` = (tests/\w+\.py)", doc))
    rows = fault_rows(doc)
    assert len(rows) > 20, "the fault tables were not found"
    tests: dict[str, dict[str, set[str]]] = {}
    for fault, cell in rows:
        cited = list(CITATION.finditer(cell))
        assert cited or cell.startswith("–"), f"{fault!r}: cites no test and does not say `–`"
        current = None
        for match in cited:
            path, short, name, ids = match.groups()
            current = path or (files[short] if short else current)
            assert current is not None, f"{fault!r}: `::{name}` follows no file"
            if current not in tests:
                tests[current] = parametrized_tests(REPO_ROOT / current)
            assert name in tests[current], f"{fault!r}: {current}::{name} does not exist"
            # `[…]` cites every parametrization; ids generated from values are not string constants
            # a combined id `a-b` cites one value from each stacked parametrize
            for param in filter(lambda p: p not in ("", "…"), (p.strip() for p in (ids or "").split(","))):
                known = tests[current][name]
                assert param in known or set(param.split("-")) <= known, (
                    f"{fault!r}: {current}::{name} has no parameter {param!r}"
                )
