"""Settings of one `xc-prep shard` run (`ShardConfig`) and what derives from them: the options of
the checks, the fingerprint recorded in the manifest, and the canonical command line.

The flags of `xc-prep shard` map 1:1 to the fields (pipeline/shard.py builds the parser from them).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pipeline.checks import ValidateOptions
from pipeline.media import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_VIDEO_SECONDS
from pipeline.template import DEFAULT_MAX_LENGTH
from pipeline.tiling import DEFAULT_HD_NUM
from schemas.manifest import Fingerprint
from schemas.sample import Layout, Style
from schemas.storage import StorageError, Store, open_store
from schemas.tile_codecs import DEFAULT_JPEG_QUALITY, JPEG_QUALITY_RANGE, TileCodec

DEFAULT_DATA_TXT = Path("data.txt")
DEFAULT_OUT = "shards"
DEFAULT_SAMPLES_PER_SHARD = 256
DEFAULT_TILE_CODEC: TileCodec = "raw"
PACKAGE_NAME = "xcomposer-finetune"


class UsageError(Exception):
    """A bad flag value or an output folder the command must not touch (exit 2)."""


@dataclass(frozen=True)
class ShardConfig:
    """Settings of one `xc-prep shard` run; flags map 1:1 to fields."""

    data_txt: Path = DEFAULT_DATA_TXT
    """data.txt listing one `<json path> <k>` per line."""
    out: str = DEFAULT_OUT
    """Output folder (created if missing), or s3://BUCKET/PREFIX (README.md#large-corpora)."""
    tokenizer: Path | None = None
    """The sentencepiece tokenizer.model of the model to fine-tune (required)."""
    hd_num: int = DEFAULT_HD_NUM
    """Maximum number of 560-px local tiles per image."""
    max_length: int = DEFAULT_MAX_LENGTH
    """Maximum tokens per sample; longer samples are truncated between image blocks, or rejected."""
    style: Style = "train"
    """HD transform: train (official fine-tuning) or infer (model inference)."""
    layout: Layout = "official"
    """Token layout: official (training; <s> after a leading image) or inference (<s> first)."""
    workers: int = 1
    """Worker processes (output bytes do not depend on it)."""
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD
    """Records per work unit, so at most this many samples per shard file."""
    tile_codec: TileCodec = DEFAULT_TILE_CODEC
    """How tiles are stored: raw (exact, fastest to read), webp (exact, lossless WebP, ~5x smaller) or
    jpeg (lossy, about the source JPEGs' size); README.md#tile-codecs says which to pick."""
    jpeg_quality: int = DEFAULT_JPEG_QUALITY
    """JPEG quality of --tile-codec jpeg (1-100; higher: closer to the exact tiles, larger)."""
    font: Path | None = None
    """TrueType font for video frame labels (default: the one pipeline/video.py finds)."""
    overwrite: bool = False
    """Delete existing shards, manifest and work files in --out before writing."""
    part: str | None = None
    """I/N: build only work units j with j % N == I (0 <= I < N), one share per machine; then --finalize."""
    finalize: bool = False
    """Write the manifest once every --part has finished (lists the missing parts otherwise)."""
    engine: Literal["local", "ray"] = "local"
    """local: a process pool of --workers; ray: Ray tasks on the cluster RAY_ADDRESS names."""
    # The media safety policy: the same flags (pipeline/flags.py) and fields as `xc-prep validate`.
    allow_path: tuple[Path, ...] = ()
    """Extra folders media files may lie in, besides the current directory and the JSON file's folder."""
    allow_any_path: bool = False
    """Accept media files anywhere (turns off the allowed-folders check)."""
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    """Largest image (width × height) accepted; checked from the header, before decoding."""
    max_video_seconds: float = DEFAULT_MAX_VIDEO_SECONDS
    """Longest video accepted (frames / fps from the metadata), checked before decoding frames."""

    def media_policy(self) -> dict[str, Any]:
        """The policy fields as JSON values (they decide which records are rejected)."""
        return {
            "allow_path": [str(p) for p in self.allow_path],
            "allow_any_path": self.allow_any_path,
            "max_image_pixels": self.max_image_pixels,
            "max_video_seconds": self.max_video_seconds,
        }

    def check(self) -> None:
        """Raise UsageError naming the flag, the value and the fix."""
        if self.tokenizer is None:
            raise UsageError("--tokenizer is required: pass the model's tokenizer.model")
        if not self.tokenizer.exists():
            raise UsageError(f"--tokenizer {self.tokenizer}: not found")
        for flag, value in (
            ("--hd-num", self.hd_num),
            ("--max-length", self.max_length),
            ("--workers", self.workers),
            ("--samples-per-shard", self.samples_per_shard),
        ):
            if value < 1:
                raise UsageError(f"{flag} ({value}) must be at least 1")
        low, high = JPEG_QUALITY_RANGE
        if not low <= self.jpeg_quality <= high:
            raise UsageError(f"--jpeg-quality ({self.jpeg_quality}) must be in [{low}, {high}]")
        if self.font is not None and not self.font.is_file():
            raise UsageError(f"--font {self.font}: file not found")
        store = self.store()
        if store.is_local and store.local_path().exists() and not store.local_path().is_dir():
            raise UsageError(f"--out {self.out}: exists and is not a folder")
        self.part_of()
        if self.part is not None and (self.finalize or self.overwrite):
            flag = "--finalize" if self.finalize else "--overwrite"
            raise UsageError(
                f"--part and {flag} do not combine: run every --part I/N, then the same command once "
                "with --finalize instead of --part (--overwrite: clear the output once, before the parts)"
            )

    def store(self) -> Store:
        """Where --out is (a folder or an object-store prefix)."""
        try:
            return open_store(self.out)
        except StorageError as e:
            raise UsageError(f"--out {e}") from e

    def part_of(self) -> tuple[int, int]:
        """(I, N) of --part (0, 1 without it: every unit)."""
        if self.part is None:
            return 0, 1
        index, sep, count = self.part.partition("/")
        if not (sep and index.isdigit() and count.isdigit() and 0 <= int(index) < int(count)):
            raise UsageError(
                f"--part {self.part!r}: expected I/N with 0 <= I < N, e.g. --part 0/4 "
                "(Slurm: --part $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)"
            )
        return int(index), int(count)

    @property
    def stored_jpeg_quality(self) -> int | None:
        """The JPEG quality the tiles are stored with (None unless --tile-codec jpeg)."""
        return self.jpeg_quality if self.tile_codec == "jpeg" else None

    def command(self) -> list[str]:
        """The canonical command line recorded in the manifest (without --out, --workers, --overwrite,
        --part, --finalize and --engine: they do not change a byte)."""
        cmd = ["xc-prep", "shard", str(self.data_txt), "--tokenizer", str(self.tokenizer)]
        cmd += ["--hd-num", str(self.hd_num), "--max-length", str(self.max_length)]
        cmd += ["--style", self.style, "--layout", self.layout]
        cmd += ["--samples-per-shard", str(self.samples_per_shard), "--tile-codec", self.tile_codec]
        if self.stored_jpeg_quality is not None:
            cmd += ["--jpeg-quality", str(self.stored_jpeg_quality)]
        if self.font is not None:
            cmd += ["--font", str(self.font)]
        for folder in self.allow_path:
            cmd += ["--allow-path", str(folder)]
        if self.allow_any_path:
            cmd += ["--allow-any-path"]
        if self.max_image_pixels != DEFAULT_MAX_IMAGE_PIXELS:
            cmd += ["--max-image-pixels", str(self.max_image_pixels)]
        if self.max_video_seconds != DEFAULT_MAX_VIDEO_SECONDS:
            cmd += ["--max-video-seconds", f"{self.max_video_seconds:g}"]
        return cmd


