"""Several GPUs of one host (issue 9): LoRA scaling, elastic resume, full fine-tuning with ZeRO-3.

Every run is `xc-train` under `torch.distributed.run` (one process per GPU, NCCL), on shards that
this bench makes with `xc-prep shard` from a generated mix of real photos (bench/common.py's
sources: single-image, multi-image multi-turn and text-only records, real tokenizer, hd 18,
max_length 16,384), in phases:

  scaling      LoRA (fix_vit, fix_sampler) on 1, 2, 4 GPUs, one after another, each rank
               `--micro-batches` packs per step (weak scaling: the global batch grows with the
               GPUs, so each run trains other samples), or `--global-batch` packs per step on
               every GPU count (strong scaling: the same samples in every step, fewer
               micro-batches per rank on more GPUs). Reported over steps `--warmup`+1 .. `--steps`:
               tokens/s over all GPUs, per GPU, and the efficiency = tokens/s per GPU against the
               smallest run's (one GPU's by default); the same for model FLOPs (trainer/flops.py,
               every rank's packs), which weighs what weak scaling's different samples cost
               (attention grows with the square of a sample's length); step time p50; data wait;
               peak memory per rank. The largest run goes on,
               uninterrupted, to `--elastic-steps`, saving a checkpoint at step `--steps`: the
               reference for the elastic phase.
  elastic      that step-`--steps` checkpoint resumed on half the GPUs with the same global batch
               (twice the micro-batches per rank; DeepSpeed's universal checkpoint re-splits the
               ZeRO state) to `--elastic-steps`; each step's sample digest (`EpochPlan.step_digest`)
               and loss compared with the uninterrupted run's.
  full         the full recipe (every weight but the unused adapters trains, ViT and vision_proj
               too) with ZeRO-3 on all GPUs, one pack per rank, every layer recomputed: stops after
               `--full-stop` of `--full-steps` steps with a checkpoint; tokens/s per GPU, peak
               memory per rank, checkpoint size and write time. The LoRA runs' checkpoints are
               deleted first (a 7B full checkpoint is ≈ 110 GB, and the resume writes its own
               before it deletes the older one).
  full-resume  that run resumed (`--resume auto`, same GPUs) to `--full-steps`: load time, the
               losses and digests going on, peak memory.

Each run's summary is kept in --work (`<run>.json`, with the command it ran): invoking the bench
again with the same --work skips the runs already done with the same arguments, so the phases can
be spread over several invocations (a GPU lease with a time limit per command).

    python -m bench.scaling --tokenizer tokenizer.model --gpus 1,2,4 --out-json scaling.json
    python -m bench.scaling --tokenizer tokenizer.model --phases full,full-resume   # same --work
    python -m bench.scaling --preset tiny --tokenizer tiny --gpus 1,2 --device cpu --hd-num 2 \
        --max-length 4096 --records 3 --micro-batches 1 --train-args ""
"""

from __future__ import annotations

import argparse
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

from bench.common import bench_header, build_shards, make_photos, make_sources, resolve_tokenizer, write_json
from trainer import checkpoint as ckpt
from trainer.train import SUMMARY_FILE

PHASES = ("scaling", "elastic", "full", "full-resume")


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


def run_once(
    work: Path, name: str, gpus: int, argv: list[str], args: argparse.Namespace, fresh: bool = True
) -> dict[str, Any]:
    """`xc_train` unless `work/<name>.json` says this very run is done; `fresh` empties its output
    folder first (a resume keeps it)."""
    record = work / f"{name}.json"
    if record.is_file():
        done = json.loads(record.read_text())
        if done["gpus"] == gpus and done["argv"] == argv:
            print(f"{name}: done before ({record}), reused", flush=True)
            return dict(done["summary"])
    if fresh:
        shutil.rmtree(argv[argv.index("--output-dir") + 1], ignore_errors=True)
    print(f"{name}: xc-train on {gpus} {args.device} rank(s)", flush=True)
    summary = xc_train(gpus, argv, work / f"{name}.log", args.run_timeout_s, args.device)
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps({"gpus": gpus, "argv": argv, "summary": summary}))
    tmp.replace(record)
    return summary


def measured(summary: dict[str, Any], gpus: int, warmup: int, last: int | None = None) -> dict[str, Any]:
    """Rates over the history's steps warmup+1 .. last (tokens of a step = tokens/s × step time)."""
    steps = [h for h in summary["history"] if warmup < h["step"] <= (last or h["step"])]
    if not steps:
        raise RuntimeError(f"no step after the {warmup} warm-up step(s)")
    tokens = sum(h["tokens_per_s"] * h["step_s"] for h in steps)
    seconds = sum(h["step_s"] for h in steps)
    flops = sum(h.get("model_flops") or 0.0 for h in steps)
    peaks = summary.get("peak_gpu_memory_bytes") or []
    return {
        "gpus": gpus,
        "steps": len(steps),
        "tokens_per_step": tokens / len(steps),
        "step_s_p50": statistics.median(h["step_s"] for h in steps),
        "step_s_max": max(h["step_s"] for h in steps),
        "tokens_per_s": tokens / seconds,
        "tokens_per_s_per_gpu": tokens / seconds / gpus,
        "model_tflops_per_s_per_gpu": flops / seconds / gpus / 1e12,
        "data_wait_pct": sum(h["data_wait_pct"] * h["step_s"] for h in steps) / seconds,
        "mfu": statistics.median(h["mfu"] for h in steps) if steps[0].get("mfu") is not None else None,
        "peak_gib_per_rank": [p / 2**30 for p in peaks if p is not None],
        "wall_s": summary["wall_s"],
        "startup_s": summary.get("startup_s"),
    }


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def startup(seconds: dict[str, float]) -> str:
    return f"{sum(seconds.values()):.0f} s (" + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + ")"


