"""Official-layout model folders: save -> load -> save is bit-identical, .bin shards load, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainer.errors import ModelFolderError
from trainer.model import IXCModel, build_model
from trainer.weights import load_config, load_model, save_model

SHARD_BYTES = 150_000  # the tiny model is ~0.57 MB in bf16: several shards


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model with random unused adapters, saved once with a tokenizer file and an unknown config field."""
    src = tmp_path_factory.mktemp("src")
    (src / "tokenizer.model").write_bytes(b"not a real tokenizer")
    model = build_model("tiny", seed=3)
    gen = torch.Generator().manual_seed(0)
    for m in model.plora_linears():
        for k, t in m.unused_adapters.items():
            m.unused_adapters[k] = torch.randn(t.shape, generator=gen).to(torch.bfloat16)
    model.config.extra["auto_map"] = {
        "AutoModel": "modeling_internlm_xcomposer2.InternLMXComposer2ForCausalLM"
    }
    out = tmp_path_factory.mktemp("saved")
    save_model(model, out, max_shard_bytes=SHARD_BYTES, copy_from=src)
    return out


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_save_load_save_is_bit_identical(saved: Path, tmp_path: Path) -> None:
    files = _bytes(saved)
    assert "model.safetensors.index.json" in files and "tokenizer.model" in files
    assert sum(n.endswith(".safetensors") for n in files) > 1
    model = load_model(saved, dtype=torch.float32)  # bf16 -> fp32 -> bf16 is exact
    model.set_unused_adapters_in_state_dict(False)  # as for training checkpoints: save writes them anyway
    save_model(model, tmp_path / "again", max_shard_bytes=SHARD_BYTES)
    assert _bytes(tmp_path / "again") == files
    config = json.loads((saved / "config.json").read_text())
    assert config["auto_map"]["AutoModel"].endswith("ForCausalLM") and config["plora_r"] == 8
    assert config["torch_dtype"] == "bfloat16" and config["model_type"] == "internlm2"


def test_loaded_model_runs_like_the_saved_one(saved: Path) -> None:
    a = load_model(saved, dtype=torch.float32)
    b = load_model(saved)  # config dtype: bf16
    assert b.output.weight.dtype == torch.bfloat16
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa.to(pb.dtype), pb), name
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        la = a(ids, return_logits=True).logits
        lb = b(ids, return_logits=True).logits
    torch.testing.assert_close(lb.float(), la, atol=2e-2, rtol=0)  # bf16 on CPU runs too
    assert not a.training  # load_model returns eval mode


def test_sharded_bin_folder_loads(saved: Path, tmp_path: Path) -> None:
    tensors = {}
    for f in sorted(saved.glob("*.safetensors")):
        tensors |= load_file(f)
    keys = list(tensors)
    half = len(keys) // 2
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({k: tensors[k] for k in part}, tmp_path / name)
        weight_map |= {k: name for k in part}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text((saved / "config.json").read_text())
    model = load_model(tmp_path)
    sd = model.state_dict()
    assert sd.keys() == tensors.keys()
    assert all(torch.equal(sd[k], tensors[k]) for k in keys)


def _copy_with(saved: Path, dest: Path, edit) -> Path:  # noqa: ANN001
    tensors = {}
    for f in sorted(saved.glob("*.safetensors")):
        tensors |= load_file(f)
    edit(tensors)
    dest.mkdir()
    save_file(tensors, dest / "model.safetensors")
    (dest / "config.json").write_text((saved / "config.json").read_text())
    return dest


def test_errors_name_the_problem(saved: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelFolderError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFolderError, match="config.json is missing"):
        load_config(tmp_path / "empty")

    def damage(t: dict) -> None:
        del t["model.layers.1.feed_forward.w2.lora_web_B.weight"]
        del t["output.weight"]
        t["extra.weight"] = torch.zeros(2)
        t["plora_sub_GN"] = torch.zeros(1, 1, 1, 7)

    folder = _copy_with(saved, tmp_path / "bad", damage)
    with pytest.raises(ModelFolderError) as e:
        load_model(folder)
    msg = str(e.value)
    assert "2 missing key(s)" in msg and "output.weight" in msg and "lora_web_B" in msg
    assert "1 unexpected key(s)" in msg and "extra.weight" in msg
    assert "plora_sub_GN: expected [1, 1, 1, 128], got [1, 1, 1, 7]" in msg

    partial = tmp_path / "partial"
    partial.mkdir()
    for f in saved.iterdir():
        if not f.name.startswith("model-00002"):
            (partial / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ModelFolderError, match="1 are missing: model-00002"):
        load_model(partial)
    with pytest.raises(ModelFolderError, match="already holds weights"):
        save_model(load_model(saved), saved)


def test_save_refuses_a_peft_wrapper(tmp_path: Path) -> None:
    class Wrapper(torch.nn.Module):
        pass

    with pytest.raises(TypeError, match="merge_and_unload"):
        save_model(Wrapper(), tmp_path)  # type: ignore[arg-type]
    assert isinstance(build_model("tiny"), IXCModel)
