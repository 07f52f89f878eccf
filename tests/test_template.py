"""Chat template, BOS rules, label mask and truncation: golden vectors and the tiny tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.build import build_sample
from pipeline.errors import DataError
from pipeline.preview import load_record
from pipeline.template import count_tokens, mask_human_targets, render_conversation
from pipeline.tokenization import Tokenizer, build_tiny_tokenizer
from schemas.record import Turn
from schemas.sample import IGNORE_INDEX, IMAGE_TOKEN_ID, image_token_count

USER, ASSISTANT = "user", "assistant"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_path(build_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tiny.model"))


def conv(*values: str) -> list[Turn]:
    """Alternating user/assistant turns."""
    return [Turn(USER if i % 2 == 0 else ASSISTANT, v) for i, v in enumerate(values)]


def golden_rows(ixc_dir: Path) -> list[dict]:
    lines = (ixc_dir / "golden/tokens/official_train_tokens.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_official_tokens_equal_golden(ixc_dir: Path, real_tokenizer_path: Path, monkeypatch) -> None:
    tokenizer = Tokenizer.from_path(real_tokenizer_path)
    monkeypatch.chdir(ixc_dir / "upstream-example")  # upstream resolves media against the cwd
    rows = golden_rows(ixc_dir)
    assert len(rows) == 6
    for row in rows:
        json_file = Path("data") / row["file"]
        records = json.loads(json_file.read_text())
        index = next(i for i, r in enumerate(records) if r["id"] == row["id"])
        sample = build_sample(
            load_record(json_file, index), tokenizer, source_name="golden", file=str(json_file), index=index
        )
        where = f"{row['file']} id {row['id']}"
        assert sample.input_ids.tolist() == row["input_ids"], where
        assert sample.labels.tolist() == row["labels"], where
        assert sample.layout == "official"


def test_answer_header_is_six_tokens_with_the_real_tokenizer(real_tokenizer_path: Path) -> None:
    tokenizer = Tokenizer.from_path(real_tokenizer_path)
    assert tokenizer.encode("[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n") == [
        92542, 364, 92543, 525, 11353, 364
    ]  # fmt: skip


def test_text_only_layout_and_labels(tiny: Tokenizer) -> None:
    turns = conv("  Q1  ", "A1", "Q2", " A2\n")
    r = render_conversation(turns, [], tiny)
    ids, labels = r.input_ids.tolist(), r.labels.tolist()
    expected_text = (
        "[UNUSED_TOKEN_146]user\nQ1[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\nA1[UNUSED_TOKEN_145]\n"
        "[UNUSED_TOKEN_146]user\nQ2[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\nA2[UNUSED_TOKEN_145]\n</s>"
    )
    assert ids == [tiny.bos_id] + tiny.encode(expected_text)
    assert ids[-2:] == [tiny.end_of_turn_id, tiny.eos_id]  # the final \n is stripped before </s>
    trained = tiny.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])
    assert trained == "A1[UNUSED_TOKEN_145]A2[UNUSED_TOKEN_145]</s>"
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels, strict=True))
    assert not r.truncated and r.spans == [] and r.full_length == len(ids)
    assert count_tokens(turns, [], tiny) == len(ids)


def test_single_image_goes_first_and_bos_follows_it(tiny: Tokenizer) -> None:
    turns = conv("Describe it.", "A cat.")
    n = image_token_count(2, 3)
    official = render_conversation(turns, [(2, 3)], tiny)
    assert official.spans == [(0, n)] and official.grids == [(2, 3)]
    assert official.input_ids[n] == tiny.bos_id  # official training: <s> AFTER the image
    assert np.all(official.input_ids[:n] == IMAGE_TOKEN_ID) and np.all(official.labels[:n] == IGNORE_INDEX)
    inference = render_conversation(turns, [(2, 3)], tiny, layout="inference")
    assert inference.input_ids[0] == tiny.bos_id and inference.spans == [(1, n + 1)]
    assert (inference.input_ids == tiny.bos_id).sum() == 1
    # Same tokens, only the BOS moved; same trained tokens.
    assert sorted(inference.input_ids.tolist()) == sorted(official.input_ids.tolist())
    assert inference.num_trained == official.num_trained
    assert count_tokens(turns, [(2, 3)], tiny) == official.num_tokens


def test_inference_layout_text_only_equals_official(tiny: Tokenizer) -> None:
    turns = conv("Q", "A")
    a = render_conversation(turns, [], tiny)
    b = render_conversation(turns, [], tiny, layout="inference")
    assert a.input_ids.tolist() == b.input_ids.tolist() and a.labels.tolist() == b.labels.tolist()


def test_placeholders_place_images_in_order(tiny: Tokenizer) -> None:
    turns = conv("Image1: <ImageHere>; Image2: <ImageHere>. Compare.", "Different.")
    r = render_conversation(turns, [(1, 1), (1, 2)], tiny)
    n1, n2 = image_token_count(1, 1), image_token_count(1, 2)
    head = [tiny.bos_id] + tiny.encode("[UNUSED_TOKEN_146]user\nImage1: ")
    middle = tiny.encode("; Image2: ")
    assert r.spans == [
        (len(head), len(head) + n1),
        (len(head) + n1 + len(middle), len(head) + n1 + len(middle) + n2),
    ]
    assert r.input_ids[: len(head)].tolist() == head
    assert (r.input_ids == tiny.bos_id).sum() == 1


def test_placeholder_count_must_match(tiny: Tokenizer) -> None:
    with pytest.raises(DataError) as e:
        render_conversation(conv("<ImageHere> and <ImageHere>", "A"), [(1, 1)], tiny)
    assert e.value.code == "image_count_mismatch"
    with pytest.raises(DataError):
        render_conversation(conv("no placeholder", "A"), [(1, 1), (1, 1)], tiny)
    with pytest.raises(DataError):
        render_conversation(conv("<ImageHere>", "A"), [], tiny)


def test_truncation_in_text_keeps_max_length(tiny: Tokenizer) -> None:
    turns = conv("Q", "a long answer " * 50)
    full = render_conversation(turns, [], tiny)
    r = render_conversation(turns, [], tiny, max_length=40)
    assert r.truncated and r.num_tokens == 40 and r.full_length == full.num_tokens
    assert r.labels.tolist() == full.labels[:40].tolist()  # labels from the whole sample, then cut
    assert r.num_trained > 0


def test_truncation_never_cuts_an_image(tiny: Tokenizer) -> None:
    turns = conv("first <ImageHere>", "answer one", "then <ImageHere>", "answer two")
    full = render_conversation(turns, [(1, 1), (1, 1)], tiny)
    (_, end1), (start2, _) = full.spans
    r = render_conversation(turns, [(1, 1), (1, 1)], tiny, max_length=start2 + 100)  # inside image 2
    assert r.truncated and r.num_tokens == start2
    assert r.spans == full.spans[:1] and r.grids == [(1, 1)] and r.dropped_images == 1
    # No answer token left before the cut: rejected with a reason.
    with pytest.raises(DataError) as e:
        render_conversation(turns, [(1, 1), (1, 1)], tiny, max_length=end1 - 3)
    assert e.value.code == "too_long_no_trained_tokens"
    assert "max_length" in e.value.message and e.value.hint


def test_answer_survives_truncation_after_images(tiny: Tokenizer) -> None:
    turns = conv("What is it?", "It is a cat, sitting on a mat. " * 5)
    full = render_conversation(turns, [(2, 2)], tiny)
    r = render_conversation(turns, [(2, 2)], tiny, max_length=full.num_tokens - 5)
    assert r.truncated and r.dropped_images == 0 and r.num_trained == full.num_trained - 5


def test_mask_human_targets_truncated_text_quirk() -> None:
    # Upstream's text-only path masks after truncation; without </s> and ending in a user turn,
    # everything after the last answer's 92542 but the next token is ignored.
    eot, eos, hdr = 9, 2, 3
    ids = np.array([1, 5, eot, 7, 8, 20, 21, eot, 3, 5, 6], dtype=np.int32)  # answer 20 21, then a user turn
    labels = mask_human_targets(ids, end_of_turn_id=eot, eos_id=eos, answer_header_len=hdr)
    assert labels.tolist() == [-100, -100, -100, -100, -100, 20, 21, eot, 3, -100, -100]


def test_unknown_layout(tiny: Tokenizer) -> None:
    with pytest.raises(ValueError, match="layout"):
        render_conversation(conv("Q", "A"), [], tiny, layout="chat")  # type: ignore[arg-type]


def test_no_assistant_turn_is_rejected(tiny: Tokenizer) -> None:
    with pytest.raises(DataError) as e:
        render_conversation(conv("only a question"), [], tiny)
    assert e.value.code == "no_trained_tokens"
