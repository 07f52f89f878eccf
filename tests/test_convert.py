"""`xc-prep convert`: LLaVA, ShareGPT, OpenAI-messages and Hugging Face data → the official format,
each round-tripped through validate → shard → preview; and validate's warning on `<image>`."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import pytest
import skimage.data
from PIL import Image

from pipeline.chat_formats import CONVERT_HINTS
from pipeline.cli import main as prep_main
from pipeline.convert import FILE_HINTS, k_for
from pipeline.tokenization import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model")


@pytest.fixture
def raw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp/raw/ with real photos in raw/imgs/; the current directory is tmp/."""
    monkeypatch.chdir(tmp_path)
    imgs = tmp_path / "raw" / "imgs"
    imgs.mkdir(parents=True)
    Image.fromarray(skimage.data.astronaut()).resize((300, 300)).save(imgs / "astronaut.jpg")
    Image.fromarray(skimage.data.coffee()).resize((240, 160)).save(imgs / "coffee.png")
    Image.fromarray(skimage.data.chelsea()).resize((200, 150)).save(imgs / "chelsea.jpg")
    return tmp_path / "raw"


def png_bytes(image: Any, size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).resize(size).save(buffer, format="PNG")
    return buffer.getvalue()


def qa(
    question: str, answer: str = "An answer.", user: str = "human", bot: str = "gpt"
) -> list[dict[str, str]]:
    return [{"from": user, "value": question}, {"from": bot, "value": answer}]


def write_json(path: Path, records: Any) -> Path:
    path.write_text(json.dumps(records))
    return path


