"""Reliability and security of `xc-prep` (issue 10, pipeline side; see RELIABILITY.md).

- Nothing executes from data: no eval/exec/pickle/unsafe torch.load in the source tree, shards and
  manifests are Arrow IPC + JSON only, and `pipe:` strings are plain (missing) file names.
- Media paths stay inside the allowed folders (cwd, the JSON file's folder, --allow-path).
- Decompression bombs and absurd videos are refused from headers/metadata, in bounded memory.
- A full disk during `xc-prep shard` leaves finished shards intact and the re-run completes them.
"""

from __future__ import annotations

import ast
import contextlib
import errno
import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import skimage.data
from conftest import qa, write_json
from PIL import Image

import pipeline.checks as checks_module
import pipeline.media_probe as media_probe_module
import schemas.storage as storage_module
from pipeline import video as video_module
from pipeline.checks import HINTS, ValidateOptions, check_source
from pipeline.cli import main
from pipeline.media import DEFAULT_MAX_IMAGE_PIXELS, MediaError, load_rgb, probe_image_size
from pipeline.tokenization import build_tiny_tokenizer
from pipeline.video import MAX_FRAMES, VideoInfo
from schemas.atomic import temp_path
from schemas.cli import ExitCode
from schemas.record import Source
from schemas.shards import ShardReader, ShardWriter, file_sha256, verify_shards

REPO_ROOT = Path(__file__).resolve().parent.parent
SCANNED_PACKAGES = ("pipeline", "trainer", "schemas")
BOMB_SIZE = (20_000, 20_000)
RSS_BUDGET_BYTES = 100 * 2**20


def source_of(path: Path) -> Source:
    return Source(path=path.name, resolved=path, k=1.0, line=1)


def codes(check: Any) -> list[list[str]]:
    return [[f.code for f in r.findings if f.severity == "error"] for r in check.records]


