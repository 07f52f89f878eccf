"""What training and merging hand back loads elsewhere: full-model folders carry the base's remote
code, tokenizer and generation config byte for byte (and load with `trust_remote_code`), adapters
read with PEFT 0.8.2's LoraConfig, and transformers-style `generate` equals the native loop."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import trainer.hf  # noqa: F401  registers model_type internlm2 with the Auto classes
from chat.prompt import build_prompt, load_media
from pipeline.tokenization import Tokenizer, build_tiny_tokenizer
from trainer.config import TrainConfig
from trainer.generate import generate
from trainer.merge import merge
from trainer.model import build_model
from trainer.modelio import Loaded, apply_recipe, load_for_inference
from trainer.output_files import PEFT_082_LORA_FIELDS, portable_adapter_config
from trainer.weights import load_model, save_model

PEFT_082_LORA_CONFIG_FIELDS = {
    "peft_type", "auto_mapping", "base_model_name_or_path", "revision", "task_type", "inference_mode",
    "r", "target_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias", "use_rslora",
    "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern",
    "alpha_pattern", "megatron_config", "megatron_core", "loftq_config",
}  # fmt: skip
"""The dataclass fields of PEFT 0.8.2's LoraConfig (peft/tuners/lora/config.py) and its bases
PeftConfig / PeftConfigMixin (peft/config.py), read from the 0.8.2 wheel: the official
environment passes adapter_config.json to `LoraConfig(**json)`, which refuses any other key."""

REMOTE_CONFIG = """from transformers import PretrainedConfig


class FakeIXCConfig(PretrainedConfig):
    model_type = "internlm2"
"""
REMOTE_MODEL = '''import torch
from transformers import PreTrainedModel

from .configuration_fake_ixc import FakeIXCConfig


class FakeIXCForCausalLM(PreTrainedModel):
    """Stands in for the official remote code: builds the output head and loads it by its key."""

    config_class = FakeIXCConfig

    def __init__(self, config):
        super().__init__(config)
        self.output = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
'''
AUTO_MAP = {
    "AutoConfig": "configuration_fake_ixc.FakeIXCConfig",
    "AutoModelForCausalLM": "modeling_fake_ixc.FakeIXCForCausalLM",
}
COMPANIONS = (
    "configuration_fake_ixc.py",
    "modeling_fake_ixc.py",
    "generation_config.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
MAIN = SimpleNamespace(is_main=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model folder laid out like the released one: auto_map + remote code, tokenizer files
    with a chat template, a generation_config.json of its own formatting."""
    folder = tmp_path_factory.mktemp("base")
    build_tiny_tokenizer(folder / "tokenizer.model")
    model = build_model("tiny", seed=1, vocab_size=Tokenizer.from_path(folder / "tokenizer.model").vocab_size)
    model.config.extra["auto_map"] = AUTO_MAP
    save_model(model, folder, dtype=torch.float32)
    (folder / "configuration_fake_ixc.py").write_text(REMOTE_CONFIG)
    (folder / "modeling_fake_ixc.py").write_text(REMOTE_MODEL)
    (folder / "generation_config.json").write_text(
        '{"bos_token_id": 1,\n "eos_token_id": [2, 3], "pad_token_id": 2}'
    )
    (folder / "tokenizer_config.json").write_text(
        '{"chat_template": "{{ bos_token }}...", "model_max_length": 16384}'
    )
    (folder / "special_tokens_map.json").write_text('{"bos_token": "<s>"}')
    (folder / "README.md").write_text("# the base's model card\n")
    return folder