def convert(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = prep_main(["convert", *argv])
    return code, capsys.readouterr().out


def converted(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text())


def round_trip(out: Path, tokenizer: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> None:
    """validate (no error, no warning) → shard (nothing rejected) → preview equals the stored sample."""
    data_txt = str(out / "data.txt")
    assert prep_main(["validate", data_txt, "--tokenizer", str(tokenizer), "--hd-num", "2", *extra]) == 0
    report = capsys.readouterr().out
    assert ", 0 errors, 0 warnings" in report.splitlines()[-1], report
    shards = out.parent / f"{out.name}-shards"
    argv = ["shard", data_txt, "--tokenizer", str(tokenizer), "--hd-num", "2", "--out", str(shards)]
    assert prep_main([*argv, "--workers", "1", *extra]) == 0
    capsys.readouterr()
    manifest = json.loads((shards / "manifest.json").read_text())
    assert all(s["rejected"] == 0 for s in manifest["sources"])
    sample = 0
    for line in (out / "data.txt").read_text().splitlines()[1:]:
        name = line.split()[0]
        for index in range(len(converted(out / name))):
            preview = ["preview", str(out / name), "--record", str(index), "--tokenizer", str(tokenizer)]
            assert prep_main([*preview, "--hd-num", "2", "--json", *extra]) == 0
            from_json = json.loads(capsys.readouterr().out)
            assert prep_main(["preview", "--shards", str(shards), "--sample", str(sample), "--json"]) == 0
            assert json.loads(capsys.readouterr().out) == from_json, (name, index)
            sample += 1


# ---------------------------------------------------------------- LLaVA


def llava_records() -> list[dict[str, Any]]:
    return [
        {"id": "coco-1", "image": "imgs/astronaut.jpg", "conversations": qa("<image>\nWho is this?")},
        {
            "id": "multi-turn",
            "image": "imgs/coffee.png",
            "conversations": [
                *qa("What is in the cup?\n<image>", "Coffee."),
                *qa("And the saucer?", "It is white."),
            ],
        },
        {
            "id": "two-images",
            "image": ["imgs/astronaut.jpg", "imgs/chelsea.jpg"],
            "conversations": qa("Image1: <image>; Image2: <image>. Which one is a cat?", "The second."),
        },
        {"id": "text-only", "conversations": qa("What is 2 + 2?", "4.")},
    ]


def test_llava_converts_by_the_official_placeholder_rules(
    raw: Path, tokenizer: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_json(raw / "llava_instruct.json", llava_records())
    code, out = convert([str(source), "--out", "converted"], capsys)
    assert code == 0, out
    records = converted(Path("converted/llava_instruct.json"))
    imgs = raw.resolve() / "imgs"
    assert records == [
        # one image opening the first question: no placeholder (the official single-image layout)
        {"id": "coco-1", "image": str(imgs / "astronaut.jpg"), "conversations": qa("Who is this?")},
        # one image elsewhere: its placeholder stays where it was
        {
            "id": "multi-turn",
            "image": str(imgs / "coffee.png"),
            "conversations": [
                *qa("What is in the cup?\n<ImageHere>", "Coffee."),
                *qa("And the saucer?", "It is white."),
            ],
        },
        {
            "id": "two-images",
            "image": [str(imgs / "astronaut.jpg"), str(imgs / "chelsea.jpg")],
            "conversations": qa(
                "Image1: <ImageHere>; Image2: <ImageHere>. Which one is a cat?", "The second."
            ),
        },
        {"id": "text-only", "conversations": qa("What is 2 + 2?", "4.")},
    ]
    assert Path("converted/data.txt").read_text().splitlines()[1:] == ["llava_instruct.json 0.004"]
    assert Path("converted/rejects.jsonl").read_text() == ""
    assert "4 records read, 4 converted, 0 rejected" in out and "next: xc-prep validate" in out
    round_trip(Path("converted"), tokenizer, capsys)


def test_llava_image_folder_outside_the_current_directory(
    raw: Path, tokenizer: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """LLaVA paths start at an image folder (--image-folder); convert names the --allow-path validate needs."""
    source = write_json(raw / "llava.json", llava_records()[:1])
    work = raw.parent / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code, out = convert([str(source), "--image-folder", str(raw), "--out", "converted"], capsys)
    assert code == 0, out
    assert f"next: xc-prep validate converted/data.txt --allow-path {raw.resolve()}" in out
    round_trip(Path("converted"), tokenizer, capsys, "--allow-path", str(raw))


# ---------------------------------------------------------------- ShareGPT


def test_sharegpt_variants_and_system_turns(
    raw: Path, tokenizer: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = [
        # LLaMA-Factory: messages with role/content, <image> in the text, an "images" list, a system turn
        {
            "messages": [
                {"role": "system", "content": "You answer in one sentence."},
                {"role": "user", "content": "<image>Describe the photo."},
                {"role": "assistant", "content": "A cat lies on a blanket."},
            ],
            "images": ["imgs/chelsea.jpg"],
        },
        # from/value with user/assistant roles and a record-level "system"
        {
            "id": 7,
            "system": "Be precise.",
            "conversations": qa("Compare <image> and <image>.", "A person, then a cup.", "user", "assistant"),
            "images": ["imgs/astronaut.jpg", "imgs/coffee.png"],
        },
        # two user turns in a row are one question (as chat APIs read them)
        {"id": "joined", "conversations": [*qa("Part one.")[:1], *qa("Part two.", "Both parts.")]},
        # a ShareGPT "system" turn in from/value form
        {"id": "sys", "conversations": [{"from": "system", "value": "Rules."}, *qa("Hi.", "Hello.")]},
    ]
    source = write_json(raw / "sharegpt.json", records)
    code, out = convert([str(source), "--out", "merged"], capsys)
    assert code == 0, out
    merged = converted(Path("merged/sharegpt.json"))
    assert [r["id"] for r in merged] == [0, 7, "joined", "sys"]
    assert merged[0]["conversations"][0]["value"] == "You answer in one sentence.\n\nDescribe the photo."
    assert merged[0]["image"] == str(raw.resolve() / "imgs" / "chelsea.jpg")
    assert merged[1]["conversations"][0]["value"] == "Be precise.\n\nCompare <ImageHere> and <ImageHere>."
    assert merged[2]["conversations"] == qa("Part one.\nPart two.", "Both parts.")
    assert merged[3]["conversations"][0]["value"] == "Rules.\n\nHi."
    assert "turns as from/value 3, role/content 1" in out
    assert "system turn merged into the first question in 3" in out
    assert "1 consecutive same-role turns joined" in out and "1 ids set to the record index" in out
    round_trip(Path("merged"), tokenizer, capsys)

    code, out = convert([str(source), "--out", "dropped", "--system", "drop"], capsys)
    assert code == 0 and "system turn dropped in 3" in out
    dropped = converted(Path("dropped/sharegpt.json"))
    assert dropped[0]["conversations"][0]["value"] == "Describe the photo."
    assert dropped[1]["conversations"][0]["value"] == "Compare <ImageHere> and <ImageHere>."


# ---------------------------------------------------------------- OpenAI messages


def test_openai_messages_with_image_parts(
    raw: Path, tokenizer: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photo = png_bytes(skimage.data.coffee(), (160, 120))
    data_url = "data:image/png;base64," + base64.b64encode(photo).decode()
    local = str(raw / "imgs" / "astronaut.jpg")
    lines = [
        {
            "messages": [
                {"role": "developer", "content": "Answer briefly."},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is shown?"},
                        {"type": "image_url", "image_url": {"url": data_url, "detail": "high"}},
                    ],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "A cup of coffee."}]},
            ]
        },
        {
            "id": "two",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "First:"},
                        {"type": "image_url", "image_url": "file://" + local},
                        {"type": "text", "text": " second:"},
                        {"type": "image", "image": "imgs/chelsea.jpg"},
                        {"type": "text", "text": " What differs?"},
                    ],
                },
                {"role": "assistant", "content": "A person and a cat."},
            ],
        },
        # TRL / Hugging Face layout: image parts that name nothing take the record's "images" in order
        {
            "id": "trl",
            "images": ["imgs/coffee.png"],
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Coffee on a saucer."}]},
            ],
        },
    ]
    source = raw / "chats.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    code, out = convert([str(source), "--out", "converted"], capsys)
    assert code == 0, out
    records = converted(Path("converted/chats.json"))
    written = records[0]["image"]
    assert written.startswith("images/") and written.endswith(".png")
    assert Path("converted", written).read_bytes() == photo  # the data: URL, written out as a file
    assert records[0]["conversations"] == qa(
        "Answer briefly.\n\nWhat is shown?<ImageHere>", "A cup of coffee."
    )
    assert records[1]["image"] == [local, str(raw.resolve() / "imgs" / "chelsea.jpg")]
    assert records[1]["conversations"][0]["value"] == "First:<ImageHere> second:<ImageHere> What differs?"
    assert records[2]["conversations"][0]["value"] == "Describe it."  # a single leading image: no placeholder
    round_trip(Path("converted"), tokenizer, capsys)


