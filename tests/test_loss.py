"""Chunked cross-entropy equals the plain full-logits one (fp32), for the loss and its gradients."""

from __future__ import annotations

import torch

from schemas.sample import IGNORE_INDEX
from trainer.loss import chunked_cross_entropy, plain_cross_entropy, segment_losses, token_losses


def _case(t: int = 300, d: int = 32, v: int = 1000) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(t, d, generator=gen, requires_grad=True)
    weight = (torch.randn(v, d, generator=gen) * 0.3).requires_grad_()
    targets = torch.randint(0, v, (t,), generator=gen)
    targets[torch.rand(t, generator=gen) < 0.4] = IGNORE_INDEX
    return hidden, weight, targets


def test_chunked_equals_plain_loss_and_gradients() -> None:
    hidden, weight, targets = _case()
    plain, n_plain = plain_cross_entropy(hidden, weight, targets)
    g_plain = torch.autograd.grad(plain, (hidden, weight))
    for chunk in (7, 64, 10_000):
        loss, n = chunked_cross_entropy(hidden, weight, targets, chunk_tokens=chunk)
        assert n == n_plain
        torch.testing.assert_close(loss, plain, atol=1e-5, rtol=1e-6)
        for got, want in zip(torch.autograd.grad(loss, (hidden, weight)), g_plain, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_row_without_trained_tokens_gives_zero_and_backward_runs() -> None:
    hidden, weight, targets = _case()
    loss, n = chunked_cross_entropy(hidden, weight, torch.full_like(targets, IGNORE_INDEX))
    assert n == 0 and loss.item() == 0.0
    loss.backward()
    assert hidden.grad is not None and not hidden.grad.any() and weight.grad is not None


def test_per_token_and_per_sample_losses() -> None:
    hidden, weight, targets = _case()
    with torch.no_grad():
        losses = token_losses(hidden, weight, targets, chunk_tokens=50)
        total, n = chunked_cross_entropy(hidden, weight, targets)
    assert (losses[targets == IGNORE_INDEX] == 0).all()
    torch.testing.assert_close(losses.sum(), total)
    cu = torch.tensor([0, 100, 120, 300], dtype=torch.int32)
    sums, counts = segment_losses(losses, targets, cu)
    for s in range(3):
        a, b = int(cu[s]), int(cu[s + 1])
        torch.testing.assert_close(sums[s], losses[a:b].sum())
        assert counts[s] == (targets[a:b] != IGNORE_INDEX).sum()
    assert counts.sum() == n
