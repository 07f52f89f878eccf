"""Hostile inputs against `xc-prep` (issue 32): one class of failure per section, each showing a
clear finding or rejection, no traceback, records read = written + rejected, nothing executed and
no process left behind. See RELIABILITY.md.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import skimage.data
from conftest import qa, write_json
from PIL import Image

import pipeline.json_source as json_source_module
import pipeline.template as template_module
from pipeline.checks import MAX_RECORD_DEPTH, ValidateOptions, check_source
from pipeline.cli import main
from pipeline.media import load_rgb, probe_image_size
from pipeline.template import render_conversation
from pipeline.tokenization import ADDED_TOKENS, Tokenizer, build_tiny_tokenizer
from schemas.manifest import Manifest
from schemas.record import MAX_K, Source, Turn

REPO_ROOT = Path(__file__).resolve().parent.parent


def photo(path: Path, size: tuple[int, int] = (96, 64), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(skimage.data.astronaut()).resize(size).save(path, format=fmt)
    return path


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tiny.model")


def validate(data: Path, *extra: str) -> int:
    with contextlib.chdir(data):
        return main(["validate", "data.txt", *extra])


def shard(data: Path, out: Path, tokenizer: Path, *extra: str) -> int:
    argv = ["shard", "data.txt", "--tokenizer", str(tokenizer), "--out", str(out), "--hd-num", "1"]
    with contextlib.chdir(data):
        return main([*argv, "--samples-per-shard", "2", "--workers", "1", *extra])


def rejects(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]


def assert_every_record_accounted_for(out: Path) -> None:
    for s in Manifest.load(out).sources:
        assert s.records_read == s.samples_written + s.rejected, s


def report(json_path: Path) -> list[dict[str, Any]]:
    return json.loads(json_path.read_text())["errors"]


# ---------------------------------------------------------------- 1. no program runs from a data file


@pytest.fixture
def gs_trap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `gs` first on PATH that records being run (and fails, as a missing Ghostscript would)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ran = tmp_path / "gs-ran"
    (bin_dir / "gs").write_text(f'#!/bin/sh\necho "$@" >> {ran}\nexit 1\n')
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    from PIL import EpsImagePlugin

    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # look Ghostscript up again, on our PATH
    return ran


def test_a_postscript_file_named_jpg_never_runs_ghostscript(
    tmp_path: Path, gs_trap: Path, tiny_tokenizer: Path, capsys
) -> None:
    data = tmp_path / "data"
    eps = data / "img" / "photo.jpg"
    photo(eps, (40, 30), fmt="EPS")  # PostScript, whatever the name says
    photo(data / "img" / "ok.jpg")
    # The trap works: Pillow left to choose the plugin itself runs our `gs` to render the file (and
    # its CalledProcessError, no OSError, is what used to abort a whole shard run).
    with pytest.raises(subprocess.CalledProcessError), Image.open(eps) as im:
        im.load()
    assert gs_trap.exists()
    gs_trap.unlink()

    records = [
        {"id": "eps", "image": "img/photo.jpg", "conversations": qa()},
        {"id": "ok", "image": "img/ok.jpg", "conversations": qa()},
    ]
    write_json(data / "d.json", records)
    (data / "data.txt").write_text("d.json 1\n")
    assert validate(data, "--json", str(tmp_path / "r.json")) == 1
    (error,) = report(tmp_path / "r.json")
    assert (error["index"], error["code"]) == (0, "image_unreadable")
    assert "not a JPEG, PNG, WebP, GIF, BMP, TIFF, ICO or PPM image" in error["message"]
    for workers in ("1", "2"):  # in-process, and in spawned workers that inherit PATH
        out = tmp_path / f"out{workers}"
        assert shard(data, out, tiny_tokenizer, "--workers", workers) == 0
        assert [(r["index"], r["code"]) for r in rejects(out)] == [(0, "image_unreadable")]
        assert_every_record_accounted_for(out)
    assert not gs_trap.exists(), f"gs ran: {gs_trap.read_text()}"
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("raised", [EOFError("eof"), struct.error("unpack"), ZeroDivisionError("zero")])
def test_any_decoder_failure_is_that_images_rejection(
    tmp_path: Path, tiny_tokenizer: Path, monkeypatch: pytest.MonkeyPatch, raised: Exception
) -> None:
    """Whatever a decoder raises on one file (not only OSError) rejects that record in validate and
    shard alike, and the run goes on."""
    data = tmp_path / "data"
    photo(data / "bad.png", fmt="PNG")
    photo(data / "good.png", fmt="PNG")
    from PIL import ImageFile

    real_load = ImageFile.ImageFile.load

    def load(self: ImageFile.ImageFile) -> Any:
        if str(getattr(self, "filename", "")).endswith("bad.png"):
            raise raised
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    write_json(
        data / "d.json",
        [{"id": i, "image": f"{n}.png", "conversations": qa()} for i, n in enumerate(["bad", "good"])],
    )
    (data / "data.txt").write_text("d.json 1\n")
    assert validate(data, "--json", str(tmp_path / "r.json")) == 1
    assert [(e["index"], e["code"]) for e in report(tmp_path / "r.json")] == [(0, "image_corrupt")]
    out = tmp_path / "out"
    assert shard(data, out, tiny_tokenizer) == 0
    (reject,) = rejects(out)
    assert (reject["index"], reject["code"]) == (0, "image_corrupt") and type(raised).__name__ in reject[
        "message"
    ]
    assert reject["hint"], "the fix travels with the reject"
    assert_every_record_accounted_for(out)


# ---------------------------------------------------------------- 2. one record never ends the run


def wide_video(path: Path, size: tuple[int, int] = (2400, 2)) -> Path:
    """Frames 1,200 times wider than tall: scaled to a 1,120-px long side, the short side is < 1 px."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=2)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(3):
            frame = np.full((size[1], size[0], 3), 60 * i, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_a_video_whose_frames_scale_to_zero_height_builds(tmp_path: Path, tiny_tokenizer: Path) -> None:
    """Validate accepts it, so shard must build it: the short side is held at one pixel."""
    data = tmp_path / "data"
    wide_video(data / "wide.mp4")
    write_json(data / "d.json", [{"id": 0, "image": "wide.mp4", "conversations": qa()}])
    (data / "data.txt").write_text("d.json 1\n")
    assert validate(data) == 0
    out = tmp_path / "out"
    assert shard(data, out, tiny_tokenizer) == 0
    assert rejects(out) == [] and Manifest.load(out).sources[0].samples_written == 1


def test_an_unexpected_error_rejects_its_record_names_it_and_exits_1(
    tmp_path: Path, tiny_tokenizer: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Any exception while building one record (a bug, not a data rule) is a `build_failed` reject
    naming file, index, id and the error; the run finishes every other record, then exits 1."""
    import pipeline.build as build_module

    real = build_module.render_conversation

    def render(turns: Any, *args: Any, **kwargs: Any) -> Any:
        if turns[0].value == "explode":
            raise KeyError("a bug somewhere")
        return real(turns, *args, **kwargs)

    monkeypatch.setattr(build_module, "render_conversation", render)
    data = tmp_path / "data"
    records = [{"id": f"r{i}", "conversations": qa("explode" if i == 2 else f"q{i}")} for i in range(5)]
    write_json(data / "d.json", records)
    (data / "data.txt").write_text("d.json 1\n")
    out = tmp_path / "out"
    assert shard(data, out, tiny_tokenizer) == 1
    (reject,) = rejects(out)
    assert (reject["file"], reject["index"], reject["id"], reject["code"]) == (
        "d.json",
        2,
        "r2",
        "build_failed",
    )
    assert "KeyError: 'a bug somewhere' (at test_hostile_inputs.py:" in reject["message"]
    assert "report" in reject["hint"]
    assert Manifest.load(out).sources[0].samples_written == 4
    assert_every_record_accounted_for(out)
    err = capsys.readouterr().err
    assert "FAILED: 1 record(s) hit an error inside xc-prep" in err and "d.json record 2" in err
    assert "Traceback" not in err
    assert shard(data, out, tiny_tokenizer) == 1, "a re-run reuses the units and says it again"


def test_a_check_that_raises_is_that_records_error(
    tmp_path: Path, tiny_tokenizer: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.checks as checks_module

    real = checks_module._check_placeholders

    def check(turns: Any, *args: Any) -> None:
        if turns[0][1] == "explode":
            raise IndexError("out of range")
        real(turns, *args)

    monkeypatch.setattr(checks_module, "_check_placeholders", check)
    data = tmp_path / "data"
    write_json(
        data / "d.json", [{"id": i, "conversations": qa("explode" if i == 1 else "q")} for i in range(3)]
    )
    (data / "data.txt").write_text("d.json 1\n")
    assert validate(data, "--json", str(tmp_path / "r.json")) == 1
    (error,) = report(tmp_path / "r.json")
    assert (error["index"], error["code"]) == (1, "check_failed") and "IndexError: out of range" in error[
        "message"
    ]
    out = tmp_path / "out"
    assert shard(data, out, tiny_tokenizer) == 1
    assert [(r["index"], r["code"]) for r in rejects(out)] == [(1, "check_failed")]
    assert_every_record_accounted_for(out)


# ---------------------------------------------------------------- 3. records nested too deeply to send


def test_a_deeply_nested_record_is_rejected_before_it_reaches_a_worker(
    tmp_path: Path, tiny_tokenizer: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """600 levels parse, but pickling them to a worker process exhausts the stack."""
    import pipeline.validate as validate_module

    monkeypatch.setattr(validate_module, "PARALLEL_MIN_COST", 0)  # use the pool for 3 records
    data = tmp_path / "data"
    text = '[{"id": 0, "conversations": %s}, {"id": 1, "conversations": %s, "extra": %s}, {"id": 2, "conversations": %s}]'
    conv = json.dumps(qa())
    (data).mkdir()
    (data / "d.json").write_text(text % (conv, conv, "[" * 600 + "]" * 600, conv))
    (data / "data.txt").write_text("d.json 1\n")
    for workers in ("1", "2"):
        assert validate(data, "--workers", workers, "--json", str(tmp_path / f"r{workers}.json")) == 1
        (error,) = report(tmp_path / f"r{workers}.json")
        assert (error["index"], error["id"], error["code"]) == (1, 1, "record_too_deep")
        assert f"more than {MAX_RECORD_DEPTH} levels" in error["message"]
    outs = []
    for workers in ("1", "2"):
        outs.append(tmp_path / f"out{workers}")
        assert shard(data, outs[-1], tiny_tokenizer, "--workers", workers, "--samples-per-shard", "1") == 0
        assert [(r["index"], r["code"]) for r in rejects(outs[-1])] == [(1, "record_too_deep")]
        assert_every_record_accounted_for(outs[-1])
    assert (outs[0] / "rejects.jsonl").read_bytes() == (outs[1] / "rejects.jsonl").read_bytes()


# ---------------------------------------------------------------- 4. control tokens come from the tokenizer


def test_the_forbidden_strings_are_the_real_tokenizers_control_pieces(real_tokenizer_path: Path) -> None:
    tokenizer = Tokenizer.from_path(real_tokenizer_path)
    unused = [f"[UNUSED_TOKEN_{n}]" for n in range(147)]
    assert set(tokenizer.control_pieces) == {"<unk>", "<s>", "</s>", *unused}
    assert set(tokenizer.forbidden_strings) == {*tokenizer.control_pieces, *ADDED_TOKENS}
    assert tokenizer.control_pieces["[UNUSED_TOKEN_141]"] == 92538  # the tool-call tokens, 92538..92541
    for text in ("Ｅ", "——", "……", "\n"):  # user-defined pieces that are text
        assert text not in tokenizer.forbidden_strings


@pytest.mark.parametrize("which", ["real", "tiny"])
def test_literal_control_strings_are_refused_by_validate_shard_and_the_template(
    which: str, real_tokenizer_path: Path, tiny_tokenizer: Path, tmp_path: Path
) -> None:
    path = real_tokenizer_path if which == "real" else tiny_tokenizer
    tokenizer = Tokenizer.from_path(path)
    bad = (
        ["[UNUSED_TOKEN_141]", "[UNUSED_TOKEN_1]", "<|plugin|>", "</s>"]
        if which == "real"
        else ["[UNUSED_TOKEN_145]", "<s>"]
    )
    texts = [f"call {s} now" for s in bad] + ["ＥＦ —— plain text"]
    data = tmp_path / "data"
    write_json(data / "d.json", [{"id": i, "conversations": qa("q", t)} for i, t in enumerate(texts)])
    (data / "data.txt").write_text("d.json 1\n")
    assert validate(data, "--tokenizer", str(path), "--json", str(tmp_path / "r.json")) == 1
    expected = [(i, "special_token") for i in range(len(bad))]
    assert [(e["index"], e["code"]) for e in report(tmp_path / "r.json")] == expected
    out = tmp_path / "out"
    assert shard(data, out, path) == 0
    assert [(r["index"], r["code"]) for r in rejects(out)] == expected
    assert_every_record_accounted_for(out)
    # Past the text check, the template still refuses any control id the text became (the HF
    # added tokens are text to sentencepiece: only the check above can refuse those).
    for s in (s for s in bad if s in tokenizer.control_pieces):
        turns = (Turn("user", "q"), Turn("assistant", f"call {s} now"))
        with pytest.raises(template_module.DataError, match=r"control tokens the template does not place"):
            render_conversation(turns, [], tokenizer)
    render_conversation((Turn("user", "q"), Turn("assistant", "ＥＦ —— plain text")), [], tokenizer)


# ---------------------------------------------------------------- 5. absurd k


@pytest.mark.parametrize("k", ["1e9", "1e300", "1e306", "inf", "nan", "-1", "100000.5"])
def test_an_absurd_k_is_a_finding_at_its_data_txt_line(
    k: str, tmp_path: Path, tiny_tokenizer: Path, capsys
) -> None:
    data = tmp_path / "data"
    write_json(data / "d.json", [{"id": 0, "conversations": qa()}])
    (data / "data.txt").write_text(f"# weights\nd.json {k}\n")
    assert validate(data) == 1
    out_text = capsys.readouterr().out
    assert "data.txt:2: " in out_text and "fix:" in out_text
    if k not in ("inf", "nan", "-1"):
        assert f"more than {MAX_K * 1000:,} (k {MAX_K:,})" in out_text
    assert shard(data, tmp_path / "out", tiny_tokenizer) == 1
    assert "data.txt:2: " in capsys.readouterr().out
    assert not (tmp_path / "out" / "manifest.json").exists()


# ---------------------------------------------------------------- 6. no worker outlives the run


psutil = pytest.importorskip("psutil")


def many_images(folder: Path, count: int) -> None:
    """`count` records, each with its own copy of a 1,600×1,200 JPEG (no probe cache hit)."""
    buf = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).resize((1600, 1200)).save(buf, "JPEG", quality=95)
    (folder / "img").mkdir(parents=True)
    for i in range(count):
        (folder / "img" / f"{i}.jpg").write_bytes(buf.getvalue())
    records = [{"id": i, "image": f"img/{i}.jpg", "conversations": qa()} for i in range(count)]
    write_json(folder / "d.json", records)
    (folder / "data.txt").write_text("d.json 1\n")


@pytest.fixture(scope="module")
def busy_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("busy") / "data"
    many_images(data, 120)  # validate's pool starts at 100 media files
    return data


def start(argv: list[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *argv],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )


def wait_for_workers(proc: subprocess.Popen[str], count: int, timeout_s: float = 60.0) -> list[Any]:
    """The main process's descendants once `count` of them are pool workers."""
    main_process = psutil.Process(proc.pid)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"finished before it could be killed: {proc.communicate()}"
        descendants = main_process.children(recursive=True)
        workers = [p for p in descendants if "multiprocessing" in " ".join(_cmdline(p))]
        if len(workers) >= count:
            return descendants
        time.sleep(0.05)
    raise AssertionError("the workers never started")


def _cmdline(p: Any) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def assert_all_gone(processes: list[Any], timeout_s: float = 15.0) -> None:
    """Every one of `processes` exits within `timeout_s` (those that do not are killed, then fail)."""
    deadline = time.monotonic() + timeout_s
    alive = processes
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if _running(p)]
    left = [(p.pid, _cmdline(p)) for p in alive]
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    assert not left, f"left behind: {left}"


def _running(p: Any) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("command", ["shard", "validate"])
def test_kill_9_of_the_main_process_alone_leaves_no_worker_behind(
    command: str, busy_data: Path, tiny_tokenizer: Path, tmp_path: Path
) -> None:
    argv = [command, "data.txt", "--workers", "2"]
    if command == "shard":
        argv += ["--tokenizer", str(tiny_tokenizer), "--out", str(tmp_path / "out"), "--hd-num", "4"]
        argv += ["--samples-per-shard", "2"]
    proc = start(argv, busy_data)
    descendants = wait_for_workers(proc, 2)
    os.kill(proc.pid, signal.SIGKILL)  # the main process only, not its process group
    assert_all_gone(descendants)
    proc.communicate(timeout=30)  # the output pipe closes: no worker holds it open


@pytest.mark.slow
def test_sigterm_stops_shard_like_ctrl_c_and_the_rerun_resumes(
    busy_data: Path, tiny_tokenizer: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    argv = ["shard", "data.txt", "--tokenizer", str(tiny_tokenizer), "--out", str(out), "--hd-num", "4"]
    argv += ["--samples-per-shard", "2", "--workers", "2"]
    proc = start(argv, busy_data)
    descendants = wait_for_workers(proc, 2)
    proc.send_signal(signal.SIGTERM)  # as `timeout`, docker and Slurm do
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "stopped by SIGTERM; finished shards are kept, re-run the same command to resume" in err
    assert "Traceback" not in err
    assert_all_gone(descendants)
    assert not (out / "manifest.json").exists()
    with contextlib.chdir(busy_data):
        assert main([*argv[:-2], "--workers", "1"]) == 0  # the same command (--workers changes no byte)
    assert_every_record_accounted_for(out)


@pytest.mark.slow
def test_sigterm_stops_validate_with_exit_130(busy_data: Path) -> None:
    proc = start(["validate", "data.txt", "--workers", "2"], busy_data)
    descendants = wait_for_workers(proc, 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "xc-prep validate: stopped by SIGTERM" in err, err
    assert "Traceback" not in err
    assert_all_gone(descendants)


# ---------------------------------------------------------------- 7. truncated images


def png_bytes(width: int, height: int, rows: int) -> bytes:
    """An RGB PNG whose header says width×height and whose (complete) zlib stream holds `rows` rows."""
    raw = b"".join(b"\x00" + bytes([90, 140, 200]) * width for _ in range(rows))

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def interlaced_png(image: np.ndarray) -> bytes:
    """`image` (uint8[H, W, 3]) as an Adam7-interlaced PNG (Pillow writes none)."""
    passes = (
        (0, 0, 8, 8),
        (4, 0, 8, 8),
        (0, 4, 4, 8),
        (2, 0, 4, 4),
        (0, 2, 2, 4),
        (1, 0, 2, 2),
        (0, 1, 1, 2),
    )
    raw = b""
    for x0, y0, dx, dy in passes:
        sub = image[y0::dy, x0::dx]
        if sub.size:
            raw += b"".join(b"\x00" + row.tobytes() for row in sub)

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    height, width = image.shape[:2]
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 1)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def jpeg_claiming(size: tuple[int, int]) -> bytes:
    """A small real JPEG whose frame header claims `size`, closed by its EOI: libjpeg fills grey."""
    buf = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).resize((64, 64)).save(buf, "JPEG")
    data = buf.getvalue()
    sof = data.index(b"\xff\xc0")
    return data[: sof + 5] + struct.pack(">HH", size[1], size[0]) + data[sof + 9 :]


def cut(fmt: str, fraction: float = 0.6) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buf, fmt)
    data = buf.getvalue()
    return data[: int(len(data) * fraction)]


