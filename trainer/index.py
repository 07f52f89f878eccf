"""What the shards hold, read once at start-up: every stored sample's lengths and location.

`SampleIndex` reads the manifest, checks the shards against it and reads the per-sample lengths
(tokens, trained tokens, tiles) of every shard, in manifest order; the epoch plan
(`trainer/plan.py`) is computed from these arrays alone, and the loader (`trainer/loader.py`)
reads samples by their (shard, row) with `read_sample`. `hold_out` splits an index into the
samples that train and a seeded held-out share that is only evaluated (`--eval-fraction`).

Start-up reads no tile byte: it checks each shard's size, Arrow footer, codec and sample count
against the manifest (`schemas.shards.shard_problems`), not its sha256. Every sample is checked
against its own sha256 when it is read (`ShardReader.read`), so no damaged byte is trained on;
`xc-prep info --verify` is the full check of a folder.

The folder may be an object-store prefix (s3://BUCKET/PREFIX, schemas/storage.py): the checks and
lengths then take a few small ranged reads per shard (column projection, never a tile), many shards
at a time.
"""

from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from schemas.manifest import MANIFEST_NAME, TOKENIZER_NAME, Manifest, ShardInfo, shard_member
from schemas.sample import Sample
from schemas.shards import ShardCorruptError, ShardReader, manifest_problems, mismatch_message, shard_problems
from schemas.storage import Store, open_store
from trainer.errors import ShardDataError

MAX_LISTED_PROBLEMS = 10
REMOTE_LENGTH_READERS = 32
"""Shards checked and measured at once on an object store (each read waits on the network)."""
STREAM_HELD_OUT = 3
"""Random stream of the held-out draw (the plan's streams are 0-2: trainer/plan.py)."""

Lengths = tuple[np.ndarray, np.ndarray, np.ndarray]


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
    selection: str = "all"
    """Which of the stored samples this index holds: all, or a part named by `subset`."""

    @classmethod
    def load(cls, shards_dir: str | Path | Store) -> SampleIndex:
        """Read the manifest, check the shards against it (no hashing) and read every sample's lengths."""
        store = open_store(shards_dir) if isinstance(shards_dir, str | Path) else shards_dir
        try:
            manifest = Manifest.load(store)
        except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
            raise shards_mismatch(store.url(), [f"{store.url(MANIFEST_NAME)}: {e}"]) from e
        problems = manifest_problems(manifest)
        listed = [shard for source in manifest.sources for shard in source.shards]
        with ThreadPoolExecutor(1 if store.is_local else REMOTE_LENGTH_READERS) as pool:
            checked = list(pool.map(lambda shard: _checked_lengths(store, shard, manifest), listed))
        shard_files: list[str] = []
        lengths: list[Lengths] = []
        for shard, (found, shard_lengths) in zip(listed, checked, strict=True):
            problems += found
            if shard_lengths is not None:
                shard_files.append(shard.file)
                lengths.append(shard_lengths)
        if problems:
            raise shards_mismatch(store.url(), problems)
        shard_of = [np.full(len(t), k, dtype=np.int32) for k, (t, _, _) in enumerate(lengths)]
        rows = [np.arange(len(t), dtype=np.int32) for t, _, _ in lengths]
        offsets = np.cumsum([0] + [source.samples_written for source in manifest.sources])
        cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
        return cls(
            store=store,
            manifest=manifest,
            shard_files=shard_files,
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

    def subset(self, keep: np.ndarray, selection: str) -> SampleIndex:
        """The samples `keep` (sorted global ids), renumbered in the same order; `selection` names
        the part (it enters `fingerprint`, so a plan of the part differs from a plan of all)."""
        counts = np.bincount(self.source_of(keep), minlength=len(self.source_offsets) - 1)
        return SampleIndex(
            store=self.store,
            manifest=self.manifest,
            shard_files=self.shard_files,
            sample_shard=self.sample_shard[keep],
            sample_row=self.sample_row[keep],
            num_tokens=self.num_tokens[keep],
            num_trained=self.num_trained[keep],
            num_tiles=self.num_tiles[keep],
            source_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            selection=selection,
        )

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
        """What identifies these shards' contents: the manifest fingerprint and every shard's
        checksum (and the selection, for a part of them)."""
        m = self.manifest
        selection = {} if self.selection == "all" else {"selection": self.selection}
        return {
            **selection,
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


def hold_out(index: SampleIndex, fraction: float, seed: int) -> tuple[SampleIndex, SampleIndex]:
    """(training samples, held-out samples): of each source's n stored samples, round(fraction·n)
    (at least 1, at most n - 1; none of a source of one sample) drawn with (seed, source), so
    every rank and every resumed run holds out the same ones."""
    held: list[np.ndarray] = []
    for i in range(len(index.source_offsets) - 1):
        start, end = int(index.source_offsets[i]), int(index.source_offsets[i + 1])
        n = end - start
        count = min(n - 1, max(1, round(fraction * n))) if n >= 2 else 0
        rng = np.random.default_rng([seed, STREAM_HELD_OUT, i])
        held.append(start + np.sort(rng.permutation(n)[:count]))
    held_ids = np.concatenate(held).astype(np.int64) if held else np.zeros(0, np.int64)
    mask = np.zeros(len(index), dtype=bool)
    mask[held_ids] = True
    name = f"held-out fraction {fraction:g}, seed {seed}"
    train = index.subset(np.flatnonzero(~mask), f"training samples ({name})")
    return train, index.subset(held_ids, f"evaluation samples ({name})")


def _checked_lengths(store: Store, shard: ShardInfo, manifest: Manifest) -> tuple[list[str], Lengths | None]:
    """(problems, lengths) of one listed shard: the cheap checks, then its samples' lengths."""
    try:
        file = shard_member(store, shard.file)
    except ValueError as e:
        return [str(e)], None
    found, reader = shard_problems(store, file, shard, manifest)
    if reader is None:
        return found, None
    try:
        return found, reader.lengths()
    except ShardCorruptError as e:
        return [*found, str(e)], None


def read_sample(
    readers: dict[int, ShardReader], store: Store, shard_files: list[str], shard: int, row: int
) -> Sample:
    """Row `row` of shard `shard` (an index into `shard_files`), checked against its sha256; opened
    readers are kept in `readers`. A damaged sample raises ShardDataError naming the shard and the fix."""
    try:
        if shard not in readers:
            readers[shard] = ShardReader.open(store, shard_files[shard])
        return readers[shard].read(row)
    except ShardCorruptError as e:
        raise ShardDataError(str(e)) from e


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
