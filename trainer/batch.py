"""The packed micro-batch (docs/ARCHITECTURE.md): samples collated into one row, as the model takes it."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch

from schemas.sample import IGNORE_INDEX, IMAGE_TOKEN_ID, TILE_SIZE, Sample


@dataclass
class PackedBatch:
    """One packed micro-batch (docs/ARCHITECTURE.md): B = 1 row of T tokens from S samples.

    Shapes: input_ids/position_ids/targets int64[1, T], cu_seqlens int32[S+1], tiles
    uint8[N, 560, 560, 3], image_grids int64[I, 2], image_starts int64[I] (absolute in the row).
    """

    input_ids: torch.Tensor
    """int64[1, T]; image positions hold 0 (their embeddings are replaced)."""
    position_ids: torch.Tensor
    """int64[1, T]; restart at 0 for each sample."""
    cu_seqlens: torch.Tensor
    """int32[S+1] sample boundaries for varlen attention."""
    max_seqlen: int
    targets: torch.Tensor
    """int64[1, T] label to predict at position t (shifted within each sample; -100: not trained)."""
    tiles: torch.Tensor
    """uint8[N, 560, 560, 3] local tiles of all images in the row, image by image (normalize on GPU)."""
    image_grids: torch.Tensor
    """int64[I, 2] (rows, cols) per image."""
    image_starts: torch.Tensor
    """int64[I] first position of each image block in the row."""
    sample_keys: list[tuple[str, int, Any]]
    """(source, record index, id) of each sample, for logs and NaN reports."""
    num_tokens: int
    num_trained: int
    """Positions with a target in this micro-batch."""
    epoch: int = 0
    step: int = 0
    """Global step (optimizer step) within the epoch."""
    micro_step: int = 0
    """Index of this micro-batch among the rank's micro-batches of the step."""
    pack: int = 0
    """Pack id in the epoch plan: names this micro-batch the same way on any world size."""
    global_num_trained: int = 0
    """Trained tokens of the whole global step (all ranks): divide the summed loss by it."""
    global_num_tokens: int = 0
    read_bytes: int = 0
    """Stored bytes of this micro-batch's samples (the loader's read throughput)."""
    read_s: float = 0.0
    """Seconds its loader worker spent reading them."""

    def _map(self, fn: Any) -> PackedBatch:
        tensors = {
            f.name: fn(getattr(self, f.name))
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **tensors)

    def model_inputs(self) -> dict[str, Any]:
        """The keyword arguments of `IXCModel.forward` for this row (without targets)."""
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "cu_seqlens": self.cu_seqlens,
            "max_seqlen": self.max_seqlen,
            "tiles": self.tiles,
            "image_grids": self.image_grids,
            "image_starts": self.image_starts,
        }

    def to(self, device: torch.device | str, non_blocking: bool = True) -> PackedBatch:
        """Copy every tensor to `device` (asynchronously from pinned memory)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> PackedBatch:
        """Page-locked copy (the DataLoader's pin thread calls this when CUDA is present)."""
        return self._map(lambda t: t.pin_memory())


def collate(samples: list[Sample]) -> PackedBatch:
    """Pack samples (in order) into one row: shift targets within each sample, offset image starts."""
    lengths = [s.num_tokens for s in samples]
    total = sum(lengths)
    offsets = np.zeros(len(samples) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lengths)
    input_ids = np.concatenate([s.input_ids for s in samples]).astype(np.int64)
    input_ids[input_ids == IMAGE_TOKEN_ID] = 0
    position_ids = np.arange(total, dtype=np.int64) - np.repeat(offsets[:-1], lengths)
    targets = np.full(total, IGNORE_INDEX, dtype=np.int64)
    grids, starts = [], []
    for s, start in zip(samples, offsets[:-1].tolist(), strict=True):
        # The label of position t+1 is predicted at t; a sample's last position predicts nothing.
        targets[start : start + s.num_tokens - 1] = s.labels[1:]
        for im in s.images:
            grids.append(im.grid)
            starts.append(start + im.span[0])
    num_tiles = sum(s.num_tiles for s in samples)
    # Allocating in shared memory here (to spare torch's copy when a worker sends it) measured
    # slower: 53 vs 75 samples/s with one worker (H200 host, 10 raw tiles per sample).
    tiles = torch.empty((num_tiles, TILE_SIZE, TILE_SIZE, 3), dtype=torch.uint8)
    at = 0
    for s in samples:
        if s.num_tiles:
            tiles[at : at + s.num_tiles].copy_(torch.from_numpy(s.tiles))
            at += s.num_tiles
    return PackedBatch(
        input_ids=torch.from_numpy(input_ids).view(1, total),
        position_ids=torch.from_numpy(position_ids).view(1, total),
        cu_seqlens=torch.from_numpy(offsets.astype(np.int32)),
        max_seqlen=max(lengths),
        targets=torch.from_numpy(targets).view(1, total),
        tiles=tiles,
        image_grids=torch.tensor(grids, dtype=torch.int64).view(-1, 2),
        image_starts=torch.tensor(starts, dtype=torch.int64),
        sample_keys=[(s.source, s.index, s.id) for s in samples],
        num_tokens=total,
        num_trained=int((targets != IGNORE_INDEX).sum()),
    )
