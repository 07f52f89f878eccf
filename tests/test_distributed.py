"""Several ranks on one CPU machine through the launcher path a multi-node job uses (issue 9).

`torchrun` with a c10d rendezvous starts two gloo ranks exactly as it starts one rank per GPU on
each node; the trainer reads RANK/WORLD_SIZE/LOCAL_RANK from it. Checked here: a 2-rank run
stopped mid-way resumes on ONE rank with the same global batch (DeepSpeed universal checkpoint)
and gives the loss history of an uninterrupted run, from ZeRO-2 and from ZeRO-1; ZeRO-3 on two
ranks trains the same losses as ZeRO-2 and writes a full checkpoint that loads; a non-finite loss
on one rank is skipped or stops the run on both ranks, with no hang.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.checkpoint import complete_checkpoints
from trainer.cli import main as train_main
from trainer.weights import load_model

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def args(shards: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--shards", str(shards), "--model", "tiny", "--output-dir", str(out), "--recipe", "full",
        "--max-length", "128", "--global-batch-size", "2", "--num-workers", "0", "--learning-rate", "1e-3",
        "--warmup-ratio", "0", "--save-every-steps", "100", "--log-every-steps", "1", "--epochs", "2", *extra,
    ]  # fmt: skip


def torchrun(argv: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--nnodes=1",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "trainer.cli", *argv,
    ]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def losses(out: Path) -> list[float]:
    return [h["loss"] for h in json.loads((out / "train_summary.json").read_text())["history"]]


def step_samples(out: Path) -> list[str]:
    """Each step's sample digest (`EpochPlan.step_digest`)."""
    return [h["samples"] for h in json.loads((out / "train_summary.json").read_text())["history"]]


