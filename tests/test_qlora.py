"""`--recipe qlora` (issue 27): the five PLoRA linears of every decoder layer in 4-bit NF4 through
bitsandbytes, LoRA over them; the saved adapter is the LoRA recipe's and loads like it.

bitsandbytes runs 4-bit on CPU (0.50 tested), so these run on CPU
with the tiny preset and DeepSpeed on gloo; without bitsandbytes they skip.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from trainer.cli import main as xc_train
from trainer.config import TrainConfig
from trainer.model import PLoRALinear, build_model

bnb = pytest.importorskip("bitsandbytes")

from trainer.qlora import PLoRALinear4bit, quantize_base  # noqa: E402

ADAPTER_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.\d+\.(attention\.(wqkv|wo)|feed_forward\.w[123])\.lora_[AB]\.weight$"
)


pytestmark = pytest.mark.usefixtures("in_process_training")


def test_quantized_linears_hold_nf4_weights_and_compute_close_to_the_full_ones() -> None:
    model = build_model("tiny", seed=0)
    reference = {
        name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, PLoRALinear)
    }
    plora = {
        name: m.Plora_A.weight.detach().clone()
        for name, m in model.named_modules()
        if isinstance(m, PLoRALinear)
    }
    x = torch.randn(7, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    layer = model.model.layers[0].attention.wqkv
    mask = torch.ones(7, 1)
    full = layer(x, mask)
    assert quantize_base(model, torch.device("cpu")) == len(reference) == 5 * model.config.num_hidden_layers
    for name, module in model.named_modules():
        if name in reference:
            assert isinstance(module, PLoRALinear4bit)
            assert isinstance(module.weight, bnb.nn.Params4bit) and module.weight.quant_type == "nf4"
            assert module.weight.dtype == torch.uint8 and module.weight.numel() * 2 == reference[name].numel()
            # Plora (the image-token update) is not quantized
            assert (
                torch.equal(module.Plora_A.weight, plora[name]) and module.Plora_A.weight.is_floating_point()
            )
    quantized = layer(x, mask)
    # NF4 (16 levels, blocks of 64) of normal weights: ~9 % relative error (measured 0.088-0.094)
    assert ((quantized - full).norm() / full.norm()).item() < 0.15
    assert not torch.equal(quantized, full)
    # the gradient reaches the input through the 4-bit matmul
    x.requires_grad_(True)
    layer(x, mask).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_qlora_refuses_zero_3() -> None:
    with pytest.raises(ValueError, match="--recipe qlora does not work with --zero-stage 3"):
        TrainConfig(shards=Path("s"), recipe="qlora", zero_stage=3).resolve()
    cfg = TrainConfig(shards=Path("s"), recipe="qlora").resolve()
    assert (cfg.use_lora, cfg.fix_vit, cfg.fix_sampler, cfg.zero_stage) == (True, True, True, 1)


@pytest.mark.slow
def test_qlora_trains_resumes_and_saves_the_lora_recipes_adapter(
    tiny_text_shards: Path, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    from safetensors.torch import load_file

    from trainer.modelio import load_for_inference

    out = tmp_path / "run"
    argv = [
        "--shards", str(tiny_text_shards), "--model", "tiny", "--output-dir", str(out), "--recipe", "qlora",
        "--max-length", "128", "--global-batch-size", "2", "--num-workers", "0", "--warmup-ratio", "0",
        "--learning-rate", "2e-3", "--max-steps", "4", "--save-every-steps", "100",
    ]  # fmt: skip
    assert xc_train([*argv, "--stop-after-steps", "2"]) == 0  # a checkpoint without the 4-bit base
    assert xc_train(argv) == 0
    log = capfd.readouterr().err
    assert "decoder linears in 4-bit NF4) | recipe qlora" in log
    assert "resumed from" in log and "step 3/4 |" in log
    summary = json.loads((out / "train_summary.json").read_text())
    losses = [h["loss"] for h in summary["history"]]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]

    adapter = out / "final"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(
        (out / "base").resolve()
    )
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert weights and all(ADAPTER_KEY.match(k) for k in weights), sorted(weights)
    assert len(weights) == 2 * 5 * 2  # lora_A/B × five linears × 2 layers: the LoRA recipe's keys
    assert any(w.abs().max() > 0 for k, w in weights.items() if ".lora_B." in k)

    # it loads like a LoRA adapter: on the 16-bit base
    model = load_for_inference(adapter, dtype=torch.float32, device=torch.device("cpu"))
    assert not any(isinstance(m, PLoRALinear4bit) for m in model.modules())
    assert xc_train(["eval", "--model", str(adapter), "--shards", str(tiny_text_shards)]) == 0
