"""What the shards hold, read once at start-up: every stored sample's lengths and location.

`SampleIndex` reads the manifest, checks the shards against it and reads the per-sample lengths
(tokens, trained tokens, tiles) of every shard, in manifest order; the epoch plan
(`trainer/plan.py`) is computed from these arrays alone, and the loader (`trainer/loader.py`)
reads samples by their (shard, row).

The folder may be an object-store prefix (s3://BUCKET/PREFIX, schemas/storage.py): the lengths
are then read with column projection (a few bytes per sample, never a tile), many shards at a time.
"""

from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from schemas.manifest import TOKENIZER_NAME, Manifest
from schemas.shards import ShardReader, mismatch_message, verify_shards
from schemas.storage import Store, open_store
from trainer.errors import ShardDataError

MAX_LISTED_PROBLEMS = 10
REMOTE_LENGTH_READERS = 32
"""Shards whose lengths are read at once from an object store (each read waits on the network)."""


def shards_mismatch(shards_dir: str | Path, problems: list[str]) -> ShardDataError:
    """The error for shards that differ from their manifest (`verify_shards`' problems)."""
    return ShardDataError(mismatch_message(shards_dir, problems))


@dataclass
class SampleIndex:
    """Lengths and locations of every stored sample, in manifest order (sources, shards, rows).

    Global sample id g: samples of source i are [source_offsets[i], source_offsets[i+1]).
    """

    store: Store
    """The shard folder or object-store prefix."""
    manifest: Manifest
    shard_files: list[str]
    """Shard paths relative to shards_dir."""
    sample_shard: np.ndarray
    """int32[S] shard of each sample (index into shard_files)."""
    sample_row: np.ndarray
    """int32[S] row of each sample in its shard."""
    num_tokens: np.ndarray
    """int64[S]"""
    num_trained: np.ndarray
    """int64[S]"""
    num_tiles: np.ndarray
    """int64[S]"""
    source_offsets: np.ndarray
    """int64[num_sources + 1]"""

    @classmethod
    def load(cls, shards_dir: str | Path | Store, *, checksums: bool = False) -> SampleIndex:
        """Read the manifest, check the shards against it, and read every sample's lengths."""
        store = open_store(shards_dir) if isinstance(shards_dir, str | Path) else shards_dir
        problems = verify_shards(store, checksums=checksums)
        if problems:
            raise shards_mismatch(store.url(), problems)
        manifest = Manifest.load(store)
        files = [shard.file for source in manifest.sources for shard in source.shards]
        with ThreadPoolExecutor(1 if store.is_local else REMOTE_LENGTH_READERS) as pool:
            lengths = list(pool.map(lambda file: ShardReader.open(store, file).lengths(), files))
        shard_of = [np.full(len(t), k, dtype=np.int32) for k, (t, _, _) in enumerate(lengths)]
        rows = [np.arange(len(t), dtype=np.int32) for t, _, _ in lengths]
        offsets = np.cumsum([0] + [source.samples_written for source in manifest.sources])
        cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
        return cls(
            store=store,
            manifest=manifest,
            shard_files=files,
            sample_shard=cat(shard_of, np.int32),
            sample_row=cat(rows, np.int32),
            num_tokens=cat([t for t, _, _ in lengths], np.int64),
            num_trained=cat([tr for _, tr, _ in lengths], np.int64),
            num_tiles=cat([ti for _, _, ti in lengths], np.int64),
            source_offsets=np.asarray(offsets, dtype=np.int64),
        )

    @property
    def shards_dir(self) -> str:
        """The folder or URL, for messages."""
        return self.store.url()

    def reader(self, shard: int) -> ShardReader:
        """A reader of shard `shard` (an index into shard_files)."""
        return ShardReader.open(self.store, self.shard_files[shard])

    def tokenizer_dir(self) -> Path:
        """A local folder holding the shards' tokenizer.model (for an object store, a copy in a
        new temp folder): presets are built from it and outputs carry it."""
        if self.store.is_local:
            return self.store.local_path()
        folder = Path(tempfile.mkdtemp(prefix="xc-shards-tokenizer-"))
        (folder / TOKENIZER_NAME).write_bytes(self.store.read_bytes(TOKENIZER_NAME))
        return folder

    def __len__(self) -> int:
        return int(self.num_tokens.shape[0])

    def source_of(self, sample_ids: np.ndarray) -> np.ndarray:
        """Source position of each global sample id."""
        return np.searchsorted(self.source_offsets, sample_ids, side="right") - 1

    def describe(self, g: int) -> str:
        """Where sample g lives, for error messages (reads its provenance, not its tiles)."""
        path = self.store.url(self.shard_files[self.sample_shard[g]])
        source, file, index, record_id = self.reader(int(self.sample_shard[g])).provenance(
            int(self.sample_row[g])
        )
        return f"{path} row {self.sample_row[g]} (source {source!r}, {file} record {index}, id {record_id!r})"

    def fingerprint(self) -> dict[str, Any]:
        """What identifies these shards' contents: the manifest fingerprint and every shard's checksum."""
        m = self.manifest
        return {
            "fingerprint": asdict(m.fingerprint),
            "sources": [
                {
                    "name": s.name,
                    "path": s.path,
                    "k": s.k,
                    "samples": s.samples_written,
                    "shards": [sh.sha256 for sh in s.shards],
                }
                for s in m.sources
            ],
        }


def check_budgets(index: SampleIndex, max_length: int, max_tiles: int | None) -> None:
    """Raise ShardDataError naming every sample that cannot fit one pack (never split)."""
    too_long = np.flatnonzero(index.num_tokens > max_length)
    too_tiled = np.flatnonzero(index.num_tiles > max_tiles) if max_tiles is not None else np.zeros(0, int)
    if not len(too_long) and not len(too_tiled):
        return
    made_with = index.manifest.fingerprint.max_length
    lines = []
    if len(too_long):
        lines.append(
            f"{len(too_long)} sample(s) have more than max_length {max_length} tokens "
            f"(the shards were made with max_length {made_with}):"
        )
        lines += [
            f"  {index.num_tokens[g]} tokens: {index.describe(g)}" for g in too_long[:MAX_LISTED_PROBLEMS]
        ]
    if len(too_tiled):
        lines.append(f"{len(too_tiled)} sample(s) have more than max_tiles {max_tiles} tiles:")
        lines += [
            f"  {index.num_tiles[g]} tiles: {index.describe(g)}" for g in too_tiled[:MAX_LISTED_PROBLEMS]
        ]
    lines.append(
        f"a sample is never split: use --max-length >= {int(index.num_tokens.max())} and "
        f"--max-tiles >= {int(index.num_tiles.max())}, or re-shard with `xc-prep shard --max-length {max_length}`"
    )
    raise ShardDataError("\n".join(lines))