def print_tables(results: dict[str, Any]) -> None:
    rows = results.get("scaling", [])
    if rows:
        print(
            "| GPUs | steps | tokens/step | step s p50 | tokens/s | tokens/s per GPU | efficiency | model TFLOP/s per GPU | efficiency (FLOPs) | data wait | MFU | peak GiB per rank | start-up s |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "–"
            peaks = ", ".join(f"{p:.1f}" for p in r["peak_gib_per_rank"]) or "–"
            print(
                f"| {r['gpus']} | {r['steps']} | {r['tokens_per_step']:,.0f} | {r['step_s_p50']:.3f} | "
                f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_gpu']:,.0f} | {r['efficiency']:.1%} | "
                f"{r['model_tflops_per_s_per_gpu']:.3g} | {r['efficiency_flops']:.1%} | "
                f"{r['data_wait_pct']:.2f} % | {mfu} | {peaks} | {startup(r['startup_s'])} |"
            )
    elastic = results.get("elastic")
    if elastic:
        print(
            f"elastic: {elastic['gpus']} GPUs uninterrupted vs stopped at step {elastic['stopped_at']} and "
            f"resumed on {elastic['resume_gpus']} to step {elastic['last_step']}: same samples in every "
            f"step: {elastic['same_samples']} ({elastic['steps_compared']} steps); max |loss difference| "
            f"{elastic['max_loss_diff']:.2e}; resumed run {elastic['tokens_per_s_fewer_gpus']:,.0f} tokens/s, "
            f"checkpoint loaded in {elastic['load_s']:.1f} s"
        )
    for key in ("full", "full-resume"):
        full = results.get(key)
        if full:
            peaks = ", ".join(f"{p:.1f}" for p in full["peak_gib_per_rank"])
            saves = ", ".join(f"step {s['step']} {s['seconds']:.0f} s" for s in full["checkpoint_saves"])
            print(
                f"{key} (ZeRO-{full['zero_stage']}, {full['gpus']} GPUs): steps {full['first_step']}-{full['last_step']}, "
                f"step p50 {full['step_s_p50']:.2f} s, {full['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU, "
                f"MFU {full['mfu'] or 0:.1%}, peak GiB per rank {peaks}, checkpoint {full['checkpoint_gb']:.1f} GB "
                f"saved in {saves}, start-up {startup(full['startup_s'])}, losses {full['losses']}"
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
    parser.add_argument("--micro-batches", type=int, default=2, help="packs per rank per step (weak scaling)")
    parser.add_argument(
        "--global-batch",
        type=int,
        default=None,
        help="packs per step on every GPU count (strong scaling: the same samples in every step)",
    )
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the rates")
    parser.add_argument("--steps", type=int, default=12, help="steps of each scaling run (warm-up included)")
    parser.add_argument("--elastic-steps", type=int, default=16, help="the resumed runs' last step")
    parser.add_argument("--full-steps", type=int, default=8, help="steps of the full recipe (both runs)")
    parser.add_argument("--full-stop", type=int, default=4, help="the full recipe's first run stops here")
    parser.add_argument(
        "--full-zero-stage", type=int, default=3, choices=(2, 3), help="ZeRO stage of the full recipe"
    )
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
    if args.global_batch is not None and any(args.global_batch % n for n in gpus):
        parser.error(f"--global-batch {args.global_batch} must be a multiple of every --gpus count")
    if "elastic" in phases and (gpus[-1] < 2 or gpus[-1] % 2):
        parser.error("--phases elastic needs an even largest --gpus count")
    if not args.warmup < args.steps < args.elastic_steps or not 0 < args.full_stop < args.full_steps:
        parser.error("need --warmup < --steps < --elastic-steps and 0 < --full-stop < --full-steps")

    results: dict[str, Any] = bench_header("scaling", argv)
    if args.device == "cuda":
        import torch

        results["device"] = f"{torch.cuda.device_count()} × {torch.cuda.get_device_name()}"
        results["torch"] = torch.__version__

    def write() -> None:
        write_json(args.out_json, results)

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
    common += ["--num-workers", "2", "--log-every-steps", "1", "--no-save-final"]
    lora = [*common, "--recipe", "lora", *args.train_args.split()]
    work = args.work
    global_batch = lambda n: args.global_batch or n * args.micro_batches  # noqa: E731

    # --- scaling (the largest run is the elastic phase's uninterrupted reference)
    largest = gpus[-1]
    if "scaling" in phases:
        results["scaling"] = []
        for n in gpus:
            run = [*lora, "--global-batch-size", str(global_batch(n))]
            run += ["--output-dir", str(work / f"lora-{n}"), "--keep-last", "100"]
            if n == largest:
                run += ["--max-steps", str(args.elastic_steps), "--save-every-steps", str(args.steps)]
            else:
                run += ["--max-steps", str(args.steps), "--save-every-steps", "100000"]
            summary = run_once(work, f"lora-{n}", n, run, args)
            row = measured(summary, n, args.warmup, last=args.steps)
            first = results["scaling"][0] if results["scaling"] else row
            row["efficiency"] = row["tokens_per_s_per_gpu"] / first["tokens_per_s_per_gpu"]
            row["efficiency_flops"] = row["model_tflops_per_s_per_gpu"] / (
                first["model_tflops_per_s_per_gpu"] or float("nan")
            )
            results["scaling"].append(row)
            write()

    # --- elastic: the largest run's step-`steps` checkpoint resumed on half the GPUs
    if "elastic" in phases:
        half = largest // 2
        reference = work / f"lora-{largest}.json"
        stopped = work / f"lora-{largest}" / "checkpoints" / f"step-{args.steps:08d}"
        if not reference.is_file() or not (stopped.is_dir() or (work / f"elastic-{half}.json").is_file()):
            raise SystemExit(
                f"--phases elastic resumes {stopped} and compares with {reference}: run the scaling "
                "phase first (same --work; delete the .json to redo a run)"
            )
        run = [*lora, "--global-batch-size", str(global_batch(largest))]
        run += ["--output-dir", str(work / f"elastic-{half}"), "--save-every-steps", "100000"]
        run += ["--max-steps", str(args.elastic_steps), "--resume", str(stopped)]
        resumed = run_once(work, f"elastic-{half}", half, run, args)
        after = lambda history: [h for h in history if h["step"] > args.steps]  # noqa: E731
        same = after(json.loads(reference.read_text())["summary"]["history"])
        fewer = after(resumed["history"])
        results["elastic"] = {
            "gpus": largest,
            "resume_gpus": half,
            "stopped_at": args.steps,
            "last_step": args.elastic_steps,
            "same_samples": [h["samples"] for h in same] == [h["samples"] for h in fewer],
            "steps_compared": len(fewer),
            "losses_uninterrupted": [round(h["loss"], 4) for h in same],
            "losses_resumed": [round(h["loss"], 4) for h in fewer],
            "max_loss_diff": max(abs(a["loss"] - b["loss"]) for a, b in zip(same, fewer, strict=True)),
            "tokens_per_s_fewer_gpus": measured(resumed, half, args.steps + 1)["tokens_per_s"],
            "load_s": resumed["startup_s"].get("resume", 0.0),
            "peak_gib_per_rank": [p / 2**30 for p in resumed.get("peak_gpu_memory_bytes") or [] if p],
        }
        write()

    # --- full fine-tuning (ZeRO-3 by default): stop with a checkpoint, then resume
    full_dir = work / "full"
    full = [*common, "--recipe", "full", "--zero-stage", str(args.full_zero_stage)]
    full += ["--global-batch-size", str(largest)]
    full += ["--max-steps", str(args.full_steps), "--output-dir", str(full_dir), "--keep-last", "1"]
    for key in ("full", "full-resume"):
        if key not in phases:
            continue
        if key == "full":
            for old in [*work.glob("lora-*/checkpoints"), *work.glob("elastic-*/checkpoints")]:
                shutil.rmtree(old)  # disk: the 7B full checkpoints are ≈ 110 GB each
            # the first two steps of each run warm up (7B on 4 × H200: 17 and 9 s, then 4 s)
            run, warmup = [*full, "--stop-after-steps", str(args.full_stop)], min(2, args.full_stop - 1)
        else:
            if not ckpt.complete_checkpoints(full_dir):
                raise SystemExit(f"--phases full-resume resumes {full_dir}: run the full phase first")
            run, warmup = [*full, "--resume", "auto"], min(args.full_stop + 2, args.full_steps - 1)
        free_gb = shutil.disk_usage(work).free / 1e9
        summary = run_once(work, key, largest, run, args, fresh=key == "full")
        row = measured(summary, largest, warmup)
        checkpoints = ckpt.complete_checkpoints(full_dir)
        row["checkpoint_gb"] = dir_bytes(checkpoints[-1]) / 1e9 if checkpoints else 0.0
        row["disk_free_gb_before"] = free_gb
        row["checkpoint_saves"] = summary["checkpoint_saves"]
        row["zero_stage"] = args.full_zero_stage
        row["first_step"], row["last_step"] = warmup + 1, summary["steps"]
        row["losses"] = [round(h["loss"], 3) for h in summary["history"]]
        row["digests"] = [h["samples"] for h in summary["history"]]
        results[key] = row
        write()
    print_tables(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
