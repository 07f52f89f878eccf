"""pipeline/checks.py, pipeline/validate.py and `xc-prep validate`: every check on real files made in tmp_path.

Images come from scikit-image's bundled photos, videos are written with PyAV; the broken files
are real too (a truncated JPEG, a zero-byte file, text named .jpg, an mp4 without its index).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import skimage.data
from conftest import SPECIAL_STRINGS
from PIL import Image

import pipeline.validate as validate_module
from pipeline.checks import HINTS, ValidateOptions, check_source
from pipeline.cli import main as cli_main
from pipeline.tokenization import build_tiny_tokenizer
from pipeline.validate import format_report, validate
from schemas.record import RECORD_JSON_SCHEMA, RECORD_SCHEMA_FILE, Record, Source, render_record_json_schema

REPO_ROOT = Path(__file__).resolve().parent.parent

"""Strings IXC2.5's tokenizer turns into control ids (the checks' set without a tokenizer)."""


def validate_main(argv: list[str]) -> int:
    """`xc-prep validate ...` in process (through pipeline.cli, as a user runs it)."""
    return cli_main(["validate", *argv])


# ---------------------------------------------------------------- media fixtures


def _save(path: Path, image: Image.Image, **kwargs: Any) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path.name


def write_video(path: Path, *, seconds: float = 2, fps: int = 10, size: tuple[int, int] = (96, 64)) -> None:
    """A real H.264/MPEG-4 clip: a window panning across the coffee photo."""
    path.parent.mkdir(parents=True, exist_ok=True)
    photo = Image.fromarray(skimage.data.coffee()).resize((size[0] * 2, size[1]))
    frames = int(seconds * fps)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            left = i * size[0] // frames
            crop = np.asarray(photo.crop((left, 0, left + size[0], size[1])))
            for packet in stream.encode(av.VideoFrame.from_ndarray(crop, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Good, odd-but-valid and broken media files, made once for the module.

    The folder lies outside the cwd and the test's JSON folders: tests name it with --allow-path.
    """
    d = tmp_path_factory.mktemp("media")
    cat = Image.fromarray(skimage.data.chelsea())  # 451×300 RGB
    _save(d / "cat.jpg", cat, quality=85)
    _save(d / "cat.png", cat)
    _save(d / "cmyk.jpg", cat.convert("CMYK"))
    _save(d / "rgba.png", Image.fromarray(skimage.data.logo()))  # RGBA
    _save(d / "palette.png", cat.convert("P"))
    _save(d / "gray.jpg", Image.fromarray(skimage.data.camera()))  # L
    _save(d / "gray16.png", Image.fromarray(skimage.data.camera().astype(np.uint16) * 257))  # I;16
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° when displayed
    _save(d / "exif_rotated.jpg", cat, exif=exif)
    good = (d / "cat.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (d / "zero.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("<html>403 Forbidden</html>\n")
    (d / "a_folder.jpg").mkdir()
    write_video(d / "clip.mp4")
    (d / "corrupt.mp4").write_bytes((d / "clip.mp4").read_bytes()[:3000])
    return d


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tiny.model")


# ---------------------------------------------------------------- dataset helpers


def qa(question: str = "What is shown here?", answer: str = "A cat.") -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def write_dataset(root: Path, files: dict[str, Any], lines: list[str] | None = None) -> Path:
    """JSON files (objects are dumped, str/bytes written as is) and a data.txt listing them."""
    root.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = root / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content)
        else:
            path.write_text(json.dumps(content, indent=1))
    data_txt = root / "data.txt"
    data_txt.write_text("\n".join(lines if lines is not None else [f"{n} 0.01" for n in files]) + "\n")
    return data_txt


