"""`xc-chat`: the official chat() prompt (docs/IXC25.md#chat-inference), rebuilt here from the
spec's text rules, and answers equal to the generation loop's on the same prompt."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from PIL import Image

from chat.cli import main as xc_chat
from chat.prompt import META_INSTRUCTION, Media, build_prompt, load_media
from chat.session import load_chat_model
from pipeline.tiling import hd_transform, to_tiles
from pipeline.tokenization import Tokenizer
from trainer.generate import generate

skimage_data = pytest.importorskip("skimage.data")

REPO_ROOT = Path(__file__).resolve().parent.parent
MARKERS = {"[UNUSED_TOKEN_145]": 92542, "[UNUSED_TOKEN_146]": 92543}
IMAGE = -100


# --------------------------------------------------------------------------- the spec, independently


def spec_grid(width: int, height: int, hd_num: int) -> tuple[int, int]:
    """docs/IXC25.md#hd-transform, inference: scale capped at ceil(w / 560), padding below."""
    landscape = width >= height
    w, h = (width, height) if landscape else (height, width)
    ratio = w / h
    scale = max(s for s in range(1, hd_num + 1) if s * math.ceil(s / ratio) <= hd_num)
    scale = min(math.ceil(w / 560), scale)
    new_w = scale * 560
    rows, cols = math.ceil(int(new_w / ratio) / 560), scale
    return (rows, cols) if landscape else (cols, rows)


def spec_image_tokens(rows: int, cols: int) -> int:
    return (rows * cols + 1) * 400 + 1 + (rows + 1) * 20


def spec_text(query: str, history: list[tuple[str, str]] = (), meta: str = "") -> str:
    text = f"[UNUSED_TOKEN_146]system\n{meta}[UNUSED_TOKEN_145]\n" if meta else ""
    for q, a in history:
        text += f"[UNUSED_TOKEN_146]user\n{q}[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n{a}[UNUSED_TOKEN_145]\n"
    return text + f"[UNUSED_TOKEN_146]user\n{query}[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n"


def spec_ids(sp: spm.SentencePieceProcessor, text: str, grids: list[tuple[int, int]]) -> list[int]:
    """One image without placeholder goes first; the text is cut at <ImageHere>; `<s>` starts the first
    part (even an empty one), later parts have none; each image's tokens follow its part."""
    if len(grids) == 1 and "<ImageHere>" not in text:
        text = "<ImageHere>" + text
    parts = text.split("<ImageHere>")
    assert len(parts) == len(grids) + 1
    ids = [1]
    for k, part in enumerate(parts):
        for chunk in re.split(r"(\[UNUSED_TOKEN_14[56]\])", part):
            ids += [MARKERS[chunk]] if chunk in MARKERS else sp.encode(chunk) if chunk else []
        if k < len(grids):
            ids += [IMAGE] * spec_image_tokens(*grids[k])
    return ids


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("photos")
    paths = {}
    for name in ("coffee", "chelsea", "astronaut"):
        paths[name] = root / f"{name}.png"
        Image.fromarray(getattr(skimage_data, name)()).save(paths[name])
    return paths


def fake_media(grids: list[tuple[int, int]]) -> list[Media]:
    return [
        Media(Path(f"{k}.png"), g, np.zeros((g[0] * g[1], 560, 560, 3), np.uint8))
        for k, g in enumerate(grids)
    ]


# --------------------------------------------------------------------------- the prompt


def test_meta_instruction_is_the_official_one(ixc_dir: Path) -> None:
    readme = (ixc_dir / "golden" / "README.md").read_text()
    official = json.loads(re.search(r"```json\n(.*?)\n```", readme, re.S).group(1))
    assert META_INSTRUCTION == official


