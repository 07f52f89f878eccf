"""Cross-entropy over the vocabulary without materializing the full fp32 logits.

The official code computes fp32 logits for every position: 16,384 tokens × 92,544 vocab × 4 bytes
is 6 GB, plus as much again for the softmax and its gradient. Here only trained positions
(target != IGNORE_INDEX) are projected, `chunk_tokens` at a time; each chunk's logits are made,
turned into a loss sum and dropped, and the backward pass recomputes them chunk by chunk
(`torch.utils.checkpoint`), so peak memory is a few chunk-sized logit blocks, whatever T is.

Shapes (T = tokens of the packed row, D = hidden size, V = vocabulary, S = samples in the row):
  hidden [T, D] (final-normed), weight [V, D] (the `output` head), targets int64[T], already
  shifted: targets[t] is the token to predict AT position t, IGNORE_INDEX where not trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from schemas.sample import IGNORE_INDEX

DEFAULT_CHUNK_TOKENS = 2048
"""Trained positions per logits block: 2,048 × 92,544 fp32 is 0.76 GB, small next to a 7B step."""


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # Logits in the model dtype (the matmul), the softmax in fp32 as the official code does.
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[torch.Tensor, int]:
    """(sum of the token losses as an fp32 scalar, number of trained tokens).

    Divide by the token count yourself (per micro-batch, or globally over ranks and accumulation
    steps). A row with no trained token returns a zero that is still connected to `hidden` and
    `weight`, so backward runs (and gives zero gradients) on every rank.
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens ({chunk_tokens}) must be positive, e.g. {DEFAULT_CHUNK_TOKENS}")
    trained = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # one host sync: sizes the chunks
    num_tokens = int(trained.numel())
    if num_tokens == 0:
        return F.linear(hidden[:0], weight).float().sum(), 0
    hidden = hidden.index_select(0, trained)
    targets = targets.index_select(0, trained)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, num_tokens, chunk_tokens):
        h, t = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if needs_grad:
            # Saves only (h, weight, t); backward recomputes this chunk's logits, then frees them.
            total = total + checkpoint(_chunk_loss_sum, h, weight, t, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(h, weight, t)
    return total, num_tokens


def token_losses(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """fp32[T]: the loss of each position, 0 where the target is IGNORE_INDEX (for evaluation).

    Same chunking as `chunked_cross_entropy`; meant for `torch.no_grad()` (no recompute wrapper).
    """
    losses = torch.zeros(targets.shape[0], dtype=torch.float32, device=hidden.device)
    trained = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    for start in range(0, int(trained.numel()), chunk_tokens):
        idx = trained[start : start + chunk_tokens]
        logits = F.linear(hidden.index_select(0, idx), weight).float()
        part = F.cross_entropy(logits, targets.index_select(0, idx), reduction="none")
        losses = losses.index_copy(0, idx, part)
    return losses


def segment_losses(
    losses: torch.Tensor, targets: torch.Tensor, cu_seqlens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (loss sums fp32[S], trained-token counts int64[S]) of a packed row.

    `losses` is `token_losses(...)` of the row; samples are [cu_seqlens[s], cu_seqlens[s+1]).
    """
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long().to(losses.device)
    sample_of = torch.repeat_interleave(torch.arange(lengths.numel(), device=losses.device), lengths)
    sums = torch.zeros(lengths.numel(), dtype=torch.float32, device=losses.device)
    counts = torch.zeros(lengths.numel(), dtype=torch.int64, device=losses.device)
    sums.index_add_(0, sample_of, losses)
    counts.index_add_(0, sample_of, (targets != IGNORE_INDEX).long())
    return sums, counts


def plain_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """The reference the official code computes: full fp32 logits [T, V], then one cross-entropy.

    For tests and `dev/experiments/loss_memory.py`; never use it for training at 16k tokens.
    """
    logits = F.linear(hidden, weight).float()
    loss_sum = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, int((targets != IGNORE_INDEX).sum())
