"""Video decoding for the frame sampler: decord (the official decoder) where installed, PyAV elsewhere.

decord has wheels for x86-64 Linux and Windows only (its last release is from 2021); PyAV has
wheels everywhere, so aarch64 (GH200) and macOS machines decode with it. Both readers give the
same frames, numbered as decord numbers them:

- the video stream is the one FFmpeg ranks best (`av_find_best_stream`: cover art is skipped);
- every packet of that stream is one frame and frames are in presentation-timestamp order (decord
  reads the packet index when it opens a file): the frame count is the packet count, frame i is the
  packet with the i-th smallest pts;
- fps is the stream's average frame rate;
- pixels are FFmpeg's RGB24 conversion at the decoded size, and a rotated video (a display matrix)
  is turned upright.

Where the codec defines its output exactly (H.264, HEVC, VP9, AV1: bit-exact decoding is part of
those standards) the RGB pixels are identical. MPEG-4 Part 2 (and MPEG-1/2) only bound their IDCT's
error, and decord's bundled FFmpeg 4 and PyAV's FFmpeg 7 differ by at most a few levels there
(tests/test_video_decoders.py measures both cases). decord 0.6 fails on videos rotated by 90° or
270° (it reports 4 channels), where PyAV turns them upright, and its seeks in AVI files with
B-frames return other frames (frame 5 for frame 15), where PyAV returns the frame that sequential
decoding gives.

`open_video(path, decoder=None)` picks decord when it imports, else PyAV; tests pass the decoder.
"""

from __future__ import annotations

import bisect
import importlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from pipeline.errors import DataError
from pipeline.media import MediaError

Decoder = Literal["decord", "pyav"]
DECODERS: tuple[Decoder, ...] = ("decord", "pyav")
INSTALL_HINT = "install a video decoder: pip install 'xcomposer-finetune[video]' (decord or PyAV)"


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    """Number of frames (packets of the video stream, as decord counts them)."""
    fps: float
    """Average frame rate of the video stream."""
    width: int
    height: int


class VideoReader(Protocol):
    """One opened video: its metadata and random access to frames by index."""

    def info(self) -> VideoInfo: ...

    def frames(self, indices: list[int]) -> list[np.ndarray]:
        """uint8[h, w, 3] RGB frames at `indices` (in the order given)."""
        ...


def available_decoder() -> Decoder:
    """decord when it imports, else PyAV; a DataError naming the install command when neither does."""
    for name, module in (("decord", "decord"), ("pyav", "av")):
        try:
            importlib.import_module(module)
        except ImportError:
            continue
        return name  # type: ignore[return-value]
    raise DataError(
        "video_unreadable", "no video decoder is installed (neither decord nor PyAV)", INSTALL_HINT
    )


def open_video(path: Path, decoder: Decoder | None = None) -> VideoReader:
    """Open a video with `decoder` (default: `available_decoder()`)."""
    path = Path(path)
    if not path.exists():
        raise MediaError("media_missing", f"{path}: file not found")
    chosen = decoder or available_decoder()
    if chosen == "decord":
        return DecordReader(path)
    if chosen == "pyav":
        return PyAVReader(path)
    raise ValueError(f"unknown video decoder {chosen!r} (expected one of {', '.join(DECODERS)})")


def _unreadable(path: Path, what: str, error: BaseException | None = None) -> DataError:
    detail = ""
    if error is not None:
        text = str(error).splitlines()[0] if str(error) else type(error).__name__
        detail = f" ({text})"
    return DataError(
        "video_unreadable",
        f"{path}: {what}{detail}",
        hint="check the file plays (e.g. `ffprobe FILE`) and re-encode it to H.264 MP4",
    )


def _checked_info(path: Path, frames: int, fps: float, shape: tuple[int, ...]) -> VideoInfo:
    height, width, channels = shape
    if channels != 3:  # decord 0.6 mis-decodes some frame widths (e.g. 48 px) and 90° rotations
        raise DataError(
            "video_unreadable",
            f"{path}: decord decodes its {width}×{height} frames with {channels} channels instead of 3",
            hint="re-encode the video at a more common frame width (e.g. a multiple of 32) without a "
            "rotation, or install PyAV and uninstall decord",
        )
    if frames < 1 or width < 1 or height < 1:
        raise DataError("video_unreadable", f"{path}: the video has no decodable frame")
    if not fps > 0 or math.isinf(fps):
        raise DataError("video_unreadable", f"{path}: the video reports no usable frame rate ({fps})")
    return VideoInfo(frames=frames, fps=fps, width=int(width), height=int(height))


# ---------------------------------------------------------------- decord


