"""Small generation loop for trying a (fine-tuned) model on an image and a question.

Greedy (temperature 0) or temperature/top-p sampling, one sequence, with a KV cache: the prompt
(images included, encoded once) is run through the decoder once, then one token per step. Stops
at any of `stop_ids` (default: `[UNUSED_TOKEN_145]` 92542, the end of a turn, and `</s>`).

Prompt shapes: input_ids int64[T] or [1, T] (image positions hold 0 or -100), tiles
uint8[N, 560, 560, 3], image_grids int64[I, 2], image_starts int64[I]; the prompt is expected to
end with the assistant header (`[UNUSED_TOKEN_146]assistant\\n`) built by the pipeline's template.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from trainer.model import END_OF_TURN_ID, IXCModel, KVCache


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        outside = sorted_probs.cumsum(0) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(
    model: IXCModel,
    input_ids: torch.Tensor,
    tiles: torch.Tensor | None = None,
    image_grids: torch.Tensor | None = None,
    image_starts: torch.Tensor | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_ids: Sequence[int] | None = None,
    seed: int | None = None,
) -> list[int]:
    """The new token ids after the prompt (the stop token, if reached, not included)."""
    if stop_ids is None:
        stop_ids = (END_OF_TURN_ID, model.config.eos_token_id)
    stop = set(int(s) for s in stop_ids)
    ids = input_ids.reshape(-1)
    was_training = model.training
    model.eval()
    device = model.output.weight.device
    generator = None
    if seed is not None and temperature > 0:
        generator = torch.Generator(device=device).manual_seed(seed)
    try:
        embeds, image_index = model.embed(ids, tiles, image_grids, image_starts)
        caches = [KVCache() for _ in model.model.layers]
        t = embeds.shape[0]
        cu = torch.tensor([0, t], dtype=torch.int32)
        hidden = model.decode(embeds, torch.arange(t), cu, t, image_index, caches)
        new: list[int] = []
        for step in range(max_new_tokens):
            token = _sample(model.output(hidden[-1]), temperature, top_p, generator)
            if token in stop:
                break
            new.append(token)
            if step == max_new_tokens - 1:
                break
            # Text tokens from here on: no PLoRA (image_index None), one position at a time.
            embeds = model.model.tok_embeddings(torch.tensor([token], device=device))
            position = torch.tensor([t + step])
            hidden = model.decode(embeds, position, torch.tensor([0, 1], dtype=torch.int32), 1, None, caches)
        return new
    finally:
        model.train(was_training)