def code_version() -> str:
    try:
        return metadata.version(PACKAGE_NAME)
    except metadata.PackageNotFoundError:
        return "unknown"


def fingerprint(config: ShardConfig, tokenizer_sha256: str) -> Fingerprint:
    return Fingerprint(
        tokenizer_sha256=tokenizer_sha256,
        layout=config.layout,
        style=config.style,
        hd_num=config.hd_num,
        max_length=config.max_length,
        tile_codec=config.tile_codec,
        jpeg_quality=config.stored_jpeg_quality,
        code_version=code_version(),
    )


def validate_options(config: ShardConfig) -> ValidateOptions:
    """The options `xc-prep validate` would get for these settings.

    Media are not decoded during the checks (decode_images=False) because build_sample decodes
    every one anyway with the same `load_rgb` / `read_frames`, so a damaged image or video is
    still rejected (`image_corrupt`, `video_unreadable`), at half the decoding cost.
    """
    return ValidateOptions(
        hd_num=config.hd_num,
        max_length=config.max_length,
        tokenizer=config.tokenizer,
        style=config.style,
        layout=config.layout,
        decode_images=False,
        allow_path=config.allow_path,
        allow_any_path=config.allow_any_path,
        max_image_pixels=config.max_image_pixels,
        max_video_seconds=config.max_video_seconds,
    )
