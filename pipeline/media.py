"""Locating and opening media files (images and videos) named by records.

Relative paths resolve against the current directory first (as the official recipe does), then
against the JSON file's folder. Images open exactly as upstream does (`Image.open(p).convert("RGB")`,
no EXIF rotation), so tiles equal the official ones.

Only the Pillow formats in `IMAGE_FORMATS` are ever tried, all decoded in-process: Pillow picks a
plugin by the file's content, not its name, and some plugins hand the file to another program (a
PostScript/EPS file named `x.jpg` would run Ghostscript). Every failure of a decoder on one file,
whatever it raises, is that file's `MediaError`.

Hostile files are refused before they cost memory: an image whose header promises more than
`max_pixels` (width × height) pixels raises `image_too_large` before a pixel is decoded (a 20000 ×
20000 PNG of one colour is a few KB on disk and 1.2 GB decoded), and a file too small for the image
its header describes, or a PNG whose data stops before its last row, is `image_corrupt`
(pipeline/image_data.py). Pillow's LOAD_TRUNCATED_IMAGES stays off while we decode. A decode holds
the decoded image and its RGB copy, about 8 bytes per pixel (Pillow keeps RGB in 4): 1.4 GB at the
default limit.
`within_roots` tells whether a path, after resolving `..` and symlinks, lies inside the allowed
folders.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, ImageFile

from pipeline.errors import DataError
from pipeline.image_data import png_short_stream, too_little_data

DEFAULT_MAX_IMAGE_PIXELS = 2 * 89_478_485
"""178,956,970 px (e.g. 13,377²): Pillow's own decompression-bomb error threshold at its defaults,
so nothing Pillow opens by default is refused; one decode then holds ~1.4 GB (see above). HD tiling
at hd_num 18 never samples more than 18 × 560² = 5.6 M px of an image."""
# Pillow's global guard stays on as a backstop for any other Image.open in this process; our own
# functions apply the configurable limit exactly (see _pillow_limit).
Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_IMAGE_PIXELS

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "ICO", "PPM")
"""The Pillow formats media may be in: what datasets ship (a camera's multi-picture JPEG opens as
JPEG, named MPO), each decoded in-process by libjpeg, zlib, libwebp, libtiff or Pillow itself.
Never EPS/PS (they run Ghostscript, an external program) nor the other plugins: each one more is
more code that hostile bytes can reach."""
ACCEPTED_FORMATS_TEXT = "JPEG, PNG, WebP, GIF, BMP, TIFF, ICO or PPM"

DEFAULT_MAX_VIDEO_SECONDS = 7200.0
"""Two hours: longer is almost surely a mistake; only 32 frames are ever decoded, but the frame
index and the 1-fps sampling list grow with the length."""


class MediaError(DataError):
    """A media file that cannot be used; `code` is the stable finding code."""


def _exists(path: Path) -> bool:
    """Path.exists() that says False instead of raising (file name too long, NUL, bad encoding)."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def resolve_path(path: str, base_dir: Path) -> Path:
    """The file a relative path names: cwd first, then `base_dir`; absolute paths as they are.

    Returns the cwd candidate when neither exists, so errors name the path the user wrote.
    """
    p = Path(path)
    if p.is_absolute() or _exists(p):
        return p
    fallback = base_dir / p
    return fallback if _exists(fallback) else p


def real_path(path: Path) -> Path | None:
    """`path` made absolute with `..` and every symlink resolved; None when the OS cannot say."""
    try:
        return path.resolve()
    except (OSError, ValueError, RuntimeError):  # NUL or unencodable name, symlink loop (3.11)
        return None


def within_roots(path: Path, roots: tuple[Path, ...]) -> bool:
    """Whether `path` (after resolving `..` and symlinks) lies inside one of `roots` (already resolved)."""
    real = real_path(path)
    return real is not None and any(real.is_relative_to(root) for root in roots)


@contextmanager
def _pillow_settings(max_pixels: int | None) -> Iterator[None]:
    """Run Pillow with its decompression-bomb guard at `max_pixels` (None: off) and truncated
    images refused, for this call.

    Pillow reads both module globals on every check (at open and inside decoders), so the
    configured limit, not Pillow's default, decides (our exact check gives the error message), and
    no other code in the process can make a truncated file pass. The pipeline opens images in one
    thread per process, so swapping the globals is safe here.
    """
    previous = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS = max_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _check_pixels(path: Path, size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise MediaError(
            "image_too_large",
            f"{path}: {width}×{height} = {width * height:,} pixels, more than --max-image-pixels "
            f"{max_pixels:,} (refused before decoding)",
        )


def _open(path: Path, max_pixels: int) -> Image.Image:
    """Open the header only; image_too_large or image_corrupt before any pixel is decoded."""
    with _pillow_settings(None):  # the header alone: our check right below replaces Pillow's
        im = Image.open(path, formats=IMAGE_FORMATS)
    try:
        _check_pixels(path, im.size, max_pixels)
        if (problem := too_little_data(path, im)) is not None:
            raise MediaError("image_corrupt", f"{path}: {problem}")
    except BaseException:
        im.close()
        raise
    return im


def _media_error(path: Path, e: Exception, stage: str) -> MediaError:
    """The MediaError for an exception raised while opening (`header`) or decoding an image.

    Decoders are third-party C and Python code fed hostile bytes: whatever they raise is this
    file's problem, never the run's.
    """
    if isinstance(e, MediaError):
        return e
    if isinstance(e, FileNotFoundError):
        return MediaError("media_missing", f"{path}: file not found")
    if isinstance(e, Image.DecompressionBombError):
        return MediaError("image_too_large", f"{path}: {e}")
    if isinstance(e, Image.UnidentifiedImageError):
        return MediaError(
            "image_unreadable", f"{path}: not a {ACCEPTED_FORMATS_TEXT} image (the formats xc-prep reads)"
        )
    reason = f"{type(e).__name__}: {e}" if not isinstance(e, OSError | SyntaxError | ValueError) else str(e)
    if stage == "header":
        return MediaError("image_unreadable", f"{path}: not an image Pillow can read ({reason})")
    return MediaError("image_corrupt", f"{path}: cannot decode the image ({reason})")


def probe_image_size(path: Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) from the file header, without decoding pixels."""
    try:
        with _open(path, max_pixels) as im:
            return im.size
    except Exception as e:  # every failure of one file is its MediaError
        raise _media_error(path, e, "header") from e


def load_rgb(path: Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Fully decode an image to RGB, as the official recipe does (size and data checked before decoding)."""
    try:
        im = _open(path, max_pixels)
    except Exception as e:
        raise _media_error(path, e, "header") from e
    try:
        with im, _pillow_settings(max_pixels):
            if im.format == "PNG" and (problem := png_short_stream(path)) is not None:
                raise MediaError("image_corrupt", f"{path}: {problem}")
            im.load()
            return im.convert("RGB")
    except Exception as e:
        raise _media_error(path, e, "decode") from e
