"""Held-out loss (`xc-train eval`) and answering a stored prompt (`xc-train generate`).

Both read shards through `schemas/` only and load a model folder or a LoRA adapter folder
(`trainer.modelio.load_for_inference`). Evaluation visits every stored sample exactly once,
one sample per row, and reports each sample's mean token loss plus token-weighted means per
source and overall.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from schemas.manifest import TOKENIZER_NAME
from schemas.sample import IGNORE_INDEX, Sample
from schemas.shards import ShardReader
from schemas.tokens import for_display
from trainer.batch import collate
from trainer.generate import generate
from trainer.heldout import sample_losses
from trainer.index import SampleIndex, read_sample
from trainer.modelio import load_for_inference

STOP_PIECES = ("[UNUSED_TOKEN_145]", "</s>")
"""Generation stops at the end of the assistant's turn (or the end of the text)."""


def _device_dtype() -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def _read(index: SampleIndex, g: int, readers: dict[int, ShardReader] | None = None) -> Sample:
    """Stored sample g; `readers` (shard number -> open reader) keeps each shard mapped once."""
    if not 0 <= g < len(index):
        raise IndexError(f"sample {g} is out of range: {index.shards_dir} holds {len(index)} samples")
    readers = {} if readers is None else readers
    return read_sample(
        readers, index.store, index.shard_files, int(index.sample_shard[g]), int(index.sample_row[g])
    )


@torch.no_grad()
def evaluate(model_path: str | Path, shards: str | Path) -> dict[str, Any]:
    device, dtype = _device_dtype()
    index = SampleIndex.load(shards)  # before the model: bad shards fail fast
    model = load_for_inference(model_path, dtype=dtype, device=device)
    readers: dict[int, ShardReader] = {}
    per_sample = []
    for g in range(len(index)):
        sample = _read(index, g, readers)
        sums, counts = sample_losses(model, collate([sample]).to(device))
        loss_sum, count = float(sums[0]), int(counts[0])
        per_sample.append(
            {
                "source": sample.source,
                "file": sample.file,
                "index": sample.index,
                "id": sample.id,
                "tokens": sample.num_tokens,
                "trained_tokens": count,
                "loss": loss_sum / max(1, count),
                "loss_sum": loss_sum,
            }
        )
    by_source: dict[str, list[float]] = {}
    for r in per_sample:
        acc = by_source.setdefault(r["source"], [0.0, 0])
        acc[0] += r["loss_sum"]
        acc[1] += r["trained_tokens"]
    total_sum = sum(a[0] for a in by_source.values())
    total_count = sum(a[1] for a in by_source.values())
    return {
        "model": str(model_path),
        "shards": str(shards),
        "samples": len(per_sample),
        "mean_loss": total_sum / max(1, total_count),
        "mean_sample_loss": float(np.mean([r["loss"] for r in per_sample])) if per_sample else None,
        "per_source": {k: s / max(1, c) for k, (s, c) in by_source.items()},
        "per_sample": per_sample,
    }


def format_eval(result: dict[str, Any]) -> str:
    lines = [f"{'source':<28} {'index':>6} {'id':>12} {'tokens':>7} {'loss':>8}"]
    for r in result["per_sample"]:
        lines.append(
            f"{r['source']:<28} {r['index']:>6} {str(r['id']):>12} {r['trained_tokens']:>7} {r['loss']:>8.4f}"
        )
    for source, loss in result["per_source"].items():
        lines.append(f"source {source}: mean loss {loss:.4f}")
    mean_sample = result["mean_sample_loss"]
    lines.append(
        f"{result['samples']} samples | mean loss (token-weighted) {result['mean_loss']:.4f} | "
        f"mean per-sample loss {'n/a' if mean_sample is None else f'{mean_sample:.4f}'}"
    )
    return "\n".join(lines)


@torch.no_grad()
def generate_for_sample(
    model_path: str | Path,
    shards: str | Path,
    g: int,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_ids: list[int] | None = None,
) -> dict[str, Any]:
    """Generate from the sample's prompt: its tokens before the first trained label. The texts
    show the turn markers as `<|im_start|>`/`<|im_end|>`.

    Stops at `stop_ids`, by default the shards' tokenizer's end of turn and `</s>` (the released
    ids 92542 and 2 hold only for the real tokenizer; the tiny one numbers them differently).
    """
    import sentencepiece as spm

    device, dtype = _device_dtype()
    index = SampleIndex.load(shards)
    sample = _read(index, g)  # before the model: an out-of-range --sample fails fast
    model = load_for_inference(model_path, dtype=dtype, device=device)
    sp = spm.SentencePieceProcessor(model_file=str(index.tokenizer_dir() / TOKENIZER_NAME))
    if stop_ids is None:
        stop_ids = [i for i in map(sp.piece_to_id, STOP_PIECES) if i != sp.unk_id()]
    trained = np.flatnonzero(sample.labels != IGNORE_INDEX)
    cut = int(trained[0])
    answer_end = cut
    while answer_end < sample.num_tokens and sample.labels[answer_end] != IGNORE_INDEX:
        answer_end += 1
    images = [im for im in sample.images if im.span[1] <= cut]
    tile_count = sum(im.num_tiles for im in images)
    ids = torch.from_numpy(sample.input_ids[:cut].astype(np.int64)).clamp_min(0)
    new = generate(
        model,
        ids,
        torch.from_numpy(np.ascontiguousarray(sample.tiles[:tile_count])) if images else None,
        torch.tensor([im.grid for im in images], dtype=torch.int64) if images else None,
        torch.tensor([im.span[0] for im in images], dtype=torch.int64) if images else None,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        stop_ids=stop_ids,
        seed=seed,
    )
    text_ids = [int(t) for t in sample.input_ids[:cut] if t >= 0]
    return {
        "source": sample.source,
        "index": sample.index,
        "id": sample.id,
        "prompt_text": for_display(sp.decode(text_ids)),
        "generated_ids": new,
        "generated_text": for_display(sp.decode(new)),
        "reference_ids": [int(t) for t in sample.input_ids[cut:answer_end]],
        "reference_text": for_display(sp.decode([int(t) for t in sample.input_ids[cut:answer_end]])),
    }
