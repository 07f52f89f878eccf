"""`xc-prep export --format webdataset SHARD_DIR --out DIR`: the Arrow shards as WebDataset tar shards.

For the WebDataset ecosystem (the `webdataset` library, Megatron-Energon), which reads tar files of
samples: one tar per Arrow shard, `DIR/<source>/shard-NNNNN.tar`, samples in row order, written with
webdataset's own `TarWriter` (`pip install 'xcomposer-finetune[webdataset]'`). A sample is the tar
members sharing its key `<source>-<shard>-<row>` (dots in a source name become `_`: webdataset
splits a member name at its first dot):

    KEY.input_ids.npy   int32[T]  token ids; -100 at image positions
    KEY.labels.npy      int32[T]  -100 where not trained
    KEY.json            {"source", "file", "index", "id", "layout", "num_tokens", "num_trained",
                         "num_tiles", "images": [{"grid": [rows, cols], "span": [start, end]}, ...]}
    KEY.tiles.npy       uint8[N, 560, 560, 3]  every image's local tiles (shards with raw tiles)
    KEY.tile.NNN.webp   tile NNN as the file the shard stored (shards written with --tile-codec webp;
    KEY.tile.NNN.jpg    .jpg with --tile-codec jpeg)

`.npy` members are `numpy.save` output (no pickle): `numpy.load(io.BytesIO(sample["input_ids.npy"]))`.
`DIR/index.json` lists every tar with its Arrow shard, sample count, first and last key, bytes and
sha256, plus the shard folder's fingerprint; it is written last, so its presence means the export is
complete. The bytes depend only on the shards (fixed mtime, owner and mode), and every file is
written atomically. Reading: `webdataset.WebDataset(urls, shardshuffle=False)` with the tar paths
from index.json. (Importing `webdataset` imports torch when torch is installed: the library's own
`__init__`; it runs without torch.)
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from schemas.atomic import publish, temp_path, write_json_atomic
from schemas.cli import ExitCode
from schemas.manifest import MANIFEST_NAME, Manifest
from schemas.shards import SHARD_SUFFIX, ShardReader, file_sha256, verify_shards
from schemas.storage import StorageError, Store, open_store

FORMATS = ("webdataset",)
INDEX_NAME = "index.json"
INDEX_VERSION = 1
TAR_SUFFIX = ".tar"
TILE_SUFFIX = {"webp": "webp", "jpeg": "jpg"}
"""Codecs whose stored tiles are image files, exported as they are: `KEY.tile.NNN.<suffix>`."""
FIXED_MTIME = 0
"""Tar members carry this mtime, owner and mode so that an export's bytes depend on its data only."""
TAR_OWNER = "xc-prep"
TAR_MODE = 0o444
INSTALL_HINT = "pip install 'xcomposer-finetune[webdataset]'"


def sample_key(source: str, shard_stem: str, row: int) -> str:
    """`<source>-<shard>-<row>`, without dots (webdataset splits member names at the first dot)."""
    return f"{source}-{shard_stem}-{row:06d}".replace(".", "_")


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def sample_members(reader: ShardReader, row: int) -> dict[str, bytes]:
    """The tar members of one stored sample (without the key)."""
    sample = reader.read(row)
    meta = {
        "source": sample.source,
        "file": sample.file,
        "index": sample.index,
        "id": sample.id,
        "layout": sample.layout,
        "num_tokens": sample.num_tokens,
        "num_trained": sample.num_trained,
        "num_tiles": sample.num_tiles,
        "images": [{"grid": list(im.grid), "span": list(im.span)} for im in sample.images],
    }
    members = {
        "input_ids.npy": npy_bytes(sample.input_ids),
        "labels.npy": npy_bytes(sample.labels),
        "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode(),
    }
    if (suffix := TILE_SUFFIX.get(reader.codec)) is not None:
        for t, data in enumerate(reader.encoded_tiles(row)):
            members[f"tile.{t:03d}.{suffix}"] = data
    else:
        members["tiles.npy"] = npy_bytes(sample.tiles)
    return members