TRUNCATED = {
    "png_header_claims_2000px_10_rows_of_data.png": lambda: png_bytes(2000, 2000, 10),
    "png_stream_ends_at_90_percent.png": lambda: png_bytes(300, 200, 180),
    "jpeg_header_claims_8000px.jpg": lambda: jpeg_claiming((8000, 8000)),
    **{
        f"cut.{fmt.lower()}": (lambda fmt=fmt: cut(fmt))
        for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "ICO", "PPM")
    },
}


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about TIFF tags it cannot read
@pytest.mark.parametrize("name", sorted(TRUNCATED))
def test_a_truncated_image_of_any_format_is_rejected(name: str, tmp_path: Path, tiny_tokenizer: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / name).write_bytes(TRUNCATED[name]())
    photo(data / "ok.png", fmt="PNG")
    write_json(
        data / "d.json",
        [
            {"id": 0, "image": name, "conversations": qa()},
            {"id": 1, "image": "ok.png", "conversations": qa()},
        ],
    )
    (data / "data.txt").write_text("d.json 1\n")
    assert validate(data, "--json", str(tmp_path / "r.json")) == 1
    (error,) = report(tmp_path / "r.json")
    assert error["index"] == 0 and error["code"] in ("image_corrupt", "image_unreadable"), error
    out = tmp_path / "out"
    assert shard(data, out, tiny_tokenizer) == 0
    assert [(r["index"], r["code"]) for r in rejects(out)] == [(0, error["code"])]
    assert_every_record_accounted_for(out)


