"""Held-out evaluation during training, the best checkpoint, early stopping (issue 27), on CPU with the
tiny preset and the real DeepSpeed engine (gloo). Shards: two text sources, so that losses per
source are logged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import DIST_ENV

from trainer.checkpoint import complete_checkpoints
from trainer.cli import main as xc_train
from trainer.config import TrainConfig
from trainer.evaluate import evaluate
from trainer.heldout import EvalRecord
from trainer.index import SampleIndex, hold_out
from trainer.plan import LoaderConfig, compute_plan_id

REPO_ROOT = Path(__file__).resolve().parent.parent


def make_shards(root: Path, sources: dict[str, int], tokenizer: Path | None = None) -> Path:
    """Short question/answer records, `count` per source; k draws each twice per epoch."""
    from pipeline.cli import main as xc_prep
    from pipeline.tokenization import build_tiny_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        tokenizer = build_tiny_tokenizer(root / "tokenizer.model")
    lines = []
    for name, count in sources.items():
        records = [
            {
                "id": i,
                "conversations": [
                    {"from": "human", "value": f"{name} question {i}?"},
                    {"from": "gpt", "value": f"The {name} answer number {i} is short and plain."},
                ],
            }
            for i in range(count)
        ]
        (root / f"{name}.json").write_text(json.dumps(records))
        lines.append(f"{name}.json {2 * count / 1000}")
    (root / "data.txt").write_text("\n".join(lines) + "\n")
    argv = ["shard", str(root / "data.txt"), "--tokenizer", str(tokenizer), "--out", str(root / "shards")]
    assert xc_prep([*argv, "--max-length", "128", "--workers", "1"]) == 0
    return root / "shards"


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shards(tmp_path_factory.mktemp("heldout"), {"alpha": 6, "beta": 5})


pytestmark = pytest.mark.usefixtures("in_process_training")


def train_argv(shards: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--shards", str(shards), "--model", "tiny", "--output-dir", str(out), "--recipe", "lora",
        "--max-length", "128", "--global-batch-size", "2", "--num-workers", "0", "--warmup-ratio", "0",
        "--save-every-steps", "100", "--log-every-steps", "1", *extra,
    ]  # fmt: skip


def summary(out: Path) -> dict:
    return json.loads((out / "train_summary.json").read_text())


# --------------------------------------------------------------------------- the held-out split


def test_held_out_samples_are_seeded_per_source_and_never_train(two_sources: Path) -> None:
    index = SampleIndex.load(two_sources)
    train, held = hold_out(index, 0.3, seed=42)
    again_train, again_held = hold_out(index, 0.3, seed=42)
    assert np.array_equal(held.sample_row, again_held.sample_row)
    assert np.diff(held.source_offsets).tolist() == [2, 2]  # round(0.3 · 6), round(0.3 · 5)
    assert np.diff(train.source_offsets).tolist() == [4, 3]
    stored = {(int(s), int(r)) for s, r in zip(index.sample_shard, index.sample_row, strict=True)}
    kept = {(int(s), int(r)) for s, r in zip(train.sample_shard, train.sample_row, strict=True)}
    out = {(int(s), int(r)) for s, r in zip(held.sample_shard, held.sample_row, strict=True)}
    assert kept | out == stored and not kept & out
    assert not np.array_equal(hold_out(index, 0.3, seed=7)[1].sample_row, held.sample_row)
    # a plan of the training part is another plan: a run cannot resume with another held-out share
    config = LoaderConfig(max_length=128)
    assert compute_plan_id(train, config, 2) != compute_plan_id(index, config, 2)
    assert compute_plan_id(index, config, 2) == compute_plan_id(SampleIndex.load(two_sources), config, 2)
    # a source of one sample keeps it for training; every larger source gives at least one
    assert np.diff(hold_out(index, 0.01, seed=42)[1].source_offsets).tolist() == [1, 1]


def test_evaluation_settings_are_checked_where_the_config_is_built() -> None:
    with pytest.raises(ValueError, match="--eval-shards and --eval-fraction both"):
        TrainConfig(shards=Path("s"), eval_shards=Path("e"), eval_fraction=0.1).resolve()
    with pytest.raises(ValueError, match="--early-stop-patience needs held-out samples: add --eval-shards"):
        TrainConfig(shards=Path("s"), early_stop_patience=2).resolve()
    with pytest.raises(ValueError, match=r"--eval-fraction 1.0: must be a number in \[0, 1\)"):
        TrainConfig(shards=Path("s"), eval_fraction=1.0).resolve()
    record = EvalRecord()
    assert record.add(1, {"loss": 2.0}) and not record.add(2, {"loss": 2.0}) and record.add(3, {"loss": 1.5})
    assert (record.best_step, record.since_best, record.out_of_patience(1)) == (3, 0, False)
    assert not record.add(4, {"loss": 1.6}) and record.out_of_patience(1)


# --------------------------------------------------------------------------- training with evaluation


@pytest.mark.slow
def test_held_out_loss_matches_xc_train_eval_and_early_stopping_ends_the_run(
    two_sources: Path, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    """A learning rate of 1e-30 leaves every weight as it was (steps far below fp32 resolution; 0 is
    refused): every evaluation gives the first one's loss, so with patience 2 the run stops
    at the third; that loss is `xc-train eval`'s token-weighted mean over the held-out samples (one
    sample per row there, packed rows here); best/ holds the step-1 adapter; a rerun has nothing left."""
    out = tmp_path / "run"
    argv = train_argv(two_sources, out, "--learning-rate", "1e-30", "--epochs", "3", "--eval-fraction", "0.3")
    argv += ["--eval-every-steps", "1", "--early-stop-patience", "2"]
    assert xc_train(argv) == 0
    log = capfd.readouterr().err
    result = summary(out)
    evals = result["evaluations"]
    assert [e["step"] for e in evals] == [1, 2, 3] and result["steps"] == 3 and result["stopped_early"]
    assert len({e["loss"] for e in evals}) == 1 and evals[0]["samples"] == 4
    assert set(evals[0]["source_loss"]) == {"001-alpha", "002-beta"}
    assert "stopping early: the eval loss has not improved for 2 evaluation(s) (best" in log
    assert "eval step 1 | loss" in log and "001-alpha" in log
    assert result["best"] == {"step": 1, "eval_loss": evals[0]["loss"], "dir": str(out / "best")}
    assert json.loads((out / "best" / "eval.json").read_text())["step"] == 1
    assert (out / "best" / "adapter_config.json").is_file() and (
        out / "final" / "adapter_config.json"
    ).is_file()
    assert [p.name for p in complete_checkpoints(out)] == ["step-00000003"]

    # the same loss as `xc-train eval` of the (unchanged) model over the held-out samples
    everything = evaluate(out / "best", two_sources)
    index = SampleIndex.load(two_sources)
    _, held = hold_out(index, 0.3, seed=42)
    held_keys = {(int(s), int(r)) for s, r in zip(held.sample_shard, held.sample_row, strict=True)}
    rows = [
        r
        for g, r in enumerate(everything["per_sample"])
        if (int(index.sample_shard[g]), int(index.sample_row[g])) in held_keys
    ]
    expected = sum(r["loss_sum"] for r in rows) / sum(r["trained_tokens"] for r in rows)
    assert evals[0]["loss"] == pytest.approx(expected, rel=1e-5)
    for source in ("001-alpha", "002-beta"):
        mine = [r for r in rows if r["source"] == source]
        per_source = sum(r["loss_sum"] for r in mine) / sum(r["trained_tokens"] for r in mine)
        assert evals[0]["source_loss"][source] == pytest.approx(per_source, rel=1e-5)

    # TensorBoard holds the held-out scalars beside the training ones
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"train/loss", "eval/loss", "eval_loss_by_source/002-beta"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("eval/loss")] == [1, 2, 3]

    # the run is over: a rerun of the same command trains nothing more
    capfd.readouterr()
    assert xc_train(argv) == 0
    assert "the run stopped early at step 3" in capfd.readouterr().err
    assert summary(out)["steps"] == 3


@pytest.mark.slow
@pytest.mark.distributed
def test_eval_shards_on_two_ranks_give_the_one_rank_losses(two_sources: Path, tmp_path: Path) -> None:
    """--eval-shards (another folder, same tokenizer): each rank evaluates its share of the rows and
    the sums are reduced: the 2-rank run logs the 1-rank run's held-out losses; best/ follows the
    lowest one."""
    eval_shards = make_shards(tmp_path / "eval", {"alpha": 3, "gamma": 4}, two_sources / "tokenizer.model")
    common = ["--learning-rate", "2e-3", "--max-steps", "3", "--eval-shards", str(eval_shards)]
    common += ["--eval-every-steps", "1"]
    one = tmp_path / "one"
    assert xc_train(train_argv(two_sources, one, *common)) == 0

    two = tmp_path / "two"
    port = str(_free_port())
    cmd = [sys.executable, "-m", "trainer.cli", *train_argv(two_sources, two, *common)]
    procs = []
    for rank in (0, 1):
        env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
        env.update(
            RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port
        )
        procs.append(
            subprocess.Popen(
                cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(logs)
    a, b = summary(one)["evaluations"], summary(two)["evaluations"]
    assert [e["step"] for e in a] == [e["step"] for e in b] == [1, 2, 3]
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5) and y["samples"] == x["samples"] == 7
        assert y["source_loss"].keys() == {"001-alpha", "002-gamma"}
        for source, loss in x["source_loss"].items():
            assert y["source_loss"][source] == pytest.approx(loss, rel=1e-5)
    best = min(a, key=lambda e: e["loss"])
    assert summary(two)["best"]["step"] == best["step"]
    assert json.loads((two / "best" / "eval.json").read_text())["step"] == best["step"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def image_and_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two single-photo records and two text records too long to share a 2,048-token row with an
    image: every packed row holds one sample, with images or without."""
    from PIL import Image
    from skimage import data as skdata

    from pipeline.cli import main as xc_prep
    from pipeline.tokenization import build_tiny_tokenizer

    root = tmp_path_factory.mktemp("image_and_text")
    (root / "images").mkdir()
    image, text = [], []
    for i, name in enumerate(("astronaut", "chelsea")):
        Image.fromarray(getattr(skdata, name)()).save(root / "images" / f"{name}.jpg", quality=90)
        turns = [{"from": "human", "value": "What is this?"}, {"from": "gpt", "value": f"A photo of {name}."}]
        image.append({"id": f"i{i}", "image": f"images/{name}.jpg", "conversations": turns})
        answer = " ".join(f"fact {n} holds." for n in range(330))
        text.append(
            {
                "id": f"t{i}",
                "conversations": [
                    {"from": "human", "value": f"Tell me {i}."},
                    {"from": "gpt", "value": answer},
                ],
            }
        )
    (root / "image.json").write_text(json.dumps(image))
    (root / "text.json").write_text(json.dumps(text))
    (root / "data.txt").write_text("image.json 0.002\ntext.json 0.002\n")
    tokenizer = build_tiny_tokenizer(root / "tokenizer.model")
    argv = ["shard", str(root / "data.txt"), "--tokenizer", str(tokenizer), "--hd-num", "1"]
    assert xc_prep([*argv, "--max-length", "2048", "--out", str(root / "shards"), "--workers", "1"]) == 0
    return root / "shards"


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_evaluation_when_one_rank_has_the_image_row(image_and_text: Path, tmp_path: Path) -> None:
    """ZeRO-3 gathers each module's weights in collectives, in forward too: the rank whose held-out
    row has no image still runs the (blank) vision side, so neither rank waits forever; the losses
    are the one-rank run's."""
    common = ["--shards", str(image_and_text), "--model", "tiny", "--recipe", "lora", "--zero-stage", "3"]
    common += [
        "--max-length",
        "2048",
        "--global-batch-size",
        "2",
        "--num-workers",
        "0",
        "--warmup-ratio",
        "0",
    ]
    common += ["--learning-rate", "1e-3", "--max-steps", "2", "--no-save-final", "--save-every-steps", "100"]
    common += ["--eval-fraction", "0.5", "--eval-every-steps", "1"]
    index = SampleIndex.load(image_and_text)
    _, held = hold_out(index, 0.5, seed=42)
    assert sorted(held.num_tiles.tolist()) == [0, 1]  # one held-out row with an image, one without
    one = tmp_path / "one"
    assert xc_train([*common, "--output-dir", str(one)]) == 0
    two = tmp_path / "two"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--nnodes=1", "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "-m", "trainer.cli", *common, "--output-dir", str(two),
    ]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = summary(one)["evaluations"], summary(two)["evaluations"]
    assert [e["step"] for e in b] == [1, 2] and [e["samples"] for e in b] == [2, 2]
    assert [e["loss"] for e in b] == pytest.approx([e["loss"] for e in a], rel=1e-4)
