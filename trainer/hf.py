"""The native model on transformers' side: Auto classes (model_type `internlm2`, no remote code)
and `generate` with transformers' signature.

After `import trainer.hf`, `AutoModelForCausalLM.from_pretrained(folder)` loads an official-layout
IXC2.5 folder with this package's model, and PEFT's
`AutoPeftModelForCausalLM.from_pretrained(adapter_dir)` loads an adapter written by `xc-train`
on top of its recorded base — the same call the official scripts use, without
`trust_remote_code` or the network. Loading goes through `trainer.weights.load_model`, so the
unused lora_sft/dpo/web weights are kept and every key is checked.

`model.generate(...)` (`IXCModel.generate`, also through PEFT's wrapper) takes what users pass to
transformers' `generate` and returns the same tensor: input_ids [B, T] (+ attention_mask, left or
right padding), max_new_tokens / max_length, do_sample, temperature, top_k, top_p,
repetition_penalty, eos_token_id, pad_token_id, generation_config, streamer. Defaults come from
`model.generation_config`, else the model folder's generation_config.json, else transformers'.
Image inputs are keyword arguments, as `IXCModel.forward` takes them (one prompt, B = 1):
tiles uint8[N, 560, 560, 3], image_grids int64[I, 2], image_starts int64[I], with input_ids
holding the image positions (any id >= -100); `chat.prompt.build_prompt(...).generate_inputs()`
makes all four. Beam search and other strategies raise ValueError.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PretrainedConfig

from schemas.manifest import TOKENIZER_NAME
from trainer.generate import stream_tokens
from trainer.model import IXCModel
from trainer.modelio import resolve_model_dir
from trainer.output_files import GENERATION_CONFIG, generation_config
from trainer.weights import load_model

MODEL_TYPE = "internlm2"
DEFAULTS = {
    "max_length": 20,
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
}
"""transformers' global defaults, for what neither the call nor the generation config sets."""
NEUTRAL = {
    "num_beams": 1,
    "num_return_sequences": 1,
    "return_dict_in_generate": False,
    "output_scores": False,
    "output_logits": False,
    "output_attentions": False,
    "output_hidden_states": False,
    "min_new_tokens": 0,
    "min_length": 0,
    "no_repeat_ngram_size": 0,
    "typical_p": 1.0,
    "min_p": 0.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "penalty_alpha": 0.0,
    "guidance_scale": 1.0,
    "bad_words_ids": [],
    "force_words_ids": [],
    "sequence_bias": {},
    "suppress_tokens": [],
    "begin_suppress_tokens": [],
    "forced_bos_token_id": -1,
    "forced_eos_token_id": -1,
    "stop_strings": [],
}
"""Settings this `generate` does not implement: refused unless unset or at the value that changes nothing."""


class IXCConfig(PretrainedConfig):
    """transformers-side view of an IXC2.5 config.json (the model itself reads `ModelConfig`)."""

    model_type = MODEL_TYPE


class IXCForCausalLM(IXCModel):
    """The class the Auto loaders resolve `internlm2` to; `from_pretrained` returns an `IXCModel`."""

    config_class = IXCConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> IXCModel:
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if isinstance(dtype, str):
            dtype = None if dtype == "auto" else getattr(torch, dtype)
        device = kwargs.get("device_map") or "cpu"
        if not isinstance(device, str | torch.device):  # a per-module device map: load on the CPU
            device = "cpu"
        folder = resolve_model_dir(str(pretrained_model_name_or_path))
        return load_model(folder, dtype=dtype, device=device if device != "auto" else "cpu")


def model_generation_config(model: IXCModel) -> GenerationConfig:
    """`model.generation_config`, read from the model's folder (or made from its config.json) at first use."""
    if model.generation_config is None:
        folder = model.source_dir
        if folder is not None and (folder / GENERATION_CONFIG).is_file():
            model.generation_config = GenerationConfig.from_pretrained(str(folder))
        else:
            tokenizer = folder / TOKENIZER_NAME if folder is not None else None
            model.generation_config = GenerationConfig(**generation_config(model.config, tokenizer))
    return model.generation_config


def _setting(config: GenerationConfig, name: str) -> Any:
    value = getattr(config, name, None)
    return DEFAULTS[name] if value is None else value