def test_little_data_is_refused_from_the_header_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "claims.png"
    path.write_bytes(png_bytes(13_000, 13_000, 1))  # under --max-image-pixels: 676 MB decoded
    with pytest.raises(Exception, match=r"holds \d+ bytes, but a 13000×13000 PNG takes at least") as e:
        probe_image_size(path)  # the header probe (`xc-prep shard`'s checks) already refuses it
    assert e.value.code == "image_corrupt"


def test_complete_images_pass_the_completeness_checks(tmp_path: Path) -> None:
    """No false alarm: interlaced and every PNG colour type, a flat progressive JPEG, a 1-bit bomb."""
    image = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((301, 187)))
    (tmp_path / "interlaced.png").write_bytes(interlaced_png(image))
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "interlaced.png")), image)
    for mode in ("1", "L", "P", "RGB", "RGBA", "LA", "I;16"):
        Image.fromarray(image).convert(mode).save(tmp_path / f"{mode.replace(';', '')}.png")
        assert load_rgb(tmp_path / f"{mode.replace(';', '')}.png").size == (301, 187)
    flat = Image.new("L", (4000, 4000), 90)  # the least data a JPEG of this size can hold
    flat.save(tmp_path / "flat.jpg", quality=10, optimize=True, progressive=True)
    assert load_rgb(tmp_path / "flat.jpg").size == (4000, 4000)


