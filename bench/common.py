"""What the benchmarks share: the real-photo data mix, the card and host, timing, JSON output.

Run every bench from the repository root as a module (`python -m bench.NAME`), so that `bench`,
`pipeline`, `trainer` and `schemas` import from this checkout. The product never imports `bench`.

  data      `make_photos` (scikit-image's photos as JPEGs of 0.3–2 MP), `make_sources` (the mix:
            single-image, multi-image multi-turn and text-only records with answers of 40–400
            words), `build_shards` (`xc-prep shard` over them), `resolve_tokenizer`.
  host      `host_info` (card, memory, CPUs, package versions), `measure_matmul_flops`.
  timing    `sync`, `reset_peak`, `peak_gib` (no-ops or None on the CPU).
  output    `bench_header` (bench name, the command that reproduces it, date), `write_json`.
  s3        `s3_server` (moto's S3 server started on 127.0.0.1, or a given endpoint; the AWS
            variables point at it), `new_bucket`.
  baseline  `build_lora_model` and `optimizer_step`: the LoRA recipe's model driven directly with
            torch's AdamW, no DeepSpeed: the official recipe's step (bench/train_throughput.py's
            official mode) and the memory probe of bench/max_length.py. What users train is
            measured through `trainer.train.train_step` instead.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import random
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch loads where it is used: bench.prep_throughput runs without it
    import torch

    from trainer.config import TrainConfig
    from trainer.model import IXCModel

REPO_ROOT = Path(__file__).resolve().parent.parent
REAL_TOKENIZER = REPO_ROOT.parent / "shared" / "ixc25" / "tokenizer.model"
TOKENIZER_CANDIDATES = (REPO_ROOT / ".bench" / "tokenizer.model", REAL_TOKENIZER)
SKIMAGE_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
)
PHOTO_SIZES = ((640, 480), (1024, 768), (1280, 960), (1080, 1440), (1632, 1224))
"""(width, height): 0.31, 0.79, 1.23, 1.56 (portrait) and 2.0 megapixels."""
JPEG_QUALITY = 90
ANSWER_WORDS = (40, 80, 150, 250, 400)
"""Answer lengths in words (≈ 1.3 tokens each), drawn per answer."""
PROSE = (
    "The light comes from the left and leaves long, soft shadows across the scene.",
    "In the foreground the main subject is sharp, while the background falls gently out of focus.",
    "The colours are natural, with warm tones in the highlights and cooler blues in the shade.",
    "Several smaller details, such as the texture of the surface, reward a closer look.",
    "Taken together, the composition guides the eye from the centre towards the upper right.",
    "A careful answer would also mention what is missing: there is no text and no visible logo.",
    "Compared with a typical snapshot, the framing is deliberate and the horizon is level.",
    "If the photo were cropped more tightly, the subject would dominate even more clearly.",
)
QUESTIONS = (
    "Explain how a hash table handles collisions, with an example.",
    "Summarize the causes of the French Revolution in a few paragraphs.",
    "What should I check before buying a used bicycle?",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Compare gradient descent with Newton's method for a beginner.",
)
MATMUL_SIZE = 8192
SERVER_START_S = 30.0
PACKAGES = ("torch", "transformers", "peft", "deepspeed", "numpy", "pillow")


# ---------------------------------------------------------------- data


def make_photos(folder: Path) -> list[Path]:
    """One JPEG per (skimage photo, size), cycling sizes so that every photo gets every size once."""
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, name in enumerate(SKIMAGE_PHOTOS):
        src = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        for j in range(len(PHOTO_SIZES)):
            w, h = PHOTO_SIZES[(i + j) % len(PHOTO_SIZES)]
            scale = max(w / src.width, h / src.height)
            big = src.resize((round(src.width * scale), round(src.height * scale)), Image.Resampling.BICUBIC)
            left, top = (big.width - w) // 2, (big.height - h) // 2
            path = folder / f"{name}_{w}x{h}.jpg"
            big.crop((left, top, left + w, top + h)).save(path, quality=JPEG_QUALITY)
            paths.append(path)
    return paths


def prose(rng: random.Random, words: int) -> str:
    """About `words` words of plausible answer text, deterministic per rng."""
    out: list[str] = []
    while sum(len(s.split()) for s in out) < words:
        out.append(rng.choice(PROSE))
    return " ".join(out)


def human(text: str) -> dict[str, str]:
    return {"from": "human", "value": text}


def bot(text: str) -> dict[str, str]:
    return {"from": "bot", "value": text}


def make_sources(photos: list[Path], per_kind: int, seed: int) -> dict[str, list[dict[str, Any]]]:
    """Three sources of `per_kind` records: single-image, multi-image multi-turn, text-only."""
    rng = random.Random(seed)
    answer = lambda: prose(rng, rng.choice(ANSWER_WORDS))  # noqa: E731
    single, multi, text = [], [], []
    for i in range(per_kind):
        turns = [human("Describe this photo in detail."), bot(answer())]
        if i % 2:
            turns += [human("What time of day was it taken, and how can you tell?"), bot(answer())]
        single.append({"id": f"single-{i}", "image": str(rng.choice(photos)), "conversations": turns})

        images = [str(p) for p in rng.sample(photos, 2 + i % 2)]
        turns = [human("Image1: <ImageHere>; Image2: <ImageHere>; What differs between them?"), bot(answer())]
        if len(images) == 3:
            turns += [human("Image3: <ImageHere>; How does this one compare?"), bot(answer())]
        turns += [human("Which would suit a magazine cover, and why?"), bot(answer())]
        multi.append({"id": f"multi-{i}", "image": images, "conversations": turns})

        turns = [human(QUESTIONS[i % len(QUESTIONS)]), bot(answer())]
        if i % 3 == 0:
            turns += [human("Can you make it shorter?"), bot(prose(rng, 40))]
        text.append({"id": f"text-{i}", "conversations": turns})
    return {"single": single, "multi": multi, "text": text}


def write_data_txt(work: Path, sources: dict[str, list[dict[str, Any]]]) -> Path:
    """`work/<source>.json` per source and the `work/data.txt` listing them (weight 1 each)."""
    lines = []
    for name, records in sources.items():
        path = work / f"{name}.json"
        path.write_text(json.dumps(records))
        lines.append(f"{path} 1")
    (work / "data.txt").write_text("\n".join(lines) + "\n")
    return work / "data.txt"


def build_shards(
    work: Path,
    sources: dict[str, list[dict[str, Any]]],
    tokenizer: Path,
    hd_num: int,
    max_length: int,
    workers: int,
) -> Path:
    """`xc-prep shard` over one JSON file per source (weight 1 each); returns the shard folder."""
    from pipeline import cli as prep_cli

    write_data_txt(work, sources)
    out = work / "shards"
    argv = ["shard", str(work / "data.txt"), "--out", str(out), "--tokenizer", str(tokenizer)]
    argv += ["--hd-num", str(hd_num), "--max-length", str(max_length), "--workers", str(workers)]
    argv += ["--allow-path", str(work), "--overwrite"]
    status = prep_cli.main(argv)
    if status != 0:
        raise RuntimeError(f"xc-prep {' '.join(argv)} failed with exit status {status}")
    return out


def resolve_tokenizer(arg: str | None, preset: str, work: Path) -> Path:
    """--tokenizer: a path, or 'tiny' (built in `work`; the default for --preset tiny), else the
    first of TOKENIZER_CANDIDATES that exists."""
    from pipeline.tokenization import build_tiny_tokenizer

    if arg == "tiny" or (arg is None and preset == "tiny"):
        return build_tiny_tokenizer(work / "tiny.model")
    if arg is not None:
        return Path(arg)
    for path in TOKENIZER_CANDIDATES:
        if path.is_file():
            return path
    raise SystemExit(f"no tokenizer.model at {' or '.join(map(str, TOKENIZER_CANDIDATES))}; pass --tokenizer")


# ---------------------------------------------------------------- an S3 server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def s3_server(endpoint: str | None) -> Iterator[str]:
    """The endpoint URL of an S3 server: `endpoint`, or moto's started here (stopped on exit). The
    AWS variables point at it for this process and its children (loader workers)."""
    if endpoint is not None:
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        yield endpoint
        return
    port = free_port()
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        }
    )
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("moto's S3 server did not start (pip install 'moto[server]')") from None
                time.sleep(0.2)
        yield os.environ["AWS_ENDPOINT_URL"]
    finally:
        server.terminate()
        server.wait(timeout=10)


def new_bucket() -> str:
    import boto3

    name = f"xc-bench-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


# ---------------------------------------------------------------- host and card


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


def device_name(device: torch.device) -> str:
    """The card's name, or the CPU's."""
    import torch

    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    return platform.processor() or "cpu"


def host_info(device: torch.device) -> dict[str, Any]:
    """The card, its memory, torch and the packages, the host's CPUs: the facts a result depends on."""
    import torch

    cuda = device.type == "cuda"
    return {
        "device": device_name(device),
        "gpu_memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30 if cuda else None,
        "torch": torch.__version__,
        "versions": package_versions(),
        "cpus": os.cpu_count(),
    }


