"""Start-up checks of the shards and --model, before any step: the manifest, the tokenizer the
shards were made with against the model's and the eval shards', max_length, and the sample index
loaded and checked on every rank (a problem found by one rank stops them all)."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from schemas.manifest import MANIFEST_NAME, TOKENIZER_NAME, Manifest
from schemas.shards import file_sha256, mismatch_message, tokenizer_problems
from schemas.storage import StorageError, open_store
from trainer.config import TrainConfig
from trainer.errors import ShardDataError
from trainer.index import SampleIndex, shards_mismatch
from trainer.model_config import PRESETS
from trainer.modelio import BASE_DIR_NAME, resolve_model_dir


def load_index_on_all_ranks(shards: str, world_size: int) -> SampleIndex:
    """`SampleIndex.load` (sizes, footers, codecs and counts: no hashing, each sample is checked as it
    is read) and the folder's tokenizer check, on every rank; every rank raises if any found a
    problem (so no rank is left waiting in a collective)."""
    index, problem = None, None
    try:
        index = SampleIndex.load(shards)
        # its copy of the tokenizer too: presets and `generate` read it later
        if tokenizer := tokenizer_problems(index.store, index.manifest):
            problem = mismatch_message(shards, tokenizer)
    except ShardDataError as e:
        problem = str(e)
    if world_size > 1:
        found: list[str | None] = [None] * world_size
        dist.all_gather_object(found, problem)
        problem = next((p for p in found if p is not None), None)
    if problem is not None:
        raise ShardDataError(problem)
    assert index is not None
    return index


def check_model(cfg: TrainConfig, manifest: Manifest, output_dir: Path) -> Path | None:
    """--model's folder (None for a preset built here), resolved and its tokenizer checked against
    the shards': no process group, no checksum, no weights yet, so a wrong --model fails in seconds.
    A tiny base that an earlier run left in output-dir is reused: it is checked like a folder."""
    model_dir = None if cfg.model in PRESETS else resolve_model_dir(cfg.model)
    if cfg.model == "tiny":
        model_dir = output_dir / BASE_DIR_NAME
    check_fingerprint(manifest, model_dir, cfg)
    return model_dir


def load_manifest(shards: str) -> Manifest:
    """The manifest of a shard folder or s3:// prefix, or the error `verify_shards` would report for it."""
    try:
        store = open_store(shards)
    except StorageError as e:
        raise shards_mismatch(shards, [str(e)]) from e
    try:
        return Manifest.load(store)
    except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
        raise shards_mismatch(shards, [f"{store.url(MANIFEST_NAME)}: {e}"]) from e


def check_eval_shards(eval_manifest: Manifest, eval_shards: str, manifest: Manifest) -> None:
    """--eval-shards must be tokenized like the training shards."""
    theirs = eval_manifest.fingerprint.tokenizer_sha256
    if theirs != manifest.fingerprint.tokenizer_sha256:
        raise ValueError(
            f"--eval-shards {eval_shards} was tokenized with another tokenizer (sha256 {theirs[:12]}…) than "
            f"--shards (sha256 {manifest.fingerprint.tokenizer_sha256[:12]}…): shard both with the same "
            "--tokenizer"
        )


def check_fingerprint(manifest: Manifest, model_dir: Path | None, cfg: TrainConfig) -> None:
    """Refuse shards made with another tokenizer or a longer max_length than training allows."""
    fp = manifest.fingerprint
    if model_dir is not None and (model_dir / TOKENIZER_NAME).is_file():
        model_sha = file_sha256(model_dir / TOKENIZER_NAME)
        if model_sha != fp.tokenizer_sha256:
            raise ValueError(
                f"the shards in {cfg.shards} were tokenized with another tokenizer "
                f"(sha256 {fp.tokenizer_sha256[:12]}…) than the model's {model_dir / TOKENIZER_NAME} "
                f"({model_sha[:12]}…): re-run `xc-prep shard --tokenizer {model_dir}`"
            )
    if fp.max_length > cfg.max_length:
        raise ValueError(
            f"the shards were made with max_length {fp.max_length} but --max-length is {cfg.max_length}: "
            f"samples may not fit a packed row; use --max-length {fp.max_length} or re-shard"
        )
