"""The vision side of IXC2.5: CLIP ViT-L/14 at 560 px, its patch embedding, and how its features
become image tokens (2×2 patch merge, the official layout with separators) before vision_proj.

Shapes: tiles float[B, 3, 560, 560] -> ViT features [B, 1600, C] -> merged [B, 20, 20, 4C] ->
per image [image_token_count(grid), 4C] (`assemble_image_tokens`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from schemas.sample import MERGED_SIDE, TILE_SIZE, image_token_count
from trainer.model_config import VIT_PATCH_SIDE, ModelConfig

if TYPE_CHECKING:  # transformers is imported where a ViT is built: `xc-train plan` never needs it
    from transformers import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings


def clip_config(config: ModelConfig) -> CLIPVisionConfig:
    """transformers' CLIP vision config for the ViT sizes of `config` (560-px tiles, SDPA attention)."""
    from transformers import CLIPVisionConfig

    clip = CLIPVisionConfig(
        hidden_size=config.vit_hidden_size,
        intermediate_size=config.vit_intermediate_size,
        num_hidden_layers=config.vit_num_hidden_layers,
        num_attention_heads=config.vit_num_attention_heads,
        image_size=TILE_SIZE,
        patch_size=config.vit_patch_size,
        hidden_act=config.vit_hidden_act,
        layer_norm_eps=config.vit_layer_norm_eps,
    )
    clip._attn_implementation = "sdpa"
    return clip


class _CLIPHolder(nn.Module):
    # transformers 5 flattened CLIPVisionModel (no `.vision_model` level); the official checkpoint
    # keeps that level, so it is restored here: keys vit.vision_tower.vision_model.*.
    def __init__(self, config: CLIPVisionConfig):
        from transformers import CLIPVisionModel

        super().__init__()
        self.vision_model = CLIPVisionModel(config)


class VisionTower(nn.Module):
    """CLIP ViT-L/14 at 560 px. Output: the LAST encoder layer (before post_layernorm), CLS dropped."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.vision_tower = _CLIPHolder(clip_config(config))
        # post_layernorm is in the checkpoint but not on the feature path: frozen so that no
        # optimizer carries state for it and no rank waits for a gradient it never gets.
        self.vision_tower.vision_model.post_layernorm.requires_grad_(False)
        self.gradient_checkpointing = False

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """float[B, 3, 560, 560] -> [B, 1600, vit_hidden] (40×40 patches, row-major)."""
        clip = self.vision_tower.vision_model
        h = clip.pre_layrnorm(patch_embeddings(clip.embeddings, pixels))
        for layer in clip.encoder.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(layer, h, None, use_reentrant=False)
            else:
                h = layer(h, None)
        return h[:, 1:]


def patch_embeddings(embeddings: CLIPVisionEmbeddings, pixels: torch.Tensor) -> torch.Tensor:
    """transformers' CLIPVisionEmbeddings.forward (no position interpolation), its p×p stride-p
    patch convolution computed as one matmul: [B·patches, 3·p·p] × [3·p·p, C].

    Same products, accumulated in another order. On CUDA the convolution ran as cuDNN's implicit
    GEMM at 20 TFLOP/s (2.7 ms for 28 views of 560 px on an H200).
    ZeRO-3 gathers a module's weights only when that module is called: the matmul reads the
    convolution's weight without calling it, so under ZeRO-3 the module itself runs.
    """
    conv = embeddings.patch_embedding
    if hasattr(conv.weight, "ds_id"):
        return embeddings(pixels)
    b, channels, height, width = pixels.shape
    size, p = cast(int, embeddings.image_size), conv.weight.shape[-1]
    if (height, width) != (size, size):
        raise ValueError(f"Input image size ({height}*{width}) doesn't match model ({size}*{size}).")
    side = size // p
    patches = pixels.to(conv.weight.dtype).reshape(b, channels, side, p, side, p)
    patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(b, side * side, channels * p * p)
    x = F.linear(patches, conv.weight.reshape(conv.weight.shape[0], -1), conv.bias)
    cls = embeddings.class_embedding.to(x.dtype).expand(b, 1, -1)
    return torch.cat([cls, x], dim=1) + embeddings.position_embedding(embeddings.position_ids)


def merge_patches(features: torch.Tensor) -> torch.Tensor:
    """[B, 1600, C] -> [B, 20, 20, 4C]: token (y, x) = concat of patches (2y,2x), (2y,2x+1), (2y+1,2x), (2y+1,2x+1)."""
    b, n, c = features.shape
    assert n == VIT_PATCH_SIDE**2, f"expected {VIT_PATCH_SIDE**2} patches per tile, got {n}"
    side = MERGED_SIDE
    grid = features.reshape(b, side, 2, side, 2, c).permute(0, 1, 3, 2, 4, 5)  # (b, y, x, dy, dx, c)
    return grid.reshape(b, side, side, 4 * c)


def assemble_image_tokens(
    merged: torch.Tensor, grids: list[tuple[int, int]], glb_gn: torch.Tensor, sub_gn: torch.Tensor
) -> torch.Tensor:
    """Lay out each image's tokens as the official model does (docs/IXC25.md#image-token-layout), before vision_proj.

    merged [I + N, 20, 20, 4C]: the I global views first, then the N local tiles image by image.
    Per image: global 20×20 with `sub_gn` after each row (420), one `glb_gn`, then the local tiles
    reassembled into (rows·20)×(cols·20) with `sub_gn` after each of its rows.
    Returns [sum image_token_count(grid), 4C].
    """
    num_images = len(grids)
    width = merged.shape[-1]
    sub = sub_gn.reshape(1, 1, width).to(merged.dtype)
    glb = glb_gn.reshape(1, width).to(merged.dtype)
    out = []
    offset = num_images
    for i, (rows, cols) in enumerate(grids):
        side = MERGED_SIDE
        global_rows = torch.cat([merged[i], sub.expand(side, 1, width)], dim=1).reshape(-1, width)
        local = merged[offset : offset + rows * cols].reshape(rows, cols, side, side, width)
        offset += rows * cols
        local = local.permute(0, 2, 1, 3, 4).reshape(rows * side, cols * side, width)
        local_rows = torch.cat([local, sub.expand(rows * side, 1, width)], dim=1).reshape(-1, width)
        out.extend([global_rows, glb, local_rows])
        assert sum(p.shape[0] for p in out[-3:]) == image_token_count(rows, cols)
    return torch.cat(out)
