"""CUDA paths of the model: varlen kernels vs per-sample SDPA, bf16 packing, checkpointing, the fused
LoRA layer (marked gpu)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from schemas.sample import image_token_count
from trainer import attention
from trainer.config import TrainConfig
from trainer.lora import PLoRALoraLinear
from trainer.model import build_model
from trainer.modelio import Loaded, apply_recipe

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _packed(gen: torch.Generator) -> dict:
    n = image_token_count(1, 2)
    lengths = [7 + n + 5, 30, 3 + image_token_count(1, 1)]
    ids = torch.randint(3, 500, (sum(lengths),), generator=gen)
    return {
        "input_ids": ids[None],
        "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
        "cu_seqlens": torch.tensor([0, lengths[0], lengths[0] + 30, sum(lengths)], dtype=torch.int32),
        "max_seqlen": max(lengths),
        "tiles": torch.randint(0, 256, (3, 560, 560, 3), dtype=torch.uint8, generator=gen),
        "image_grids": torch.tensor([[1, 2], [1, 1]]),
        "image_starts": torch.tensor([7, lengths[0] + 30 + 3]),
        "targets": ids.roll(-1)[None],
    }


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("backend", ["varlen", "flash", "fa4"])
def test_varlen_kernels_match_per_sample_sdpa(backend: str, d: int) -> None:
    if backend == "flash" and attention.flash_attn_varlen_func is None:
        pytest.skip("flash-attn not installed")
    if backend == "fa4" and not attention.fa4_usable(torch.device("cuda"), d):
        pytest.skip("flash-attn-4 not installed, or not an sm90/sm100 GPU")
    if backend == "varlen" and attention.varlen_attn is None:
        pytest.skip("this torch has no varlen_attn")
    gen = torch.Generator(device="cuda").manual_seed(0)
    t, h, hkv = 300, 8, 2
    q = torch.randn(t, h, d, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    k = torch.randn(t, hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    v = torch.randn(t, hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    cu = torch.tensor([0, 100, 101, 300], dtype=torch.int32, device="cuda")
    ref = attention.varlen_attention(q, k, v, cu, 199, "sdpa")
    got = attention.varlen_attention(q, k, v, cu, 199, backend)
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=2e-2)
    g_ref = torch.autograd.grad(ref.float().square().sum(), (q, k, v))
    g_got = torch.autograd.grad(got.float().square().sum(), (q, k, v))
    for a, b in zip(g_got, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("backend", ["varlen", "flash", "fa4"])
def test_varlen_kernels_attend_from_query_runs_end_aligned(backend: str) -> None:
    """Fewer queries than keys per segment (the last layer's trained rows): each kernel must align
    the causal mask to the end, as the SDPA path does."""
    if backend == "flash" and attention.flash_attn_varlen_func is None:
        pytest.skip("flash-attn not installed")
    if backend == "fa4" and not attention.fa4_usable(torch.device("cuda"), 128):
        pytest.skip("flash-attn-4 not installed, or not an sm90/sm100 GPU")
    if backend == "varlen" and attention.varlen_attn is None:
        pytest.skip("this torch has no varlen_attn")
    gen = torch.Generator(device="cuda").manual_seed(3)
    t, h, hkv, d = 700, 8, 2, 128
    q, k, v = (
        torch.randn(t, n, d, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
        for n in (h, hkv, hkv)
    )
    cu = torch.tensor([0, 300, 301, 700], dtype=torch.int32)
    positions = torch.tensor([5, 6, 7, 150, 151, 299, 300, *range(500, 530), 600, 699])
    runs = attention.query_runs(positions, cu)
    assert runs is not None
    runs = runs.to(torch.device("cuda"))
    full = attention.varlen_attention(q, k, v, cu.cuda(), 399, "sdpa")[runs.index]
    got = attention.attend_runs(q[runs.index], k, v, runs, backend)  # type: ignore[arg-type]
    torch.testing.assert_close(got, full, atol=2e-2, rtol=2e-2)
    g_ref = torch.autograd.grad(full.float().square().sum(), (q, k, v))
    g_got = torch.autograd.grad(got.float().square().sum(), (q, k, v))
    for a, b in zip(g_got, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)


def test_fp32_cuda_packed_row_equals_samples_alone() -> None:
    model = build_model("tiny", seed=0, device="cuda", dtype=torch.float32).eval()
    row = _packed(torch.Generator().manual_seed(1))
    row.pop("targets")
    with torch.no_grad():
        packed = model(**row, return_logits=True).logits[0]
        bounds = row["cu_seqlens"].tolist()
        alone = model(row["input_ids"][:, bounds[1] : bounds[2]], return_logits=True).logits[
            0
        ]  # the text-only middle sample
    torch.testing.assert_close(packed[bounds[1] : bounds[2]], alone, atol=1e-5, rtol=1e-5)


def test_bf16_auto_backend_matches_sdpa_and_checkpointing_matches() -> None:
    row = _packed(torch.Generator().manual_seed(2))
    results = {}
    for name, backend, ckpt in (
        ("sdpa", "sdpa", False),
        ("auto", "auto", False),
        ("auto+ckpt", "auto", True),
    ):
        model = build_model("tiny", seed=0, device="cuda", dtype=torch.bfloat16, attention=backend).train()
        model.config.plora_dropout = 0.0
        for m in model.plora_linears():
            m.lora_dropout.p = 0.0
        if ckpt:
            model.gradient_checkpointing_enable()
        out = model(**row)
        out.loss_sum.backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
        results[name] = (out.loss_sum.detach(), grads)
    loss_sdpa, g_sdpa = results["sdpa"]
    loss_auto, g_auto = results["auto"]
    loss_ckpt, g_ckpt = results["auto+ckpt"]
    torch.testing.assert_close(loss_auto, loss_sdpa, atol=0.5, rtol=2e-3)
    torch.testing.assert_close(loss_ckpt, loss_auto, atol=0, rtol=0)  # same forward kernels
    assert g_auto.keys() == g_ckpt.keys() == g_sdpa.keys()
    flat_auto = torch.cat([g.flatten() for g in g_auto.values()])
    for other in (g_ckpt, g_sdpa):
        # bf16, and attention backward kernels that accumulate dQ with atomics: close, not equal.
        flat = torch.cat([other[n].flatten() for n in g_auto])
        assert (flat - flat_auto).norm() <= 0.02 * flat_auto.norm()


def test_bf16_fused_lora_layer_matches_pefts() -> None:
    """The LoRA recipe's fused layer (trainer/lora.py) in bf16 on CUDA: PEFT's loss and gradients,
    dropout on (the same draws in the same order)."""
    cfg = TrainConfig(shards=Path("."), model="tiny", recipe="lora", lora_r=4, lora_alpha=8).resolve()
    fused, plain = (
        apply_recipe(
            Loaded(build_model("tiny", seed=0, device="cuda", dtype=torch.bfloat16), None, "tiny", "test"),
            cfg,
            fused_lora=fused_lora,
        )
        .model.to(torch.bfloat16)
        .train()
        for fused_lora in (True, False)
    )
    assert any(isinstance(m, PLoRALoraLinear) for m in fused.modules())
    with torch.no_grad():
        for name, p in fused.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    plain.load_state_dict(fused.state_dict())  # the same weights, LoRA's random init included
    row = _packed(torch.Generator().manual_seed(3))
    results = []
    for model in (fused, plain):
        torch.manual_seed(5)
        out = model(**row)
        out.loss_sum.backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss_sum.detach().float(), grads))
    (loss_fused, g_fused), (loss_peft, g_peft) = results
    torch.testing.assert_close(loss_fused, loss_peft, atol=0.5, rtol=2e-3)
    assert g_fused.keys() == g_peft.keys() and any(".lora_B." in n for n in g_fused)
    flat_fused = torch.cat([g_fused[n].flatten() for n in g_peft])
    flat_peft = torch.cat([g.flatten() for g in g_peft.values()])
    assert (flat_fused - flat_peft).norm() <= 0.02 * flat_peft.norm()


def test_bf16_generation_with_the_kv_cache_matches_the_logits_of_a_full_forward() -> None:
    """The prompt goes through the varlen kernels into the cache, each new token through
    cached_attention: every step's logits equal a full forward's (bf16 tolerance)."""
    from trainer.generate import generate

    model = build_model("tiny", seed=0, device="cuda", dtype=torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(0)
    row = _packed(gen)
    n = image_token_count(1, 2)
    prompt = row["input_ids"][0, : 7 + n + 5].clamp_min(0)
    tiles, grids, starts = row["tiles"][:2], row["image_grids"][:1], row["image_starts"][:1]
    new = generate(model, prompt, tiles, grids, starts, max_new_tokens=6, stop_ids=())
    ids = torch.cat([prompt, torch.tensor(new)])
    with torch.no_grad():
        logits = model(
            ids[None].cuda(), tiles=tiles, image_grids=grids, image_starts=starts, return_logits=True
        ).logits[0]
    chosen = logits[len(prompt) - 1 : -1].float()
    # Each greedy choice is the full forward's argmax, or within bf16 noise of it.
    picked = chosen.gather(1, torch.tensor(new, device="cuda")[:, None])[:, 0]
    assert (chosen.max(dim=1).values - picked <= 0.05).all(), (chosen.argmax(1).tolist(), new)
