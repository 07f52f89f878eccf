"""Several GPUs of one host (issue 9): LoRA scaling, elastic resume, full fine-tuning with ZeRO-3.

Every run is `xc-train` under `torch.distributed.run` (one process per GPU, NCCL), on shards that
this bench makes with `xc-prep shard` from a generated mix of real photos (bench/train_throughput.py's
sources: single-image, multi-image multi-turn and text-only records, real tokenizer, hd 18,
max_length 16,384), in phases:

  scaling   LoRA (fix_vit, fix_sampler) on 1, 2, 4 GPUs, one after another, each rank
            `--micro-batches` packs per step (weak scaling: the global batch grows with the GPUs).
            Reported over the steps after `--warmup`: tokens/s over all GPUs, per GPU, and the
            efficiency = tokens/s per GPU against the smallest run's (one GPU's by default); step
            time p50; data wait; peak memory per rank. The largest run stops after its steps and
            keeps a checkpoint for the next phase.
  elastic   that checkpoint resumed twice to `--elastic-steps`: on the same GPUs, and on half of
            them with the same global batch (twice the micro-batches per rank; DeepSpeed's universal
            checkpoint re-splits the ZeRO state). Each step's sample digest (`EpochPlan.step_digest`)
            and loss are compared.
  full      the full recipe (every weight but the unused adapters trains, ViT and vision_proj
            too) with ZeRO-3 on all GPUs: `--full-steps` steps, one pack per rank, every layer
            recomputed; tokens/s per GPU, peak memory per rank, the size of the final checkpoint.

    python bench/scaling.py --tokenizer tokenizer.model --gpus 1,2,4 --out-json scaling.json
    python bench/scaling.py --tokenizer tokenizer.model --phases elastic,full   # same --work: reuses both
    python bench/scaling.py --preset tiny --tokenizer tiny --gpus 1,2 --phases scaling,elastic --device cpu
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path[:0] = [str(BENCH_DIR), str(REPO_ROOT)]
from prep_throughput import make_photos  # noqa: E402
from train_throughput import build_shards, make_sources, resolve_tokenizer  # noqa: E402

from trainer.train import SUMMARY_FILE  # noqa: E402

PHASES = ("scaling", "elastic", "full")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def xc_train(gpus: int, argv: list[str], log: Path, timeout_s: float, device: str) -> dict[str, Any]:
    """One `xc-train` run on `gpus` processes; returns its summary (raises with the log's tail)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={gpus}", "--nnodes=1",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "trainer.cli", *argv,
    ]  # fmt: skip
    env = dict(os.environ)
    if device == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{log.read_text()[-4000:]}")
    out_dir = Path(argv[argv.index("--output-dir") + 1])
    summary = json.loads((out_dir / SUMMARY_FILE).read_text())
    summary["wall_s"] = time.perf_counter() - t0
    return summary