def test_prompt_ids_and_image_spans_follow_the_spec(
    real_tokenizer_path: Path, photos: dict[str, Path]
) -> None:
    tokenizer = Tokenizer.from_path(real_tokenizer_path)
    sp = spm.SentencePieceProcessor(model_file=str(real_tokenizer_path))
    one = load_media([photos["coffee"]])
    two = load_media([photos["coffee"], photos["astronaut"]])
    w, h = Image.open(photos["coffee"]).size
    assert [m.grid for m in one] == [spec_grid(w, h, 24)] == [(2, 2)]  # one image: hd 24
    assert [m.grid for m in two] == [spec_grid(w, h, 6), spec_grid(512, 512, 6)]  # several: hd 6
    history = [("What is shown?", " A cup of coffee.  "), ("Describe the cup.", "White, on a saucer.")]
    pair = "Image1: <ImageHere>; Image2: <ImageHere>. What differs?"
    cases = [
        ("text only", "Hello, who are you?", [], [], ""),
        ("one image, no placeholder", "What is in the cup? ", one, [], ""),
        ("two images with placeholders", pair, two, [], ""),
        ("one image with history", "And the saucer?", one, history, ""),
        ("placeholders in the history", "Which is warmer?", two, [(pair, "The first.")], ""),
        ("one image with the meta instruction", "Hi", one, [], META_INSTRUCTION),
        ("text only with the meta instruction", "Hi", [], history, META_INSTRUCTION),
    ]
    for name, query, media, hist, meta in cases:
        prompt = build_prompt(tokenizer, query, media, hist, system=meta or None)
        grids = [m.grid for m in media]
        expected = spec_ids(sp, spec_text(query, hist, meta), grids)
        assert prompt.input_ids.tolist() == expected, name
        starts = [i for i, t in enumerate(expected) if t == IMAGE and (i == 0 or expected[i - 1] != IMAGE)]
        spans = [(s, s + spec_image_tokens(*g)) for s, g in zip(starts, grids, strict=True)]
        assert prompt.spans == spans, name
        assert prompt.tiles.shape[0] == sum(r * c for r, c in grids)
    # One image without placeholder sits right after <s>, before the system turn.
    meta_prompt = build_prompt(tokenizer, "Hi", one, system=META_INSTRUCTION)
    assert meta_prompt.spans[0][0] == 1 and meta_prompt.input_ids[meta_prompt.spans[0][1]] == 92543
    shown = meta_prompt.display_text(tokenizer)
    assert shown.startswith("<s><image 2×2: 2061 tokens><|im_start|>system\nYou are an AI assistant")
    assert shown.endswith("<|im_end|>\n<|im_start|>assistant\n") and "UNUSED_TOKEN" not in shown


def test_tiles_are_the_inference_hd_transform_of_the_photo(photos: dict[str, Path]) -> None:
    (media,) = load_media([photos["coffee"]])
    expected = to_tiles(hd_transform(Image.open(photos["coffee"]).convert("RGB"), 24, "infer"))
    assert np.array_equal(media.tiles, expected)
    # Inference pads at the bottom: the last rows of the canvas are white.
    assert (media.tiles[-1, -100:] == 255).all()


def test_placeholders_must_pair_up_with_images(tmp_path: Path, photos: dict[str, Path], capsys) -> None:
    argv = ["--model", "tiny", "--image", str(photos["coffee"]), "--image", str(photos["chelsea"])]
    assert xc_chat([*argv, "--prompt", "Compare them."]) == 1
    assert "0 <ImageHere> placeholder(s) for 2 image(s)" in capsys.readouterr().err
    assert xc_chat(["--model", "tiny", "--image", str(tmp_path / "missing.png"), "--prompt", "Hi"]) == 1
    assert "file not found" in capsys.readouterr().err
    assert xc_chat(["--model", "tiny", "--video", "clip.png", "--prompt", "Hi"]) == 2
    assert xc_chat(["--prompt", "Hi"]) == 2
    assert xc_chat(["--model", "tiny", "--top-p", "0", "--prompt", "Hi"]) == 2


# --------------------------------------------------------------------------- answers


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, Tokenizer]:
    return load_chat_model("tiny", device=torch.device("cpu"), dtype=torch.float32)


