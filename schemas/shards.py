"""Shard container format: one Arrow IPC file per shard, one record batch per sample.

Why Arrow IPC (not a WebDataset tar): an IPC *file* has a footer index of its record batches, so a
memory-mapped shard gives O(1) random access to sample i, and column projection lets the loader read
every sample's length (`num_tokens`, `num_tiles`) for planning without touching a tile byte. It is a
standard, self-describing, language-neutral container with no pickle. Writing one record batch per
sample keeps the writer's memory bounded by the largest sample.

Columns (one row per sample):
  text_ids int32 list (the token ids outside image spans), trained_spans int32 list ([start, end)
  pairs of the trained positions), image_rows/image_cols/image_starts int32 lists,
  tiles list<binary> (one element per 560×560×3 tile, encoded by the manifest's tile codec:
  schemas/tile_codecs.py), num_tokens/num_trained/num_tiles int32, source/file/layout string,
  index int64, id_json string, sha256 fixed_size_binary(32).
A sample's input_ids and labels are rebuilt from these (`token_columns` / `tokens_from_columns`):
image positions hold IMAGE_TOKEN_ID, and a label is the input id where trained, IGNORE_INDEX
elsewhere, so storing both arrays in full would spend most of a sample's non-tile bytes on
placeholders.

Integrity has two levels. The manifest lists each shard's size and whole-file sha256 (`xc-prep info
--verify`, and a resumed `xc-prep shard`, check them). Each row also carries the sha256 of its own
values (`sample_sha256`), checked by every `ShardReader.read` before a sample is handed out, so a
reader never needs the whole file to trust one sample (a training start reads no tile byte; a reader
of ranged reads can check what it fetched).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from schemas.manifest import MANIFEST_NAME, TOKENIZER_NAME, Manifest, ShardInfo, shard_member
from schemas.sample import IGNORE_INDEX, IMAGE_TOKEN_ID, ImageSpan, Sample, image_token_count
from schemas.storage import Store, open_store, sha256_of
from schemas.tile_codecs import check_codec, decode_tiles, encode_tiles

SHARD_SUFFIX = ".arrow"
"""The file suffix of an Arrow IPC shard."""
SHA256_COLUMN = "sha256"
LENGTH_COLUMNS = ("num_tokens", "num_trained", "num_tiles")

SHARD_SCHEMA = pa.schema(
    [
        ("text_ids", pa.list_(pa.int32())),
        ("trained_spans", pa.list_(pa.int32())),
        ("image_rows", pa.list_(pa.int32())),
        ("image_cols", pa.list_(pa.int32())),
        ("image_starts", pa.list_(pa.int32())),
        ("tiles", pa.list_(pa.binary())),
        ("num_tokens", pa.int32()),
        ("num_trained", pa.int32()),
        ("num_tiles", pa.int32()),
        ("source", pa.string()),
        ("file", pa.string()),
        ("index", pa.int64()),
        ("id_json", pa.string()),
        ("layout", pa.string()),
        (SHA256_COLUMN, pa.binary(32)),
    ]
)
HASHED_COLUMNS = tuple(name for name in SHARD_SCHEMA.names if name != SHA256_COLUMN)


class ShardCorruptError(ValueError):
    """A shard's bytes differ from what `xc-prep shard` wrote (the message names the file and the fix)."""


def corrupt_message(path: Path | str, what: str) -> str:
    return (
        f"{path}: {what}: the shard is damaged (on disk or in transfer); re-run the `xc-prep shard` "
        "command recorded in its folder's manifest.json (it rebuilds damaged shards and keeps the "
        "others) or restore the folder from a copy; `xc-prep info --verify` checks every shard"
    )


# ---------------------------------------------------------------- per-sample checksum