def measured(summary: dict[str, Any], gpus: int, warmup: int) -> dict[str, Any]:
    """Rates over the history's steps after `warmup` (tokens of a step = tokens/s × step time)."""
    steps = summary["history"][warmup:]
    if not steps:
        raise RuntimeError(f"no step after the {warmup} warm-up step(s)")
    tokens = sum(h["tokens_per_s"] * h["step_s"] for h in steps)
    seconds = sum(h["step_s"] for h in steps)
    peaks = summary.get("peak_gpu_memory_bytes") or []
    return {
        "gpus": gpus,
        "steps": len(steps),
        "tokens_per_step": tokens / len(steps),
        "step_s_p50": statistics.median(h["step_s"] for h in steps),
        "step_s_max": max(h["step_s"] for h in steps),
        "tokens_per_s": tokens / seconds,
        "tokens_per_s_per_gpu": tokens / seconds / gpus,
        "data_wait_pct": sum(h["data_wait_pct"] * h["step_s"] for h in steps) / seconds,
        "mfu": statistics.median(h["mfu"] for h in steps) if steps[0].get("mfu") is not None else None,
        "peak_gib_per_rank": [p / 2**30 for p in peaks if p is not None],
        "wall_s": summary["wall_s"],
    }


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def print_tables(results: dict[str, Any]) -> None:
    rows = results.get("scaling", [])
    if rows:
        print(
            "| GPUs | steps | tokens/step | step s p50 | tokens/s | tokens/s per GPU | efficiency | data wait | MFU | peak GiB per rank |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "–"
            peaks = ", ".join(f"{p:.1f}" for p in r["peak_gib_per_rank"]) or "–"
            print(
                f"| {r['gpus']} | {r['steps']} | {r['tokens_per_step']:,.0f} | {r['step_s_p50']:.3f} | "
                f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_gpu']:,.0f} | {r['efficiency']:.1%} | "
                f"{r['data_wait_pct']:.2f} % | {mfu} | {peaks} |"
            )
    elastic = results.get("elastic")
    if elastic:
        print(
            f"elastic: stopped at step {elastic['stopped_at']} on {elastic['gpus']} GPUs, resumed to step "
            f"{elastic['last_step']}: same samples in every step on {elastic['gpus']} and "
            f"{elastic['resume_gpus']} GPUs: {elastic['same_samples']}; max |loss difference| "
            f"{elastic['max_loss_diff']:.2e} (losses {elastic['losses_same_gpus'][:3]}... vs "
            f"{elastic['losses_fewer_gpus'][:3]}...)"
        )
    full = results.get("full")
    if full:
        peaks = ", ".join(f"{p:.1f}" for p in full["peak_gib_per_rank"])
        print(
            f"full (ZeRO-3, {full['gpus']} GPUs): {full['steps']} measured steps, step p50 {full['step_s_p50']:.2f} s, "
            f"{full['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU, peak GiB per rank {peaks}, "
            f"checkpoint {full['checkpoint_gb']:.1f} GB, losses {full['losses']}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="7b", choices=("7b", "tiny"))
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer.model, or 'tiny' (default for --preset tiny)"
    )
    parser.add_argument("--gpus", default="1,2,4", help="GPU counts of the scaling phase, ascending")
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument(
        "--device", default="cuda", choices=("cuda", "cpu"), help="cpu: gloo ranks (a smoke test)"
    )
    parser.add_argument("--records", type=int, default=64, help="records per kind (single, multi, text)")
    parser.add_argument("--hd-num", type=int, default=18)
    parser.add_argument("--max-length", type=int, default=16384)
    parser.add_argument("--micro-batches", type=int, default=2, help="packs per rank per step (scaling)")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the rates")
    parser.add_argument("--steps", type=int, default=12, help="steps of each scaling run (warm-up included)")
    parser.add_argument("--elastic-steps", type=int, default=16, help="the resumed runs' last step")
    parser.add_argument("--full-steps", type=int, default=5, help="steps of the full-recipe run")
    parser.add_argument(
        "--train-args", default="--compile --checkpoint-layers 0", help="extra LoRA xc-train flags"
    )
    parser.add_argument("--run-timeout-s", type=float, default=420)
    parser.add_argument("--work", type=Path, default=Path("/tmp/xc-scaling"))
    parser.add_argument("--out-json", type=Path, default=None)
    args = parser.parse_args(argv)
    gpus = sorted(int(g) for g in args.gpus.split(","))
    phases = [p for p in args.phases.split(",") if p]
    if unknown := set(phases) - set(PHASES):
        parser.error(f"--phases: unknown {sorted(unknown)}; choose from {PHASES}")
    if "elastic" in phases and (gpus[-1] < 2 or gpus[-1] % 2 or args.elastic_steps <= args.steps):
        parser.error("--phases elastic needs an even largest --gpus count and --elastic-steps > --steps")

    results: dict[str, Any] = {
        "bench": "scaling",
        "command": ["python", "bench/scaling.py", *(sys.argv[1:] if argv is None else argv)],
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if args.device == "cuda":
        import torch

        results["device"] = f"{torch.cuda.device_count()} × {torch.cuda.get_device_name()}"
        results["torch"] = torch.__version__

    def write() -> None:
        if args.out_json:
            args.out_json.write_text(json.dumps(results, indent=1))

    # --- data (kept in --work: a later invocation reuses the shards and the scaling phase's runs)
    args.work.mkdir(parents=True, exist_ok=True)
    shards = args.work / "shards"
    t0 = time.perf_counter()
    if not (shards / "manifest.json").is_file():
        tokenizer = resolve_tokenizer(args.tokenizer, args.preset, args.work)
        sources = make_sources(make_photos(args.work / "photos"), args.records, seed=0)
        shards = build_shards(
            args.work, sources, tokenizer, args.hd_num, args.max_length, os.cpu_count() or 1
        )
    results["data_prep_s"] = time.perf_counter() - t0
    manifest = json.loads((shards / "manifest.json").read_text())
    results["data"] = {s["name"]: s["samples_written"] for s in manifest["sources"]}
    print(f"shards {shards}: {results['data']} in {results['data_prep_s']:.0f} s", flush=True)

    common = ["--shards", str(shards), "--model", args.preset, "--max-length", str(args.max_length)]
    common += [
        "--num-workers",
        "2",
        "--log-every-steps",
        "1",
        "--no-save-final",
        "--save-every-steps",
        "100000",
    ]
    lora = [*common, "--recipe", "lora", *args.train_args.split()]

    # --- scaling
    if "scaling" in phases:
        results["scaling"] = []
        for n in gpus:
            out = args.work / f"lora-{n}"
            shutil.rmtree(out, ignore_errors=True)
            run = [*lora, "--global-batch-size", str(n * args.micro_batches), "--output-dir", str(out)]
            if n == gpus[-1]:  # stops and keeps its checkpoint for the elastic phase
                run += ["--max-steps", str(args.elastic_steps), "--stop-after-steps", str(args.steps)]
            else:
                run += ["--max-steps", str(args.steps)]
            summary = xc_train(n, run, args.work / f"lora-{n}.log", args.run_timeout_s, args.device)
            row = measured(summary, n, args.warmup)
            row["efficiency"] = row["tokens_per_s_per_gpu"] / (
                results["scaling"][0]["tokens_per_s_per_gpu"]
                if results["scaling"]
                else row["tokens_per_s_per_gpu"]
            )
            results["scaling"].append(row)
            write()

    # --- elastic
    if "elastic" in phases:
        n, half = gpus[-1], gpus[-1] // 2
        stopped = args.work / f"lora-{n}"
        if not (stopped / "checkpoints").is_dir():
            raise SystemExit(f"--phases elastic resumes {stopped}: run the scaling phase first (same --work)")
        histories = {}
        for resume_gpus in (n, half):
            out = args.work / f"elastic-{resume_gpus}"
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(stopped, out)
            run = [*lora, "--global-batch-size", str(n * args.micro_batches), "--output-dir", str(out)]
            run += ["--max-steps", str(args.elastic_steps), "--resume", "auto"]
            summary = xc_train(
                resume_gpus, run, args.work / f"elastic-{resume_gpus}.log", args.run_timeout_s, args.device
            )
            histories[resume_gpus] = summary["history"][args.steps :]
        same, fewer = histories[n], histories[half]
        results["elastic"] = {
            "gpus": n,
            "resume_gpus": half,
            "stopped_at": args.steps,
            "last_step": args.elastic_steps,
            "same_samples": [h["samples"] for h in same] == [h["samples"] for h in fewer],
            "steps_compared": len(same),
            "losses_same_gpus": [round(h["loss"], 4) for h in same],
            "losses_fewer_gpus": [round(h["loss"], 4) for h in fewer],
            "max_loss_diff": max(abs(a["loss"] - b["loss"]) for a, b in zip(same, fewer, strict=True)),
            "tokens_per_s_fewer_gpus": measured({"history": fewer, "wall_s": 0}, half, 1)["tokens_per_s"],
        }
        write()

    # --- full fine-tuning, ZeRO-3
    if "full" in phases:
        n = gpus[-1]
        out = args.work / "full"
        shutil.rmtree(out, ignore_errors=True)
        run = [*common, "--recipe", "full", "--zero-stage", "3", "--global-batch-size", str(n)]
        run += ["--max-steps", str(args.full_steps), "--output-dir", str(out)]
        summary = xc_train(n, run, args.work / "full.log", args.run_timeout_s, args.device)
        row = measured(summary, n, min(2, args.full_steps - 1))
        checkpoints = sorted((out / "checkpoints").glob("step-*"))
        row["checkpoint_gb"] = dir_bytes(checkpoints[-1]) / 1e9 if checkpoints else 0.0
        row["losses"] = [round(h["loss"], 3) for h in summary["history"]]
        results["full"] = row
        write()
    print_tables(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
