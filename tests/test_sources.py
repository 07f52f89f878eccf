"""pipeline/sources.py: data.txt lines → Sources plus findings (codes, lines, path resolution)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.sources import DataTxtError, parse_data_txt


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _codes(findings) -> list[tuple[int, str, str]]:
    return [(f.line, f.code, f.severity) for f in findings]


def test_valid_lines_comments_and_blank_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    _write(tmp_path / "data" / "a.json", "[]")
    _write(tmp_path / "data" / "b.json", "[]")
    data_txt = _write(
        tmp_path / "data" / "data.txt",
        "# my sources\n\ndata/a.json 0.5\n   \n  b.json\t2  \n",
    )
    monkeypatch.chdir(tmp_path)
    sources, findings = parse_data_txt(Path("data/data.txt"))
    assert findings == []
    assert [(s.path, s.k, s.line, s.samples_per_epoch) for s in sources] == [
        ("data/a.json", 0.5, 3, 500),
        ("b.json", 2.0, 5, 2000),
    ]
    # data/a.json resolves against the current directory, b.json against data.txt's folder
    assert sources[0].resolved == Path("data/a.json")
    assert sources[1].resolved == data_txt.parent.relative_to(tmp_path) / "b.json"
    assert all(s.resolved.is_file() for s in sources)


def test_current_directory_wins_over_data_txt_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    _write(tmp_path / "x.json", "[1]")
    _write(tmp_path / "sub" / "x.json", "[2]")
    _write(tmp_path / "sub" / "data.txt", "x.json 1\n")
    monkeypatch.chdir(tmp_path)
    (source,), _ = parse_data_txt(Path("sub/data.txt"))
    assert source.resolved.read_text() == "[1]"


def test_every_bad_line_is_reported_with_its_line(tmp_path: Path):
    _write(tmp_path / "ok.json", "[]")
    _write(tmp_path / "with space.json", "[]")
    (tmp_path / "folder.json").mkdir()
    data_txt = _write(
        tmp_path / "data.txt",
        "\n".join(
            [
                "ok.json",  # 1 missing k
                "ok.json abc",  # 2 non-numeric
                "ok.json nan",  # 3 non-finite
                "ok.json inf",  # 4 non-finite
                "ok.json 0",  # 5 zero
                "ok.json -0.5",  # 6 negative
                "ok.json 0.5 extra",  # 7 extra column
                "with space.json 0.5",  # 8 a path with a space: extra column, with a hint
                "nope.json 0.5",  # 9 missing file
                "folder.json 0.5",  # 10 a folder
                "ok.json 0.0001",  # 11 valid but 0 samples per epoch (warning)
                "ok.json 1",  # 12 listed twice (warning)
                "# ok.json 1",  # 13 comment
            ]
        )
        + "\n",
    )
    sources, findings = parse_data_txt(data_txt)
    assert _codes(findings) == [
        (1, "source_missing_k", "error"),
        (2, "source_bad_k", "error"),
        (3, "source_bad_k", "error"),
        (4, "source_bad_k", "error"),
        (5, "source_nonpositive_k", "error"),
        (6, "source_nonpositive_k", "error"),
        (7, "source_extra_columns", "error"),
        (8, "source_extra_columns", "error"),
        (9, "source_file_missing", "error"),
        (10, "source_file_missing", "error"),
        (11, "source_zero_samples", "warning"),
        (12, "source_duplicate", "warning"),
    ]
    assert [s.line for s in sources] == [11, 12]
    by_line = {f.line: f for f in findings}
    assert all(f.file == str(data_txt) and f.index is None and f.id is None for f in findings)
    assert "'abc' is not a number" in by_line[2].message and "e.g." in by_line[2].message
    assert "paths with spaces" in by_line[8].hint
    assert "nope.json" in by_line[9].message
    assert "line 11" in by_line[12].message
    assert all(f.hint for f in findings)


def test_empty_data_txt_is_an_error(tmp_path: Path):
    (_, findings) = parse_data_txt(_write(tmp_path / "data.txt", "# nothing yet\n\n"))
    assert _codes(findings) == [(1, "data_txt_empty", "error")]


def test_missing_data_txt_raises(tmp_path: Path):
    with pytest.raises(DataTxtError) as info:
        parse_data_txt(tmp_path / "data.txt")
    assert info.value.code == "data_txt_missing"
    with pytest.raises(DataTxtError):
        parse_data_txt(tmp_path)  # a folder
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9.json 1\n")
    with pytest.raises(DataTxtError) as info:
        parse_data_txt(tmp_path / "latin.txt")
    assert info.value.code == "data_txt_unreadable"