# ---------------------------------------------------------------- Hugging Face datasets


def test_hugging_face_saved_dataset_and_parquet(
    raw: Path, tokenizer: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Image(),
            "conversations": datasets.List(
                {"from": datasets.Value("string"), "value": datasets.Value("string")}
            ),
        }
    )
    photos = [png_bytes(skimage.data.astronaut(), (128, 128)), png_bytes(skimage.data.chelsea(), (200, 150))]
    rows = {
        "id": ["a", "b"],
        "image": [{"bytes": p, "path": None} for p in photos],
        "conversations": [
            qa("<image>\nWho is this?", "An astronaut."),
            qa("<image>\nWhat animal?", "A cat."),
        ],
    }
    train = datasets.Dataset.from_dict(rows, features=features)
    test = datasets.Dataset.from_dict({k: v[:1] for k, v in rows.items()}, features=features)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(raw / "llava_hf"))
    train.to_parquet(str(raw / "train-00000-of-00001.parquet"))

    code, out = convert([str(raw / "llava_hf"), "--out", "converted"], capsys)
    assert code == 1 and "hf_split" in out and "the splits test, train (no --split given)" in out
    code, out = convert(
        [
            str(raw / "llava_hf"),
            str(raw / "train-00000-of-00001.parquet"),
            "--split",
            "train",
            "--out",
            "converted",
        ],
        capsys,
    )
    assert code == 0, out
    from_folder = converted(Path("converted/llava_hf-train.json"))
    from_parquet = converted(Path("converted/train-00000-of-00001.json"))
    assert from_folder == from_parquet
    assert [r["conversations"][0]["value"] for r in from_folder] == ["Who is this?", "What animal?"]
    assert [Path("converted", r["image"]).read_bytes() for r in from_folder] == photos
    round_trip(Path("converted"), tokenizer, capsys)