MEASURE_BUILD_RSS = """
import json, resource, sys
from pathlib import Path
from pipeline.media import load_rgb
from pipeline.tiling import hd_transform
warm = Path(sys.argv[2])
hd_transform(load_rgb(warm), 18)  # imports and first allocations
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
before = rss()
load_rgb(Path(sys.argv[1]))
decoded = rss()
hd_transform(load_rgb(Path(sys.argv[1])), 18)
print(json.dumps({"decode": decoded - before, "build": rss() - before}))
"""


@pytest.mark.slow
def test_decoding_and_tiling_an_image_costs_the_documented_bytes_per_pixel(tmp_path: Path) -> None:
    """RELIABILITY.md: a decode holds ~8 bytes per pixel (the decoded image and its RGB copy), the
    HD transform after it ~13 at most; noise, so that PNG cannot compress it away."""
    pixels = np.random.default_rng(0).integers(0, 256, (2000, 3000, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "noise.png", compress_level=1)
    photo(tmp_path / "warm.png", fmt="PNG")
    out = subprocess.run(
        [sys.executable, "-c", MEASURE_BUILD_RSS, str(tmp_path / "noise.png"), str(tmp_path / "warm.png")],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    growth = json.loads(out.stdout)
    margin = 20 * 2**20
    assert growth["decode"] < 8.5 * pixels.size / 3 + margin, growth
    assert growth["build"] < 13 * pixels.size / 3 + margin, growth


# ---------------------------------------------------------------- 8. a JSON file larger than memory


def test_a_json_file_larger_than_memory_is_refused_from_its_size(
    tmp_path: Path, tiny_tokenizer: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    data = tmp_path / "data"
    write_json(data / "big.json", [{"id": i, "conversations": qa()} for i in range(200)])
    (data / "data.txt").write_text("big.json 1\n")
    monkeypatch.setattr(json_source_module, "memory_bytes", lambda: 50_000)  # a 5,000-byte limit
    assert validate(data) == 1
    text = capsys.readouterr().out
    assert "json_too_large" in text and "big.json" in text and "more than the 0.0 GB limit" in text
    assert "split the file into several JSON files" in text
    assert shard(data, tmp_path / "out", tiny_tokenizer) == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_running_out_of_memory_while_parsing_is_a_finding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_json(tmp_path / "a.json", [{"id": 0, "conversations": qa()}])

    def no_memory(*args: Any, **kwargs: Any) -> Any:
        raise MemoryError

    monkeypatch.setattr(json_source_module.json, "loads", no_memory)
    check = check_source(Source(path="a.json", resolved=path, k=1.0, line=1), ValidateOptions())
    (finding,) = check.file_findings
    assert finding.code == "json_too_large" and "ran out of memory" in finding.message and finding.hint


# ---------------------------------------------------------------- 11. small ones: preview, manifest paths, hints


def preview(*argv: str) -> int:
    return main(["preview", *argv])


def test_preview_refuses_a_folder_outside_media_and_control_strings(
    tmp_path: Path, tiny_tokenizer: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    data = tmp_path / "data"
    photo(tmp_path / "outside.jpg")
    records = [
        {"id": 0, "image": "../outside.jpg", "conversations": qa()},
        {"id": 1, "conversations": qa("q", "say [UNUSED_TOKEN_145] twice")},
        {"id": 2, "conversations": qa()},
    ]
    write_json(data / "d.json", records)
    monkeypatch.chdir(data)
    tok = ["--tokenizer", str(tiny_tokenizer)]
    assert preview(str(data), *tok) == 1
    assert "is a folder; pass a JSON file of records" in capsys.readouterr().err
    assert preview("d.json", "--record", "0", *tok) == 1
    err = capsys.readouterr().err
    assert "[media_outside_roots]" in err and "fix: keep media inside" in err
    assert preview("d.json", "--record", "0", "--allow-path", "..", *tok) == 0
    assert preview("d.json", "--record", "1", *tok) == 1
    assert "[special_token]" in capsys.readouterr().err
    assert preview("d.json", "--record", "2", *tok) == 0
    assert "Traceback" not in capsys.readouterr().err


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Path) -> Path:
    data = tmp_path_factory.mktemp("small") / "data"
    write_json(data / "d.json", [{"id": i, "conversations": qa(f"q{i}")} for i in range(3)])
    (data / "data.txt").write_text("d.json 1\n")
    out = data.parent / "shards"
    assert shard(data, out, tiny_tokenizer) == 0
    return out


def edited_copy(shards: Path, dest: Path, file: str) -> Path:
    import shutil

    shutil.copytree(shards, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["sources"][0]["shards"][0]["file"] = file
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


@pytest.mark.parametrize("file", ["../outside.arrow", "/etc/passwd", "001-d/../../x.arrow", "link.arrow"])
def test_a_manifest_shard_path_outside_the_folder_is_refused(
    file: str, small_shards: Path, tmp_path: Path, capsys
) -> None:
    folder = edited_copy(small_shards, tmp_path / "shards", file)
    original = small_shards / Manifest.load(small_shards).sources[0].shards[0].file
    (tmp_path / "outside.arrow").write_bytes(original.read_bytes())
    (folder / "link.arrow").symlink_to(tmp_path / "outside.arrow")
    assert main(["info", str(folder), "--verify"]) == 1
    err = capsys.readouterr().err
    assert "leaves the shard folder" in err or "absolute path" in err or "symlink that leads out" in err, err
    assert "Traceback" not in err


def test_the_json_report_and_rejects_carry_the_fix(
    small_shards: Path, tmp_path: Path, tiny_tokenizer: Path
) -> None:
    data = tmp_path / "data"
    write_json(data / "d.json", [{"id": 0, "conversations": [{"from": "human", "value": "q"}]}])
    (data / "data.txt").write_text("d.json 1\n")
    assert validate(data, "--json", str(tmp_path / "r.json")) == 1
    (error,) = report(tmp_path / "r.json")
    assert error["code"] == "last_turn_not_assistant" and error["hint"].startswith("end the conversation")
    assert shard(data, tmp_path / "out", tiny_tokenizer) == 0
    (reject,) = rejects(tmp_path / "out")
    assert reject["hint"] == error["hint"]