def _value_parts(column: pa.Array) -> list[Any]:
    """The bytes of one row's value (a one-row column) that its checksum covers, without copies."""
    if pa.types.is_list(column.type):
        values = column[0].values
        if pa.types.is_binary(values.type):  # tiles: each one's length, then their bytes
            _, offset_buffer, data = values.buffers()
            offsets = np.frombuffer(offset_buffer, dtype="<i4")[
                values.offset : values.offset + len(values) + 1
            ]
            body = data[int(offsets[0]) : int(offsets[-1])] if data is not None else b""
            return [np.diff(offsets).astype("<i8"), body]
        assert values.type == pa.int32(), f"{column.type}: no checksum rule for this type"
        return [values.to_numpy(zero_copy_only=False).astype("<i4", copy=False)]
    scalar = column[0].as_py()
    if isinstance(scalar, str):
        return [scalar.encode()]
    return [int(scalar).to_bytes(8, "little", signed=True)]


def sample_sha256(batch: pa.RecordBatch) -> bytes:
    """sha256 of a one-row batch's values (every column but the checksum), each part length-prefixed."""
    h = hashlib.sha256()
    for name in HASHED_COLUMNS:
        for part in _value_parts(batch.column(name)):
            view = memoryview(part).cast("B")
            h.update(len(view).to_bytes(8, "little"))
            h.update(view)
    return h.digest()


# ---------------------------------------------------------------- token columns


def image_mask(num_tokens: int, images: list[ImageSpan]) -> np.ndarray:
    """bool[T]: True at the positions of image blocks."""
    mask = np.zeros(num_tokens, dtype=bool)
    for im in images:
        mask[im.span[0] : im.span[1]] = True
    return mask