def test_parquet_needs_no_datasets_library(raw: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An image column stored as the datasets Image struct {bytes, path}, written by pyarrow alone."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    photo = png_bytes(skimage.data.coffee(), (100, 80))
    table = pa.table(
        {
            "messages": [
                [
                    {"role": "user", "content": "<image>What is it?"},
                    {"role": "assistant", "content": "Coffee."},
                ]
            ],
            "images": [[{"bytes": photo, "path": "coffee.png"}]],
        }
    )
    pq.write_table(table, raw / "vqa.parquet")
    code, out = convert([str(raw / "vqa.parquet"), "--out", "converted"], capsys)
    assert code == 0, out
    (record,) = converted(Path("converted/vqa.json"))
    assert record["conversations"] == qa("What is it?", "Coffee.") and record["id"] == 0
    assert Path("converted", record["image"]).read_bytes() == photo


# ---------------------------------------------------------------- rejects and errors


def test_every_unconvertible_record_is_reported_with_why_and_fix(
    raw: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = [
        ("ok", {"id": "ok", "conversations": qa("Fine?", "Yes.")}),
        ("record_not_object", ["not", "a", "record"]),
        ("turns_missing", {"id": 1, "question": "?", "answer": "!"}),
        ("unknown_role", {"id": 2, "conversations": [{"from": "narrator", "value": "x"}, *qa("q")[1:]]}),
        (
            "tool_turn",
            {"id": 3, "messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}]},
        ),
        ("last_turn_not_assistant", {"id": 4, "conversations": qa("q")[:1]}),
        ("turn_order", {"id": 5, "conversations": qa("q")[::-1]}),
        (
            "media_count_mismatch",
            {"id": 6, "image": ["imgs/astronaut.jpg"], "conversations": qa("<image> <image>")},
        ),
        ("media_count_mismatch", {"id": 7, "conversations": qa("<image> where is it?")}),
        ("media_missing", {"id": 8, "image": "imgs/nope.jpg", "conversations": qa("<image>x")}),
        (
            "media_remote",
            {
                "id": 9,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}}],
                    },
                    {"role": "assistant", "content": "a"},
                ],
            },
        ),
        (
            "media_data_url",
            {
                "id": 10,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:image/png,abc"}}],
                    },
                    {"role": "assistant", "content": "a"},
                ],
            },
        ),
        (
            "image_bytes_unreadable",
            {
                "id": 11,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image_url",
                                "image_url": {
                                    "url": "data:image/png;base64," + base64.b64encode(b"<html>").decode()
                                },
                            }
                        ],
                    },
                    {"role": "assistant", "content": "a"},
                ],
            },
        ),
        (
            "media_not_in_question",
            {"id": 12, "image": "imgs/astronaut.jpg", "conversations": qa("q", "<image> here")},
        ),
        (
            "part_unsupported",
            {
                "id": 13,
                "messages": [
                    {"role": "user", "content": [{"type": "input_audio"}]},
                    {"role": "assistant", "content": "a"},
                ],
            },
        ),
        (
            "official_placeholder",
            {"id": 14, "image": "imgs/astronaut.jpg", "conversations": qa("<ImageHere> q")},
        ),
        ("turn_empty", {"id": 15, "conversations": qa("q", "   ")}),
        (
            "system_not_first",
            {"id": 16, "conversations": [*qa("q"), {"from": "system", "value": "s"}, *qa("q")]},
        ),
        (
            "video_extension",
            {"id": 17, "videos": ["imgs/astronaut.jpg"], "conversations": qa("<video> what?")},
        ),
    ]
    source = write_json(raw / "mixed.json", [record for _, record in bad])
    code, out = convert([str(source), "--out", "converted"], capsys)
    assert code == 0, out
    rejects = [json.loads(line) for line in Path("converted/rejects.jsonl").read_text().splitlines()]
    assert [(r["index"], r["code"]) for r in rejects] == [(i, code) for i, (code, _) in enumerate(bad) if i]
    for r in rejects:
        assert r["file"] == str(source) and r["message"] and r["fix"] == CONVERT_HINTS[r["code"]]
        expected_id = bad[r["index"]][1].get("id") if isinstance(bad[r["index"]][1], dict) else None
        assert r["id"] == expected_id
    assert len(converted(Path("converted/mixed.json"))) == 1
    assert f"{len(bad)} records read, 1 converted, {len(bad) - 1} rejected" in out
    assert "media_missing: 1 error" in out and "imgs/nope.jpg" in out  # grouped as validate groups them