def run_json(tmp_path: Path, data_txt: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    out = tmp_path / "report.json"
    code = validate_main([str(data_txt), "--json", str(out), "--workers", "1", *extra])
    return code, json.loads(out.read_text())


def found(report: dict[str, Any], kind: str = "errors") -> set[tuple[str, Any, Any, str]]:
    return {(f["file"], f["line"], f["index"], f["code"]) for f in report[kind]}


# ---------------------------------------------------------------- valid data


def test_odd_but_valid_media_and_mixed_records_pass(tmp_path: Path, media_dir: Path, capsys):
    names = [
        "cat.jpg",
        "cat.png",
        "cmyk.jpg",
        "rgba.png",
        "palette.png",
        "gray.jpg",
        "gray16.png",
        "exif_rotated.jpg",
    ]
    records: list[dict[str, Any]] = [
        {"id": i, "image": str(media_dir / n), "conversations": qa()} for i, n in enumerate(names)
    ]
    records += [
        {"id": "text", "conversations": qa("Hello?", "Hi! How can I help?")},
        {"id": "video", "image": str(media_dir / "clip.mp4"), "conversations": qa("What happens?", "A pan.")},
        {
            "id": "multi",
            "image": [str(media_dir / "cat.jpg"), str(media_dir / "gray.jpg"), str(media_dir / "clip.mp4")],
            "conversations": [
                {"from": "USER", "value": "Image1: <ImageHere>; Image2: <ImageHere>. Compare them."},
                {"from": "Assistant", "value": "A cat and a photographer."},
                {"from": "human", "value": "And this clip? <ImageHere>"},
                {"from": "bot", "value": "It pans across a coffee cup."},
            ],
        },
        {
            "id": "one-placeholder",
            "image": str(media_dir / "cat.jpg"),
            "conversations": qa("<ImageHere> Describe."),
        },
    ]
    data_txt = write_dataset(tmp_path, {"mixed.json": records})
    code, report = run_json(tmp_path, data_txt, "--allow-path", str(media_dir))
    assert (report["errors"], report["warnings"]) == ([], [])
    assert code == 0 and report["ok"] is True
    (summary,) = report["sources"]
    assert (summary["records"], summary["images"], summary["videos"]) == (len(records), 11, 2)
    out = capsys.readouterr().out
    assert out.strip().endswith(f"OK: 1 source, {len(records)} records, 0 errors, 0 warnings")
    assert "length check skipped" in out


def test_upstream_example_validates_clean(ixc_dir: Path, real_tokenizer_path: Path, tmp_path, monkeypatch):
    """The official example data, run from its folder as the official recipe is (paths against cwd)."""
    monkeypatch.chdir(ixc_dir / "upstream-example")
    code, report = run_json(tmp_path, Path("data.txt"), "--tokenizer", str(real_tokenizer_path))
    assert code == 0, report["errors"]
    assert report["warnings"] == []
    # Token counts equal the official code's (golden/tokens): 533+512, 1158+1354, 3901+4585.
    assert [(s["records"], s["images"], s["tokens_total"], s["tokens_max"]) for s in report["sources"]] == [
        (2, 0, 1045, 533),
        (2, 2, 2512, 1354),
        (2, 4, 8486, 4585),
    ]
    assert [s["trained_tokens_total"] for s in report["sources"]] == [1005, 789, 4396]


def test_upstream_example_records_match_the_json_schema(ixc_dir: Path):
    jsonschema = pytest.importorskip("jsonschema")
    files = sorted((ixc_dir / "upstream-example" / "data").glob("*.json"))
    files += sorted((REPO_ROOT / "data").glob("*.json"))
    assert len(files) == 7
    for path in files:
        for record in json.loads(path.read_text()):
            jsonschema.validate(record, RECORD_JSON_SCHEMA)


def test_exported_record_schema_is_current():
    assert RECORD_SCHEMA_FILE.read_text() == render_record_json_schema(), "run `python -m schemas.record`"


@pytest.mark.parametrize("cwd", [".", "data"])
def test_shipped_example_data_validates_clean(cwd: str, tiny_tokenizer: Path, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT / cwd)
    data_txt = Path("data.txt") if cwd == "data" else Path("data/data.txt")
    code, report = run_json(tmp_path, data_txt, "--tokenizer", str(tiny_tokenizer))
    assert code == 0, report["errors"]
    assert report["warnings"] == []
    kinds = {s["file"]: (s["records"] > 0, s["images"] > 0, s["videos"] > 0) for s in report["sources"]}
    assert kinds == {
        "text_only.json": (True, False, False),
        "single_image.json": (True, True, False),
        "multi_image.json": (True, True, False),
        "video.json": (True, False, True),
    }
    media = [p for p in (REPO_ROOT / "data").rglob("*") if p.suffix in {".jpg", ".mp4"}]
    assert sum(p.stat().st_size for p in media) < 1_500_000


# ---------------------------------------------------------------- a corrupted dataset, one pass


def _corrupted_dataset(root: Path, media: Path) -> tuple[Path, set, set]:
    """(data.txt, expected errors, expected warnings) as (file, line, index, code)."""
    img = str(media / "cat.jpg")
    records: list[Any] = [
        {"id": "ok", "conversations": qa()},  # 0
        "not an object",  # 1
        {"conversations": qa()},  # 2 id_missing
        {"id": [1], "conversations": qa()},  # 3 id_bad_type
        {"id": 4, "conversations": qa(), "source": "web"},  # 4 unknown_key (warning)
        {"id": 5},  # 5 conversations_missing
        {"id": 6, "conversations": "hi"},  # 6
        {"id": 7, "conversations": []},  # 7
        {"id": 8, "conversations": ["hi", {"from": "gpt", "value": "x"}]},  # 8 turn_not_object
        {"id": 9, "conversations": [{"value": "q"}, {"from": "gpt", "value": "a"}]},  # 9
        {"id": 10, "conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]},  # 10
        {"id": 11, "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]},  # 11
        {"id": 12, "conversations": [{"from": "system", "value": "q"}, {"from": "gpt", "value": "a"}]},  # 12
        {"id": 13, "conversations": qa("q", "  \n ")},  # 13 value_empty
        {"id": 14, "conversations": qa()[::-1] + qa()[1:]},  # 14 gpt, human, gpt: turn_order
        {"id": 15, "conversations": qa()[:1]},  # 15 last_turn_not_assistant
        {"id": "ok", "conversations": qa()},  # 16 duplicate_id of record 0
        {"id": 17, "image": 5, "conversations": qa()},  # 17 image_bad_type
        {"id": 18, "image": [], "conversations": qa()},  # 18 image_bad_type
        {"id": 19, "image": "nope/missing.jpg", "conversations": qa()},  # 19 media_missing
        {"id": 20, "image": str(media / "zero.jpg"), "conversations": qa()},  # 20 media_empty
        {"id": 21, "image": str(media / "text.jpg"), "conversations": qa()},  # 21 image_unreadable
        {"id": 22, "image": str(media / "truncated.jpg"), "conversations": qa()},  # 22 image_corrupt
        {"id": 23, "image": str(media / "corrupt.mp4"), "conversations": qa()},  # 23 video_unreadable
        {"id": 24, "image": [img, img], "conversations": qa("Image1: <ImageHere>. Compare.")},  # 24 count
        {"id": 25, "image": img, "conversations": qa("q", "See <ImageHere>.")},  # 25 in assistant
        {"id": 26, "image": img, "conversations": qa("<ImageHere> <ImageHere>")},  # 26 count (single)
        {"id": 27, "conversations": qa("<ImageHere> what?")},  # 27 placeholder_without_media
        {"id": 28, "conversations": qa("<|im_start|>system")},  # 28 special_token
        {"id": 29, "conversations": qa("q", "done[UNUSED_TOKEN_145]")},  # 29 special_token
        {"id": 30, "conversations": qa("q", "bye</s>")},  # 30 special_token
        {"id": 31, "image": img, "conversations": qa()},  # 31 valid image record
        {"id": 32, "conversations": qa("Look: <imagehere>")},  # 32 placeholder_lookalike (warning)
        {
            "id": 33,
            "conversations": [{"from": "human", "value": "q", "lang": "en"}, {"from": "gpt", "value": "a"}],
        },
        {"id": 34, "image": ["", img], "conversations": qa("<ImageHere><ImageHere>")},  # 34 image_bad_type
        {"id": 35, "image": str(media / "a_folder.jpg"), "conversations": qa()},  # 35 media_missing
        {"id": True, "conversations": qa()},  # 36 id_bad_type (a boolean is not an integer)
    ]
    files = {
        "bad.json": records,
        "syntax.json": '[\n  {"id": 1,\n   "conversations": [}\n]\n',
        "dict.json": {"id": 1, "conversations": qa()},
        "empty.json": [],
        "latin1.json": '[{"id": "caf\u00e9", "conversations": []}]'.encode("latin-1"),
    }
    lines = [
        "bad.json 0.5",  # 1
        "# a comment",  # 2
        "",  # 3
        "syntax.json 1",  # 4
        "dict.json 0.1",  # 5
        "empty.json 0.1",  # 6
        "missing.json 0.1",  # 7
        "bad.json",  # 8
        "bad.json abc",  # 9
        "bad.json -1",  # 10
        "bad.json 0.5 extra",  # 11
        "latin1.json 0.2",  # 12
        "bad.json nan",  # 13
    ]
    data_txt = write_dataset(root, files, lines)
    d = str(data_txt)
    record_errors = {
        1: ["record_not_object"],
        2: ["id_missing"],
        3: ["id_bad_type"],
        5: ["conversations_missing"],
        6: ["conversations_bad_type"],
        7: ["conversations_empty"],
        8: ["turn_not_object"],
        9: ["turn_missing_from"],
        10: ["turn_missing_value"],
        11: ["value_not_string"],
        12: ["unknown_role"],
        13: ["value_empty"],
        14: ["turn_order"],
        15: ["last_turn_not_assistant"],
        16: ["duplicate_id"],
        17: ["image_bad_type"],
        18: ["image_bad_type"],
        19: ["media_missing"],
        20: ["media_empty"],
        21: ["image_unreadable"],
        22: ["image_corrupt"],
        23: ["video_unreadable"],
        24: ["placeholder_count_mismatch"],
        25: ["placeholder_in_assistant"],
        26: ["placeholder_count_mismatch"],
        27: ["placeholder_without_media"],
        28: ["special_token"],
        29: ["special_token"],
        30: ["special_token"],
        34: ["image_bad_type"],
        35: ["media_missing"],
        36: ["id_bad_type"],
    }
    errors = {("bad.json", None, i, c) for i, codes in record_errors.items() for c in codes}
    errors |= {
        ("syntax.json", 3, None, "json_syntax"),
        ("dict.json", None, None, "json_not_a_list"),
        ("empty.json", None, None, "source_empty"),
        ("latin1.json", 1, None, "json_not_utf8"),
        (d, 7, None, "source_file_missing"),
        (d, 8, None, "source_missing_k"),
        (d, 9, None, "source_bad_k"),
        (d, 10, None, "source_nonpositive_k"),
        (d, 11, None, "source_extra_columns"),
        (d, 13, None, "source_bad_k"),
    }
    warnings = {
        ("bad.json", None, 4, "unknown_key"),
        ("bad.json", None, 32, "placeholder_lookalike"),
        ("bad.json", None, 33, "unknown_key"),
    }
    return data_txt, errors, warnings


def test_corrupted_dataset_is_flagged_in_one_pass(tmp_path: Path, media_dir: Path, capsys):
    data_txt, errors, warnings = _corrupted_dataset(tmp_path / "ds", media_dir)
    code, report = run_json(tmp_path, data_txt, "--allow-path", str(media_dir))
    assert code == 1 and report["ok"] is False
    assert found(report) == errors
    assert found(report, "warnings") == warnings
    assert len(report["errors"]) == len(errors), "one finding per problem"
    # ids ride along; the JSON holds exactly the contract's keys
    by_index = {f["index"]: f for f in report["errors"] if f["file"] == "bad.json"}
    assert by_index[16]["id"] == "ok" and by_index[3]["id"] == [1] and by_index[2]["id"] is None
    assert all(set(f) == {"file", "line", "index", "id", "code", "message", "hint"} for f in report["errors"])
    assert all(f["hint"] for f in report["errors"]), "every error carries its fix, as the human report does"
    syntax = next(f for f in report["errors"] if f["code"] == "json_syntax")
    assert "line 3, column 22" in syntax["message"]
    assert "not found in the current directory" in by_index[19]["message"]
    assert "<|im_start|>" in by_index[28]["message"]
    # the source table: parsed sources only, file-level failures counted
    assert [(s["file"], s["records"], s["errors"]) for s in report["sources"]] == [
        ("bad.json", 37, 32),
        ("syntax.json", 0, 1),
        ("dict.json", 0, 1),
        ("empty.json", 0, 1),
        ("latin1.json", 0, 1),
    ]
    out = capsys.readouterr().out
    assert "image_corrupt: 1 error\n  fix: " + HINTS["image_corrupt"] in out
    assert "bad.json record 16 (id 'ok'): id 'ok' is already used by record 0" in out
    assert f"{data_txt}:9: k 'abc' is not a number" in out
    assert (
        out.rstrip()
        .splitlines()[-1]
        .startswith(f"FAILED: 5 sources, 37 records, {len(errors)} errors, 3 warnings")
    )


def test_parallel_run_equals_serial_run(tmp_path: Path, media_dir: Path, monkeypatch):
    data_txt, _, _ = _corrupted_dataset(tmp_path / "ds", media_dir)
    opts = ValidateOptions(allow_path=(media_dir,))
    serial = validate(data_txt, opts, workers=1)
    monkeypatch.setattr(validate_module, "PARALLEL_MIN_COST", 0)  # force the pool on a small input
    monkeypatch.setattr(validate_module, "CHUNKS_PER_WORKER", 20)  # and many chunks per source
    parallel = validate(data_txt, opts, workers=2)
    assert parallel.to_json() == serial.to_json()
    assert format_report(parallel) == format_report(serial)


# ---------------------------------------------------------------- the reusable per-source API


def test_check_source_api(tmp_path: Path, media_dir: Path):
    records = [
        {"id": 1, "image": "cat.jpg", "conversations": qa()},
        {"id": 2, "conversations": qa("q", "")},
        {"id": 1, "conversations": qa()},
        {"id": "1", "conversations": qa()},  # a string id differs from the integer 1
    ]
    (tmp_path / "cat.jpg").write_bytes((media_dir / "cat.jpg").read_bytes())
    path = tmp_path / "a.json"
    path.write_text(json.dumps(records))
    check = check_source(Source(path="a.json", resolved=path, k=0.1, line=1), ValidateOptions())
    assert check.file_findings == []
    assert [(r.index, r.id, r.ok) for r in check.records] == [
        (0, 1, True),
        (1, 2, False),
        (2, 1, False),
        (3, "1", True),
    ]
    first = check.records[0].record
    assert isinstance(first, Record)
    assert first.media == ("cat.jpg",) and first.media_paths == (
        tmp_path / "cat.jpg",
    )  # JSON-folder fallback
    assert [t.role for t in first.turns] == ["user", "assistant"]
    assert [f.code for f in check.records[2].findings] == ["duplicate_id"]
    assert check.sha256 is not None and len(check.sha256) == 64


def test_special_strings_each_flagged(tmp_path: Path):
    records = [{"id": i, "conversations": qa(f"x {s} y")} for i, s in enumerate(SPECIAL_STRINGS)]
    check = check_source(_source(tmp_path, records), ValidateOptions())
    assert [[f.code for f in r.findings] for r in check.records] == [["special_token"]] * len(SPECIAL_STRINGS)


def test_turn_order_message_names_the_actual_role(tmp_path: Path):
    turns = [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}, {"from": "gpt", "value": "c"}]
    check = check_source(_source(tmp_path, [{"id": 0, "conversations": turns}]), ValidateOptions())
    (finding,) = check.records[0].findings
    assert finding.code == "turn_order"
    assert finding.message == "conversations[1] is a user turn where an assistant turn is expected"


def _source(tmp_path: Path, records: list[Any], name: str = "s.json") -> Source:
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return Source(path=name, resolved=path, k=0.1, line=1)


# ---------------------------------------------------------------- length check (tiny tokenizer)


def test_length_check(tmp_path: Path, media_dir: Path, tiny_tokenizer: Path):
    cat = str(media_dir / "cat.jpg")  # 451×300 → 2×2 grid at hd 18 (train) → 2061 tokens
    long_answer = "The poster shows two images. " * 300
    records = [
        {"id": "fits", "image": cat, "conversations": qa()},
        # the image alone exceeds max_length: nothing trainable survives the cut
        {"id": "no-answer-left", "image": cat, "conversations": qa()},
        # a text turn first, then an image that the cut would split
        {
            "id": "cut-image",
            "image": cat,
            "conversations": qa("Hi", "Hello there, how can I help? " * 5)
            + qa("<ImageHere> and this?", "A cat."),
        },
        # text-only and long: truncated inside the last answer, trained tokens remain
        {"id": "truncated", "conversations": qa("Describe it.", "Short.") + qa("More?", long_answer)},
    ]
    opts = ValidateOptions(tokenizer=tiny_tokenizer, max_length=2100, allow_path=(media_dir,))
    checks = check_source(_source(tmp_path, records), opts).records
    fits, no_answer, cut_image, truncated = checks
    assert fits.ok and fits.findings == [] and fits.tokens is not None and 2061 < fits.tokens <= 2100
    assert fits.trained_tokens and fits.trained_tokens > 0

    small = ValidateOptions(tokenizer=tiny_tokenizer, max_length=2000, allow_path=(media_dir,))
    (no_answer,) = check_source(_source(tmp_path, records[1:2]), small).records
    assert [f.code for f in no_answer.findings] == ["too_long_no_trained_tokens"] and not no_answer.ok
    assert "more than --max-length 2,000" in no_answer.findings[0].message

    assert [f.code for f in cut_image.findings] == ["too_long_cuts_image"] and not cut_image.ok
    assert [(f.code, f.severity) for f in truncated.findings] == [("truncated", "warning")]
    assert truncated.ok and truncated.tokens is not None and truncated.tokens > 2100
    assert truncated.trained_tokens is not None and truncated.trained_tokens > 0


def test_token_totals_in_report_and_table(tmp_path: Path, tiny_tokenizer: Path, capsys):
    data_txt = write_dataset(tmp_path, {"t.json": [{"id": i, "conversations": qa()} for i in range(3)]})
    code, report = run_json(tmp_path, data_txt, "--tokenizer", str(tiny_tokenizer))
    assert code == 0
    (s,) = report["sources"]
    assert s["tokens_total"] == 3 * s["tokens_max"] and 0 < s["trained_tokens_total"] < s["tokens_total"]
    assert "max tokens" in capsys.readouterr().out


# ---------------------------------------------------------------- exit codes and usage errors


def test_exit_codes(tmp_path: Path, tiny_tokenizer: Path, capsys):
    good = write_dataset(tmp_path / "good", {"a.json": [{"id": 1, "conversations": qa()}]})
    bad = write_dataset(tmp_path / "bad", {"a.json": [{"id": 1, "conversations": qa()[:1]}]})
    assert validate_main([str(good)]) == 0
    assert validate_main([str(bad)]) == 1
    assert validate_main([str(tmp_path / "nope" / "data.txt")]) == 2
    assert "file not found" in capsys.readouterr().err
    assert validate_main([str(tmp_path / "good")]) == 2  # a folder, not data.txt
    assert validate_main([str(good), "--hd-num", "0"]) == 2
    assert validate_main([str(good), "--max-length", "-1"]) == 2
    assert validate_main([str(good), "--workers", "0"]) == 2
    assert validate_main([str(good), "--tokenizer", str(tmp_path / "missing.model")]) == 2
    assert validate_main([str(good), "--tokenizer", str(good)]) == 2  # not a sentencepiece model
    assert validate_main([str(good), "--style", "sideways"]) == 2
    assert validate_main([]) == 2
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "tokenizer.model").write_bytes(tiny_tokenizer.read_bytes())
    assert validate_main([str(good), "--tokenizer", str(model_dir)]) == 0  # a folder holding one
    assert validate_main([str(good), "--tokenizer", str(tmp_path)]) == 2  # a folder without one
