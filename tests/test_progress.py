"""Progress lines for logs (pipeline/progress.py): what a line says, when lines come, and that
`xc-prep shard` and `validate` print them when stderr is not a terminal."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from pipeline import progress, validate
from pipeline.cli import main
from pipeline.progress import ProgressLines, format_duration
from pipeline.tokenization import build_tiny_tokenizer


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_line_every_few_seconds_with_done_total_rate_and_eta() -> None:
    clock, out = Clock(), io.StringIO()
    lines = ProgressLines("xc-prep shard", 1000, "samples", every_s=5, stream=out, clock=clock)
    for t in range(1, 11):  # 10 samples/s for 10 s, reported every second
        clock.now = float(t)
        lines.set(10 * t)
    assert out.getvalue().splitlines() == [
        "xc-prep shard: 50/1,000 samples (5.0%) | 10.0 samples/s | ETA 1m35s",
        "xc-prep shard: 100/1,000 samples (10.0%) | 10.0 samples/s | ETA 1m30s",
    ]
    clock.now = 100.0
    lines.set(1000)
    lines.close()
    assert (
        out.getvalue()
        .splitlines()[-1]
        .endswith("1,000/1,000 samples (100.0%) | 10.0 samples/s | done in 1m40s")
    )


def test_short_runs_print_nothing_and_durations_read_naturally() -> None:
    clock, out = Clock(), io.StringIO()
    lines = ProgressLines("x", 10, "records", every_s=5, stream=out, clock=clock)
    clock.now = 1.0
    lines.set(10)
    lines.close()
    assert out.getvalue() == ""
    assert [format_duration(s) for s in (9.4, 213, 3725)] == ["9s", "3m33s", "1h02m"]


def test_shard_and_validate_print_lines_when_stderr_is_a_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)  # every update prints
    monkeypatch.setattr(validate, "PROGRESS_MIN_COST", 0)
    records = [
        {"id": i, "conversations": [{"from": "human", "value": f"Q{i}?"}, {"from": "gpt", "value": "A."}]}
        for i in range(6)
    ]
    (tmp_path / "text.json").write_text(json.dumps(records))
    (tmp_path / "data.txt").write_text("text.json 1\n")
    tokenizer = build_tiny_tokenizer(tmp_path / "tiny.model")
    with contextlib.chdir(tmp_path):  # capsys's stderr is not a terminal
        assert main(["validate", "data.txt"]) == 0
        assert "xc-prep validate: 6/6 records (100.0%)" in capsys.readouterr().err
        argv = ["shard", "data.txt", "--tokenizer", str(tokenizer), "--out", "shards", "--workers", "1"]
        assert main([*argv, "--samples-per-shard", "2"]) == 0
    err = capsys.readouterr().err
    assert "xc-prep shard: 2/6 samples (33.3%)" in err and "samples/s | ETA" in err
    assert "xc-prep shard: 6/6 samples (100.0%)" in err and "done in" in err