def write_tar(shards: Store, arrow_file: str, source: str, out: Path) -> dict[str, Any]:
    """One Arrow shard → one tar at the same relative path (atomically); its entry of index.json."""
    from webdataset.writer import TarWriter  # only the writer: no URL opener, no decoders

    reader = ShardReader.open(shards, arrow_file)
    relative = Path(arrow_file).with_suffix(TAR_SUFFIX)
    tar_path = out / relative
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(tar_path)
    keys = []
    with open(tmp, "wb") as stream:
        writer = TarWriter(
            stream, user=TAR_OWNER, group=TAR_OWNER, mode=TAR_MODE, encoder=False, mtime=FIXED_MTIME
        )
        for row in range(len(reader)):
            keys.append(sample_key(source, relative.stem, row))
            writer.write({"__key__": keys[-1], **sample_members(reader, row)})
        writer.close()
    publish(tmp, tar_path)
    return {
        "file": relative.as_posix(),
        "arrow_shard": arrow_file,
        "source": source,
        "samples": len(keys),
        "first_key": keys[0] if keys else None,
        "last_key": keys[-1] if keys else None,
        "bytes": tar_path.stat().st_size,
        "sha256": file_sha256(tar_path),
    }


def export_webdataset(shard_dir: str | Path | Store, out: Path) -> dict[str, Any]:
    """Write every shard of `shard_dir` (a folder, an s3:// URL or a store) as a tar under `out`, then
    `out/index.json`; returns the index."""
    shards = open_store(shard_dir) if isinstance(shard_dir, str | Path) else shard_dir
    manifest = Manifest.load(shards)
    tars = [
        write_tar(shards, shard.file, source.name, out)
        for source in manifest.sources
        for shard in source.shards
    ]
    index = {
        "format": "webdataset",
        "format_version": INDEX_VERSION,
        "from_manifest_sha256": hashlib.sha256(shards.read_bytes(MANIFEST_NAME)).hexdigest(),
        "fingerprint": manifest.to_json()["fingerprint"],
        "tiles": f"tile.NNN.{suffix}"
        if (suffix := TILE_SUFFIX.get(manifest.fingerprint.tile_codec))
        else "tiles.npy",
        "samples": sum(t["samples"] for t in tars),
        "tars": tars,
    }
    write_json_atomic(out / INDEX_NAME, index)
    return index


# ---------------------------------------------------------------- CLI


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a shard folder as WebDataset tar shards (for webdataset / Megatron-Energon loaders)",
        description=(
            "Write the samples of a shard folder (xc-prep shard) as WebDataset tar files, one per Arrow "
            "shard, with index.json. Exit 0: written; 1: the shard folder is damaged; 2: usage error."
        ),
    )
    parser.add_argument(
        "shard_dir", metavar="SHARD_DIR", help="folder (or s3://BUCKET/PREFIX) written by xc-prep shard"
    )
    parser.add_argument("--format", choices=FORMATS, required=True, help="output format: webdataset")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for the tar files")
    parser.set_defaults(run=run)


def _error(message: str, code: int) -> int:
    print(f"xc-prep export: {message}", file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("webdataset") is None:
        return _error(f"--format webdataset needs the webdataset library: {INSTALL_HINT}", ExitCode.USAGE)
    try:
        shards = open_store(args.shard_dir)
    except StorageError as e:
        return _error(str(e), ExitCode.USAGE)
    if shards.size(MANIFEST_NAME) is None:
        return _error(
            f"{args.shard_dir}: no {MANIFEST_NAME}; is this a folder written by `xc-prep shard`?",
            ExitCode.USAGE,
        )
    out = args.out
    if (
        (shards.is_local and out.resolve() == shards.local_path().resolve())
        or (out / MANIFEST_NAME).exists()
        or any(out.rglob(f"*{SHARD_SUFFIX}"))
    ):
        return _error(
            f"--out {out}: holds Arrow shards; pick an empty folder or a previous export", ExitCode.USAGE
        )
    if problems := verify_shards(shards):
        return _error("the shard folder is damaged:\n  " + "\n  ".join(problems), ExitCode.INVALID_DATA)
    index = export_webdataset(shards, out)
    print(
        f"wrote {len(index['tars'])} tar file(s), {index['samples']:,} samples, to {out} (index: {out / INDEX_NAME})"
    )
    print(f"read: webdataset.WebDataset([...the 'file' entries of {INDEX_NAME}...], shardshuffle=False)")
    return ExitCode.OK
