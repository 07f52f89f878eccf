"""What `xc-train` refuses at start-up, before any step (issue 32): numeric flags out of range, a
damaged tokenizer.model in the shard folder, an absurd k in the manifest, a manifest shard path
outside the folder. Each is a clear message and a non-zero exit, no traceback, no checkpoint."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import typing
from pathlib import Path

import pytest

from schemas.record import MAX_K
from trainer.cli import main as train_main
from trainer.config import NUMBER_RULES, TrainConfig
from trainer.index import SampleIndex, ShardDataError


def copy_shards(shards: Path, dest: Path) -> Path:
    shutil.copytree(shards, dest)
    return dest


def edit_manifest(folder: Path, edit: typing.Callable[[dict[str, typing.Any]], None]) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def run_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--shards", str(shards), "--model", "tiny", "--output-dir", str(out), "--recipe", "full",
        "--max-length", "128", "--global-batch-size", "2", "--num-workers", "0", *extra,
    ]  # fmt: skip


# ---------------------------------------------------------------- 10. numeric flags


def numeric_fields() -> list[str]:
    hints = typing.get_type_hints(TrainConfig)
    names = []
    for f in dataclasses.fields(TrainConfig):
        kinds = set(typing.get_args(hints[f.name])) or {hints[f.name]}
        if kinds & {int, float} and bool not in kinds:
            names.append(f.name)
    return names


def test_every_numeric_setting_has_a_rule() -> None:
    assert sorted(NUMBER_RULES) == sorted(numeric_fields())


@pytest.mark.parametrize("name", sorted(NUMBER_RULES))
def test_each_numeric_setting_refuses_nan_inf_and_out_of_range_values(name: str) -> None:
    rule = NUMBER_RULES[name]
    bad = [math.nan, math.inf, rule.low - 1]
    if rule.open_low:
        bad.append(rule.low)
    if math.isfinite(rule.high):
        bad.append(rule.high)
    for value in bad:
        with pytest.raises(ValueError, match=rf"--{name.replace('_', '-')} {value}: must be"):
            TrainConfig(shards=Path("s"), **{name: value}).resolve()
    # the evaluation cadence needs held-out samples to be valid at all
    context = {"eval_fraction": 0.1} if name in ("eval_every_steps", "early_stop_patience") else {}
    good = rule.low if not rule.open_low else rule.low + 0.5
    TrainConfig(shards=Path("s"), **{**context, name: good}).resolve()


def test_save_every_steps_0_is_refused_before_anything_runs(
    tiny_text_shards: Path, tmp_path: Path, capsys
) -> None:
    code = train_main(
        run_args(tiny_text_shards, tmp_path / "run", "--save-every-steps", "0", "--keep-last", "0")
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "--save-every-steps 0: must be a whole number >= 1, e.g. --save-every-steps 500" in err
    assert "--keep-last 0: must be a whole number >= 1" in err, "every problem at once"
    assert "Traceback" not in err and not (tmp_path / "run").exists()


# ---------------------------------------------------------------- 9. the shard folder's tokenizer


@pytest.mark.slow  # xc-train's start-up: the first one on a machine builds DeepSpeed's CPU op (~2 min)
@pytest.mark.parametrize("damage", ["garbage", "garbage_with_its_sha256_in_the_manifest", "missing"])
def test_a_damaged_tokenizer_in_the_shard_folder_stops_start_up(
    damage: str, tiny_text_shards: Path, tmp_path: Path, capsys
) -> None:
    import hashlib

    shards = copy_shards(tiny_text_shards, tmp_path / "shards")
    tokenizer = shards / "tokenizer.model"
    if damage == "missing":
        tokenizer.unlink()
    else:
        tokenizer.write_bytes(b"\x0a\x05not a sentencepiece model")
    if damage == "garbage_with_its_sha256_in_the_manifest":
        sha = hashlib.sha256(tokenizer.read_bytes()).hexdigest()
        edit_manifest(shards, lambda m: m["fingerprint"].update(tokenizer_sha256=sha))
    out = tmp_path / "run"
    assert train_main(run_args(shards, out)) == 1
    err = capsys.readouterr().err
    expected = {
        "garbage": "sha256 does not match the manifest's fingerprint",
        "garbage_with_its_sha256_in_the_manifest": "not a sentencepiece model",
        "missing": "missing",
    }[damage]
    assert f"{tokenizer}: {expected}" in err and "re-run `xc-prep shard`" in err, err
    assert "Traceback" not in err and not (out / "checkpoints").exists()
    from pipeline.cli import main as prep_main

    assert prep_main(["info", str(shards), "--verify"]) == 1  # the same check
    assert expected in capsys.readouterr().err


# ---------------------------------------------------------------- 5. absurd k in a manifest


@pytest.mark.parametrize("k", [1e9, 1e300, 1e306, -1.0, MAX_K + 1])
def test_an_absurd_k_in_the_manifest_is_refused_by_the_plan(
    k: float, tiny_text_shards: Path, tmp_path: Path, capsys
) -> None:
    shards = copy_shards(tiny_text_shards, tmp_path / "shards")
    edit_manifest(shards, lambda m: m["sources"][0].update(k=k))
    assert train_main(["--shards", str(shards), "--plan-only", "--max-length", "128"]) == 1
    err = capsys.readouterr().err
    assert f"cannot plan the epoch: k must be a number in [0, {MAX_K:,}]" in err and f"k {k:g}" in err
    assert "--source-samples NAME=COUNT" in err and "Traceback" not in err
    # an explicit count for that source replaces k
    name = json.loads((shards / "manifest.json").read_text())["sources"][0]["name"]
    argv = ["--shards", str(shards), "--plan-only", "--max-length", "128", "--source-samples", f"{name}=8"]
    assert train_main(argv) == 0


def test_a_huge_source_samples_count_is_refused(tiny_text_shards: Path, capsys) -> None:
    name = json.loads((tiny_text_shards / "manifest.json").read_text())["sources"][0]["name"]
    argv = ["--shards", str(tiny_text_shards), "--plan-only", "--max-length", "128"]
    assert train_main([*argv, "--source-samples", f"{name}=1000000000000"]) == 1
    assert "more than 100,000,000 samples per epoch" in capsys.readouterr().err


# ---------------------------------------------------------------- 11. manifest shard paths


@pytest.mark.parametrize("file", ["../x.arrow", "/tmp/x.arrow", "link.arrow"])
def test_a_manifest_shard_path_outside_the_folder_is_refused_by_the_trainer(
    file: str, tiny_text_shards: Path, tmp_path: Path, capsys
) -> None:
    shards = copy_shards(tiny_text_shards, tmp_path / "shards")
    real = next(shards.rglob("*.arrow"))
    shutil.copy(real, tmp_path / "x.arrow")
    (shards / "link.arrow").symlink_to(tmp_path / "x.arrow")
    edit_manifest(shards, lambda m: m["sources"][0]["shards"][0].update(file=file))
    with pytest.raises(ShardDataError, match=r"leaves the shard folder|absolute path|symlink that leads out"):
        SampleIndex.load(shards)
    assert train_main(["--shards", str(shards), "--plan-only", "--max-length", "128"]) == 1
    assert "Traceback" not in capsys.readouterr().err
