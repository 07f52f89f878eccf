"""PEFT LoRA wraps the five PLoRA linears by their official names; only LoRA trains; merge is exact."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from schemas.sample import image_token_count
from trainer.model import PLORA_TARGETS, VisionTower, build_model


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
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(PLORA_TARGETS), task_type=task_type
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
        target_modules=list(PLORA_TARGETS),
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
