"""Video: frame sampling, strip layout and grid (docs/IXC25.md#video) on real small videos written with PyAV."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.build import build_sample
from pipeline.errors import DataError
from pipeline.tokenization import Tokenizer, build_tiny_tokenizer
from pipeline.video import (
    VideoInfo,
    load_font,
    probe_video,
    read_frames,
    sample_frame_indices,
    video_grid,
    video_strip,
)
from schemas.record import Record, Turn
from schemas.sample import image_token_count

av = pytest.importorskip("av")

GRAY_STEP = 6
"""Frame i is a flat gray of level 6·i, so a decoded frame tells which index it was."""


def write_video(path: Path, num_frames: int, fps: int, width: int, height: int) -> Path:
    # Lossless H.264 keeps the gray levels within ±1 after the YUV round trip.
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "0"}
        for i in range(num_frames):
            frame = np.full((height, width, 3), GRAY_STEP * i, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def frame_index(frame: np.ndarray) -> int:
    return round(float(frame.mean()) / GRAY_STEP)


def expected_strip_grid(num_frames: int, width: int, height: int) -> tuple[int, int]:
    """docs/IXC25.md#video by hand: frames to long side 1120, 50-px slot overhead, short side to 560, pad."""
    if width > height:
        canvas_w, canvas_h = 1120, num_frames * (int(1120 / (width / height)) + 50)
    else:
        canvas_w, canvas_h = num_frames * (int(1120 * width / height) + 10), 1120 + 40
    long_side = int(560 * max(canvas_w, canvas_h) / min(canvas_w, canvas_h))
    tiles = math.ceil(long_side / 560)
    return (tiles, 1) if canvas_h > canvas_w else (1, tiles)


def test_sample_frame_indices() -> None:
    assert sample_frame_indices(15, 5.0) == [0, 5, 10]
    assert sample_frame_indices(300, 29.97) == list(range(0, 300, 30))
    assert sample_frame_indices(32, 1.0) == list(range(32))
    assert sample_frame_indices(40, 1.0) == [int(i * 40 / 33) for i in range(32)]
    assert sample_frame_indices(3, 0.2) == [0, 1, 2]  # upstream: stride 0 crashes


def test_landscape_video_round_trip(tmp_path: Path) -> None:
    path = write_video(tmp_path / "land.mp4", num_frames=15, fps=5, width=64, height=32)
    assert probe_video(path) == VideoInfo(frames=15, fps=5.0, width=64, height=32)
    assert [frame_index(f) for f in read_frames(path)] == [0, 5, 10]
    grid = video_grid(path)
    assert grid == expected_strip_grid(3, 64, 32) == (2, 1)
    strip = video_strip(path)
    assert strip.shape == (grid[0] * 560, grid[1] * 560, 3) and strip.dtype == np.uint8
    # Halved layout: slot 0 = label band 0..20, frame 20..300, separator near y 302, slot 1 at 305.
    assert abs(float(strip[100:280, 100:460].mean()) - 0) < 2  # frame 0 (black)
    assert abs(float(strip[405:585, 100:460].mean()) - GRAY_STEP * 5) < 2  # frame 5
    assert strip[300:305, 280].min() <= 128  # the 2-px black line between frames, halved
    assert strip[0:20].min() < 128  # the `<IMAGE 0>` label is drawn in the band
    assert (strip[-100:] == 255).all()  # white padding at the end of the long side


def test_portrait_video_round_trip(tmp_path: Path) -> None:
    path = write_video(tmp_path / "portrait.mp4", num_frames=15, fps=5, width=32, height=64)
    grid = video_grid(path)
    assert grid == expected_strip_grid(3, 32, 64) == (1, 2)
    strip = video_strip(path)
    assert strip.shape == (560, 1120, 3)
    # Frames side by side below the label band; frame 10 is the third slot.
    slot_w = (560 + 10) * 560 / 1160
    assert abs(float(strip[100:500, int(2 * slot_w) + 20 : int(2 * slot_w) + 200].mean()) - 60) < 2
    assert (strip[:, -100:] == 255).all()


def test_long_video_takes_32_frames(tmp_path: Path) -> None:
    path = write_video(tmp_path / "long.mp4", num_frames=40, fps=1, width=64, height=32)
    frames = read_frames(path)
    assert len(frames) == 32
    assert [frame_index(f) for f in frames] == [int(i * 40 / 33) for i in range(32)]
    assert video_grid(path) == expected_strip_grid(32, 64, 32) == (18, 1)


def test_video_record_builds_a_sample(tmp_path: Path) -> None:
    path = write_video(tmp_path / "clip.mp4", num_frames=15, fps=5, width=64, height=32)
    tokenizer = Tokenizer.from_path(build_tiny_tokenizer(tmp_path / "tiny.model"))
    record = Record(
        id="v1",
        turns=(Turn("user", "What happens?"), Turn("assistant", "It gets brighter.")),
        media=("clip.mp4",),
        media_paths=(path,),
    )
    sample = build_sample(record, tokenizer, source_name="s", file="v.json", index=0)
    assert [im.grid for im in sample.images] == [(2, 1)]
    assert sample.images[0].span == (0, image_token_count(2, 1))
    assert sample.tiles.shape == (2, 560, 560, 3)
    np.testing.assert_array_equal(sample.tiles.reshape(1120, 560, 3), video_strip(path))


def test_unreadable_video_is_a_data_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00not a video" * 100)
    for fn in (probe_video, video_grid, video_strip):
        with pytest.raises(DataError) as e:
            fn(bad)
        assert e.value.code == "video_unreadable" and str(bad) in e.value.message
    with pytest.raises(DataError) as e:
        video_grid(tmp_path / "missing.mp4")
    assert e.value.code == "media_missing"


def test_font_fallback_and_bad_font(tmp_path: Path) -> None:
    assert load_font(None) is not None
    bad = tmp_path / "font.ttf"
    bad.write_bytes(b"nope")
    with pytest.raises(ValueError, match="font"):
        load_font(bad)
