"""`xc-prep preview`: the golden lists from the upstream example, the human view, errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from PIL import Image

from pipeline import cli, preview
from pipeline.build import build_sample
from pipeline.preview import load_record, render_sample_text, sample_to_preview_json
from pipeline.tokenization import Tokenizer, build_tiny_tokenizer
from schemas.record import Record, Turn


def run_cli(argv: list[str]) -> int:
    """This module's subcommand alone, so the test does not depend on the other subcommand modules."""
    parser = argparse.ArgumentParser(prog="xc-prep")
    preview.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tiny.model")


def test_registered_in_xc_prep() -> None:
    assert {"preview", "tokenization"} <= set(cli.SUBCOMMAND_MODULES)


def test_preview_json_reproduces_golden(
    ixc_dir: Path, real_tokenizer_path: Path, monkeypatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(ixc_dir / "upstream-example")
    golden = [json.loads(line) for line in (ixc_dir / "golden/tokens/official_train_tokens.jsonl").open()]
    for row in golden:
        records = json.loads((Path("data") / row["file"]).read_text())
        index = next(i for i, r in enumerate(records) if r["id"] == row["id"])
        argv = [
            "preview",
            f"data/{row['file']}",
            "--record",
            str(index),
            "--tokenizer",
            str(real_tokenizer_path),
        ]
        assert run_cli([*argv, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert set(out) == {"input_ids", "labels", "images"}
        assert out["input_ids"] == row["input_ids"] and out["labels"] == row["labels"], row["file"]
        for image in out["images"]:
            start, end = image["span"]
            assert image["grid"] == [1, 1] and end - start == 841
            assert set(out["input_ids"][start:end]) == set(out["labels"][start:end]) == {-100}
        # The human view of the same record.
        assert run_cli(argv) == 0
        text = capsys.readouterr().out
        assert text.count("<image 1×1: 841 tokens>") == len(out["images"])
        assert "⟦" in text and "<|im_end|></s>⟧" in text


def test_media_resolve_against_json_folder(
    tiny_path: Path, tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "sub"
    folder.mkdir()
    Image.new("RGB", (800, 1200), (10, 200, 30)).save(folder / "pic.png")
    turns = [{"from": "human", "value": "What color?"}, {"from": "gpt", "value": "Green."}]
    (folder / "x.json").write_text(json.dumps([{"id": "a", "image": "pic.png", "conversations": turns}]))
    monkeypatch.chdir(tmp_path)  # pic.png is not under the cwd: it resolves against the JSON's folder
    assert load_record(Path("sub/x.json"), 0).media_paths == (Path("sub/pic.png"),)
    assert run_cli(["preview", "sub/x.json", "--tokenizer", str(tiny_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["images"] == [
        {"grid": [4, 3], "span": [0, 5301]}
    ]  # docs/IXC25.md#tokens-per-image: 800×1200 → 4×3


def test_render_sample_text_marks_trained_tokens(tiny_path: Path, tmp_path: Path) -> None:
    tokenizer = Tokenizer.from_path(tiny_path)
    record = Record(
        id=7, turns=(Turn("user", "Hi there"), Turn("assistant", "Hello.")), media=(), media_paths=()
    )
    sample = build_sample(record, tokenizer, source_name="s", file="f.json", index=0)
    text = render_sample_text(sample, tokenizer)
    assert text == ("<s><|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n⟦Hello.<|im_end|></s>⟧")
    assert sample_to_preview_json(sample)["images"] == []


def test_preview_errors(
    tiny_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    data = tmp_path / "d.json"
    data.write_text(
        json.dumps(
            [{"id": 0, "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}]
        )
    )
    assert run_cli(["preview", str(data), "--record", "0", "--tokenizer", str(tiny_path)]) == 0
    capsys.readouterr()
    assert run_cli(["preview", str(data), "--record", "3", "--tokenizer", str(tiny_path)]) == 1
    assert "out of range" in capsys.readouterr().err
    assert run_cli(["preview", str(data), "--tokenizer", str(tmp_path / "none.model")]) == 2
    monkeypatch.delenv(preview.TOKENIZER_ENV, raising=False)
    assert run_cli(["preview", str(data)]) == 2
    assert "--tokenizer is required" in capsys.readouterr().err
    images = tmp_path / "img.json"
    images.write_text(
        json.dumps(
            [
                {
                    "id": 1,
                    "image": "missing.png",
                    "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}],
                }
            ]
        )
    )
    assert run_cli(["preview", str(images), "--tokenizer", str(tiny_path)]) == 1
    assert "media_missing" in capsys.readouterr().err
