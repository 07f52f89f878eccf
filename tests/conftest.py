"""Shared fixtures. Tests that need `../shared` (SPEC, golden vectors, real tokenizer) skip without it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def _shared_dir() -> Path | None:
    candidates = [os.environ.get("XC_SHARED"), REPO_ROOT.parent / "shared"]
    for c in candidates:
        if c and (Path(c) / "ixc25" / "SPEC.md").is_file():
            return Path(c)
    return None


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """`../shared` beside the checkout (CI has it; a user's clone does not: then skip)."""
    d = _shared_dir()
    if d is None:
        pytest.skip("../shared (IXC2.5 golden vectors and tokenizer) is not present")
    return d


@pytest.fixture(scope="session")
def ixc_dir(shared_dir: Path) -> Path:
    return shared_dir / "ixc25"


@pytest.fixture(scope="session")
def real_tokenizer_path(ixc_dir: Path) -> Path:
    return ixc_dir / "tokenizer.model"
