"""Experiment trackers (`--report-to`): TensorBoard, Weights & Biases, MLflow, through their own libraries.

Rank 0 only. Each tracker gets the resolved config once, the scalars of every logged step (train
and held-out), and at the end the paths of what the run wrote (final model or adapter, best
model, summary, checkpoints). W&B and MLflow are optional extras (`pip install
'xcomposer-finetune[wandb]'`, `'[mlflow]'`) configured by their usual environment variables
(WANDB_PROJECT, WANDB_MODE=offline, WANDB_DIR; MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME). A run
resumed in the same output folder continues the same W&B and MLflow runs (their ids are kept in
`<output-dir>/tracker_runs.json`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any

from schemas.atomic import write_json_atomic

RUNS_FILE = "tracker_runs.json"
DEFAULT_PROJECT = "xcomposer-finetune"
EXTRAS = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}
"""Tracker -> (module to import, the package extra that installs it)."""


def check_installed(names: tuple[str, ...]) -> None:
    """Raise ValueError naming the extra to install for a tracker whose library is missing (before
    any model or process group starts)."""
    for name in names:
        if name in EXTRAS and importlib.util.find_spec(EXTRAS[name][0]) is None:
            raise ValueError(
                f"--report-to {name}: the {EXTRAS[name][0]} package is not installed; "
                f"pip install 'xcomposer-finetune[{EXTRAS[name][1]}]' (or leave {name} out)"
            )


def _flat(config: dict[str, Any]) -> dict[str, str]:
    """Config values as MLflow params (strings; sequences joined)."""
    return {k: ",".join(map(str, v)) if isinstance(v, list | tuple) else str(v) for k, v in config.items()}


class Trackers:
    """The trackers of one run: `log(scalars, step)` each logged step, `close(paths)` at the end."""

    def __init__(self, names: tuple[str, ...], output_dir: Path, run_info: dict[str, Any]):
        self.names = names
        self.output_dir = Path(output_dir)
        runs_file = self.output_dir / RUNS_FILE
        runs: dict[str, str] = json.loads(runs_file.read_text()) if runs_file.is_file() else {}
        config = run_info["config"]
        run_name = self.output_dir.resolve().name
        self.tensorboard = None
        self.wandb_run = None
        self.mlflow = None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(self.output_dir / "tensorboard"))
        if "wandb" in names:
            import wandb

            self.wandb_run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT),
                name=run_name,
                id=runs.get("wandb"),
                resume="allow",
                dir=os.environ.get("WANDB_DIR", str(self.output_dir)),
                config={**config, "command": run_info.get("command"), "deepspeed": run_info.get("deepspeed")},
            )
            runs["wandb"] = self.wandb_run.id
        if "mlflow" in names:
            import mlflow

            if "MLFLOW_EXPERIMENT_NAME" not in os.environ and "MLFLOW_EXPERIMENT_ID" not in os.environ:
                mlflow.set_experiment(DEFAULT_PROJECT)
            run = mlflow.start_run(run_id=runs.get("mlflow"), run_name=None if "mlflow" in runs else run_name)
            if "mlflow" not in runs:  # params are written once: MLflow refuses to change one
                mlflow.log_params(_flat(config))
            runs["mlflow"] = run.info.run_id
            self.mlflow = mlflow
        if runs:
            write_json_atomic(runs_file, runs)

    def log(self, scalars: dict[str, float | None], step: int) -> None:
        """Finite scalars under their names (`train/loss`, `eval/loss`, `eval_loss_by_source/NAME`, ...)."""
        values = {k: float(v) for k, v in scalars.items() if v is not None and math.isfinite(v)}
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)
        if self.mlflow is not None:
            self.mlflow.log_metrics(values, step=step)

    def close(self, paths: dict[str, str | None]) -> None:
        """Record where the outputs are (`paths`: name -> path or None), then end every tracker run."""
        found = {k: v for k, v in paths.items() if v is not None}
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.summary.update({f"outputs/{k}": v for k, v in found.items()})
            self.wandb_run.finish()
        if self.mlflow is not None:
            self.mlflow.set_tags({f"outputs.{k}": v for k, v in found.items()})
            self.mlflow.end_run()

    def abort(self) -> None:
        """End the tracker runs of a run that failed (W&B and MLflow mark them so)."""
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1)
        if self.mlflow is not None:
            self.mlflow.end_run(status="FAILED")


def train_scalars(record: dict[str, Any]) -> dict[str, float | None]:
    """One training step's record (trainer/train.py) as tracker scalars."""
    scalars = {
        f"train/{k}": record.get(k)
        for k in ("loss", "lr", "grad_norm", "tokens_per_s", "data_wait_pct", "mfu")
    }
    scalars.update({f"loss_by_source/{s}": v for s, v in record["source_loss"].items()})
    return scalars


def eval_scalars(result: dict[str, Any]) -> dict[str, float | None]:
    """One held-out evaluation (trainer/heldout.py) as tracker scalars."""
    return {
        "eval/loss": result["loss"],
        **{f"eval_loss_by_source/{s}": v for s, v in result["source_loss"].items()},
    }