def test_jsonl_syntax_error_is_a_rejected_line(raw: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = raw / "chats.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    source.write_text(f"{good}\n\n{{broken\n{good}\n")
    code, out = convert([str(source), "--out", "converted"], capsys)
    assert code == 0, out
    (reject,) = [json.loads(line) for line in Path("converted/rejects.jsonl").read_text().splitlines()]
    assert (reject["index"], reject["line"], reject["code"]) == (1, 3, "json_syntax")
    assert [r["id"] for r in converted(Path("converted/chats.json"))] == [0, 2]


def test_ids_are_kept_unique(raw: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_json(raw / "dups.json", [{"id": "x", "conversations": qa(f"q{i}")} for i in range(3)])
    code, out = convert([str(source), "--out", "converted"], capsys)
    assert code == 0 and "2 repeated ids renamed <id>#<index>" in out
    assert [r["id"] for r in converted(Path("converted/dups.json"))] == ["x", "x#1", "x#2"]


def test_unusable_inputs_write_no_data_txt(raw: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write_json(raw / "good.json", [{"id": 1, "conversations": qa("q")}])
    broken = raw / "broken.json"
    broken.write_text('[{"id": 1,]')
    all_bad = write_json(raw / "all_bad.json", [{"id": 1, "conversations": qa("q")[:1]}])
    code, out = convert([str(good), str(broken), str(all_bad), "--out", "converted"], capsys)
    assert code == 1
    assert "json_syntax" in out and "nothing_converted" in out and "FAILED: 2 input(s)" in out
    assert not Path("converted/data.txt").exists() and not Path("converted/good.json").exists()
    assert Path("converted/rejects.jsonl").read_text().count("\n") == 1
    assert {"json_syntax", "nothing_converted"} <= set(FILE_HINTS) | set(CONVERT_HINTS)


def test_usage_errors(raw: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_json(raw / "good.json", [{"id": 1, "conversations": qa("q")}])
    assert prep_main(["convert", str(source), "--out", str(raw)]) == 2  # would replace the input
    assert "would replace an input" in capsys.readouterr().err
    (raw.parent / "mine").mkdir()
    (raw.parent / "mine" / "data.txt").write_text("my.json 1\n")
    assert prep_main(["convert", str(source), "--out", "mine"]) == 2
    assert "did not write" in capsys.readouterr().err
    assert prep_main(["convert", "missing.json", "--out", "x"]) == 2
    assert prep_main(["convert", str(source), "--out", "x", "--system", "keep"]) == 2


def test_k_draws_every_record_once_per_epoch() -> None:
    for records in [*range(1, 5000), 29, 57, 1_234_567]:
        assert int(float(k_for(records)) * 1000) == records


# ---------------------------------------------------------------- validate's hint


def test_validate_warns_on_placeholders_of_other_formats(
    raw: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = [
        {"id": "llava", "image": "imgs/astronaut.jpg", "conversations": qa("<image>\nWho is this?")},
        {"id": "qwen", "conversations": qa("Look at <IMG> and <Video> please")},
        {"id": "answer", "conversations": qa("Which tag?", "HTML uses <img>.")},  # answers are not checked
    ]
    source = write_json(raw / "llava.json", records)
    (raw / "data.txt").write_text("llava.json 1\n")
    report_path = raw / "report.json"
    assert prep_main(["validate", str(raw / "data.txt"), "--json", str(report_path)]) == 0
    out = capsys.readouterr().out
    assert "placeholder_other_format: 2 warnings" in out and "xc-prep convert FILE --out DIR" in out
    warnings = json.loads(report_path.read_text())["warnings"]
    assert [(w["index"], w["code"]) for w in warnings] == [
        (0, "placeholder_other_format"),
        (1, "placeholder_other_format"),
    ]
    assert "<IMG>, <Video>" in warnings[1]["message"]

    assert prep_main(["convert", str(source), "--out", "converted"]) == 0
    assert prep_main(["validate", "converted/data.txt"]) == 0
    report = capsys.readouterr().out.splitlines()
    assert (
        report[-1].endswith("1 warning") and "placeholder_other_format: 1 warning" in report
    )  # the literal in record 1


# ---------------------------------------------------------------- fuzzing


def _fuzz_records():
    """Chat records in the three layouts, well formed and then maybe damaged in one of many ways,
    with every kind of text; and arbitrary values."""
    from hypothesis import strategies as st

    pieces = ["a", "b ", "\n", "é"] * 4 + ["<img>", "<s>", "\ud800", "<image>", ""]
    text = st.lists(st.sampled_from(pieces), min_size=1, max_size=5).map("".join)
    damages = [
        "none", "none", "none", "drop_last", "swap_roles", "tool", "system_turn", "late_system", "null_content",
        "extra_image", "missing_image", "image_in_answer", "audio_part", "both_keys", "int_turn",
    ]  # fmt: skip

    @st.composite
    def chat(draw):
        layout = draw(st.sampled_from(["llava", "sharegpt", "openai"]))
        pairs = draw(st.lists(st.tuples(text, text), min_size=1, max_size=3))
        num_images = draw(st.integers(0, 3))
        where = [draw(st.integers(0, len(pairs) - 1)) for _ in range(num_images)]
        turns = []
        for i, (question, answer) in enumerate(pairs):
            slots = where.count(i)
            if layout == "openai":
                parts = [{"type": "image"}] * slots + [{"type": "text", "text": question}]
                turns += [{"role": "user", "content": parts}, {"role": "assistant", "content": answer}]
            else:
                key_role, key_text = ("from", "value") if layout == "llava" else ("role", "content")
                turns += [
                    {
                        key_role: "human" if layout == "llava" else "user",
                        key_text: "<image>" * slots + question,
                    },
                    {key_role: "gpt" if layout == "llava" else "assistant", key_text: answer},
                ]
        record = {"id": draw(st.one_of(st.integers(), text, st.none())), "images": ["p"] * num_images}
        record["conversations" if layout == "llava" else "messages"] = turns
        damage = draw(st.sampled_from(damages))
        turn_key = "conversations" if layout == "llava" else "messages"
        if damage == "drop_last":
            turns.pop()
        elif damage == "swap_roles":
            turns[0], turns[1] = turns[1], turns[0]
        elif damage == "tool":
            turns.insert(1, {"role": "tool", "content": "x"})
        elif damage in ("system_turn", "late_system"):
            turns.insert(
                0 if damage == "system_turn" else len(turns), {"role": "system", "content": draw(text)}
            )
        elif damage == "null_content":
            turns[-1] = {"role": "assistant", "content": None}
        elif damage in ("extra_image", "missing_image"):
            record["images"] = ["p"] * (num_images + (1 if damage == "extra_image" else -1))
        elif damage == "image_in_answer":
            turns[1] = {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "q"}}]}
        elif damage == "audio_part":
            turns[0] = {"role": "user", "content": [{"type": "input_audio"}]}
        elif damage == "both_keys":
            record["messages" if turn_key == "conversations" else "conversations"] = []
        elif damage == "int_turn":
            turns.append(7)
        return record

    return st.one_of(chat(), chat(), chat(), st.integers(), st.text(max_size=3))


def test_every_record_converts_to_what_validate_accepts_or_is_rejected_with_a_known_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any JSON value: either a record validate finds no structural error in (only its content
    checks, special tokens and lone surrogates, remain validate's), or a DataError with a known code."""
    from hypothesis import HealthCheck, given, settings

    from pipeline.chat_formats import convert_record
    from pipeline.checks import ValidateOptions, check_records
    from pipeline.errors import DataError
    from schemas.record import Source

    monkeypatch.chdir(tmp_path)
    Image.fromarray(skimage.data.coffee()).resize((64, 48)).save(tmp_path / "photo.png")
    video = Path(__file__).resolve().parent.parent / "data" / "videos" / "rocket_pan.mp4"
    source = Source(path="fuzz.json", resolved=tmp_path / "fuzz.json", k=1.0, line=1)
    opts = ValidateOptions(decode_images=False, allow_any_path=True)

    def resolve(value: Any, kind: str) -> str:
        if not isinstance(value, str | type(None)) or (isinstance(value, str) and "\ud800" in value):
            raise DataError("media_bad_type", "fuzz", CONVERT_HINTS["media_bad_type"])
        return str(video) if kind == "video" else "photo.png"

    @settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(raw=_fuzz_records())
    def check(raw: Any) -> None:
        try:
            record = {"id": 0, **convert_record(raw, resolve).record}
        except DataError as e:
            assert e.code in CONVERT_HINTS, e.code
            return
        (result,) = check_records(source, [record], 0, opts)
        errors = {f.code for f in result.findings if f.severity == "error"}
        assert errors <= {"special_token", "invalid_unicode"}, (record, result.findings)

    check()