def write_adapter(base: Path, out: Path) -> Path:
    """A LoRA adapter of `base` with non-zero updates, saved as `xc-train --recipe lora` saves it."""
    cfg = TrainConfig(shards=Path("."), model=str(base), recipe="lora", lora_r=4, lora_alpha=8).resolve()
    loaded = apply_recipe(Loaded(load_model(base), base, str(base), "test"), cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    loaded.save_final(None, out, MAIN)
    return out


@pytest.fixture(scope="module")
def adapter(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    old = os.umask(0o022)
    try:
        return write_adapter(base, tmp_path_factory.mktemp("adapter"))
    finally:
        os.umask(old)


# --------------------------------------------------------------------------- full-model outputs


@pytest.fixture(scope="module")
def outputs(base: Path, adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The merged adapter and a full fine-tuning's final/ (the same save as `xc-train --recipe full`)."""
    root = tmp_path_factory.mktemp("outputs")
    old = os.umask(0o022)
    try:
        merged = merge(adapter, None, root / "merged")
        Loaded(load_model(base), base, str(base), "test").save_final(None, root / "final", MAIN)
    finally:
        os.umask(old)
    return merged, root / "final"


def test_merged_and_full_finetuned_outputs_carry_the_base_files_byte_for_byte(
    base: Path, outputs: tuple[Path, Path]
) -> None:
    for out in outputs:
        for name in (*COMPANIONS, "config.json"):  # config.json: unchanged, so the base's bytes
            assert (out / name).read_bytes() == (base / name).read_bytes(), (out.name, name)
        # Nothing is missing; the note says only that the tiny sizes are not the released ones.
        readme = (out / "README.md").read_text()
        assert "hidden_size 64" in readme and "lacks" not in readme and "model card" not in readme
        weights = sorted(out.glob("*.safetensors"))
        assert weights and all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in weights)


@pytest.mark.slow
def test_merged_and_full_finetuned_outputs_load_with_their_remote_code(
    outputs: tuple[Path, Path], tmp_path: Path
) -> None:
    """As the official environment loads them: `trust_remote_code=True`, in a process that has not
    registered this package's model (transformers >= 5 prefers a registered class)."""
    script = (
        "import sys, torch\n"
        "from safetensors.torch import load_file\n"
        "from transformers import AutoModelForCausalLM\n"
        "for out in sys.argv[1:]:\n"
        "    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)\n"
        "    assert type(model).__name__ == 'FakeIXCForCausalLM', type(model)\n"
        "    saved = {k: v for f in __import__('pathlib').Path(out).glob('*.safetensors') for k, v in load_file(f).items()}\n"
        "    assert torch.equal(model.output.weight, saved['output.weight'])\n"
        "print('ok')\n"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script, *map(str, outputs)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_an_output_of_a_preset_says_what_official_loading_lacks(tmp_path: Path) -> None:
    out = tmp_path / "out"
    save_model(build_model("tiny"), out, dtype=torch.float32)
    readme = (out / "README.md").read_text()
    assert "no `auto_map`" in readme and "tokenizer_config.json" in readme and "hidden_size 64" in readme
    config = json.loads((out / "generation_config.json").read_text())
    assert config == {"bos_token_id": 1, "eos_token_id": [2], "pad_token_id": 2}


# --------------------------------------------------------------------------- adapters


def test_adapter_config_holds_only_what_peft_082_accepts(adapter: Path, base: Path) -> None:
    assert PEFT_082_LORA_FIELDS == PEFT_082_LORA_CONFIG_FIELDS
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert set(config) <= PEFT_082_LORA_CONFIG_FIELDS
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["task_type"]) == (
        "LORA",
        4,
        8,
        "CAUSAL_LM",
    )
    assert config["base_model_name_or_path"] == str(base)
    assert stat.S_IMODE((adapter / "adapter_model.safetensors").stat().st_mode) == 0o644
    assert (adapter / "generation_config.json").read_bytes() == (base / "generation_config.json").read_bytes()


def test_an_adapter_setting_peft_08_lacks_is_refused(adapter: Path, tmp_path: Path) -> None:
    config = json.loads((adapter / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({**config, "use_dora": True, "peft_version": "9"})
    )
    with pytest.raises(ValueError, match="use_dora=True"):
        portable_adapter_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({**config, "use_dora": False, "peft_version": "9"})
    )
    portable_adapter_config(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text()) == config


# --------------------------------------------------------------------------- transformers' generate


def test_auto_classes_generate_what_the_native_loop_generates(
    base: Path, adapter: Path, tmp_path: Path
) -> None:
    """AutoPeftModelForCausalLM (adapter) and AutoModelForCausalLM (merged) `.generate` on a text and
    an image prompt, greedy: the prompt, then the native loop's tokens and the eos that ended them."""
    from peft import AutoPeftModelForCausalLM
    from PIL import Image
    from skimage import data
    from transformers import AutoModelForCausalLM

    Image.fromarray(data.chelsea()).save(tmp_path / "cat.png")
    tokenizer = Tokenizer.from_path(base / "tokenizer.model")
    stop = [tokenizer.eos_id, tokenizer.end_of_turn_id]  # the base's generation_config.json: [2, 3]
    prompts = [
        build_prompt(tokenizer, "Who are you?"),
        build_prompt(tokenizer, "What is this?", load_media([tmp_path / "cat.png"])),
    ]
    native = load_for_inference(adapter, dtype=torch.float32, device=torch.device("cpu"))
    merged = merge(adapter, None, tmp_path / "merged")
    for auto in (
        AutoPeftModelForCausalLM.from_pretrained(str(adapter)),
        AutoModelForCausalLM.from_pretrained(str(merged)),
    ):
        for prompt in prompts:
            inputs = prompt.generate_inputs()
            out = auto.generate(**inputs, max_new_tokens=16, do_sample=False)
            new = generate(
                native,
                inputs["input_ids"][0],
                inputs.get("tiles"),
                inputs.get("image_grids"),
                inputs.get("image_starts"),
                max_new_tokens=16,
                stop_ids=stop,
            )
            t = prompt.num_tokens
            assert torch.equal(out[0, :t], inputs["input_ids"][0])
            got = out[0, t:].tolist()
            assert got[: len(new)] == new and (got[len(new) :] in ([], [2], [3])), (got, new)
    # A left-padded batch: each row as if alone, then padding.
    ids = prompts[0].generate_inputs()["input_ids"]
    longer = torch.cat([ids, ids[:, 1:4]], dim=1)
    batch = torch.cat([torch.cat([torch.full((1, 3), 2), ids], dim=1), longer])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    model = AutoModelForCausalLM.from_pretrained(str(merged))
    out = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False)
    for row, alone in ((0, ids), (1, longer)):
        single = model.generate(alone, max_new_tokens=5, do_sample=False)[0, alone.shape[1] :]
        new = out[row, batch.shape[1] :]
        assert torch.equal(new[: len(single)], single) and (new[len(single) :] == 2).all()
    with pytest.raises(ValueError, match="num_beams=2"):
        model.generate(ids, max_new_tokens=2, num_beams=2)
    with pytest.raises(ValueError, match="max_length"):
        model.generate(prompts[1].generate_inputs()["input_ids"])  # transformers' max_length 20


def test_xc_chat_answers_with_an_adapter_on_its_recorded_or_a_given_base(
    base: Path, adapter: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from chat.cli import main as xc_chat

    native = load_for_inference(adapter, dtype=torch.float32, device=torch.device("cpu"))
    tokenizer = Tokenizer.from_path(adapter / "tokenizer.model")
    prompt = build_prompt(tokenizer, "Who are you?")
    expected = generate(
        native,
        torch.from_numpy(prompt.input_ids).long(),
        max_new_tokens=8,
        stop_ids=[tokenizer.eos_id, tokenizer.end_of_turn_id],
        repetition_penalty=1.005,
    )
    flags = ["--prompt", "Who are you?", "--temperature", "0", "--max-new-tokens", "8", "--json"]
    for model in ([], ["--model", str(base)]):
        capsys.readouterr()
        assert xc_chat([*model, "--adapter", str(adapter), *flags]) == 0
        answer = json.loads(capsys.readouterr().out)
        assert answer["prompt_ids"] == prompt.input_ids.tolist() and answer["generated_ids"] == expected


def test_xc_train_generate_prints_the_turn_markers_users_know(
    tiny_text_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from trainer.cli import main as xc_train

    tokenizer = tiny_text_shards / "tokenizer.model"
    folder = tmp_path / "model"
    save_model(
        build_model("tiny", vocab_size=Tokenizer.from_path(tokenizer).vocab_size), folder, dtype=torch.float32
    )
    (folder / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    argv = ["generate", "--model", str(folder), "--shards", str(tiny_text_shards), "--max-new-tokens", "2"]
    assert xc_train(argv) == 0
    out = capsys.readouterr().out
    assert "<|im_start|>user\\n" in out and "<|im_end|>" in out and "UNUSED_TOKEN" not in out
