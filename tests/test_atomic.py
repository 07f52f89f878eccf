"""Atomic writes observed (issue 33): write → fsync(file) → rename → fsync(folder), for every file
`xc-prep shard` writes (shards, sidecars, the manifest, ...) and for a training checkpoint.

`schemas.atomic` is the one module that renames and fsyncs; its `os` is replaced by a recorder that
notes each fsync (the path behind the descriptor, file or folder, and the bytes it holds then) and
each rename. A write whose bytes are not all there at its fsync, a rename before the fsync, or no
fsync of the folder after the rename fails here.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from schemas import atomic

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads /proc/self/fd (Linux)")

Event = tuple[str, Path, Any]
"""("fsync", file, its size), ("fsync_dir", folder, None) or ("rename", source, destination)."""


class RecordingOS:
    """`os` for schemas.atomic, noting fsyncs and renames in order."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def fsync(self, fd: int) -> None:
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            self.events.append(("fsync_dir", path, None))
        else:
            self.events.append(("fsync", path, info.st_size))
        os.fsync(fd)

    def replace(self, src: Any, dst: Any) -> None:
        self.events.append(("rename", Path(src).resolve(), Path(dst).resolve()))
        os.replace(src, dst)


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> RecordingOS:
    recorder = RecordingOS()
    monkeypatch.setattr(atomic, "os", recorder)
    return recorder


def renamed_to(events: list[Event], final: Path) -> int:
    """The index of the one rename that put `final` in place."""
    found = [i for i, (kind, _, dst) in enumerate(events) if kind == "rename" and dst == final]
    assert len(found) == 1, f"{final}: renamed into place {len(found)} times (not through schemas.atomic?)"
    return found[0]


def assert_durable_file(events: list[Event], final: Path) -> None:
    """`final` was fsync'ed whole under its temp name, then renamed, then its folder fsync'ed."""
    final = final.resolve()
    i = renamed_to(events, final)
    tmp = events[i][1]
    synced = [size for kind, path, size in events[:i] if kind == "fsync" and path == tmp]
    assert synced, f"{final.name}: renamed from {tmp.name} without an fsync of it first"
    assert synced[-1] == final.stat().st_size, (
        f"{final.name}: fsync'ed at {synced[-1]} bytes, not all written"
    )
    assert ("fsync_dir", final.parent, None) in events[i + 1 :], f"{final.name}: its folder never fsync'ed"


# --------------------------------------------------------------------------- xc-prep shard


def test_every_file_of_a_shard_run_is_fsynced_renamed_then_its_folder_fsynced(
    recorded: RecordingOS, tmp_path: Path
) -> None:
    from pipeline.cli import main as prep_main
    from pipeline.tokenization import build_tiny_tokenizer

    turns = [{"from": "human", "value": "Say something."}, {"from": "gpt", "value": "Something."}]
    records = [{"id": i, "conversations": turns} for i in range(5)] + [{"id": 5, "conversations": []}]
    (tmp_path / "text.json").write_text(json.dumps(records))
    (tmp_path / "data.txt").write_text("text.json 1\n")
    tokenizer = build_tiny_tokenizer(tmp_path / "tokenizer.model")
    out = tmp_path / "shards"
    argv = ["shard", str(tmp_path / "data.txt"), "--tokenizer", str(tokenizer), "--out", str(out)]
    recorded.events.clear()
    assert prep_main([*argv, "--samples-per-shard", "2", "--workers", "1"]) == 0

    written = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "lock")
    names = {p.name for p in written}
    assert {"manifest.json", "rejects.jsonl", "shard-00000.arrow", "shard-00002.arrow"} <= names
    assert any(p.suffix == ".json" and ".work" in p.parts for p in written), "no sidecar written"
    for path in written:
        assert_durable_file(recorded.events, path)
    # the manifest, which marks the folder complete, is the last file put in place
    last = max(i for i, e in enumerate(recorded.events) if e[0] == "rename")
    assert recorded.events[last][2] == (out / "manifest.json").resolve()


# --------------------------------------------------------------------------- checkpoints


def test_a_checkpoint_is_fsynced_file_by_file_renamed_then_its_folder_fsynced(
    recorded: RecordingOS, one_rank_group: Any, tmp_path: Path
) -> None:
    """A real DeepSpeed engine's checkpoint (tiny model, ZeRO-2, gloo): every file of
    `step-N.partial/` (DeepSpeed's, the RNG states, trainer_state.json) is fsync'ed whole, and its
    folders too, before the rename to `step-N/` commits it; then checkpoints/ is fsync'ed."""
    import deepspeed
    import torch

    from trainer import checkpoint as ckpt
    from trainer.config import TrainConfig, deepspeed_config
    from trainer.model import build_model

    cfg = TrainConfig(shards=Path("unused"), model="tiny", global_batch_size=1).resolve()
    model = build_model("tiny", vocab_size=512)
    ds_config = {**deepspeed_config(cfg, world_size=1, bf16=False), "zero_allow_untested_optimizer": True}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    recorded.events.clear()
    final = ckpt.save_checkpoint(engine, tmp_path, 1, {"history": []}, keep_last=2).resolve()

    i = renamed_to(recorded.events, final)
    partial = recorded.events[i][1]
    assert partial.name == final.name + ckpt.PARTIAL_SUFFIX
    before = recorded.events[:i]
    files = sorted(p for p in final.rglob("*") if p.is_file())
    assert final / ckpt.STATE_FILE in files and any(p.suffix == ".pt" for p in files)
    for path in files:
        synced = [
            size for kind, p, size in before if kind == "fsync" and p == partial / path.relative_to(final)
        ]
        assert synced and synced[-1] == path.stat().st_size, f"{path.relative_to(final)} not fsync'ed whole"
    for folder in [final, *(p for p in final.rglob("*") if p.is_dir())]:
        assert ("fsync_dir", partial / folder.relative_to(final), None) in before, folder
    assert ("fsync_dir", final.parent, None) in recorded.events[i + 1 :], "checkpoints/ never fsync'ed"
    # trainer_state.json, written last, was itself put in place atomically inside the .partial folder
    assert renamed_to(recorded.events, partial / ckpt.STATE_FILE) < i
