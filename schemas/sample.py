"""The tokenized, tiled training sample: what one input record becomes (docs/IXC25.md#chat-template, #hd-transform).

Shapes and dtypes (T = tokens, N = local tiles of all images of the sample):
  input_ids: int32[T]   token ids; IMAGE_TOKEN_ID (-100) at every image position
  labels:    int32[T]   the input id where trained, IGNORE_INDEX (-100) elsewhere (user turns, headers, images, BOS)
  tiles:     uint8[N, 560, 560, 3]   local HD tiles of every image, image by image, row-major
  images:    one ImageSpan per image: its grid (rows, cols) and token span [start, end)
The global view of each image is not stored: it is the bicubic resize of the normalized padded
image, which is exactly the tiles reassembled, so the trainer derives it on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np

IGNORE_INDEX = -100
IMAGE_TOKEN_ID = -100
TILE_SIZE = 560
MERGED_SIDE = 20
"""A 560-px tile gives 40×40 ViT patches, merged 2×2 into 20×20 LLM tokens."""

Layout = Literal["official", "inference"]
LAYOUTS: tuple[Layout, ...] = get_args(Layout)
Style = Literal["train", "infer"]
STYLES: tuple[Style, ...] = get_args(Style)


def image_token_count(rows: int, cols: int) -> int:
    """LLM tokens one image occupies: global 20×(20+1) + glb separator + local (rows·20)×(cols·20+1).

    Equals `(rows*cols + 1) * 400 + 1 + (rows + 1) * 20` (docs/IXC25.md#tokens-per-image).
    """
    return (rows * cols + 1) * 400 + 1 + (rows + 1) * 20


@dataclass(frozen=True)
class ImageSpan:
    grid: tuple[int, int]
    """(rows, cols) of 560-px local tiles."""
    span: tuple[int, int]
    """[start, end) token positions of the image block in input_ids."""

    @property
    def num_tiles(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass
class Sample:
    input_ids: np.ndarray
    labels: np.ndarray
    images: list[ImageSpan]
    tiles: np.ndarray
    source: str
    """Source name (schemas.record.Source.name) the record came from."""
    file: str
    """JSON file as written in data.txt."""
    index: int
    """0-based record position in that file."""
    id: Any
    """The record's id as in the JSON file."""
    layout: Layout = "official"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_trained(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def num_tiles(self) -> int:
        return int(self.tiles.shape[0])

    def check(self) -> None:
        """Assert the invariants every producer must keep (internal consistency, not user input)."""
        t = self.num_tokens
        assert self.input_ids.dtype == np.int32 and self.input_ids.shape == (t,), self.input_ids.shape
        assert self.labels.dtype == np.int32 and self.labels.shape == (t,), self.labels.shape
        assert self.tiles.dtype == np.uint8 and self.tiles.ndim == 4, (self.tiles.dtype, self.tiles.shape)
        assert self.tiles.shape[1:] == (TILE_SIZE, TILE_SIZE, 3), self.tiles.shape
        assert sum(im.num_tiles for im in self.images) == self.num_tiles, "tile count != sum of grids"
        is_image = np.zeros(t, dtype=bool)
        previous_end = 0
        for im in self.images:
            start, end = im.span
            assert previous_end <= start < end <= t, f"bad span {im.span} (T={t})"
            assert end - start == image_token_count(*im.grid), f"span {im.span} != grid {im.grid}"
            is_image[start:end] = True
            previous_end = end
        assert np.all(self.input_ids[is_image] == IMAGE_TOKEN_ID), "image span holds text ids"
        assert np.all(self.input_ids[~is_image] >= 0), "text position holds a negative id"
        assert np.all(self.labels[is_image] == IGNORE_INDEX), "image position is trained"
        trained = self.labels != IGNORE_INDEX
        assert np.array_equal(self.labels[trained], self.input_ids[trained]), (
            "a label differs from its input id"
        )
        assert self.num_trained > 0, "sample has no trained token"
