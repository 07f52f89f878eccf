"""What a training config implies before any model is built: the loader's settings and the architecture.

Shared by the training loop (trainer/train.py) and `xc-train plan`, which needs neither the model
code nor transformers nor DeepSpeed: a preset's architecture is a table, and only a model folder's
config.json brings in the model code (to read and check it).
"""

from __future__ import annotations

from trainer.config import TrainConfig, batch_layout
from trainer.flops import pack_cost_weights
from trainer.model_config import PRESETS, ModelConfig, preset_config
from trainer.plan import LoaderConfig


def loader_config(cfg: TrainConfig, world_size: int, model: ModelConfig | None = None) -> LoaderConfig:
    """The loader settings a training config implies (one packed row per micro-step); `model`
    gives the compute estimate that deals packs to ranks (tokens only without it)."""
    _, accumulation = batch_layout(cfg.global_batch_size, world_size)
    attention_cost, tile_cost = (
        pack_cost_weights(model, lora=bool(cfg.use_lora), vit_trains=not cfg.fix_vit) if model else (0.0, 0.0)
    )
    return LoaderConfig(
        attention_cost=attention_cost,
        tile_cost=tile_cost,
        max_length=cfg.max_length,
        max_tiles=cfg.max_tiles,
        seed=cfg.seed,
        epochs=cfg.epochs,
        micro_batches_per_step=accumulation,
        token_weighted=cfg.token_weighted,
        source_samples=cfg.source_sample_overrides(),
        num_workers=cfg.num_workers,
    )


def model_config(cfg: TrainConfig) -> ModelConfig | None:
    """The architecture --model names, without loading weights or looking online (None: not a
    preset, a readable local folder nor a hub id in the local cache)."""
    if cfg.model in PRESETS:
        return preset_config(cfg.model)
    # Imported here: reading a folder's config needs the model code, a preset does not.
    from trainer.modelio import resolve_model_dir
    from trainer.weights import load_config

    try:
        return load_config(resolve_model_dir(cfg.model, offline=True))
    except (OSError, ValueError):
        return None
