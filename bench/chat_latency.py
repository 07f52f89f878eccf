"""Time to first token and decode speed of one image question, through xc-chat's path and through
the transformers-style `model.generate()` on the same official-format prompt.

  python -m bench.chat_latency                       # 7b preset, random bf16 weights, GPU
  python -m bench.chat_latency --preset tiny --max-new-tokens 8 --repeats 1   # CPU smoke test

The model is a preset with random weights (`xc-chat --model 7b` loads the same), one image at
hd 24 (default: a generated 3840×2160 picture, which takes all 24 tiles: 10,101 image tokens).
xc-chat's path is `chat.session.ChatSession.ask` (prompt building, ViT, prefill, sampling with
chat()'s defaults, streamed decoding of the text); `generate()` is `IXCModel.generate(**inputs,
streamer=...)` with the same settings. Time to first token: from the call to the first streamed
token; tokens/s: the tokens after the first over the time after it. Random weights may stop early
on a stop token: the token count is printed. The tokenizer: --tokenizer, else
../shared/ixc25/tokenizer.model when present, else the tiny one (its ids are valid for any vocabulary).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from bench.common import resolve_tokenizer
from chat.prompt import load_media
from chat.session import ChatSession, Sampling, load_chat_model
from pipeline.tokenization import build_tiny_tokenizer
from trainer.generate import device_dtype


def test_image(path: Path, width: int = 3840, height: int = 2160) -> Path:
    """A deterministic picture: a colour gradient, noise and shapes (JPEG, as photos come)."""
    gen = np.random.default_rng(0)
    x, y = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    rgb = np.stack([x, y, (x + y) / 2], -1) * 200 + gen.integers(0, 55, (height, width, 3))
    image = Image.fromarray(rgb.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for i in range(12):
        left, top = int(gen.integers(0, width - 400)), int(gen.integers(0, height - 400))
        draw.ellipse(
            (left, top, left + 300, top + 200 + 10 * i), fill=(255, 40 * (i % 6), 0), outline=(0, 0, 0)
        )
    image.save(path, quality=92)
    return path


class TimingStreamer:
    """transformers' streamer protocol: the prompt first, then one put per new token."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def summarize(start: float, times: list[float], tokens: int) -> dict[str, float]:
    first = times[0] - start if times else float("nan")
    rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
    return {"ttft_s": first, "tokens_per_s": rate, "tokens": tokens}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="7b", choices=("7b", "tiny"))
    parser.add_argument("--image", type=Path, help="the image (default: a generated 3840×2160 one)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer.model (default: see above)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--question", default="Describe this image in detail.")
    args = parser.parse_args(argv)

    device, dtype = device_dtype()
    tmp = Path(tempfile.mkdtemp(prefix="chat_latency_"))
    image = args.image or test_image(tmp / "picture.jpg")
    try:
        tokenizer_path: Path | None = resolve_tokenizer(args.tokenizer, args.preset, tmp)
    except SystemExit:  # no real tokenizer here: the tiny one's ids are valid for any vocabulary
        tokenizer_path = build_tiny_tokenizer(tmp / "tokenizer.model")
    load_start = time.perf_counter()
    model, tokenizer = load_chat_model(args.preset, tokenizer=tokenizer_path, device=device, dtype=dtype)
    sync()
    load_s = time.perf_counter() - load_start
    media_start = time.perf_counter()
    media = load_media([image])
    media_s = time.perf_counter() - media_start
    sampling = Sampling(max_new_tokens=args.max_new_tokens)  # chat()'s defaults: sampling, top-p 0.8, ...
    session = ChatSession(model, tokenizer, media, sampling=sampling)
    prompt = session.prompt(args.question)
    inputs = prompt.generate_inputs()
    settings = {
        "do_sample": True,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "repetition_penalty": sampling.repetition_penalty,
        "eos_token_id": [tokenizer.eos_id, tokenizer.end_of_turn_id],
    }
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(
        f"{args.preset} ({dtype}, {gpu}), image {Image.open(image).size} -> grid {media[0].grid}, "
        f"prompt {prompt.num_tokens:,} tokens; load {load_s:.1f} s, HD transform {media_s:.2f} s; "
        f"tokenizer {tokenizer.path}"
    )

    def run_chat(max_new: int) -> dict[str, float]:
        session.reset()
        times: list[float] = []
        session.sampling = Sampling(max_new_tokens=max_new)
        sync()
        start = time.perf_counter()
        answer = session.ask(args.question, on_text=lambda _: times.append(time.perf_counter()))
        return summarize(start, times, len(answer.generated_ids))

    def run_generate(max_new: int) -> dict[str, float]:
        streamer = TimingStreamer()
        sync()
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=max_new, streamer=streamer, **settings)
        return summarize(start, streamer.times, out.shape[1] - prompt.num_tokens)

    results = {}
    for name, run in (("xc-chat", run_chat), ("generate()", run_generate)):
        run(4)  # warm-up: kernels, allocator
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        runs = [run(args.max_new_tokens) for _ in range(args.repeats)]
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
        results[name] = {
            "ttft_s": statistics.median(r["ttft_s"] for r in runs),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "tokens": [int(r["tokens"]) for r in runs],
            "peak_gib": peak,
        }
    print(f"{'path':<12} {'TTFT s':>8} {'tokens/s':>9} {'peak GiB':>9}  tokens per run")
    for name, r in results.items():
        print(
            f"{name:<12} {r['ttft_s']:>8.3f} {r['tokens_per_s']:>9.1f} {r['peak_gib']:>9.1f}  {r['tokens']}"
        )
    print(json.dumps({"preset": args.preset, "device": gpu, "prompt_tokens": prompt.num_tokens, **results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