def generate(
    model: IXCModel,
    inputs: torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    streamer: Any | None = None,
    *,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    tiles: torch.Tensor | None = None,
    image_grids: torch.Tensor | None = None,
    image_starts: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """transformers' `generate` (greedy or sampling, one sequence per prompt) with the KV-cache loop
    of `trainer.generate`: int64[B, T + new] — each row its prompt, then its new tokens (the eos
    that ended it included), then pad_token_id up to the longest row (module docstring)."""
    ids = inputs if inputs is not None else input_ids
    if ids is None:
        given = "inputs_embeds" if "inputs_embeds" in kwargs else "nothing"
        raise ValueError(
            f"IXCModel.generate needs input_ids (got {given}); images go in as tiles, image_grids and "
            "image_starts (trainer/hf.py)"
        )
    config = copy.deepcopy(generation_config or model_generation_config(model))
    unknown = config.update(**kwargs)
    unknown.pop("use_cache", None)
    if unknown:
        raise ValueError(f"IXCModel.generate does not take {', '.join(sorted(unknown))}")
    refused = [
        f"{name}={getattr(config, name)!r}"
        for name, neutral in NEUTRAL.items()
        if getattr(config, name, None) not in (None, neutral)
    ]
    if refused:
        raise ValueError(
            f"IXCModel.generate does greedy search and sampling only; it does not implement {', '.join(refused)}"
        )
    do_sample, temperature = bool(_setting(config, "do_sample")), float(_setting(config, "temperature"))
    if do_sample and temperature <= 0:
        raise ValueError(
            f"temperature ({temperature}) must be strictly positive when sampling; for greedy "
            "decoding set do_sample=False"
        )
    eos = config.eos_token_id
    stop_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    pad = config.pad_token_id if config.pad_token_id is not None else (stop_ids or [0])[0]
    ids = ids[None] if ids.dim() == 1 else ids
    mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    has_images = image_grids is not None and len(image_grids) > 0
    if has_images and (ids.shape[0] != 1 or not bool(mask.all())):
        raise ValueError("images go with one unpadded prompt: input_ids [1, T] and no attention_mask zeros")
    if streamer is not None and ids.shape[0] != 1:
        raise ValueError("a streamer takes one prompt (batch size 1), as in transformers")
    if streamer is not None:
        streamer.put(ids.cpu())
    rows = []
    for row, row_mask in zip(ids, mask, strict=True):
        prompt = row[row_mask]
        max_new = config.max_new_tokens
        if max_new is None:
            max_new = int(_setting(config, "max_length")) - prompt.shape[0]
            if max_new <= 0:
                raise ValueError(
                    f"max_length ({_setting(config, 'max_length')}) leaves no room after the "
                    f"{prompt.shape[0]}-token prompt; pass max_new_tokens"
                )
        new = []
        for token in stream_tokens(
            model,
            prompt,
            tiles,
            image_grids,
            image_starts,
            max_new_tokens=max_new,
            temperature=temperature if do_sample else 0.0,
            top_k=int(_setting(config, "top_k")),
            top_p=float(_setting(config, "top_p")),
            repetition_penalty=float(_setting(config, "repetition_penalty")),
            stop_ids=stop_ids,
        ):
            new.append(token)
            if streamer is not None:
                streamer.put(torch.tensor([token]))
        rows.append(new)
    if streamer is not None:
        streamer.end()
    width = max(len(r) for r in rows)
    out = torch.full((ids.shape[0], ids.shape[1] + width), pad, dtype=torch.long, device=ids.device)
    out[:, : ids.shape[1]] = ids
    for b, new in enumerate(rows):
        out[b, ids.shape[1] : ids.shape[1] + len(new)] = torch.tensor(new, dtype=torch.long)
    return out


def register() -> None:
    """Idempotent: map model_type internlm2 to this package's config and model classes."""
    try:
        AutoConfig.register(MODEL_TYPE, IXCConfig)
    except ValueError:  # already registered (by an earlier import)
        pass
    try:
        AutoModelForCausalLM.register(IXCConfig, IXCForCausalLM)
    except ValueError:
        pass


register()