def token_columns(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """(text_ids, trained_spans) of a sample: what the shard stores of its input_ids and labels."""
    trained = sample.labels != IGNORE_INDEX
    assert np.array_equal(sample.labels[trained], sample.input_ids[trained]), (
        "a label differs from its input id"
    )
    edges = np.flatnonzero(np.diff(trained.astype(np.int8), prepend=0, append=0))
    text_ids = sample.input_ids[~image_mask(sample.num_tokens, sample.images)]
    return text_ids.astype(np.int32, copy=False), edges.astype(np.int32)


def tokens_from_columns(
    num_tokens: int, images: list[ImageSpan], text_ids: np.ndarray, trained_spans: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, labels) int32[T] from the stored columns (ValueError if they do not fit)."""
    is_image = image_mask(num_tokens, images)
    if int((~is_image).sum()) != len(text_ids) or len(trained_spans) % 2:
        raise ValueError(
            f"{len(text_ids)} text ids and {len(trained_spans)} span ends do not fit {num_tokens} tokens"
        )
    input_ids = np.full(num_tokens, IMAGE_TOKEN_ID, dtype=np.int32)
    input_ids[~is_image] = text_ids
    labels = np.full(num_tokens, IGNORE_INDEX, dtype=np.int32)
    for start, end in trained_spans.reshape(-1, 2).tolist():
        labels[start:end] = input_ids[start:end]
    return input_ids, labels


# ---------------------------------------------------------------- writing


def sample_to_batch(sample: Sample, codec: str, jpeg_quality: int | None = None) -> pa.RecordBatch:
    """One sample as a one-row record batch of SHARD_SCHEMA, its checksum included."""
    tiles = encode_tiles(sample.tiles, codec, jpeg_quality)
    text_ids, trained_spans = token_columns(sample)
    columns = [
        pa.array([text_ids], pa.list_(pa.int32())),
        pa.array([trained_spans], pa.list_(pa.int32())),
        pa.array([[im.grid[0] for im in sample.images]], pa.list_(pa.int32())),
        pa.array([[im.grid[1] for im in sample.images]], pa.list_(pa.int32())),
        pa.array([[im.span[0] for im in sample.images]], pa.list_(pa.int32())),
        pa.ListArray.from_arrays(pa.array([0, len(tiles)], pa.int32()), tiles),
        pa.array([sample.num_tokens], pa.int32()),
        pa.array([sample.num_trained], pa.int32()),
        pa.array([sample.num_tiles], pa.int32()),
        pa.array([sample.source], pa.string()),
        pa.array([sample.file], pa.string()),
        pa.array([sample.index], pa.int64()),
        pa.array([json.dumps(sample.id, ensure_ascii=False)], pa.string()),
        pa.array([sample.layout], pa.string()),
    ]
    unsigned = pa.RecordBatch.from_arrays(columns, schema=SHARD_SCHEMA.remove(len(columns)))
    checksum = pa.array([sample_sha256(unsigned)], pa.binary(32))
    return pa.RecordBatch.from_arrays([*columns, checksum], schema=SHARD_SCHEMA)


class _HashingFile:
    """A write-only file that hashes what passes through it: the shard's sha256 without reading it back."""

    def __init__(self, path: Path):
        self._file = open(path, "wb")  # noqa: SIM115 (closed by ShardWriter.close)
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.sha256.update(view)
        self.bytes += len(view)
        return self._file.write(view)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    @property
    def closed(self) -> bool:
        return self._file.closed


class ShardWriter:
    """Streams samples into one shard file, one record batch each, so memory holds one sample at a time.

    Use as a context manager; the caller makes the file atomic (write a temp name, then rename).
    After `close()`, `bytes` and `sha256` describe the file as written.
    """

    def __init__(self, path: Path, codec: str, jpeg_quality: int | None = None):
        check_codec(codec, jpeg_quality)
        self.codec = codec
        self.jpeg_quality = jpeg_quality
        self._metadata = {b"tile_codec": codec.encode()}
        self._sink = _HashingFile(path)
        self._writer = pa.ipc.new_file(
            pa.PythonFile(self._sink, mode="w"), SHARD_SCHEMA.with_metadata(self._metadata)
        )
        self.bytes = 0
        self.sha256 = ""

    def write(self, sample: Sample) -> None:
        batch = sample_to_batch(sample, self.codec, self.jpeg_quality)
        self._writer.write_batch(batch.replace_schema_metadata(self._metadata))

    def close(self) -> None:
        if self._sink.closed:
            return
        try:
            self._writer.close()
        finally:
            self._sink.close()
        self.bytes, self.sha256 = self._sink.bytes, self._sink.sha256.hexdigest()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_shard(path: Path, samples: list[Sample], codec: str, jpeg_quality: int | None = None) -> None:
    """Write samples to `path` (the caller makes it atomic: write a temp name, then rename)."""
    with ShardWriter(path, codec, jpeg_quality) as writer:
        for sample in samples:
            writer.write(sample)


# ---------------------------------------------------------------- reading


@dataclass(frozen=True)
class SampleRef:
    """Where one stored sample lives: shard file and row."""

    shard: Path
    row: int


class ShardReader:
    """Random access to one shard: memory-mapped locally, by ranged reads from an object store
    (`ShardReader.open`); the Arrow IPC footer locates each sample's bytes. Every sample read is
    checked against its sha256."""

    def __init__(self, path: Path | str, source: pa.NativeFile | None = None):
        self.path = path if source is not None else Path(path)
        """The file (or, with `source`, the object's URL) for messages."""
        self._source = source
        try:
            if self._source is None:
                self._source = pa.memory_map(str(self.path), "r")
            self._reader = pa.ipc.open_file(self._source)
        except (pa.ArrowInvalid, OSError) as e:
            raise ShardCorruptError(corrupt_message(self.path, f"not a readable Arrow IPC file ({e})")) from e
        if self._reader.schema.remove_metadata() != SHARD_SCHEMA:
            raise ShardCorruptError(corrupt_message(self.path, "its columns are not those of a shard"))
        self.codec = (self._reader.schema.metadata or {}).get(b"tile_codec", b"").decode()
        self.bytes_read = 0
        """Bytes of the samples read so far (the loader's read throughput)."""

    @classmethod
    def open(cls, store: Store, file: str) -> ShardReader:
        """The shard `file` (relative to the store's folder)."""
        if store.is_local:
            return cls(store.local_path(file))
        try:
            source = store.open_input(file)
        except OSError as e:
            raise ShardCorruptError(
                corrupt_message(store.url(file), f"not readable from the object store ({e})")
            ) from e
        return cls(store.url(file), source)

    def __len__(self) -> int:
        return self._reader.num_record_batches

    def _batch(self, row: int) -> pa.RecordBatch:
        try:
            return self._reader.get_batch(row)
        except (pa.ArrowInvalid, OSError) as e:
            raise ShardCorruptError(corrupt_message(self.path, f"row {row} is unreadable ({e})")) from e

    def lengths(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """int64 (num_tokens, num_trained, num_tiles) of every sample, without touching a tile byte.
        Only those columns are read: from an object store, a few small ranged reads per sample."""
        assert self._source is not None
        names = SHARD_SCHEMA.names
        options = pa.ipc.IpcReadOptions(included_fields=[names.index(n) for n in LENGTH_COLUMNS])
        try:
            table = pa.ipc.open_file(self._source, options=options).read_all()
        except (pa.ArrowInvalid, OSError) as e:
            raise ShardCorruptError(corrupt_message(self.path, f"unreadable ({e})")) from e
        tokens, trained, tiles = (
            table.column(n).to_numpy().astype(np.int64) if table.num_rows else np.zeros(0, np.int64)
            for n in LENGTH_COLUMNS
        )
        return tokens, trained, tiles

    def provenance(self, row: int) -> tuple[str, str, int, object]:
        """(source, file, index, id) of one sample, without decoding tiles (not checked: for messages)."""
        b = self._batch(row)
        return (
            b.column("source")[0].as_py(),
            b.column("file")[0].as_py(),
            b.column("index")[0].as_py(),
            json.loads(b.column("id_json")[0].as_py()),
        )

    def checked_batch(self, row: int) -> pa.RecordBatch:
        """Row `row` as a one-row record batch, after checking its values against their sha256."""
        batch = self._batch(row)
        if sample_sha256(batch) != batch.column(SHA256_COLUMN)[0].as_py():
            raise ShardCorruptError(corrupt_message(self.path, f"row {row} does not match its sha256"))
        return batch

    def encoded_tiles(self, row: int) -> list[bytes]:
        """The stored bytes of one sample's tiles, in the shard's codec, without decoding them."""
        encoded = self.checked_batch(row).column("tiles")[0].values
        return [encoded[i].as_py() for i in range(len(encoded))]

    def read(self, row: int) -> Sample:
        b = self.checked_batch(row)
        self.bytes_read += b.nbytes
        col = lambda name: b.column(name)[0]  # noqa: E731
        rows = col("image_rows").as_py()
        cols = col("image_cols").as_py()
        starts = col("image_starts").as_py()
        images = [
            ImageSpan(grid=(r, c), span=(s, s + image_token_count(r, c)))
            for r, c, s in zip(rows, cols, starts, strict=True)
        ]
        as_int32 = lambda name: col(name).values.to_numpy(zero_copy_only=False).astype(np.int32)  # noqa: E731
        try:
            input_ids, labels = tokens_from_columns(
                col("num_tokens").as_py(), images, as_int32("text_ids"), as_int32("trained_spans")
            )
            tiles = decode_tiles(col("tiles").values, self.codec)
        except ValueError as e:  # the checksum matched: bytes as written, by another codec or a bug
            raise ShardCorruptError(corrupt_message(self.path, f"row {row}: {e}")) from e
        return Sample(
            input_ids=input_ids,
            labels=labels,
            images=images,
            tiles=tiles,
            source=col("source").as_py(),
            file=col("file").as_py(),
            index=col("index").as_py(),
            id=json.loads(col("id_json").as_py()),
            layout=col("layout").as_py(),
        )

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self.read(i)


# ---------------------------------------------------------------- verification


def file_sha256(path: Path, chunk_bytes: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def mismatch_message(shard_dir: Path | str, problems: list[str]) -> str:
    """The error for a shard folder that fails `verify_shards`: every problem, then what to do."""
    listed = "\n  ".join(problems)
    return (
        f"{shard_dir}: the shards do not match their manifest:\n  {listed}"
        "\nre-run `xc-prep shard` (or `xc-prep info --verify` for details)"
    )


def shard_problems(
    store: Store, file: str, info: ShardInfo, manifest: Manifest
) -> tuple[list[str], ShardReader | None]:
    """The cheap checks of one listed shard (`file`, relative to the store's folder: exists, size,
    Arrow footer, codec, sample count), no hashing; returns the problems and, when it opened, the
    reader."""
    path = store.url(file)
    size = store.size(file)
    if size is None:
        return [f"{path}: missing (listed in {MANIFEST_NAME})"], None
    if size != info.bytes:
        return [f"{path}: {size} bytes, manifest says {info.bytes} (truncated or replaced)"], None
    try:
        reader = ShardReader.open(store, file)
    except ShardCorruptError as e:
        return [str(e)], None
    if reader.codec != manifest.fingerprint.tile_codec:
        return [
            f"{path}: tiles stored as {reader.codec!r}, manifest says {manifest.fingerprint.tile_codec!r}"
        ], None
    if len(reader) != info.samples:
        return [f"{path}: holds {len(reader)} samples, manifest says {info.samples}"], None
    return [], reader


def verify_shards(shard_dir: str | Path | Store) -> list[str]:
    """The full check of a shard folder (a path, an s3:// URL or a store) against its manifest;
    returns one message per problem (empty = fine).

    Every source's counts add up (records_read = samples_written + rejected), and every listed shard
    exists, has the listed size and sha256, opens as Arrow IPC with the manifest's codec and holds
    the listed number of samples. `xc-prep info --verify` and `xc-prep export` run it; the trainer
    runs the same checks without the sha256 (`shard_problems`) and checks each sample as it reads it.
    """
    store = open_store(shard_dir) if isinstance(shard_dir, str | Path) else shard_dir
    try:
        manifest = Manifest.load(store)
    except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
        return [f"{store.url(MANIFEST_NAME)}: {e}"]
    problems = manifest_problems(manifest)
    for source in manifest.sources:
        for shard in source.shards:
            try:
                file = shard_member(store, shard.file)
            except ValueError as e:
                problems.append(str(e))
                continue
            found, _ = shard_problems(store, file, shard, manifest)
            if not found and sha256_of(store, file) != shard.sha256:
                found = [f"{store.url(file)}: sha256 does not match the manifest (corrupted)"]
            problems += found
    return problems


def manifest_problems(manifest: Manifest) -> list[str]:
    """The manifest's own arithmetic: per source, records_read = samples_written + rejected and the
    shards' sample counts add up to samples_written."""
    problems = []
    for source in manifest.sources:
        if source.records_read != source.samples_written + source.rejected:
            problems.append(
                f"{MANIFEST_NAME}: source {source.path}: records_read {source.records_read} != "
                f"samples_written {source.samples_written} + rejected {source.rejected}"
            )
        if sum(s.samples for s in source.shards) != source.samples_written:
            problems.append(f"{MANIFEST_NAME}: source {source.path}: shard sample counts do not add up")
    return problems


def tokenizer_problems(shard_dir: str | Path | Store, manifest: Manifest) -> list[str]:
    """The folder's copy of the tokenizer must be the one the fingerprint names, and parse (the
    trainer builds presets from it and `xc-train generate` decodes with it). Shared by
    `xc-prep info --verify` and the trainer's start-up check."""
    store = open_store(shard_dir) if isinstance(shard_dir, str | Path) else shard_dir
    path = store.url(TOKENIZER_NAME)
    fix = "copy the tokenizer.model the shards were made with back into the folder, or re-run `xc-prep shard`"
    if store.size(TOKENIZER_NAME) is None:
        return [
            f"{path}: missing (the shards were made with tokenizer sha256 "
            f"{manifest.fingerprint.tokenizer_sha256}); {fix}"
        ]
    data = store.read_bytes(TOKENIZER_NAME)
    if hashlib.sha256(data).hexdigest() != manifest.fingerprint.tokenizer_sha256:
        return [f"{path}: sha256 does not match the manifest's fingerprint (replaced or corrupted); {fix}"]
    import sentencepiece as spm

    try:
        spm.SentencePieceProcessor(model_proto=data)
    except (RuntimeError, OSError) as e:
        return [f"{path}: not a sentencepiece model ({e}); {fix}"]
    return []
