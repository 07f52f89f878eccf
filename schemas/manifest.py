"""`manifest.json` of a shard folder: format version, fingerprint, per-source and per-shard facts.

The trainer reads it first and refuses shards whose fingerprint does not match its settings.
Invariant, for every source: records_read == samples_written + rejected.

A shard's `file` is a path relative to the shard folder, and readers open it only through
`shard_path`: a manifest naming `../x.arrow`, an absolute path, or a symlink that leads out of the
folder is refused (`ValueError` naming the manifest, the entry and the fix), so a manifest cannot
make the trainer or `xc-prep info` read a file elsewhere.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from schemas.tile_codecs import TileCodec

if TYPE_CHECKING:
    from schemas.storage import Store

FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
REJECTS_NAME = "rejects.jsonl"
TOKENIZER_NAME = "tokenizer.model"
"""The tokenizer's file name: in a model folder, and beside the manifest (a copy of the tokenizer
the shards were made with), so a shard folder serves as a tokenizer folder too."""


REFUSED_PATH_FIX = "the manifest is damaged or was edited: re-run `xc-prep shard` to write the folder again"


def _shard_file_problem(file: Any) -> str | None:
    """Why a manifest's shard path is not a plain relative path inside the folder, or None."""
    if not isinstance(file, str) or not file:
        return "not a file name"
    if "\\" in file or "\x00" in file or file.startswith("/") or PurePosixPath(file).is_absolute():
        return "an absolute path (or one with a backslash or NUL), not a path inside the shard folder"
    if any(part in ("", ".", "..") for part in file.split("/")):
        return "a path that leaves the shard folder (or has an empty, '.' or '..' part)"
    if ":" in file.split("/")[0]:
        return "a path with a drive or URL prefix, not a path inside the shard folder"
    return None


def shard_path(shard_dir: Path, file: str) -> Path:
    """The shard file a manifest entry names, refused (ValueError) unless it lies inside
    `shard_dir` after resolving symlinks."""
    if (problem := _shard_file_problem(file)) is not None:
        raise ValueError(
            f"{Path(shard_dir) / MANIFEST_NAME} lists shard {file!r}: {problem}; {REFUSED_PATH_FIX}"
        )
    path = Path(shard_dir) / file
    try:
        inside = path.resolve().is_relative_to(Path(shard_dir).resolve())
    except (OSError, RuntimeError):  # a symlink loop
        inside = False
    if not inside:
        raise ValueError(
            f"{path}: a symlink that leads out of the shard folder {shard_dir} (to {_target(path)}); "
            "the trainer and `xc-prep info` read shards only inside the folder: copy the file in instead"
        )
    return path


def shard_member(store: Store, file: str) -> str:
    """`shard_path` for any store: the member a manifest entry names, refused (ValueError) unless it
    lies inside the folder (an object store has no symlinks: the name's check is the whole check)."""
    if store.is_local:
        shard_path(store.local_path(), file)
    elif (problem := _shard_file_problem(file)) is not None:
        raise ValueError(f"{store.url(MANIFEST_NAME)} lists shard {file!r}: {problem}; {REFUSED_PATH_FIX}")
    return file


def _target(path: Path) -> str:
    try:
        return str(path.resolve())
    except (OSError, RuntimeError):
        return "a symlink loop"


@dataclass(frozen=True)
class Fingerprint:
    """Everything that changes the bytes of a stored sample."""

    tokenizer_sha256: str
    layout: str
    style: str
    hd_num: int
    max_length: int
    tile_codec: TileCodec
    """How tiles are stored (schemas/tile_codecs.py)."""
    jpeg_quality: int | None
    """The jpeg codec's quality (None for the exact codecs)."""
    code_version: str


@dataclass
class ShardInfo:
    file: str
    """Path relative to the shard folder."""
    records: tuple[int, int]
    """[start, end) record indices of the source file this shard covers."""
    samples: int
    bytes: int
    sha256: str


@dataclass
class SourceInfo:
    name: str
    path: str
    """JSON path as written in data.txt."""
    k: float
    input_sha256: str
    records_read: int = 0
    samples_written: int = 0
    rejected: int = 0
    total_tokens: int = 0
    trained_tokens: int = 0
    tiles: int = 0
    shards: list[ShardInfo] = field(default_factory=list)

    @property
    def samples_per_epoch(self) -> int:
        return int(self.k * 1000)


@dataclass
class Manifest:
    fingerprint: Fingerprint
    sources: list[SourceInfo]
    command: list[str] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"manifest format_version {version!r} is not supported (expected {FORMAT_VERSION}); "
                "re-run `xc-prep shard` with this version of the code"
            )
        sources = []
        for s in data["sources"]:
            shards = [ShardInfo(**{**sh, "records": tuple(sh["records"])}) for sh in s["shards"]]
            for shard in shards:
                if (problem := _shard_file_problem(shard.file)) is not None:
                    raise ValueError(
                        f"{MANIFEST_NAME} lists shard {shard.file!r}: {problem}; {REFUSED_PATH_FIX}"
                    )
            sources.append(SourceInfo(**{**s, "shards": shards}))
        return cls(
            fingerprint=Fingerprint(**data["fingerprint"]),
            sources=sources,
            command=list(data.get("command", [])),
            format_version=version,
        )

    @classmethod
    def load(cls, shard_dir: str | Path | Store) -> Manifest:
        """The manifest of a folder path, an s3:// URL or a store."""
        from schemas.storage import open_store

        store = open_store(shard_dir) if isinstance(shard_dir, str | Path) else shard_dir
        path = store.url(MANIFEST_NAME)
        if store.size(MANIFEST_NAME) is None:
            raise FileNotFoundError(f"{path}: no manifest; is this a folder written by `xc-prep shard`?")
        try:
            data = json.loads(store.read_bytes(MANIFEST_NAME))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e}); the shard folder is damaged") from e
        return cls.from_json(data)