def write_png_bomb(path: Path, size: tuple[int, int] = BOMB_SIZE) -> Path:
    """A valid 1-bit PNG of one colour: ~48 KB on disk, 400 M pixels (1.2 GB as RGB) decoded."""
    width, height = size
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    rows_per_block = 200
    idat = b"".join(packer.compress(row * rows_per_block) for _ in range(height // rows_per_block))
    idat += packer.compress(row * (height % rows_per_block)) + packer.flush()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
    return path


def write_video(path: Path, *, frames: int, fps: int, size: tuple[int, int] = (64, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            frame = np.full((size[1], size[0], 3), (7 * i) % 256, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_png_bomb(tmp_path_factory.mktemp("bomb") / "bomb.png")


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tiny.model")


# ---------------------------------------------------------------- nothing executes from data


def _dotted(node: ast.AST) -> str:
    """`a.b.c` for a Name/Attribute chain ('' otherwise)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and (base := _dotted(node.value)):
        return f"{base}.{node.attr}"
    return ""


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords
    )


FORBIDDEN_CALLS = {
    "eval": "eval() runs code",
    "exec": "exec() runs code",
    "compile": "compile() builds code",
    "__import__": "__import__() imports by computed name",
    "pickle.load": "unpickling runs code",
    "pickle.loads": "unpickling runs code",
    "pickle.Unpickler": "unpickling runs code",
    "marshal.load": "marshal loads code objects",
    "marshal.loads": "marshal loads code objects",
    "shelve.open": "shelve unpickles",
    "yaml.load": "yaml.load may construct objects: use yaml.safe_load",
    "yaml.unsafe_load": "constructs arbitrary objects",
    "yaml.full_load": "constructs Python objects: use yaml.safe_load",
    "os.system": "runs a shell",
    "os.popen": "runs a shell",
}
FORBIDDEN_IMPORTS = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve", "webdataset"}
# webdataset's readers open `pipe:` URLs and unpickle `.pyd` members; its tar writer (xc-prep export)
# writes our own bytes and reads nothing.
ALLOWED_IMPORTS = {"webdataset.writer"}


def unsafe_calls(source: str, filename: str = "<src>") -> list[str]:
    """Every way `source` could run code found in data: eval/exec, unpickling, unsafe YAML,
    torch.load without weights_only=True, numpy allow_pickle=True, shells."""
    problems = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if isinstance(node, ast.ImportFrom) and node.module == "torch":
                names += [f"torch.{a.name}" for a in node.names]
            for name in names:
                if (
                    name.split(".")[0] in FORBIDDEN_IMPORTS and name not in ALLOWED_IMPORTS
                ) or name == "torch.load":
                    problems.append(f"{where}: imports {name}")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name in FORBIDDEN_CALLS:
            problems.append(f"{where}: {name}(): {FORBIDDEN_CALLS[name]}")
        elif name.endswith("torch.load") or name == "torch.load":
            if not _keyword_is(node, "weights_only", True):
                problems.append(
                    f"{where}: torch.load() without weights_only=True unpickles arbitrary objects"
                )
        elif name in ("np.load", "numpy.load") and _keyword_is(node, "allow_pickle", True):
            problems.append(f"{where}: {name}(allow_pickle=True) unpickles")
        elif name.startswith("subprocess.") and _keyword_is(node, "shell", True):
            problems.append(f"{where}: {name}(shell=True) runs a shell")
        elif name in ("Image.open", "PIL.Image.open") and not any(k.arg == "formats" for k in node.keywords):
            problems.append(
                f"{where}: {name}() without formats= tries every Pillow plugin; EPS/PS run Ghostscript"
            )
    return problems


def test_scanner_flags_what_it_should() -> None:
    bad = textwrap.dedent(
        """
        import pickle
        from torch import load
        eval(text); exec(code); pickle.loads(b); yaml.load(s)
        torch.load(path); torch.load(path, weights_only=False)
        np.load(f, allow_pickle=True); subprocess.run(cmd, shell=True); os.system(cmd)
        Image.open(path)
        """
    )
    assert len(unsafe_calls(bad)) == 12
    good = textwrap.dedent(
        """
        model.eval(); re.compile("x"); yaml.safe_load(s); np.load(f)
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        subprocess.run([sys.executable, "-m", "x"])
        Image.open(path, formats=("PNG",))
        """
    )
    assert unsafe_calls(good) == []


def test_no_code_execution_primitives_in_the_source_tree() -> None:
    files = sorted(p for pkg in SCANNED_PACKAGES for p in (REPO_ROOT / pkg).rglob("*.py"))
    assert len(files) > 20, "scanned too few files: did the layout change?"
    problems = [p for f in files for p in unsafe_calls(f.read_text(), str(f.relative_to(REPO_ROOT)))]
    assert problems == [], "\n".join(problems)


def test_pipe_urls_in_data_txt_and_records_are_plain_missing_paths(tmp_path: Path, capsys) -> None:
    """We never open `pipe:`/shell URLs (webdataset's gopen would run them): they are file names."""
    marker = tmp_path / "PWNED"
    (tmp_path / "ok.json").write_text(
        json.dumps(
            [
                {"id": 0, "image": f"pipe:touch {marker}", "conversations": qa()},
                {
                    "id": 1,
                    "image": ["pipe:rm -rf x", "pipe:true"],
                    "conversations": qa("<ImageHere> <ImageHere>"),
                },
                {"id": 2, "image": "file:///etc/passwd", "conversations": qa()},
            ]
        )
    )
    (tmp_path / "data.txt").write_text(f"pipe:touch${{IFS}}{marker} 1\nok.json 1\n")
    with contextlib.chdir(tmp_path):
        assert main(["validate", "data.txt", "--json", "report.json", "--workers", "1"]) == 1
    report = json.loads((tmp_path / "report.json").read_text())
    found = [(f["file"], f["line"], f["index"], f["code"]) for f in report["errors"]]
    assert found == [
        ("data.txt", 1, None, "source_file_missing"),
        ("ok.json", None, 0, "media_missing"),
        ("ok.json", None, 1, "media_missing"),
        ("ok.json", None, 1, "media_missing"),
        ("ok.json", None, 2, "media_missing"),
    ]
    assert not marker.exists()
    capsys.readouterr()


# ---------------------------------------------------------------- allowed roots


@pytest.fixture
def rooted(tmp_path: Path) -> Path:
    """work/ (the cwd) with data/ (JSON + images); shared/ and secret/ beside work/."""
    photo = Image.fromarray(skimage.data.chelsea()).resize((64, 48))
    for folder in ("work/data/img", "work/elsewhere", "shared", "secret"):
        (tmp_path / folder).mkdir(parents=True)
    photo.save(tmp_path / "work/data/img/in.jpg")
    photo.save(tmp_path / "work/elsewhere/cwd.jpg")
    photo.save(tmp_path / "shared/pool.jpg")
    photo.save(tmp_path / "secret/s.jpg")
    (tmp_path / "work/data/img/link_out.jpg").symlink_to(tmp_path / "secret/s.jpg")
    (tmp_path / "work/data/img/link_in.jpg").symlink_to(tmp_path / "work/elsewhere/cwd.jpg")
    (tmp_path / "work/data/img/loop.jpg").symlink_to(tmp_path / "work/data/img/loop.jpg")
    records = [
        {"id": "relative-json-folder", "image": "img/in.jpg"},  # 0 via the JSON folder
        {"id": "relative-cwd", "image": "elsewhere/cwd.jpg"},  # 1 via the cwd
        {"id": "absolute-inside", "image": str(tmp_path / "work/data/img/in.jpg")},  # 2
        {"id": "dotdot-back-inside", "image": "img/../img/in.jpg"},  # 3
        {"id": "symlink-inside", "image": "img/link_in.jpg"},  # 4
        {"id": "dotdot-escape", "image": "../../secret/s.jpg"},  # 5
        {"id": "absolute-outside", "image": str(tmp_path / "secret/s.jpg")},  # 6
        {"id": "symlink-escape", "image": "img/link_out.jpg"},  # 7
        {"id": "etc-passwd", "image": "/etc/passwd"},  # 8
        {"id": "shared-pool", "image": str(tmp_path / "shared/pool.jpg")},  # 9
        {"id": "dev-zero", "image": "/dev/zero"},  # 10
        {"id": "symlink-loop", "image": "img/loop.jpg"},  # 11 never exists: media_missing
    ]
    write_json(tmp_path / "work/data/d.json", [{**r, "conversations": qa()} for r in records])
    (tmp_path / "work/data.txt").write_text("data/d.json 1\n")
    return tmp_path


OUTSIDE = [5, 6, 7, 8, 9, 10]


def test_media_outside_the_roots_is_refused_unopened(rooted: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    probed: list[Path] = []
    real_probe = checks_module.probe_media
    monkeypatch.setattr(checks_module, "probe_media", lambda p, **kw: probed.append(p) or real_probe(p, **kw))
    monkeypatch.chdir(rooted / "work")
    check = check_source(source_of(rooted / "work/data/d.json"), ValidateOptions())
    expected = [["media_outside_roots"] if i in OUTSIDE else [] for i in range(11)] + [["media_missing"]]
    assert codes(check) == expected
    assert len(probed) == 6, "files outside the roots must not even be opened (5 inside + the loop)"
    escape = check.records[7].findings[0]
    assert escape.file == "d.json" and escape.index == 7 and escape.id == "symlink-escape"
    assert str(rooted / "secret/s.jpg") in escape.message and "--allow-path" in escape.hint
    assert "--allow-any-path" in HINTS["media_outside_roots"]


def test_allow_path_and_allow_any_path(rooted: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(rooted / "work")
    allow = ValidateOptions(allow_path=(rooted / "shared", Path("../secret")))  # relative to the cwd
    assert codes(check_source(source_of(Path("data/d.json")), allow)) == [
        ["media_outside_roots"] if i in (8, 10) else ["media_missing"] if i == 11 else [] for i in range(12)
    ]
    anywhere = check_source(source_of(Path("data/d.json")), ValidateOptions(allow_any_path=True))
    assert codes(anywhere) == [
        ["image_unreadable"] if i == 8 else ["media_missing"] if i in (10, 11) else [] for i in range(12)
    ]
    # the CLI flags, and their usage errors
    report = rooted / "report.json"
    argv = ["validate", "data.txt", "--workers", "1", "--json", str(report)]
    assert main([*argv, "--allow-path", "../shared", "--allow-path", "../secret"]) == 1
    assert {f["index"] for f in json.loads(report.read_text())["errors"]} == {8, 10, 11}
    assert main([*argv, "--allow-any-path"]) == 1
    assert "not confined" in " ".join(json.loads(report.read_text())["notes"])
    assert main([*argv, "--allow-path", "../nope"]) == 2
    assert "--allow-path ../nope: not an existing folder" in capsys.readouterr().err


def test_shipped_example_data_stays_inside_the_roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The repo's example data (relative paths under the cwd) validates clean under the default policy."""
    monkeypatch.chdir(REPO_ROOT)
    assert main(["validate", "data/data.txt", "--workers", "1", "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["errors"] == []


# ---------------------------------------------------------------- decompression bombs


def test_image_bomb_is_refused_from_its_header(bomb: Path) -> None:
    assert bomb.stat().st_size < 100_000
    for read in (probe_image_size, load_rgb):
        with pytest.raises(MediaError) as e:
            read(bomb)
        assert e.value.code == "image_too_large"
        assert (
            "20000×20000 = 400,000,000 pixels" in e.value.message
            and "refused before decoding" in e.value.message
        )
    assert Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_IMAGE_PIXELS, "Pillow's global guard must be restored"


def test_image_pixel_limit_is_configurable(bomb: Path, tmp_path: Path, capsys) -> None:
    small = tmp_path / "small.png"
    Image.new("RGB", (100, 60), (1, 2, 3)).save(small)
    with pytest.raises(MediaError, match="100×60 = 6,000 pixels, more than --max-image-pixels 5,000"):
        load_rgb(small, max_pixels=5_000)
    assert load_rgb(small, max_pixels=6_000).size == (100, 60)
    # above Pillow's own error threshold (2 × its global): the header is read, nothing is decoded
    assert probe_image_size(bomb, max_pixels=500_000_000) == BOMB_SIZE
    assert Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_IMAGE_PIXELS
    write_json(tmp_path / "s.json", [{"id": 0, "image": "small.png", "conversations": qa()}])
    (tmp_path / "data.txt").write_text("s.json 1\n")
    with contextlib.chdir(tmp_path):
        assert main(["validate", "data.txt", "--workers", "1", "--max-image-pixels", "5000"]) == 1
        assert "image_too_large: 1 error" in capsys.readouterr().out
        assert main(["validate", "data.txt", "--workers", "1", "--max-image-pixels", "0"]) == 2


MEASURE_RSS = """
import json, resource, sys
from pathlib import Path
from pipeline.checks import ValidateOptions, check_source
from schemas.record import Source
json_path = Path(sys.argv[1])
source = Source(path=json_path.name, resolved=json_path, k=1.0, line=1)
check_source(source, ValidateOptions(decode_images=False))  # warm up: imports, first allocations
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
check = check_source(source, ValidateOptions(decode_images=True))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"codes": [f.code for r in check.records for f in r.findings], "rss_growth": after - before}))
"""


def test_image_bomb_costs_bounded_memory(bomb: Path, tmp_path: Path) -> None:
    """In a fresh process (peak RSS is a high-water mark): validating the bomb grows it < 100 MB."""
    json_path = write_json(tmp_path / "b.json", [{"id": 0, "image": str(bomb), "conversations": qa()}])
    out = subprocess.run(
        [sys.executable, "-c", MEASURE_RSS, str(json_path)],
        cwd=bomb.parent,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    result = json.loads(out.stdout)
    assert result["codes"] == ["image_too_large"]
    assert result["rss_growth"] < RSS_BUDGET_BYTES, result


# ---------------------------------------------------------------- absurd videos


def _video_record_check(tmp_path: Path, video: Path, opts: ValidateOptions) -> list[Any]:
    media_probe_module._media_cache.clear()  # probes are cached per process by path, size and mtime
    json_path = write_json(tmp_path / "v.json", [{"id": "v", "image": str(video), "conversations": qa()}])
    with contextlib.chdir(tmp_path):
        (record,) = check_source(source_of(json_path), opts).records
    return record.findings


def test_too_long_video_is_refused_before_decoding_frames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    video = write_video(tmp_path / "clip.mp4", frames=20, fps=10)  # 2 s
    assert _video_record_check(tmp_path, video, ValidateOptions()) == []

    def no_decoding(path: Path) -> list[np.ndarray]:
        raise AssertionError("frames were decoded before the length check")

    monkeypatch.setattr(video_module, "read_frames", no_decoding)
    (finding,) = _video_record_check(tmp_path, video, ValidateOptions(max_video_seconds=1.5))
    assert finding.code == "video_too_long" and finding.index == 0 and finding.file == "v.json"
    assert "20 frames at 10 fps = 2 s, more than --max-video-seconds 1.5" in finding.message
    # what a hostile container may claim: a billion frames, or 20000×20000 frames
    claims = {
        "video_too_long": VideoInfo(frames=10**9, fps=30.0, width=64, height=32),
        "video_frame_too_large": VideoInfo(frames=30, fps=30.0, width=20_000, height=20_000),
    }
    for code, info in claims.items():
        monkeypatch.setattr(video_module, "probe_video", lambda path, info=info: info)
        (finding,) = _video_record_check(tmp_path, video, ValidateOptions())
        assert finding.code == code and code in HINTS


def test_only_the_sampled_frames_are_decoded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 100-second clip (1 fps): decord is asked for frame 0 (size probe) and one batch of 32,
    never for the whole video."""
    import decord

    video = write_video(tmp_path / "long.mp4", frames=100, fps=1)
    calls: list[tuple[str, Any]] = []
    real = decord.VideoReader

    class SpyReader(real):  # type: ignore[misc, valid-type]
        def __getitem__(self, idx: Any) -> Any:
            calls.append(("getitem", idx))
            return super().__getitem__(idx)

        def get_batch(self, indices: Any) -> Any:
            calls.append(("get_batch", list(indices)))
            return super().get_batch(indices)

        def next(self) -> Any:
            calls.append(("next", None))
            return super().next()

    monkeypatch.setattr(decord, "VideoReader", SpyReader)
    assert _video_record_check(tmp_path, video, ValidateOptions()) == []
    batches = [args for name, args in calls if name == "get_batch"]
    assert len(batches) == 1 and len(batches[0]) == MAX_FRAMES == 32
    probes = [args for name, args in calls if name == "getitem"]
    assert set(probes) == {0}, "only frame 0 is read one by one (to learn the frame size)"
    assert sum(1 for name, _ in calls if name == "next") == len(probes), "one decoded frame per probe"


# ---------------------------------------------------------------- xc-prep shard: hostile data, no pickle


@pytest.fixture(scope="module")
def shard_data(tmp_path_factory: pytest.TempPathFactory, bomb: Path) -> Path:
    """data/ with good text and image records and hostile ones (bomb, escape, pipe:)."""
    root = tmp_path_factory.mktemp("shard-rel")
    data = root / "data"
    (data / "img").mkdir(parents=True)
    photo = Image.fromarray(skimage.data.coffee()).resize((120, 80))
    photo.save(data / "img/a.jpg")
    photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(data / "img/b.jpg")
    (data / "img/bomb.png").write_bytes(bomb.read_bytes())
    (root / "outside.jpg").write_bytes((data / "img/a.jpg").read_bytes())
    records = [
        {"id": 0, "image": "img/a.jpg", "conversations": qa()},
        {"id": 1, "conversations": qa("Say hi.", "Hi.")},
        {"id": 2, "image": "img/bomb.png", "conversations": qa()},
        {"id": 3, "image": "../outside.jpg", "conversations": qa()},
        {"id": 4, "image": "pipe:touch PWNED", "conversations": qa()},
        {"id": 5, "image": "img/b.jpg", "conversations": qa("And this one?", "The same, mirrored.")},
        {"id": 6, "conversations": qa("Count.", "One, two.")},
    ]
    write_json(data / "mixed.json", records)
    (data / "data.txt").write_text("mixed.json 1\n")
    return data


HOSTILE_REJECTS = [(2, "image_too_large"), (3, "media_outside_roots"), (4, "media_missing")]


def run_shard(data: Path, out: Path, tokenizer: Path, *extra: str) -> int:
    argv = ["shard", "data.txt", "--tokenizer", str(tokenizer), "--out", str(out), "--hd-num", "1"]
    argv += ["--samples-per-shard", "2", "--workers", "1", *extra]
    with contextlib.chdir(data):
        return main(argv)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def clean_shards(shard_data: Path, tiny_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "shards"
    assert run_shard(shard_data, out, tiny_tokenizer) == 0
    return out


PICKLE_MAGIC = tuple(bytes([0x80, protocol]) for protocol in range(2, 6))


def test_shard_rejects_hostile_records_and_holds_no_pickle(clean_shards: Path, shard_data: Path) -> None:
    rejects = [json.loads(line) for line in (clean_shards / "rejects.jsonl").read_text().splitlines()]
    assert [(r["index"], r["code"]) for r in rejects] == HOSTILE_REJECTS
    assert not (shard_data / "PWNED").exists()
    assert verify_shards(clean_shards) == []
    kinds: dict[str, int] = {}
    for path in sorted(p for p in clean_shards.rglob("*") if p.is_file()):
        data = path.read_bytes()
        assert not data.startswith(PICKLE_MAGIC), f"{path} looks like a pickle"
        if path.suffix == ".arrow":  # Arrow IPC file: magic at both ends, plain types, our metadata only
            assert data[:6] == b"ARROW1" and data[-6:] == b"ARROW1", path
            schema = ShardReader(path)._reader.schema
            assert set(schema.metadata) == {b"tile_codec"}
            assert not any("extension" in str(field.type) for field in schema), schema
        elif path.suffix == ".json":
            json.loads(data)
        elif path.suffix == ".jsonl":
            [json.loads(line) for line in data.splitlines()]
        elif path.name == "tokenizer.model":
            import sentencepiece

            sentencepiece.SentencePieceProcessor(model_proto=data)
        else:
            assert path.name == "lock" and data == b"", f"unexpected file {path}"
        kinds[path.suffix] = kinds.get(path.suffix, 0) + 1
    assert kinds[".arrow"] >= 2 and kinds[".json"] >= 3 and kinds[".jsonl"] == 1


def test_shard_takes_the_media_policy_flags(
    shard_data: Path, tiny_tokenizer: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "shards"
    assert run_shard(shard_data, out, tiny_tokenizer, "--allow-path", "..") == 0
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["index"], r["code"]) for r in rejects] == [(2, "image_too_large"), (4, "media_missing")]
    assert "--allow-path" in json.loads((out / "manifest.json").read_text())["command"]
    assert run_shard(shard_data, tmp_path / "x", tiny_tokenizer, "--allow-path", "../nope") == 2
    assert "--allow-path ../nope: not an existing folder" in capsys.readouterr().err


# ---------------------------------------------------------------- full disk during xc-prep shard


def _no_space(path: object = "") -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def inject_full_disk(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """The disk fills up at `where`: in the 2nd unit's shard, or writing a sidecar / the manifest."""
    if where == "shard":
        real_write = ShardWriter.write
        calls = iter(range(10**6))

        def write(self: ShardWriter, sample: Any) -> None:
            if next(calls) == 2:  # units 0 (records 0, 1) and 1 (all rejected) are done; unit 2 fails
                raise _no_space()
            real_write(self, sample)

        monkeypatch.setattr(ShardWriter, "write", write)
        return
    writer = storage_module  # every write of a local folder's files (schemas/storage.py)
    real_atomic = writer.write_atomic
    target = {"sidecar": "shard-00001.json", "manifest": "manifest.json"}[where]

    def write_atomic(path: Path, data: bytes) -> None:
        if path.name == target:  # a partial temp file is what a full disk leaves behind
            temp_path(path).write_bytes(data[: len(data) // 2])
            raise _no_space(temp_path(path))
        real_atomic(path, data)

    monkeypatch.setattr(writer, "write_atomic", write_atomic)


@pytest.mark.parametrize(
    ("where", "codec"), [("shard", "raw"), ("sidecar", "raw"), ("manifest", "raw"), ("shard", "jpeg")]
)
def test_full_disk_keeps_finished_work_and_the_rerun_completes_it(
    where: str, codec: str, shard_data: Path, tiny_tokenizer: Path, clean_shards: Path, tmp_path: Path
) -> None:
    out = tmp_path / "shards"
    codec_flags = ("--tile-codec", codec)
    with pytest.MonkeyPatch.context() as mp:
        inject_full_disk(mp, where)
        assert run_shard(shard_data, out, tiny_tokenizer, *codec_flags) == 1  # a clear error, not a traceback
    assert not (out / "manifest.json").exists(), "an incomplete folder must never look complete"
    # unit 0 finished before the disk filled up: its shard and sidecar are intact
    sidecar = json.loads((out / ".work/001-mixed/shard-00000.json").read_text())
    shard = out / sidecar["shard"]["file"]
    assert (
        shard.stat().st_size == sidecar["shard"]["bytes"] and file_sha256(shard) == sidecar["shard"]["sha256"]
    )
    assert verify_shards(out) != []  # and a reader refuses the folder: no manifest
    # space is back: the same command finishes the job, byte for byte as an uninterrupted run
    assert run_shard(shard_data, out, tiny_tokenizer, *codec_flags) == 0
    clean = clean_shards
    if codec != "raw":
        clean = tmp_path / "clean"
        assert run_shard(shard_data, clean, tiny_tokenizer, *codec_flags) == 0
    assert tree_bytes(out) == tree_bytes(clean)


def test_full_disk_is_a_clear_error_with_exit_1(
    shard_data: Path, tiny_tokenizer: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    out = tmp_path / "shards"
    inject_full_disk(monkeypatch, "shard")
    code = run_shard(shard_data, out, tiny_tokenizer)
    err = capsys.readouterr().err
    assert code == ExitCode.INVALID_DATA == 1
    assert f"xc-prep shard: error writing to {out}: [Errno 28] No space left on device" in err
    assert "free space or fix the folder and re-run the same command to resume" in err
