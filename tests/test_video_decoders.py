"""decord and PyAV give the same frames: frame indices per docs/IXC25.md#video and identical RGB pixels for
H.264/HEVC/VP9 (bit-exact codecs); MPEG-4 Part 2 within the bound its IDCT leaves open."""

from __future__ import annotations

import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from pipeline.errors import DataError
from pipeline.video import read_frames, sample_frame_indices
from pipeline.video_decoders import VideoInfo, available_decoder, open_video

av = pytest.importorskip("av")
REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_VIDEO = REPO_ROOT / "data" / "videos" / "rocket_pan.mp4"
MPEG4_MAX_DIFF = 2
"""Largest RGB difference measured between decord's FFmpeg 4 and PyAV's FFmpeg 7 on MPEG-4 Part 2
(300-frame GOPs included: no drift); that standard bounds the IDCT's error instead of fixing it."""


def write_video(
    path: Path,
    codec: str,
    frames: int,
    fps: int | Fraction,
    size: tuple[int, int],
    options: dict | None = None,
) -> Path:
    """A panning photo with frame i's index written as a gray level in its top-left corner."""
    photo = skimage.data.astronaut()
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
        stream.options = options or {}
        for i in range(frames):
            frame = np.asarray(Image.fromarray(np.roll(photo, 5 * i, axis=1)).resize(size)).copy()
            frame[:16, :16] = 8 * (i % 30)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def frame_number(frame: np.ndarray) -> int:
    return round(float(frame[4:12, 4:12].mean()) / 8)


def both(path: Path) -> tuple[VideoInfo, list[int], np.ndarray, np.ndarray]:
    """(info, sampled indices, decord's frames, PyAV's frames) after checking both agree on the first two."""
    pytest.importorskip("decord")
    decord_reader, pyav_reader = open_video(path, "decord"), open_video(path, "pyav")
    info = decord_reader.info()
    assert pyav_reader.info() == info
    indices = sample_frame_indices(info.frames, info.fps)
    decord_frames = np.stack(decord_reader.frames(indices))
    pyav_frames = np.stack(pyav_reader.frames(indices))
    assert decord_frames.shape == pyav_frames.shape == (len(indices), info.height, info.width, 3)
    return info, indices, decord_frames, pyav_frames


def test_shipped_video_gives_the_same_frames_with_both_decoders() -> None:
    info, indices, decord_frames, pyav_frames = both(SHIPPED_VIDEO)
    assert info == VideoInfo(frames=40, fps=10.0, width=320, height=240)
    assert indices == [0, 10, 20, 30]  # one frame per second from frame 0 (docs/IXC25.md#video)
    np.testing.assert_array_equal(pyav_frames, decord_frames)
    np.testing.assert_array_equal(np.stack(read_frames(SHIPPED_VIDEO, "pyav")), decord_frames)


@pytest.mark.parametrize(
    ("name", "codec", "frames", "fps", "options"),
    [
        # 29.97 fps with B-frames and a keyframe every 30 frames: seeking, reordering, rounding of fps
        ("h264_gops.mp4", "libx264", 300, Fraction(30000, 1001), {"g": "30", "bf": "3"}),
        ("h264_long.mkv", "libx264", 40, 1, {"g": "12"}),  # > 32 one-second frames: 32 spread evenly
        ("hevc.mp4", "libx265", 60, 25, {"x265-params": "log-level=none"}),
        ("vp9.webm", "libvpx-vp9", 45, 15, None),
    ],
)
def test_pyav_made_videos_give_identical_frames(
    tmp_path: Path, name: str, codec: str, frames: int, fps: int | Fraction, options: dict | None
) -> None:
    path = write_video(tmp_path / name, codec, frames, fps, (96, 64), options)
    info, indices, decord_frames, pyav_frames = both(path)
    assert info.frames == frames and info.fps == pytest.approx(float(fps))
    stride = round(float(fps))
    expected = list(range(0, frames, stride))
    if len(expected) > 32:
        expected = [expected[int(i * len(expected) / 33)] for i in range(32)]
    assert indices == expected
    np.testing.assert_array_equal(pyav_frames, decord_frames)
    assert [frame_number(f) for f in pyav_frames] == [i % 30 for i in indices]


def test_mpeg4_part2_frames_differ_by_at_most_the_measured_bound(tmp_path: Path) -> None:
    path = write_video(tmp_path / "mpeg4.mp4", "mpeg4", 75, 25, (160, 120), {"g": "75", "qscale": "3"})
    _, indices, decord_frames, pyav_frames = both(path)
    assert indices == [0, 25, 50]
    diff = np.abs(decord_frames.astype(np.int16) - pyav_frames.astype(np.int16))
    assert diff.max() <= MPEG4_MAX_DIFF and diff.mean() < 0.01


def test_rotated_videos_come_out_upright(tmp_path: Path) -> None:
    """A 180° display matrix: both turn the frames; 90°: decord 0.6 fails (4 channels), PyAV turns them."""
    for degrees in (180, 90):
        path = tmp_path / f"rotated{degrees}.mp4"
        photo = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((64, 48)))
        with av.open(str(path), "w") as container:
            stream = container.add_stream("libx264", rate=2)
            stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
            stream.set_display_rotation(degrees)
            for _ in range(4):
                for packet in stream.encode(av.VideoFrame.from_ndarray(photo, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        (frame,) = open_video(path, "pyav").frames([0])
        upright = np.rot90(photo, degrees // 90)  # the display matrix's angle is counter-clockwise
        assert frame.shape == upright.shape
        assert np.abs(frame.astype(int) - upright).mean() < 6  # lossy H.264 of the same picture
        if degrees == 180:
            _, _, decord_frames, pyav_frames = both(path)
            np.testing.assert_array_equal(pyav_frames, decord_frames)
        else:
            pytest.importorskip("decord")
            with pytest.raises(DataError, match="4 channels"):
                open_video(path, "decord").info()


def test_decoder_choice_falls_back_to_pyav(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "decord", None)  # `import decord` raises ImportError
    assert available_decoder() == "pyav"
    assert [f.shape for f in read_frames(SHIPPED_VIDEO)] == [(240, 320, 3)] * 4
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(DataError, match="no video decoder") as e:
        available_decoder()
    assert "pip install 'xcomposer-finetune[video]'" in e.value.hint


def test_pyav_reports_unreadable_and_missing_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00not a video" * 100)
    with pytest.raises(DataError) as e:
        open_video(bad, "pyav")
    assert e.value.code == "video_unreadable" and str(bad) in e.value.message
    with pytest.raises(DataError) as e:
        open_video(tmp_path / "missing.mp4", "pyav")
    assert e.value.code == "media_missing"
    with pytest.raises(DataError, match="frame 99 does not exist"):
        open_video(SHIPPED_VIDEO, "pyav").frames([99])
