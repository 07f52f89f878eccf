"""Load and save IXC2.5 model folders in the official layout, natively (no trust_remote_code, no network).

A model folder holds `config.json` (official field names, see `ModelConfig`), the weights as
`model.safetensors`, `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`,
`pytorch_model.bin`, or `pytorch_model-0000k-of-0000n.bin` + `pytorch_model.bin.index.json`
(`.bin` files are read with `torch.load(weights_only=True)` only), and the companion files
loading needs (remote code, tokenizer, generation_config.json: `trainer/output_files.py`).

Loading checks the whole key set and every shape before reading any tensor and reports every
problem at once. Saving writes the same 1,904 keys and shapes (7B) as sharded safetensors; a
tensor training did not touch is written with the bytes it was loaded with (bf16 -> fp32 -> bf16
is exact, and the unused lora_sft/dpo/web weights are never converted).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from trainer.errors import ModelFolderError
from trainer.model import IXCModel, build_model
from trainer.model_config import DTYPES, ModelConfig
from trainer.output_files import finish_model_folder, readable_by_group

CONFIG_FILE = "config.json"
SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
"""Largest safetensors shard written by `save_model` (a single tensor may exceed it)."""
_LIST_AT_MOST = 12


# --------------------------------------------------------------------------- reading


def load_config(folder: str | Path) -> ModelConfig:
    """`ModelConfig` of a model folder; ModelFolderError if the folder or config.json is missing/invalid."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(
            f"model folder {folder} does not exist (give a folder holding config.json and the weights, or a preset: tiny, 7b)"
        )
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ModelFolderError(
            f"{path} is missing: an IXC2.5 model folder needs its config.json beside the weights"
        )
    try:
        data = json.loads(path.read_text())
        return ModelConfig.from_dict(data)
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise ModelFolderError(f"{path}: {e}") from e


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint files of a folder, safetensors preferred over .bin; ModelFolderError if none/partial."""
    for index_name, single in ((SAFE_INDEX, SAFE_SINGLE), (BIN_INDEX, BIN_SINGLE)):
        index = folder / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise ModelFolderError(
                    f"{index} lists {len(names)} shard files but {len(missing)} are missing: "
                    f"{', '.join(missing[:_LIST_AT_MOST])} — copy the complete checkpoint"
                )
            return [folder / n for n in names]
        if (folder / single).is_file():
            return [folder / single]
    loose = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if loose:
        return loose
    raise ModelFolderError(
        f"{folder} holds no weights ({SAFE_SINGLE}, {SAFE_INDEX} + shards, {BIN_SINGLE} or {BIN_INDEX} + shards)"
    )


def _read_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        # mmap: tensors are paged in when copied to the model, not all at once.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001  (pickle errors come in many types)
        raise ModelFolderError(f"{path}: not a readable weights-only torch checkpoint ({e})") from e


def _shapes(files: list[Path]) -> dict[str, tuple[tuple[int, ...], Path]]:
    """key -> (shape, file), read from headers (safetensors) or lazily mapped files (.bin)."""
    found: dict[str, tuple[tuple[int, ...], Path]] = {}
    duplicates = []
    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                entries = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        else:
            entries = {k: tuple(v.shape) for k, v in _read_bin(path).items()}
        for key, shape in entries.items():
            if key in found:
                duplicates.append(f"{key} ({found[key][1].name}, {path.name})")
            found[key] = (shape, path)
    if duplicates:
        raise ModelFolderError(f"keys stored twice: {', '.join(duplicates[:_LIST_AT_MOST])}")
    return found


def _read_file(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118
                yield key, f.get_tensor(key)
    else:
        yield from _read_bin(path).items()


def _check_keys(
    folder: Path, expected: dict[str, tuple[int, ...]], found: dict[str, tuple[tuple[int, ...], Path]]
) -> None:
    """Collect every key problem, then fail once (STYLE 11)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [
        f"{k}: expected {list(expected[k])}, got {list(found[k][0])} (in {found[k][1].name})"
        for k in expected
        if k in found and tuple(found[k][0]) != tuple(expected[k])
    ]
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if items:
            listed = "\n    ".join(items[:_LIST_AT_MOST])
            more = f"\n    ... and {len(items) - _LIST_AT_MOST} more" if len(items) > _LIST_AT_MOST else ""
            problems.append(f"  {len(items)} {title} key(s):\n    {listed}{more}")
    if problems:
        raise ModelFolderError(
            f"{folder}: the weights do not match config.json ({len(expected)} keys expected, {len(found)} found):\n"
            + "\n".join(problems)
            + "\n  Check that config.json belongs to these weights and that every shard was copied completely."
        )


