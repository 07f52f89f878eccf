"""PEFT LoRA wraps the five PLoRA linears by their official names; only LoRA trains; merge is exact;
the recipe's fused LoRA layer computes what PEFT's own forward does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

import trainer.lora
from schemas.sample import image_token_count
from trainer.config import LORA_TARGETS, TrainConfig
from trainer.lora import PLoRALoraLinear, hashed_bits, linear_plus_low_rank, two_dropouts
from trainer.model import IXCModel, build_model, compile_layers
from trainer.modelio import Loaded, apply_recipe
from trainer.vision import VisionTower


def _row() -> dict:
    gen = torch.Generator().manual_seed(0)
    n = image_token_count(1, 1)
    ids = torch.cat(
        [
            torch.randint(3, 500, (4,), generator=gen),
            torch.zeros(n, dtype=torch.long),
            torch.randint(3, 500, (6,), generator=gen),
        ]
    )
    return {
        "input_ids": ids[None],
        "tiles": torch.randint(0, 256, (1, 560, 560, 3), dtype=torch.uint8, generator=gen),
        "image_grids": torch.tensor([[1, 1]]),
        "image_starts": torch.tensor([4]),
        "targets": ids.roll(-1)[None],
    }


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_peft_lora_trains_only_lora_and_merges_exactly(task_type: str | None) -> None:
    model = build_model("tiny", seed=0)
    model.requires_grad_(False)
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(LORA_TARGETS), task_type=task_type
    )
    peft_model = get_peft_model(model, config)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 5 * model.config.num_hidden_layers  # never the Plora/lora_* sub-layers
    wrapped = peft_model.base_model.model.model.layers[0].attention.wqkv
    assert type(wrapped.base_layer).__name__ == "PLoRALinear"

    row = _row()
    out = peft_model(**row)
    out.loss_sum.backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if p.requires_grad)
    assert all(p.grad is None for n, p in peft_model.named_parameters() if not p.requires_grad)

    with torch.no_grad():  # make the adapters non-zero, then merging must not change the logits
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
        peft_model.eval()
        before = peft_model(**row, return_logits=True).logits
        merged = peft_model.merge_and_unload()
        after = merged(**row, return_logits=True).logits
    assert type(merged).__name__ == "IXCModel"
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert len(merged.state_dict()) == len(build_model("tiny").state_dict())


def test_peft_modules_to_save_vit_and_sampler_train_with_checkpointing() -> None:
    """LoRA with fix_vit/fix_sampler off: PEFT copies vit and vision_proj (modules_to_save)."""
    model = build_model("tiny", seed=0)
    model.requires_grad_(False)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=list(LORA_TARGETS),
        modules_to_save=["vit", "vision_proj"],
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config).train()
    peft_model.gradient_checkpointing_enable()
    towers = [m for m in peft_model.modules() if isinstance(m, VisionTower)]
    assert len(towers) == 2 and all(t.gradient_checkpointing for t in towers)  # the original and the copy
    out = peft_model(**_row())
    out.loss_sum.backward()
    grads = {n for n, p in peft_model.named_parameters() if p.grad is not None}
    assert any(".vit.modules_to_save." in n for n in grads)
    assert any(".vision_proj.modules_to_save." in n for n in grads)
    assert any(".lora_A." in n for n in grads)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_fused_low_rank_update_equals_peft_forward(compiled: bool) -> None:
    """The recipe's LoRA layer adds Plora and LoRA by one matmul: same loss and gradients as PEFT's
    own forward, same dropout draws in eager mode (compiled, the dropouts draw another way:
    test_two_dropouts_under_compile; compared here in eval mode); other forms of image_tokens take
    PEFT's path."""
    cfg = TrainConfig(shards=Path("."), model="tiny", recipe="lora", lora_r=4, lora_alpha=8).resolve()
    fused, plain = (
        apply_recipe(
            Loaded(build_model("tiny", seed=0), None, "tiny", "test"), cfg, fused_lora=fused_lora
        ).model.train(not compiled)
        for fused_lora in (True, False)
    )
    layers = [m for m in fused.modules() if isinstance(m, PLoRALoraLinear)]
    assert len(layers) == 5 * fused.config.num_hidden_layers
    assert not any(isinstance(m, PLoRALoraLinear) for m in plain.modules())
    with torch.no_grad():
        for name, p in fused.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    plain.load_state_dict(fused.state_dict())  # the same weights, LoRA's random init included
    if compiled:
        compile_layers(fused, backend="aot_eager")
        compile_layers(plain, backend="aot_eager")
    calls = []

    def counted(*args: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return linear_plus_low_rank(*args)

    row = _row()

    def run(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        torch.manual_seed(1)  # the same dropout masks for both
        loss = model(**row).loss_sum
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), grads

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer.lora, "linear_plus_low_rank", counted)
        fused_loss, fused_grads = run(fused)
        plain_loss, plain_grads = run(plain)
    if not compiled:  # (a compiled graph runs the traced ops, not the patched Python function)
        assert len(calls) == len(layers)
    torch.testing.assert_close(fused_loss, plain_loss, atol=1e-5, rtol=1e-5)
    assert fused_grads.keys() == plain_grads.keys()
    assert any(".lora_A." in n for n in fused_grads) and not any("Plora" in n for n in fused_grads)
    for name in fused_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("hashed", [True, False], ids=["hashed", "randint64"])
