"""Tokenizer: golden ids with the real InternLM2 model, HF-slow whitespace rules, the tiny tokenizer."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pytest

from pipeline import tokenization
from pipeline.tokenization import Tokenizer, build_tiny_tokenizer


@pytest.fixture(scope="module")
def real_tokenizer(real_tokenizer_path: Path) -> Tokenizer:
    return Tokenizer.from_path(real_tokenizer_path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_path(build_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tiny.model"))


def run_cli(argv: list[str]) -> int:
    """This module's subcommand alone, so the test does not depend on the other subcommand modules."""
    parser = argparse.ArgumentParser(prog="xc-prep")
    tokenization.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


def test_tokenizer_facts(real_tokenizer: Tokenizer, ixc_dir: Path) -> None:
    facts = json.loads((ixc_dir / "golden/tokens/tokenizer_facts.json").read_text())
    for text, ids in facts.items():
        assert real_tokenizer.encode(text) == ids, repr(text)


def test_real_special_ids(real_tokenizer: Tokenizer, real_tokenizer_path: Path) -> None:
    t = real_tokenizer
    assert (t.vocab_size, t.bos_id, t.eos_id) == (92544, 1, 2)
    assert (t.end_of_turn_id, t.start_of_turn_id, t.newline_id) == (92542, 92543, 364)
    assert t.sha256 == hashlib.sha256(real_tokenizer_path.read_bytes()).hexdigest()
    # A model folder works as well as the file.
    assert Tokenizer.from_path(real_tokenizer_path.parent).sha256 == t.sha256


def test_special_strings_are_ids_with_hf_whitespace_rules(real_tokenizer: Tokenizer) -> None:
    t = real_tokenizer
    assert t.encode("</s>") == [2] and t.encode("<s>") == [1]
    # Plain-string specials eat the whitespace on both sides, the turn markers do not.
    assert t.encode("A \n </s> \n B") == t.encode("A") + [2] + t.encode("B")
    assert t.encode("A\n<s>\nB") == t.encode("A") + [1] + t.encode("B")
    assert t.encode("A \n[UNUSED_TOKEN_146] B") == t.encode("A \n") + [92543] + t.encode(" B")
    # No merge across a special token, no BOS added.
    assert t.encode("A[UNUSED_TOKEN_145]B") == t.encode("A") + [92542] + t.encode("B")
    assert t.encode("") == []


ROUND_TRIP_TEXT = "[UNUSED_TOKEN_146]user\nHéllo “world” 日本 42[UNUSED_TOKEN_145]\n</s>"


def test_decode_round_trip_tiny(tiny: Tokenizer) -> None:
    assert tiny.decode(tiny.encode(ROUND_TRIP_TEXT)) == ROUND_TRIP_TEXT.replace("\n</s>", "</s>")


def test_decode_round_trip_real(real_tokenizer: Tokenizer) -> None:
    t = real_tokenizer
    assert t.decode(t.encode(ROUND_TRIP_TEXT)) == ROUND_TRIP_TEXT.replace("\n</s>", "</s>")


def test_from_path_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_path(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="has no tokenizer.model"):
        Tokenizer.from_path(tmp_path)
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        Tokenizer.from_path(tmp_path)


def test_tiny_tokenizer_is_deterministic(tmp_path: Path) -> None:
    a = build_tiny_tokenizer(tmp_path / "a.model")
    b = build_tiny_tokenizer(tmp_path / "b.model")
    assert a.read_bytes() == b.read_bytes()


def test_tiny_tokenizer_pieces(tiny: Tokenizer) -> None:
    assert tiny.vocab_size == tokenization.TINY_VOCAB_SIZE
    assert [tiny.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert (tiny.bos_id, tiny.eos_id) == (1, 2)
    ids = tiny.encode("Q[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\nA[UNUSED_TOKEN_145]\n</s>")
    assert ids.count(tiny.end_of_turn_id) == 2 and ids.count(tiny.start_of_turn_id) == 1
    assert ids[-2:] == [tiny.end_of_turn_id, tiny.eos_id]
    assert tiny.encode("\n") == [tiny.newline_id]
    # Byte fallback: no character maps to <unk>.
    assert 0 not in tiny.encode("ünïcödé ✓ 中文")


def test_tiny_tokenizer_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sub" / "t.model"
    assert run_cli(["tiny-tokenizer", "--out", str(out), "--vocab-size", "600"]) == 0
    assert Tokenizer.from_path(out).vocab_size == 600
    assert "wrote" in capsys.readouterr().out
    assert run_cli(["tiny-tokenizer", "--out", str(out), "--vocab-size", "100"]) == 2
    assert "--vocab-size" in capsys.readouterr().err
