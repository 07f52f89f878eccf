"""What a user meets before training starts (issue 27): every default in `--help`, the example config
files, a "did you mean" for a misspelt config key, `xc-train plan` without transformers or
DeepSpeed, a bad `--model` reported before DeepSpeed starts, and the line announcing DeepSpeed's
one-time CPU extension build.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.cli import build_parser
from trainer.config import from_dict, load_config_file

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))

BLOCKED = ("transformers", "deepspeed", "peft", "bitsandbytes", "wandb", "mlflow")
BLOCKER = f"""
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"{{name}} is blocked in this test")
sys.meta_path.insert(0, Blocker())
from trainer.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_blocked(argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """`xc-train ARGV` in a fresh interpreter where importing any of BLOCKED fails."""
    script = tmp_path / "blocked.py"
    script.write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [sys.executable, str(script), *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )


def test_help_shows_every_default() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = " ".join(out.getvalue().split())
    for shown in (
        "(default 16384)",  # --max-length
        "(default 42)",  # --seed
        "(default --gradient-checkpointing)",
        "(default --no-compile)",
        "(default tensorboard)",  # --report-to
        "(default full)",  # --recipe
        "(recipe default: full 1e-5, LoRA 5e-5)",  # a recipe-dependent one says so itself
    ):
        assert shown in text, shown


def test_a_misspelt_config_key_gets_a_did_you_mean() -> None:
    with pytest.raises(
        ValueError, match=r"unknown config keys: learning_rat \(did you mean learning_rate\?\)"
    ):
        from_dict({"learning_rat": 1e-5})
    with pytest.raises(ValueError, match=r"eval_fracton \(did you mean eval_fraction\?\), zzz \(see"):
        from_dict({"eval_fracton": 0.1, "zzz": 1})


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_example_config_files_load_and_resolve(path: Path) -> None:
    values = load_config_file(path)
    cfg = from_dict({**values, "shards": values.get("shards", "shards/")}).resolve()
    assert cfg.recipe == values.get("recipe", "full") and cfg.learning_rate is not None


def test_the_example_configs_cover_every_recipe() -> None:
    assert {p.stem for p in CONFIGS} >= {"full", "lora", "qlora"}


def test_plan_runs_without_transformers_or_deepspeed(tiny_text_shards: Path, tmp_path: Path) -> None:
    done = run_blocked(["plan", "--shards", str(tiny_text_shards), "--max-length", "128"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "epoch 0 plan" in done.stdout
    # the held-out samples (--eval-fraction) are left out of the plan: 3 of the 4 stored samples
    held = run_blocked(
        ["plan", "--shards", str(tiny_text_shards), "--max-length", "128", "--eval-fraction", "0.25"],
        tmp_path,
    )
    assert held.returncode == 0, held.stderr[-3000:]

    def available(out: str) -> int:  # the 'avail' column of the source's row
        return int(next(line for line in out.splitlines() if line.startswith("001-text")).split()[2])

    assert (available(done.stdout), available(held.stdout)) == (4, 3)


def test_a_bad_model_is_reported_before_deepspeed_starts(tiny_text_shards: Path, tmp_path: Path) -> None:
    """DeepSpeed cannot even be imported here: the error comes first."""
    argv = ["--shards", str(tiny_text_shards), "--output-dir", str(tmp_path / "out"), "--max-length", "128"]
    missing = run_blocked([*argv, "--model", str(tmp_path / "no-such-model")], tmp_path)
    assert missing.returncode == 1, missing.stderr[-3000:]  # a missing path: invalid data
    assert "not a folder, a preset" in missing.stderr and "Traceback" not in missing.stderr

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.model").write_bytes(b"another tokenizer")
    foreign = run_blocked([*argv, "--model", str(folder)], tmp_path)
    assert foreign.returncode == 2, foreign.stderr[-3000:]
    assert "were tokenized with another tokenizer" in foreign.stderr


def test_deepspeed_extension_build_is_announced_only_when_it_will_happen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    pytest.importorskip("deepspeed")
    import deepspeed

    from trainer.train import announce_extension_build

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    announce_extension_build()
    err = capsys.readouterr().err
    assert "DeepSpeed compiles its CPU communication extension deepspeed_shm_comm now" in err
    # a build of this DeepSpeed install in the cache: silent
    folder = next(tmp_path.rglob("deepspeed_shm_comm"))
    (folder / "deepspeed_shm_comm.so").write_bytes(b"")
    (folder / "build.ninja").write_text(f"include {Path(deepspeed.__file__).parent}/csrc\n")
    announce_extension_build()
    assert capsys.readouterr().err == ""
    # a build made from another install (another virtual environment) is rebuilt: announced
    (folder / "build.ninja").write_text("include /elsewhere/site-packages/deepspeed/csrc\n")
    announce_extension_build()
    assert "compiles its CPU communication extension" in capsys.readouterr().err
