"""Shared fixtures. Tests that need `../shared` (SPEC, golden vectors, real tokenizer) skip without it,
unless XC_REQUIRE_SHARED=1 (CI, `.ci/run`): then they fail, so the golden tests cannot vanish."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.tokenization import ADDED_TOKENS

REPO_ROOT = Path(__file__).resolve().parent.parent
REQUIRE_SHARED_ENV = "XC_REQUIRE_SHARED"
"""Set to 1 where ../shared must be present (CI): a test needing it fails instead of skipping."""


def _shared_dir() -> Path | None:
    """$XC_SHARED when set (and then only it), else `../shared` beside the checkout."""
    given = os.environ.get("XC_SHARED")
    folder = Path(given) if given else REPO_ROOT.parent / "shared"
    return folder if (folder / "ixc25" / "SPEC.md").is_file() else None


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """`../shared` beside the checkout, or $XC_SHARED (CI has it; a user's clone does not: then skip,
    or fail under XC_REQUIRE_SHARED=1)."""
    d = _shared_dir()
    if d is None:
        missing = "../shared (IXC2.5 golden vectors and tokenizer) is not present (or point XC_SHARED at it)"
        if os.environ.get(REQUIRE_SHARED_ENV) == "1":
            pytest.fail(f"{missing}; {REQUIRE_SHARED_ENV}=1 requires it", pytrace=False)
        pytest.skip(missing)
    return d


@pytest.fixture(scope="session")
def ixc_dir(shared_dir: Path) -> Path:
    return shared_dir / "ixc25"


@pytest.fixture(scope="session")
def real_tokenizer_path(ixc_dir: Path) -> Path:
    return ixc_dir / "tokenizer.model"


def qa(question: str = "What is shown?", answer: str = "A photo.") -> list[dict[str, str]]:
    """One question and its answer, in the official conversation format."""
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def write_json(path: Path, records: list[Any]) -> Path:
    """`records` as a JSON data file at `path` (folders made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return path


# Strings that are special pieces of the IXC2.5 tokenizer: text holding them must be refused.
SPECIAL_STRINGS = (
    "<s>",
    "</s>",
    "<unk>",
    "[UNUSED_TOKEN_145]",
    "[UNUSED_TOKEN_146]",
    "[UNUSED_TOKEN_0]",
    "[UNUSED_TOKEN_140]",
    *ADDED_TOKENS,
)

DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


@contextlib.contextmanager
def restored_environ(*names: str) -> Iterator[None]:
    """Put back the variables `names` as they were (set or unset) when the block ends."""
    saved = {k: os.environ.get(k) for k in names}
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def one_rank_group() -> Any:
    """This process as a one-rank gloo group (`trainer.train.setup_distributed`, for a DeepSpeed
    engine in process); the launcher variables it sets are undone afterwards. The group itself
    stays: DeepSpeed keeps a handle on it, and later in-process runs join it."""
    from trainer.train import setup_distributed

    with restored_environ(*DIST_ENV):
        yield setup_distributed()


@pytest.fixture(scope="module")
def in_process_training() -> Iterator[None]:
    """For modules that run `xc-train` in this process: the launcher variables it puts into
    os.environ are undone afterwards, and the hub stays offline (PEFT looks for tokenizer files
    there otherwise). Its one-process gloo group stays: DeepSpeed keeps a handle on it, and a later
    in-process run in another module would fail on a destroyed one ("Group ... is not registered")."""
    with restored_environ(*DIST_ENV, "HF_HUB_OFFLINE"):
        os.environ["HF_HUB_OFFLINE"] = "1"
        yield


TEXT_ANSWERS = [
    "A packed row holds several samples, and attention never crosses from one to the next.",
    "The loss is the mean over every trained token of the global batch.",
    "Shards store uint8 tiles, so the GPU normalizes them and the loader never decodes images.",
    "Every record ends in a shard or in the rejects report, never in between.",
]


@pytest.fixture(scope="session")
def tiny_text_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards of 4 short text-only records (tiny tokenizer, max_length 128): 8 samples per epoch
    at k 0.008, one per packed row, so a global batch of 2 gives 4 fast optimizer steps."""
    from pipeline.cli import main as prep_main
    from pipeline.tokenization import build_tiny_tokenizer

    root = tmp_path_factory.mktemp("reliability_trainer")
    records = [
        {
            "id": i,
            "conversations": [
                {"from": "human", "value": f"Question {i}: what holds?"},
                {"from": "gpt", "value": a},
            ],
        }
        for i, a in enumerate(TEXT_ANSWERS)
    ]
    (root / "text.json").write_text(json.dumps(records))
    (root / "data.txt").write_text("text.json 0.008\n")
    tokenizer = build_tiny_tokenizer(root / "tokenizer.model")
    out = root / "shards"
    argv = ["shard", str(root / "data.txt"), "--tokenizer", str(tokenizer), "--out", str(out)]
    assert prep_main(argv + ["--max-length", "128", "--workers", "1"]) == 0
    return out