def run_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> list[dict]:
    capsys.readouterr()
    assert xc_chat([*argv, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize("names", [["coffee"], ["coffee", "astronaut"]], ids=["one photo", "two photos"])
def test_chat_answers_equal_generate_on_the_same_prompt(
    names: list[str], photos: dict[str, Path], tiny: tuple, capsys: pytest.CaptureFixture[str]
) -> None:
    model, tokenizer = tiny
    query = "What is this?" if len(names) == 1 else "Image1: <ImageHere>; Image2: <ImageHere>. Compare."
    argv = ["--model", "tiny", *[a for n in names for a in ("--image", str(photos[n]))], "--prompt", query]
    hd = 24 if len(names) == 1 else 6
    tiles = np.concatenate(
        [to_tiles(hd_transform(Image.open(photos[n]).convert("RGB"), hd, "infer")) for n in names]
    )
    sizes = [Image.open(photos[n]).size for n in names]
    grids = torch.tensor([spec_grid(w, h, hd) for w, h in sizes])
    settings = {
        "greedy": (["--temperature", "0"], {"temperature": 0.0}),
        "sampled": (["--seed", "3"], {"temperature": 1.0, "top_p": 0.8, "top_k": 50, "seed": 3}),
    }
    for flags, kwargs in settings.values():
        (answer,) = run_json([*argv, "--max-new-tokens", "12", *flags], capsys)
        ids = torch.tensor(answer["prompt_ids"])
        is_image = (ids == IMAGE).int()
        starts = torch.nonzero(is_image.diff(prepend=torch.tensor([0])) == 1).squeeze(1)
        assert len(starts) == len(names)
        expected = generate(
            model,
            ids,
            torch.from_numpy(tiles),
            grids,
            starts,
            max_new_tokens=12,
            stop_ids=[tokenizer.eos_id, tokenizer.end_of_turn_id],
            repetition_penalty=1.005,
            penalize_prompt=False,
            **kwargs,
        )
        assert answer["generated_ids"] == expected, flags
        assert answer["text"] == tokenizer.decode(expected, skip_special=True)


def test_interactive_mode_keeps_the_history_until_reset(
    photos: dict[str, Path], tiny: tuple, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, tokenizer = tiny
    monkeypatch.setattr(
        "sys.stdin", io.StringIO("What is this?\nAnd the colour?\n/reset\nWhat is this?\n/quit\nNever.\n")
    )
    argv = [
        "--model",
        "tiny",
        "--image",
        str(photos["chelsea"]),
        "--temperature",
        "0",
        "--max-new-tokens",
        "6",
    ]
    first, second, third = run_json(argv, capsys)
    media = load_media([photos["chelsea"]])
    history = [("What is this?", first["text"])]
    assert (
        second["prompt_ids"] == build_prompt(tokenizer, "And the colour?", media, history).input_ids.tolist()
    )
    assert third == first  # after /reset: the first question again, no history


def test_a_video_is_one_image_block_of_its_frame_strip(capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.tiling import grid_of
    from pipeline.video import video_strip

    video = REPO_ROOT / "data" / "videos" / "rocket_pan.mp4"
    argv = ["--model", "tiny", "--video", str(video), "--prompt", "What happens?", "--temperature", "0"]
    (answer,) = run_json([*argv, "--max-new-tokens", "4"], capsys)
    grid = grid_of(video_strip(video))
    ids = np.array(answer["prompt_ids"])
    assert ids[0] == 1 and (ids[1 : 1 + spec_image_tokens(*grid)] == IMAGE).all()
    assert (ids == IMAGE).sum() == spec_image_tokens(*grid)


def test_streamed_text_is_the_answer(photos: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--model", "tiny", "--temperature", "0", "--max-new-tokens", "12", "--prompt", "Hello"]
    (answer,) = run_json(argv, capsys)
    assert xc_chat(argv) == 0
    assert capsys.readouterr().out == answer["text"] + "\n"