def test_two_dropouts_under_compile(hashed: bool) -> None:
    """Compiled, both dropouts come from one draw per element (a keyed hash of its index, or a
    64-bit random integer): each at its rate, independent of the other, kept values scaled by
    1/(1 - rate), the gradient through the same masks, and a new draw at each call."""
    x = torch.ones(400, 1000, requires_grad=True)
    w1, w2 = torch.full((400, 1000), 3.0), torch.full((400, 1000), 5.0)

    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x1, x2 = two_dropouts(x, 0.05, 0.2, True, hashed)
        return x1, x2, (x1 * w1 + x2 * w2).sum()

    torch.manual_seed(0)
    compiled = torch.compile(run, backend="aot_eager", fullgraph=True)
    x1, x2, total = compiled(x)
    total.backward()
    drop1, drop2 = x1 == 0, x2 == 0
    # The hash resolves rates to 2⁻¹⁶ (0.05 → 3277 / 65536), the 64-bit draw to 2⁻³¹.
    rate1, rate2 = (3277 / 65536, 13108 / 65536) if hashed else (0.05, 0.2)
    n = x.numel()
    for dropped, p in ((drop1, rate1), (drop2, rate2)):
        assert abs(float(dropped.float().mean()) - p) < 4 * (p * (1 - p) / n) ** 0.5
    both = float((drop1 & drop2).float().mean())
    assert abs(both - rate1 * rate2) < 4 * (rate1 * rate2 / n) ** 0.5  # independent
    torch.testing.assert_close(x1[~drop1], torch.full_like(x1[~drop1], 1 / (1 - rate1)))
    torch.testing.assert_close(x2[~drop2], torch.full_like(x2[~drop2], 1 / (1 - rate2)))
    expected = (~drop1) * 3.0 / (1 - rate1) + (~drop2) * 5.0 / (1 - rate2)
    torch.testing.assert_close(x.grad, expected)
    # Neighbours are not correlated (along a row, down a column), and the next call draws anew.
    a = drop1.float()
    for left, right in ((a[:, 1:], a[:, :-1]), (a[1:], a[:-1]), (a, compiled(x)[0].detach() == 0)):
        left, right = left.float(), right.float()
        corr = ((left * right).mean() - left.mean() * right.mean()) / (left.std() * right.std())
        assert abs(float(corr)) < 4 / left.numel() ** 0.5
    # Eager, in eval mode or at rate 0: PyTorch's own dropout, or nothing.
    y = torch.randn(5, 3)
    assert all(t is y for t in two_dropouts(y, 0.05, 0.05, False))
    assert two_dropouts(y, 0.0, 0.05, True)[0] is y


def test_hashed_bits_are_the_splitmix32_finalizer_twice_compiled_or_not() -> None:
    """`hashed_bits` is mix(mix(i ⊕ k₀) ⊕ k₁) with splitmix32's finalizer in 32-bit unsigned
    arithmetic (checked against plain Python integers), and inductor's compiled kernel (int32
    wrap-around in generated code) gives the same bits as eager."""

    def mix(v: int) -> int:
        v ^= v >> 16
        v = (v * 0x21F0AAAD) & 0xFFFFFFFF
        v ^= v >> 15
        v = (v * 0x735A2D97) & 0xFFFFFFFF
        return v ^ (v >> 15)

    shape = torch.Size([37, 1001])
    keys = torch.tensor([0xDEADBEEF - (1 << 32), 12345], dtype=torch.int32)
    bits = hashed_bits(shape, keys).view(-1)
    for i in (0, 1, 2, 999, 1000, 20_000, shape.numel() - 1):
        assert int(bits[i]) & 0xFFFFFFFF == mix(mix(i ^ 0xDEADBEEF) ^ 12345), i
    torch.testing.assert_close(torch.compile(hashed_bits, dynamic=True)(shape, keys).view(-1), bits)


def test_compiled_lora_layers_replay_their_dropouts_when_recomputed() -> None:
    """Compiled, in training, the one-draw dropouts of a recomputed layer are drawn again from the
    restored RNG state: checkpointing every layer gives the gradients of checkpointing none."""
    cfg = TrainConfig(shards=Path("."), model="tiny", recipe="lora", lora_r=4, lora_alpha=8).resolve()
    grads = []
    for recomputed in (0, None):
        torch.manual_seed(0)  # PEFT draws lora_A's init from the global generator
        model = apply_recipe(Loaded(build_model("tiny", seed=0), None, "tiny", "test"), cfg).model.train()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
        model.gradient_checkpointing_enable()
        next(m for m in model.modules() if isinstance(m, IXCModel)).checkpoint_layers = recomputed
        compile_layers(model, backend="aot_eager")
        torch.manual_seed(5)
        model(**_row()).loss_sum.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(".lora_A." in n for n in grads[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_linear_plus_low_rank_gradients() -> None:
    gen = torch.Generator().manual_seed(0)
    x, weight = (
        torch.randn(7, 4, generator=gen, dtype=torch.float64),
        torch.randn(5, 4, generator=gen, dtype=torch.float64),
    )
    h1, h2 = (torch.randn(7, n, generator=gen, dtype=torch.float64) for n in (3, 2))
    b1, b2 = (
        torch.randn(5, 3, generator=gen, dtype=torch.float64),
        torch.randn(5, 2, generator=gen, dtype=torch.float64),
    )
    for frozen in ((), (1, 4), (1, 2, 4)):
        inputs = [
            t.clone().requires_grad_(i not in frozen) for i, t in enumerate((x, weight, h1, h2, b1, b2))
        ]
        assert torch.autograd.gradcheck(linear_plus_low_rank, inputs)
        torch.library.opcheck(linear_plus_low_rank, inputs)
