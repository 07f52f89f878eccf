"""What one media file's header or metadata says (`MediaProbe`), and the tile grid it gives.

`probe_media` is the checks' probe and never raises: an image is opened (and decoded unless
decode=False) with pipeline/media.py, a video probed and its sampled frames decoded with
pipeline/video.py; sizes and lengths are checked against the media policy before any pixel is
decoded. The probe holds the image's size or the video strip's tile grid, or the finding code and
reason that make the file unusable. `media_grid(probe, hd_num, style)` is the one rule for the
(rows, cols) of tiles a media file becomes, used by the length check and by pipeline/build.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.errors import DataError
from pipeline.media import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_VIDEO_SECONDS, load_rgb, probe_image_size
from pipeline.tiling import hd_grid
from schemas.sample import Style


@dataclass(frozen=True)
class MediaProbe:
    """What one media file told us: its size (image) or tile grid (video), or why it is unusable."""

    kind: Literal["image", "video"]
    size: tuple[int, int] | None = None
    """Image only: (width, height) from the header (no EXIF rotation, as upstream)."""
    grid: tuple[int, int] | None = None
    """Video only: (rows, cols) of the frame strip's tiles (independent of hd_num)."""
    error: tuple[str, str] | None = None
    """(code, message) when the file cannot be used."""


def media_grid(probe: MediaProbe, hd_num: int, style: Style) -> tuple[int, int]:
    """(rows, cols) of tiles the media file becomes: a video's frame strip has its own grid
    (independent of hd_num), an image the HD grid of its size under `hd_num` and `style`."""
    if probe.kind == "video":
        assert probe.grid is not None, "a video probe without a grid"
        return probe.grid
    assert probe.size is not None, "an image probe without a size"
    return hd_grid(probe.size[0], probe.size[1], hd_num, style)


_media_cache: dict[tuple[str, int, int, bool, int, float], MediaProbe] = {}
"""Per process: records often share media; keyed by path, size and mtime so edits are seen."""


def probe_media(
    path: Path,
    *,
    is_video: bool,
    decode: bool = True,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_video_seconds: float = DEFAULT_MAX_VIDEO_SECONDS,
) -> MediaProbe:
    """Open an image (fully decoded unless decode=False) or a video; bad data gives `error`, never raises.

    Sizes and lengths are checked from headers and metadata before any pixel is decoded.
    """
    kind: Literal["image", "video"] = "video" if is_video else "image"
    try:
        stat = path.stat()
    except FileNotFoundError:
        return MediaProbe(kind, error=("media_missing", "not found"))
    except (OSError, ValueError) as e:  # ValueError: NUL or an unencodable name
        return MediaProbe(
            kind, error=("media_missing", f"cannot be read ({getattr(e, 'strerror', None) or e})")
        )
    if not path.is_file():
        return MediaProbe(kind, error=("media_missing", "is not a file"))
    if stat.st_size == 0:
        return MediaProbe(kind, error=("media_empty", "is empty (0 bytes)"))
    key = (str(path.absolute()), stat.st_size, stat.st_mtime_ns, decode, max_image_pixels, max_video_seconds)
    if (cached := _media_cache.get(key)) is not None:
        return cached
    try:
        if is_video:
            probe = _probe_video(path, max_image_pixels, max_video_seconds, decode)
        else:
            size = probe_image_size(path, max_image_pixels)
            if decode:
                load_rgb(path, max_image_pixels)
            probe = MediaProbe("image", size=size)
    except DataError as e:
        # media.py and video.py start their messages with the path; the finding names it already
        reason = e.message.removeprefix(f"{path}: ")
        probe = MediaProbe(kind, error=(e.code, reason))
    _media_cache[key] = probe
    return probe


def _probe_video(path: Path, max_image_pixels: int, max_video_seconds: float, decode: bool) -> MediaProbe:
    """Check length and frame size from the metadata, then (with `decode`) decode the frames
    training would use (1 fps, at most 32); the strip's grid comes from the metadata."""
    from pipeline import video  # decord is slow to import: only records with videos pay for it

    info = video.probe_video(path)  # frame count and fps from the container; decodes frame 0 only
    seconds = info.frames / info.fps
    if seconds > max_video_seconds:
        raise DataError(
            "video_too_long",
            f"{info.frames:,} frames at {info.fps:g} fps = {seconds:,.0f} s, more than "
            f"--max-video-seconds {max_video_seconds:g} (refused before decoding its frames)",
        )
    if info.width * info.height > max_image_pixels:
        raise DataError(
            "video_frame_too_large",
            f"its {info.width}×{info.height} frames have more than --max-image-pixels "
            f"{max_image_pixels:,} pixels each (refused before decoding the sampled frames)",
        )
    if decode:  # `xc-prep shard` skips this: building the sample decodes the same frames
        video.read_frames(path)
    return MediaProbe("video", grid=video.strip_grid(info))
