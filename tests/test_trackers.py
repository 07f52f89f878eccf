"""`--report-to tensorboard,wandb,mlflow` (issue 27): a tiny run logs to W&B in offline mode and to MLflow
with a local file store, and what they hold is read back: the resolved config, the train and
held-out scalars by step, and the paths of the outputs."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from trainer.cli import main as xc_train
from trainer.config import TrainConfig

pytestmark = pytest.mark.usefixtures("in_process_training")


def wandb_records(run_file: Path) -> list[Any]:
    """The records of a `.wandb` file: W&B's header (':W&B', magic, version: 7 bytes), then LevelDB
    log blocks of 32 KiB whose records (crc32c 4, length 2, type 1: full/first/middle/last) carry
    serialized `wandb_internal_pb2.Record`s."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            break
        pending += payload
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_report_to_is_checked_and_split_at_commas() -> None:
    cfg = TrainConfig(shards=Path("s"), report_to=("tensorboard,wandb", "mlflow", "wandb")).resolve()
    assert cfg.report_to == ("tensorboard", "wandb", "mlflow")
    assert TrainConfig(shards=Path("s"), report_to=("none",)).resolve().report_to == ()
    with pytest.raises(ValueError, match="--report-to comet: expected any of tensorboard, wandb, mlflow"):
        TrainConfig(shards=Path("s"), report_to=("comet",)).resolve()


@pytest.mark.slow
def test_wandb_offline_and_mlflow_file_store_hold_config_scalars_and_outputs(
    tiny_text_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb-dir").mkdir()
    store = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for a database by default
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "xc-test")
    out = tmp_path / "run"
    argv = [
        "--shards", str(tiny_text_shards), "--model", "tiny", "--output-dir", str(out), "--recipe", "lora",
        "--max-length", "128", "--global-batch-size", "2", "--num-workers", "0", "--warmup-ratio", "0",
        "--learning-rate", "1e-3", "--max-steps", "3", "--eval-fraction", "0.25", "--eval-every-steps", "2",
        "--report-to", "tensorboard,wandb,mlflow",
    ]  # fmt: skip
    assert xc_train(argv) == 0
    runs = json.loads((out / "tracker_runs.json").read_text())

    # --- W&B: the offline run file
    run_files = list((tmp_path / "wandb-dir").rglob(f"run-{runs['wandb']}.wandb"))
    assert len(run_files) == 1, list((tmp_path / "wandb-dir").rglob("*"))
    records = wandb_records(run_files[0])
    config = {  # the run record's config (and later config updates, if any)
        item.key: json.loads(item.value_json)
        for r in records
        for item in (
            r.run.config.update
            if r.WhichOneof("record_type") == "run"
            else r.config.update
            if r.WhichOneof("record_type") == "config"
            else []
        )
    }
    assert config["learning_rate"] == 1e-3 and config["recipe"] == "lora" and config["use_lora"] is True
    history: dict[str, dict[int, float]] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for key, value in items.items():
                if not key.startswith("_"):
                    history.setdefault(key, {})[int(items["_step"])] = value
    assert sorted(history["train/loss"]) == [1, 2, 3] and sorted(history["eval/loss"]) == [2, 3]
    assert "eval_loss_by_source/001-text" in history and "train/lr" in history
    summary = {
        i.key or "/".join(i.nested_key): json.loads(i.value_json)
        for r in records
        if r.WhichOneof("record_type") == "summary"
        for i in r.summary.update
    }
    assert summary["outputs/final"] == str(out / "final") and summary["outputs/best"] == str(out / "best")

    # --- MLflow: the file store, through its client
    client = MlflowClient(store)
    run = client.get_run(runs["mlflow"])
    assert client.get_experiment(run.info.experiment_id).name == "xc-test"
    assert run.data.params["learning_rate"] == "0.001" and run.data.params["recipe"] == "lora"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/loss")] == [2, 3]
    assert run.data.tags["outputs.final"] == str(out / "final")
    assert run.data.tags["outputs.summary"] == str(out / "train_summary.json")
    assert run.info.status == "FINISHED"
    losses = [h["loss"] for h in json.loads((out / "train_summary.json").read_text())["history"]]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")] == pytest.approx(
        losses
    )
    assert sorted(history["train/loss"].values()) == pytest.approx(sorted(losses))