@pytest.fixture(scope="module")
def reference_run(tiny_text_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One rank, uninterrupted, ZeRO-2: the history (and final weights) every other layout must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    assert train_main(args(tiny_text_shards, out)) == 0
    return out


@pytest.fixture(scope="module")
def reference(reference_run: Path) -> list[float]:
    return losses(reference_run)


@pytest.mark.parametrize("stage", ["2", "1"])
def test_two_ranks_stop_then_resume_on_one_rank_matches(
    tiny_text_shards: Path,
    tmp_path: Path,
    reference: list[float],
    reference_run: Path,
    capsys: pytest.CaptureFixture,
    stage: str,
) -> None:
    """ZeRO-2 (the full recipe's default) and ZeRO-1 (LoRA's: gradients reduced once per step)."""
    out = tmp_path / "run"
    zero = ("--zero-stage", stage)
    done = torchrun(args(tiny_text_shards, out, "--stop-after-steps", "3", "--no-save-final", *zero))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stopping after 3 step(s)" in done.stderr and f"ZeRO {stage}" in done.stderr
    assert json.loads((out / "checkpoints/step-00000003/trainer_state.json").read_text())["world_size"] == 2
    assert train_main(args(tiny_text_shards, out, "--resume", "auto", "--no-save-final", *zero)) == 0
    assert "resumed from" in capsys.readouterr().err
    assert (out / "checkpoints/step-00000003/universal").is_dir()  # DeepSpeed re-split ZeRO's state
    assert losses(out) == pytest.approx(reference, rel=1e-4)
    assert step_samples(out) == step_samples(reference_run)  # the same samples in every global step
    assert len(set(step_samples(out))) > 1
    # MFU counts every rank's packs of the step (from the plan): the same FLOPs on 2 ranks as on 1
    flops = [h["model_flops"] for h in json.loads((out / "train_summary.json").read_text())["history"]]
    reference_flops = [
        h["model_flops"] for h in json.loads((reference_run / "train_summary.json").read_text())["history"]
    ]
    assert flops == reference_flops and min(flops) > 0


def test_zero3_on_two_ranks_trains_like_zero2_and_saves_a_full_checkpoint(
    tiny_text_shards: Path, tmp_path: Path, reference: list[float], reference_run: Path
) -> None:
    """The final folder holds every weight gathered from the ZeRO-3 partitions: the values the
    one-rank ZeRO-2 run trained (not the initial ones, not a rank's shard), in the official layout."""
    out = tmp_path / "run"
    done = torchrun(args(tiny_text_shards, out, "--zero-stage", "3"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ZeRO 3" in done.stderr
    assert losses(out) == pytest.approx(reference, rel=1e-4)
    final = load_model(out / "final").state_dict()
    expected = load_model(reference_run / "final").state_dict()
    initial = load_model(out / "base").state_dict()  # the tiny preset's random init, saved by the run
    assert final.keys() == expected.keys() == initial.keys()
    moved = {k for k in final if not torch.equal(expected[k], initial[k])}
    decoder = {k for k in final if re.fullmatch(r"model\.layers\.\d+\.\w+\.(wqkv|wo|w1|w2|w3)\.weight", k)}
    assert decoder and decoder | {"output.weight"} <= moved, (
        "the text-only run left decoder weights untrained"
    )
    for key in final:
        torch.testing.assert_close(
            final[key], expected[key], atol=1e-5, rtol=1e-4, msg=lambda m, k=key: f"{k}: {m}"
        )


def test_deepspeed_launcher_runs_the_same_training(
    tiny_text_shards: Path, tmp_path: Path, reference: list[float]
) -> None:
    """`deepspeed --num_gpus 2 --module trainer.cli ...` (it appends --local_rank) gives the same run."""
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
        "--module", "trainer.cli", *args(tiny_text_shards, out, "--no-save-final"),
    ]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert losses(out) == pytest.approx(reference, rel=1e-4)


POISON_RANK_1 = """
import os, sys
from trainer.cli import main
from trainer.model import IXCModel

real_forward, calls = IXCModel.forward, [0]

def forward(self, *args, **kwargs):  # rank 1's 3rd micro-batch (step 3) gets an infinite loss
    out = real_forward(self, *args, **kwargs)
    calls[0] += 1
    if os.environ["RANK"] == "1" and calls[0] == 3 and out.loss_sum is not None:
        out.loss_sum = out.loss_sum * float("inf")
    return out

IXCModel.forward = forward
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(("stage", "policy"), [("2", "skip"), ("2", "stop"), ("1", "skip"), ("1", "stop")])
def test_a_non_finite_loss_on_one_rank(
    tiny_text_shards: Path, tmp_path: Path, stage: str, policy: str
) -> None:
    """ZeRO-2 reduces gradients in every backward, so the ranks agree on each micro-batch before
    its backward and all skip it (a zero gradient on one rank alone puts the collectives out of
    step). ZeRO-1 reduces once per step: only rank 1 skips its micro-batch, and the ranks agree
    before the optimizer step. Stop halts every rank before it. Nothing hangs."""
    script = tmp_path / "poisoned.py"
    script.write_text(POISON_RANK_1)
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--nnodes=1", "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}", str(script),
        *args(tiny_text_shards, out, "--nan-policy", policy, "--no-save-final", "--save-every-steps", "2",
              "--zero-stage", stage),
    ]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if policy == "skip":
        assert done.returncode == 0, done.stderr[-3000:]
        summary = json.loads((out / "train_summary.json").read_text())
        skipped = summary["skipped_samples"]
        assert skipped and all(k[0] == "001-text" for k in skipped)
        step3 = summary["history"][2]
        assert step3["step"] == 3
        if stage == "2":
            assert len(skipped) >= 2  # both ranks' packs of the micro-batch
            assert step3["loss"] == 0.0  # nothing of step 3 trained
        else:
            assert 0 < step3["loss"] < float("inf")  # rank 0's pack of step 3 trained, rank 1's skipped
        assert all(0 < h["loss"] < float("inf") for h in summary["history"] if h["step"] != 3)
    else:
        assert done.returncode != 0
        where = "micro-batch 0" if stage == "2" else "micro-batch 0 on rank 1"
        assert f"non-finite loss at epoch 0 step 2 {where}; samples (source, index, id)" in done.stderr
        assert [p.name for p in complete_checkpoints(out)] == ["step-00000002"]


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two single-image records (real photos) and two text records too long to share a 2,048-token
    row with an image: every packed row holds one sample, with images or without."""
    from PIL import Image
    from skimage import data as skdata

    from pipeline.cli import main as prep_main
    from pipeline.tokenization import build_tiny_tokenizer

    root = tmp_path_factory.mktemp("mixed")
    (root / "images").mkdir()
    image = []
    for i, name in enumerate(("astronaut", "chelsea")):
        Image.fromarray(getattr(skdata, name)()).save(root / "images" / f"{name}.jpg", quality=90)
        turns = [{"from": "human", "value": "What is this?"}, {"from": "gpt", "value": f"A photo of {name}."}]
        image.append({"id": f"i{i}", "image": f"images/{name}.jpg", "conversations": turns})
    answer = " ".join(f"fact {n} holds." for n in range(330))
    text = [
        {
            "id": f"t{i}",
            "conversations": [{"from": "human", "value": f"Tell me {i}."}, {"from": "gpt", "value": answer}],
        }
        for i in range(2)
    ]
    (root / "text.json").write_text(json.dumps(text))
    (root / "image.json").write_text(json.dumps(image))
    (root / "data.txt").write_text("text.json 0.002\nimage.json 0.002\n")
    build_tiny_tokenizer(root / "tokenizer.model")
    argv = ["shard", str(root / "data.txt"), "--tokenizer", str(root / "tokenizer.model"), "--hd-num", "1"]
    assert prep_main([*argv, "--max-length", "2048", "--out", str(root / "shards"), "--workers", "1"]) == 0
    return root / "shards"


def test_full_recipe_on_two_ranks_when_one_rank_has_no_image(mixed_shards: Path, tmp_path: Path) -> None:
    """The full recipe trains the ViT: a rank whose row has no image still runs it (a blank image
    that adds nothing), so ZeRO-2's and ZeRO-3's gradient reductions stay in step with the rank
    whose row has one (before: gloo aborted at the first such step). Same losses as one rank."""
    from trainer.config import TrainConfig
    from trainer.index import SampleIndex
    from trainer.plan import plan_epoch
    from trainer.train import loader_config

    common = ["--shards", str(mixed_shards), "--model", "tiny", "--recipe", "full", "--max-length", "2048"]
    common += ["--global-batch-size", "2", "--epochs", "3", "--num-workers", "0", "--warmup-ratio", "0"]
    common += ["--learning-rate", "1e-3", "--no-save-final", "--save-every-steps", "100"]
    cfg = TrainConfig(
        shards=mixed_shards, recipe="full", max_length=2048, global_batch_size=2, epochs=3
    ).resolve()
    index = SampleIndex.load(mixed_shards)
    mixed_steps = 0
    for epoch in range(3):
        plan = plan_epoch(index, loader_config(cfg, 2), epoch, 2)
        for step in range(plan.steps):
            tiles = sorted(int(plan.pack_tiles[p]) for p in plan.step_packs(step))
            mixed_steps += tiles[0] == 0 < tiles[1]
    assert mixed_steps  # a step where one rank's row has an image and the other's has none

    one = tmp_path / "one"
    assert train_main([*common, "--output-dir", str(one)]) == 0
    for stage in ("2", "3"):
        out = tmp_path / f"zero{stage}"
        done = torchrun([*common, "--output-dir", str(out), "--zero-stage", stage])
        assert done.returncode == 0, done.stderr[-3000:]
        assert losses(out) == pytest.approx(losses(one), rel=1e-4)
        assert step_samples(out) == step_samples(one)
