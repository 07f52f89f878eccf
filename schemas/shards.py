"""Shard container format: one Arrow IPC file per shard, one record batch per sample.

Why Arrow IPC (not a WebDataset tar): an IPC *file* has a footer index of its record batches, so a
memory-mapped shard gives O(1) random access to sample i, and column projection lets the loader read
every sample's length (`num_tokens`, `num_tiles`) for planning without touching a tile byte. It is a
standard, self-describing, language-neutral container with no pickle. Writing one record batch per
sample keeps the writer's memory bounded by the largest sample.

Columns (one row per sample):
  input_ids int32 list, labels int32 list, image_rows/image_cols/image_starts int32 lists,
  tiles list<binary> (one element per 560×560×3 tile, encoded by the manifest's tile codec),
  num_tokens/num_trained/num_tiles int32, source/file/layout string, index int64, id_json string.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from schemas.manifest import MANIFEST_NAME, TILE_CODECS, TOKENIZER_NAME, Manifest, shard_member
from schemas.sample import TILE_SIZE, ImageSpan, Sample, image_token_count
from schemas.storage import Store, open_store, sha256_of

SHARD_SUFFIX = ".arrow"
"""The file suffix of an Arrow IPC shard."""
LENGTH_COLUMNS = ("num_tokens", "num_trained", "num_tiles")
TILE_BYTES = TILE_SIZE * TILE_SIZE * 3

SHARD_SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
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
    ]
)


# ---------------------------------------------------------------- tile codecs


def encode_tile(tile: np.ndarray, codec: str) -> bytes:
    """uint8[560, 560, 3] -> bytes. Both codecs are lossless."""
    if codec == "raw":
        return np.ascontiguousarray(tile, dtype=np.uint8).tobytes()
    if codec == "png":
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(tile, "RGB").save(buf, format="PNG", compress_level=1)
        return buf.getvalue()
    raise ValueError(f"unknown tile codec {codec!r} (expected one of {', '.join(TILE_CODECS)})")


def decode_tile(data: bytes | memoryview, codec: str) -> np.ndarray:
    if codec == "raw":
        if len(data) != TILE_BYTES:
            raise ValueError(f"raw tile has {len(data)} bytes, expected {TILE_BYTES}")
        return np.frombuffer(data, dtype=np.uint8).reshape(TILE_SIZE, TILE_SIZE, 3)
    if codec == "png":
        from PIL import Image

        with Image.open(io.BytesIO(data), formats=("PNG",)) as im:  # never another plugin
            if im.size != (TILE_SIZE, TILE_SIZE):  # checked from the header, before decoding
                raise ValueError(f"png tile is {im.size[0]}×{im.size[1]}, expected {TILE_SIZE}×{TILE_SIZE}")
            return np.asarray(im.convert("RGB"))
    raise ValueError(f"unknown tile codec {codec!r} (expected one of {', '.join(TILE_CODECS)})")


# ---------------------------------------------------------------- writing


def sample_to_batch(sample: Sample, codec: str) -> pa.RecordBatch:
    """One sample as a one-row record batch of SHARD_SCHEMA."""
    columns = {
        "input_ids": [sample.input_ids.astype(np.int32, copy=False)],
        "labels": [sample.labels.astype(np.int32, copy=False)],
        "image_rows": [[im.grid[0] for im in sample.images]],
        "image_cols": [[im.grid[1] for im in sample.images]],
        "image_starts": [[im.span[0] for im in sample.images]],
        "tiles": [[encode_tile(t, codec) for t in sample.tiles]],
        "num_tokens": [sample.num_tokens],
        "num_trained": [sample.num_trained],
        "num_tiles": [sample.num_tiles],
        "source": [sample.source],
        "file": [sample.file],
        "index": [sample.index],
        "id_json": [json.dumps(sample.id, ensure_ascii=False)],
        "layout": [sample.layout],
    }
    return pa.RecordBatch.from_pydict(columns, schema=SHARD_SCHEMA)


class ShardWriter:
    """Streams samples into one shard file, one record batch each, so memory holds one sample at a time.

    Use as a context manager; the caller makes the file atomic (write a temp name, then rename).
    """

    def __init__(self, path: Path, codec: str):
        if codec not in TILE_CODECS:
            raise ValueError(f"unknown tile codec {codec!r} (expected one of {', '.join(TILE_CODECS)})")
        self.codec = codec
        self._metadata = {b"tile_codec": codec.encode()}
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_file(self._sink, SHARD_SCHEMA.with_metadata(self._metadata))

    def write(self, sample: Sample) -> None:
        self._writer.write_batch(sample_to_batch(sample, self.codec).replace_schema_metadata(self._metadata))

    def close(self) -> None:
        self._writer.close()
        self._sink.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_shard(path: Path, samples: list[Sample], codec: str) -> None:
    """Write samples to `path` (the caller makes it atomic: write a temp name, then rename)."""
    with ShardWriter(path, codec) as writer:
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
    (`ShardReader.open`); the Arrow IPC footer locates each sample's bytes."""

    def __init__(self, path: Path | str, source: pa.NativeFile | None = None):
        self.path = path if source is not None else Path(path)
        """The file (or, with `source`, the object's URL) for messages."""
        self._source = source if source is not None else None
        try:
            if self._source is None:
                self._source = pa.memory_map(str(self.path), "r")
            self._reader = pa.ipc.open_file(self._source)
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(f"{self.path}: not a readable shard ({e}); run `xc-prep info --verify`") from e
        self.codec = (self._reader.schema.metadata or {}).get(b"tile_codec", b"raw").decode()
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
            raise ValueError(
                f"{store.url(file)}: not a readable shard ({e}); run `xc-prep info --verify`"
            ) from e
        return cls(store.url(file), source)

    def __len__(self) -> int:
        return self._reader.num_record_batches

    def lengths(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """int64 (num_tokens, num_trained, num_tiles) of every sample. Only those columns are read
        (a few bytes per sample, never a tile): from an object store, two small ranged reads per sample."""
        assert self._source is not None
        names = SHARD_SCHEMA.names
        options = pa.ipc.IpcReadOptions(included_fields=[names.index(n) for n in LENGTH_COLUMNS])
        table = pa.ipc.open_file(self._source, options=options).read_all()
        tokens, trained, tiles = (
            table.column(n).to_numpy().astype(np.int64) if table.num_rows else np.zeros(0, np.int64)
            for n in LENGTH_COLUMNS
        )
        return tokens, trained, tiles

    def provenance(self, row: int) -> tuple[str, str, int, object]:
        """(source, file, index, id) of one sample, without decoding tiles."""
        b = self._reader.get_batch(row)
        return (
            b.column("source")[0].as_py(),
            b.column("file")[0].as_py(),
            b.column("index")[0].as_py(),
            json.loads(b.column("id_json")[0].as_py()),
        )

    def encoded_tiles(self, row: int) -> list[bytes]:
        """The stored bytes of one sample's tiles, in the shard's codec, without decoding them."""
        encoded = self._reader.get_batch(row).column("tiles")[0].values
        return [encoded[i].as_py() for i in range(len(encoded))]

    def read(self, row: int) -> Sample:
        b = self._reader.get_batch(row)
        self.bytes_read += b.nbytes
        col = lambda name: b.column(name)[0]  # noqa: E731
        input_ids = col("input_ids").values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
        labels = col("labels").values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
        rows = col("image_rows").as_py()
        cols = col("image_cols").as_py()
        starts = col("image_starts").as_py()
        images = [
            ImageSpan(grid=(r, c), span=(s, s + image_token_count(r, c)))
            for r, c, s in zip(rows, cols, starts, strict=True)
        ]
        encoded = col("tiles").values
        if len(encoded):
            tiles = np.stack([decode_tile(encoded[i].as_buffer(), self.codec) for i in range(len(encoded))])
        else:
            tiles = np.zeros((0, TILE_SIZE, TILE_SIZE, 3), dtype=np.uint8)
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


def mismatch_message(shard_dir: Path, problems: list[str]) -> str:
    """The error for a shard folder that fails `verify_shards`: every problem, then what to do."""
    listed = "\n  ".join(problems)
    return (
        f"{shard_dir}: the shards do not match their manifest:\n  {listed}"
        "\nre-run `xc-prep shard` (or `xc-prep info --verify` for details)"
    )


def verify_shards(
    shard_dir: str | Path | Store, *, checksums: bool = True, part: tuple[int, int] = (0, 1)
) -> list[str]:
    """Check a shard folder (a path, an s3:// URL or a store) against its manifest; returns one
    message per problem (empty = fine).

    Checks that every listed shard exists, has the listed size, (with `checksums`) the listed
    sha256, opens as Arrow IPC and holds the listed number of samples. Shared by
    `xc-prep info --verify` and the trainer's start-up check. `part=(i, n)` hashes only every n-th
    shard from the i-th (the trainer's ranks split the hashing and combine their findings).
    """
    store = open_store(shard_dir) if isinstance(shard_dir, str | Path) else shard_dir
    try:
        manifest = Manifest.load(store)
    except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
        return [f"{store.url(MANIFEST_NAME)}: {e}"]
    problems: list[str] = []
    ordinal = -1
    for source in manifest.sources:
        if source.records_read != source.samples_written + source.rejected:
            problems.append(
                f"{MANIFEST_NAME}: source {source.path}: records_read {source.records_read} != "
                f"samples_written {source.samples_written} + rejected {source.rejected}"
            )
        if sum(s.samples for s in source.shards) != source.samples_written:
            problems.append(f"{MANIFEST_NAME}: source {source.path}: shard sample counts do not add up")
        for shard in source.shards:
            ordinal += 1
            try:
                file = shard_member(store, shard.file)
            except ValueError as e:
                problems.append(str(e))
                continue
            path = store.url(file)
            size = store.size(file)
            if size is None:
                problems.append(f"{path}: missing (listed in {MANIFEST_NAME})")
                continue
            if size != shard.bytes:
                problems.append(f"{path}: {size} bytes, manifest says {shard.bytes} (truncated or replaced)")
                continue
            if checksums and ordinal % part[1] == part[0] and sha256_of(store, file) != shard.sha256:
                problems.append(f"{path}: sha256 does not match the manifest (corrupted)")
                continue
            try:
                n = len(ShardReader.open(store, file))
            except ValueError as e:
                problems.append(str(e))
                continue
            if n != shard.samples:
                problems.append(f"{path}: holds {n} samples, manifest says {shard.samples}")
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
