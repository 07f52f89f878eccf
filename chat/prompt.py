"""The prompt of the official IXC2.5 `chat()` for a question, its images or videos and the history
(docs/IXC25.md#chat-inference), from the pipeline's template, tokenizer, tiling and video code.

- Media: every path through the inference HD transform (`style="infer"`: width capped at 1×, white
  padding at the bottom) at hd_num 24 for one image and 6 for several (the official `chat()`
  forces 6), or through the video strip (docs/IXC25.md#video) when its extension names a video.
- Text: `pipeline.template.chat_text` (no system turn unless one is given; history pairs; the
  question; the assistant header), then `render_chat_prompt`: `<s>` first; one image without
  `<ImageHere>` goes right after it, before everything else; otherwise image k sits at the k-th
  placeholder of the whole text (history included).

Shapes: input_ids int32[T] (IMAGE_TOKEN_ID -100 on image positions), spans and grids per image,
tiles uint8[N, 560, 560, 3] (every image's tiles, image by image).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.build import media_padded
from pipeline.template import DEFAULT_MAX_LENGTH, TokenizerLike, chat_text, render_chat_prompt
from pipeline.tiling import grid_of, to_tiles
from pipeline.tokenization import Tokenizer
from schemas.record import is_video_path
from schemas.sample import TILE_SIZE
from schemas.tokens import for_display

SINGLE_IMAGE_HD_NUM = 24
"""hd_num of the official `chat()` for one image (its default)."""
MULTI_IMAGE_HD_NUM = 6
"""hd_num the official `chat()` forces when several images are given."""
META_INSTRUCTION = (
    "You are an AI assistant whose name is InternLM-XComposer (浦语·灵笔).\n"
    "- InternLM-XComposer (浦语·灵笔) is a multi-modality conversational language model that is developed by "
    "Shanghai AI Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM-XComposer (浦语·灵笔) can understand and communicate fluently in the language chosen by the "
    "user such as English and 中文.\n"
    "- InternLM-XComposer (浦语·灵笔) is capable of comprehending and articulating responses effectively "
    "based on the provided image."
)
"""The official `chat()`'s default meta instruction: the system turn with `use_meta=True`."""


@dataclass(frozen=True)
class Media:
    """One image or video, transformed once and reused by every turn."""

    path: Path
    grid: tuple[int, int]
    """(rows, cols) of 560-px tiles."""
    tiles: np.ndarray
    """uint8[rows·cols, 560, 560, 3], row-major."""


def media_hd_num(count: int, hd_num: int = SINGLE_IMAGE_HD_NUM) -> int:
    """The hd_num `chat()` uses for `count` images: `hd_num` for one, 6 for several."""
    return hd_num if count <= 1 else MULTI_IMAGE_HD_NUM


def load_media(
    paths: Sequence[str | Path], hd_num: int = SINGLE_IMAGE_HD_NUM, font_path: str | Path | None = None
) -> list[Media]:
    """Decode and tile every image/video (DataError for a missing or unreadable file)."""
    hd = media_hd_num(len(paths), hd_num)
    media = []
    for path in map(Path, paths):
        padded = media_padded(
            path, is_video=is_video_path(str(path)), hd_num=hd, style="infer", font_path=font_path
        )
        media.append(Media(path, grid_of(padded), to_tiles(padded)))
    return media


@dataclass(frozen=True)
class ChatPrompt:
    """One turn's prompt: token ids with image blocks, and the images' tiles."""

    input_ids: np.ndarray
    """int32[T], IMAGE_TOKEN_ID (-100) on image positions."""
    spans: list[tuple[int, int]]
    """[start, end) of each image block."""
    grids: list[tuple[int, int]]
    tiles: np.ndarray
    """uint8[N, 560, 560, 3]."""

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def display_text(self, tokenizer: Tokenizer) -> str:
        """The prompt as text: image blocks as `<image rows×cols: N tokens>`, turn markers as
        `<|im_start|>`/`<|im_end|>`, `<s>` as it is."""
        out, pos = [], 0
        for (start, end), (rows, cols) in zip(self.spans, self.grids, strict=True):
            out.append(for_display(tokenizer.decode(self.input_ids[pos:start].tolist())))
            out.append(f"<image {rows}×{cols}: {end - start} tokens>")
            pos = end
        out.append(for_display(tokenizer.decode(self.input_ids[pos:].tolist())))
        return "".join(out)

    def generate_inputs(self) -> dict[str, Any]:
        """Keyword arguments of `model.generate` / `IXCModel.forward`: input_ids int64[1, T], and
        tiles, image_grids, image_starts when there are images."""
        import torch

        inputs: dict[str, Any] = {"input_ids": torch.from_numpy(self.input_ids.astype(np.int64))[None]}
        if self.grids:
            inputs["tiles"] = torch.from_numpy(self.tiles)
            inputs["image_grids"] = torch.tensor(self.grids, dtype=torch.int64)
            inputs["image_starts"] = torch.tensor([s for s, _ in self.spans], dtype=torch.int64)
        return inputs


def build_prompt(
    tokenizer: TokenizerLike,
    query: str,
    media: Sequence[Media] = (),
    history: Sequence[tuple[str, str]] = (),
    *,
    system: str | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> ChatPrompt:
    """The official `chat()` prompt (module docstring); DataError when placeholders and images do
    not pair up or the prompt exceeds max_length."""
    grids = [m.grid for m in media]
    input_ids, spans = render_chat_prompt(
        chat_text(query, history, system), grids, tokenizer, max_length=max_length
    )
    tiles = (
        np.concatenate([m.tiles for m in media])
        if media
        else np.zeros((0, TILE_SIZE, TILE_SIZE, 3), dtype=np.uint8)
    )
    return ChatPrompt(input_ids=input_ids, spans=spans, grids=grids, tiles=tiles)
