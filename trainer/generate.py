"""Token-by-token generation with a KV cache: the loop behind `xc-chat`, `xc-train generate` and
`IXCModel.generate` (transformers' signature, `trainer/hf.py`).

The prompt (images included, encoded once) runs through the decoder once, then one token per step.
The next token is chosen as transformers' `generate` chooses it: fp32 logits, then the same logits
processors in the same order (repetition penalty; when sampling, temperature, top-k, top-p), then
argmax, or `torch.multinomial` (the global RNG, or a generator seeded with `seed`).
`temperature <= 0` means greedy, as in lmdeploy and vLLM. Stops after any of `stop_ids` (default:
`[UNUSED_TOKEN_145]` 92542, the end of a turn, and `</s>`) or `max_new_tokens` tokens.

Prompt shapes: input_ids int64[T] or [1, T] (image positions hold IMAGE_TOKEN_ID -100, or any id
>= -100), tiles uint8[N, 560, 560, 3], image_grids int64[I, 2], image_starts int64[I]; the prompt
ends with the assistant header (`[UNUSED_TOKEN_146]assistant\\n`), as the pipeline's templates build it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from transformers.generation import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from schemas.sample import image_token_count
from trainer.attention import KVCache
from trainer.model import END_OF_TURN_ID, IXCModel


def device_dtype() -> tuple[torch.device, torch.dtype]:
    """Where inference runs: the GPU in bf16 when there is one, else the CPU in fp32."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def logits_processors(
    temperature: float, top_k: int, top_p: float, repetition_penalty: float
) -> LogitsProcessorList:
    """transformers' processors for these settings, in `generate`'s order (greedy: the penalty only)."""
    processors = LogitsProcessorList()
    if repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if temperature > 0:
        if temperature != 1.0:
            processors.append(TemperatureLogitsWarper(temperature))
        if top_k:
            processors.append(TopKLogitsWarper(top_k=top_k))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=top_p))
    return processors


def _text_ids(
    ids: torch.Tensor, image_grids: torch.Tensor | None, image_starts: torch.Tensor | None
) -> torch.Tensor:
    """The prompt's text token ids (image spans and negative ids left out): the repetition penalty's context."""
    keep = ids >= 0
    if image_grids is not None and image_starts is not None:
        for (rows, cols), start in zip(image_grids.tolist(), image_starts.tolist(), strict=True):
            keep[start : start + image_token_count(rows, cols)] = False
    return ids[keep]


@torch.no_grad()
def stream_tokens(
    model: IXCModel,
    input_ids: torch.Tensor,
    tiles: torch.Tensor | None = None,
    image_grids: torch.Tensor | None = None,
    image_starts: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    stop_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
    penalize_prompt: bool = True,
) -> Iterator[int]:
    """Each new token as it is chosen, the stop token included (then it ends), at most max_new_tokens.

    `penalize_prompt=False`: the repetition penalty counts the generated tokens only (what the
    official `chat()` gets for image prompts, which it passes to transformers as embeddings).
    """
    stop = {int(s) for s in stop_ids}
    ids = input_ids.reshape(-1)
    processors = logits_processors(temperature, top_k, top_p, repetition_penalty)
    device = model.output.weight.device
    seen = _text_ids(ids, image_grids, image_starts) if penalize_prompt else ids[:0]
    seen = seen.to(device=device, dtype=torch.long)[None]  # [1, L]
    was_training = model.training
    model.eval()
    try:
        embeds, image_index = model.embed(ids, tiles, image_grids, image_starts)
        t = embeds.shape[0]
        caches = [KVCache(capacity=t + max_new_tokens) for _ in model.model.layers]
        cu = torch.tensor([0, t], dtype=torch.int32)
        hidden = model.decode(embeds, torch.arange(t), cu, t, image_index, caches)
        one = torch.tensor([0, 1], dtype=torch.int32)
        for step in range(max_new_tokens):
            scores = processors(seen, model.output(hidden[-1:]).float())  # type: ignore[arg-type]
            if temperature > 0:
                probs = torch.softmax(scores, dim=-1)
                token = torch.multinomial(probs, num_samples=1, generator=generator)[0]
            else:
                token = scores.argmax(dim=-1)
            value = int(token)
            yield value
            if value in stop or step == max_new_tokens - 1:
                return
            seen = torch.cat([seen, token.view(1, 1)], dim=1)
            # Text tokens from here on: no PLoRA (image_index None), one position at a time.
            embeds = model.model.tok_embeddings(token.view(1))
            hidden = model.decode(embeds, torch.tensor([t + step]), one, 1, None, caches)
    finally:
        model.train(was_training)


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
    *,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    penalize_prompt: bool = True,
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """The new token ids after the prompt (the stop token, if reached, not included).

    `on_token` is called with each of them as soon as it is chosen (streaming); `seed` seeds the
    sampling (None: torch's global RNG, as transformers does).
    """
    if stop_ids is None:
        stop_ids = (END_OF_TURN_ID, model.config.eos_token_id)
    generator = None
    if seed is not None and temperature > 0:
        generator = torch.Generator(device=model.output.weight.device).manual_seed(seed)
    stop = {int(s) for s in stop_ids}
    new: list[int] = []
    for token in stream_tokens(
        model,
        input_ids,
        tiles,
        image_grids,
        image_starts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        stop_ids=stop_ids,
        generator=generator,
        penalize_prompt=penalize_prompt,
    ):
        if token in stop:
            break
        new.append(token)
        if on_token is not None:
            on_token(token)
    return new