def load_model(
    folder: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    attention: str = "auto",
) -> IXCModel:
    """An IXCModel with the folder's weights, in eval mode (call .train() to train).

    dtype defaults to config.json's torch_dtype (bf16 for the released model); pass float32 for
    CPU work. Parameters go to `device`; the unused lora_sft/dpo/web weights stay on the CPU in
    their stored dtype. Shards are read one at a time.
    """
    folder = Path(folder)
    config = load_config(folder)
    files = weight_files(folder)
    dtype = dtype or config.dtype
    model = build_model(config, dtype=dtype, device="meta", attention=attention)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    _check_keys(folder, expected, _shapes(files))
    model.to_empty(device=device)
    model.reset_buffers()
    loaded: set[str] = set()
    for path in files:
        tensors = dict(_read_file(path))
        result = model.load_state_dict(tensors, strict=False)
        assert not result.unexpected_keys, result.unexpected_keys  # _check_keys ruled these out
        loaded.update(tensors)
        del tensors
    assert loaded == set(expected), f"not loaded: {sorted(set(expected) - loaded)[:5]}"
    model.source_dir = folder
    return model.eval()


# --------------------------------------------------------------------------- writing


def _plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    current = 0
    for key, size in sizes.items():
        if shards[-1] and current + size > max_shard_bytes:
            shards.append([])
            current = 0
        shards[-1].append(key)
        current += size
    return shards


def save_model(
    model: IXCModel,
    folder: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    copy_from: str | Path | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write `model` as an official-layout folder; returns the weight files written.

    Tensors are cast to `dtype` (default: config.json's torch_dtype) only where their dtype
    differs; one shard is materialized on the CPU at a time. config.json is written back with any
    unknown official fields kept (the source's bytes when nothing changed); remote code, tokenizer
    files and generation_config.json come from `copy_from` (default: the folder the model was
    loaded from), see `trainer/output_files.py`. An existing folder with weights is refused unless
    overwrite=True, which first removes its old weight files (stale shards would mix into a later load).
    """
    if not isinstance(model, IXCModel):
        raise TypeError(
            f"save_model takes an IXCModel, got {type(model).__name__}; for a PEFT model call "
            "merge_and_unload() first (or save the adapter with save_pretrained)"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    old = [
        p
        for pattern in ("*.safetensors", "pytorch_model*.bin", SAFE_INDEX, BIN_INDEX)
        for p in folder.glob(pattern)
    ]
    if old and not overwrite:
        raise ModelFolderError(
            f"{folder} already holds weights ({old[0].name}, ...): choose an empty folder or pass overwrite=True "
            "(`xc-merge --overwrite`)"
        )
    for path in old:
        path.unlink()
    dtype = dtype or model.config.dtype
    flags = [m.unused_in_state_dict for m in model.plora_linears()]
    model.set_unused_adapters_in_state_dict(True)  # a model folder always holds all 1,904 keys
    try:
        state = model.state_dict()
    finally:
        for m, flag in zip(model.plora_linears(), flags, strict=True):
            m.unused_in_state_dict = flag
    target = {k: (dtype if v.is_floating_point() else v.dtype) for k, v in state.items()}
    sizes = {k: v.numel() * torch.empty((), dtype=target[k]).element_size() for k, v in state.items()}
    shards = _plan_shards(sizes, max_shard_bytes)
    names = (
        [SAFE_SINGLE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    written = []
    for name, keys in zip(names, shards, strict=True):
        tensors = {}
        for key in keys:
            t = state[key].detach()
            if t.dtype != target[key]:
                t = t.to(
                    target[key]
                )  # trained fp32 weights -> stored dtype; untouched bf16 round-trips exactly
            tensors[key] = t.to("cpu").contiguous()
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        readable_by_group(folder / name)
        written.append(folder / name)
        del tensors
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(sizes.values())},
            "weight_map": {k: name for name, keys in zip(names, shards, strict=True) for k in keys},
        }
        (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    config = model.config.to_dict()
    config["torch_dtype"] = {v: k for k, v in DTYPES.items()}[dtype]
    source = Path(copy_from) if copy_from is not None else model.source_dir
    source_config = None if source is None else Path(source) / CONFIG_FILE
    if (
        source_config is not None
        and source_config.is_file()
        and source_config.resolve() != (folder / CONFIG_FILE).resolve()
        and json.loads(source_config.read_text()) == config
    ):
        shutil.copyfile(source_config, folder / CONFIG_FILE)  # unchanged: the base's bytes
    else:
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    finish_model_folder(folder, model.config, Path(source) if source is not None else None)
    return written