class DecordReader:
    """decord's VideoReader, one thread (the pipeline parallelizes over processes)."""

    def __init__(self, path: Path):
        import decord  # slow to import: only records with videos pay for it

        self.path = path
        try:
            self._reader = decord.VideoReader(str(path), num_threads=1)
        except Exception as e:  # decord raises its own DECORDError or RuntimeError, in C++ terms
            raise _unreadable(path, "cannot open the video with decord", e) from e

    def info(self) -> VideoInfo:
        try:
            frames = len(self._reader)
            fps = float(self._reader.get_avg_fps())
            shape = tuple(self._reader[0].shape) if frames else (0, 0, 3)
        except Exception as e:
            raise _unreadable(self.path, "cannot read the video's first frame", e) from e
        return _checked_info(self.path, frames, fps, shape)

    def frames(self, indices: list[int]) -> list[np.ndarray]:
        try:
            return list(self._reader.get_batch(indices).asnumpy())
        except Exception as e:
            raise _unreadable(self.path, f"cannot decode frames {indices[:4]}...", e) from e


# ---------------------------------------------------------------- PyAV


class PyAVReader:
    """PyAV (FFmpeg) with decord's frame numbering: a packet index read at open, seeks to keyframes."""

    def __init__(self, path: Path):
        import av

        self.path = path
        try:
            self._container = av.open(str(path))
            stream = self._container.streams.best("video")
            if stream is None:
                raise _unreadable(path, "the file holds no video stream")
            stream.codec_context.thread_count = 1
            self._stream = stream
            self._pts, self._keyframes = self._index()
        except DataError:
            raise
        except Exception as e:  # av.error.FFmpegError and friends
            raise _unreadable(path, "cannot open the video with PyAV", e) from e

    def _index(self) -> tuple[list[int] | None, list[int]]:
        """Sorted pts of every packet (None when a packet has none) and sorted keyframe pts."""
        pts: list[int] = []
        keyframes: list[int] = []
        self._count = 0
        for packet in self._container.demux(self._stream):
            if packet.size == 0 and packet.pts is None and packet.dts is None:
                continue  # the empty packet PyAV yields at the end to flush the decoder
            self._count += 1
            if packet.pts is not None:
                pts.append(packet.pts)
                if packet.is_keyframe:
                    keyframes.append(packet.pts)
        if len(pts) != self._count:  # without timestamps, frames are numbered in decoding order
            return None, []
        return sorted(pts), sorted(keyframes)

    def _rgb(self, frame) -> np.ndarray:  # frame: av.VideoFrame
        rgb = frame.to_ndarray(format="rgb24")
        # `rotation` is the display matrix's counter-clockwise angle; decord turns frames upright too
        turns = round(getattr(frame, "rotation", 0) / 90) % 4
        return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb

    def info(self) -> VideoInfo:
        fps = float(self._stream.average_rate or 0)
        shape: tuple[int, ...] = (0, 0, 3)
        if self._count:
            (first,) = self.frames([0])
            shape = first.shape
        return _checked_info(self.path, self._count, fps, shape)

    def frames(self, indices: list[int]) -> list[np.ndarray]:
        bad = [i for i in indices if not 0 <= i < self._count]
        if bad:
            raise _unreadable(self.path, f"frame {bad[0]} does not exist ({self._count} frames)")
        try:
            decoded = self._decode_sequential(indices) if self._pts is None else self._decode_by_pts(indices)
        except DataError:
            raise
        except Exception as e:
            raise _unreadable(self.path, f"cannot decode frames {indices[:4]}...", e) from e
        return [decoded[i] for i in indices]

    def _decode_by_pts(self, indices: list[int]) -> dict[int, np.ndarray]:
        """Frames by index: seek to the keyframe before each target unless decoding on reaches it first."""
        assert self._pts is not None
        out: dict[int, np.ndarray] = {}
        frames = None
        position: int | None = None  # pts of the last decoded frame
        for index in sorted(set(indices)):
            target = self._pts[index]
            k = bisect.bisect_right(self._keyframes, target) - 1
            keyframe = self._keyframes[k] if k >= 0 else self._pts[0]
            if frames is None or position is None or position >= target or position < keyframe:
                self._container.seek(keyframe, stream=self._stream, backward=True, any_frame=False)
                frames = self._container.decode(self._stream)
                position = None
            for frame in frames:
                pts = frame.pts if frame.pts is not None else frame.dts
                if pts is None:
                    continue
                position = pts
                if pts == target:
                    out[index] = self._rgb(frame)
                    break
                if pts > target:
                    raise _unreadable(self.path, f"frame {index} (pts {target}) did not decode")
            else:
                raise _unreadable(self.path, f"frame {index} (pts {target}) did not decode")
        return out

    def _decode_sequential(self, indices: list[int]) -> dict[int, np.ndarray]:
        wanted = set(indices)
        last = max(wanted)
        out: dict[int, np.ndarray] = {}
        self._container.seek(0)
        for n, frame in enumerate(self._container.decode(self._stream)):
            if n in wanted:
                out[n] = self._rgb(frame)
            if n >= last:
                break
        if len(out) != len(wanted):
            missing = sorted(wanted - set(out))
            raise _unreadable(self.path, f"frame {missing[0]} did not decode")
        return out