def measure_matmul_flops(device: torch.device) -> dict[str, Any]:
    """The card's bf16 matmul rate: median of 20 timed 8192³ products on random data (fp32 1024³
    on the CPU)."""
    import torch

    size, dtype = (MATMUL_SIZE, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(20):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    seconds = float(np.median(times))
    return {"size": size, "dtype": str(dtype).removeprefix("torch."), "flops": 2 * size**3 / seconds}


# ---------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a step's time ends here)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> tuple[float | None, float | None]:
    """Peak (allocated, reserved) GiB since the last `reset_peak`; (None, None) on the CPU."""
    import torch

    if device.type != "cuda":
        return None, None
    return torch.cuda.max_memory_allocated(device) / 2**30, torch.cuda.max_memory_reserved(device) / 2**30


# ---------------------------------------------------------------- output


def bench_header(name: str, argv: list[str] | None) -> dict[str, Any]:
    """The first keys of every result: the bench, the command that reproduces it, the date."""
    args = sys.argv[1:] if argv is None else argv
    return {
        "bench": name,
        "command": ["python", "-m", f"bench.{name}", *args],
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def write_json(path: Path | None, results: dict[str, Any]) -> None:
    """The results as indented JSON (nothing when `path` is None); called again as results grow."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")


# ---------------------------------------------------------------- the baseline's step


def build_lora_model(
    preset: str,
    device: torch.device,
    dtype: torch.dtype,
    vocab_size: int,
    seed: int = 0,
    fused_lora: bool = True,
) -> tuple[IXCModel, torch.optim.Optimizer, list[torch.nn.Parameter], TrainConfig]:
    """The trainer's LoRA recipe on a random preset, driven without DeepSpeed: model, torch AdamW
    (fused on CUDA), trainable parameters, config. fused_lora=False: PEFT's own LoRA layer, as the
    official recipe runs (`apply_recipe`)."""
    import torch

    from trainer.config import TrainConfig
    from trainer.model import build_model
    from trainer.modelio import Loaded, apply_recipe
    from trainer.train import trainable_groups

    torch.manual_seed(seed)
    model = build_model(preset, seed=seed, dtype=dtype, device=device, vocab_size=vocab_size)
    cfg = TrainConfig(shards=Path("."), model=preset, recipe="lora").resolve()
    loaded = Loaded(model, None, preset, f"{preset} preset, random init")
    model = apply_recipe(loaded, cfg, fused_lora=fused_lora).model
    # PEFT creates the adapters in fp32; DeepSpeed's bf16 engine casts the whole module to bf16.
    model.to(dtype)
    model.gradient_checkpointing_enable()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable_groups(model, cfg.weight_decay),
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        fused=device.type == "cuda",
    )
    return model, optimizer, params, cfg


def optimizer_step(
    loss: torch.Tensor, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]
) -> float:
    """Backward and update, then the loss as a float (one host sync: the step has run)."""
    loss.backward()
    update(optimizer, params)
    return float(loss.detach())


def update(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
    """Clip to norm 1.0, AdamW step, clear the gradients: launched, not waited for."""
    import torch

    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
