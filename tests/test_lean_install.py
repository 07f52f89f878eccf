"""A prep-only machine installs no torch: the base/`[prep]` dependencies hold none of the training
stack, decord is asked for only where its wheels exist, and `xc-prep` runs with torch,
transformers, peft and deepspeed unimportable."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAINING_STACK = {"torch", "transformers", "peft", "deepspeed"}
PLATFORMS = {  # (sys_platform, platform_machine) → the video decoder pip should install
    ("linux", "x86_64"): "decord",
    ("win32", "AMD64"): "decord",
    ("linux", "aarch64"): "av",  # GH200
    ("darwin", "arm64"): "av",
    ("darwin", "x86_64"): "av",
}


def project() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]


def requirements(extras: tuple[str, ...], platform: tuple[str, str] = ("linux", "x86_64")) -> set[str]:
    """Names of the distributions pip installs for `xcomposer-finetune[extras]` on a platform."""
    from packaging.requirements import Requirement

    meta = project()
    env = {"sys_platform": platform[0], "platform_machine": platform[1], "extra": ""}
    names: set[str] = set()
    todo = [Requirement(r) for r in meta["dependencies"]]
    todo += [Requirement(r) for extra in extras for r in meta["optional-dependencies"][extra]]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        if req.name == meta["name"]:  # a self-reference: xcomposer-finetune[video]
            todo += [Requirement(r) for extra in req.extras for r in meta["optional-dependencies"][extra]]
        else:
            names.add(re.sub(r"[-_.]+", "-", req.name).lower())
    return names


def test_prep_dependencies_hold_no_training_stack() -> None:
    pytest.importorskip("packaging")
    for platform, decoder in PLATFORMS.items():
        base = requirements((), platform)
        prep = requirements(("prep",), platform)
        assert base == {"numpy", "pillow", "sentencepiece", "pyarrow", "tqdm"}
        assert not prep & TRAINING_STACK, platform
        assert prep - base == {decoder}, platform  # the one video decoder that has wheels there
        assert TRAINING_STACK <= requirements(("train",), platform)
    dev = requirements(("dev",))
    assert requirements(("train",)) | {"av", "datasets", "webdataset", "pytest", "scikit-image"} <= dev
    assert {"decord", "av"} <= dev  # the tests compare the two decoders


# Runs in a fresh interpreter: every import of the training stack raises, as on a machine without it.
BLOCKED_RUN = """
import sys
BLOCKED = {blocked!r}

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, Blocker())
from pipeline.cli import main
from pipeline.tokenization import build_tiny_tokenizer

tmp = {tmp!r}
tok = str(build_tiny_tokenizer(tmp + "/tokenizer.model"))
assert main(["validate", "data/data.txt", "--tokenizer", tok, "--hd-num", "2"]) == 0
assert main(["shard", "data/data.txt", "--tokenizer", tok, "--hd-num", "2", "--out", tmp + "/shards", "--workers", "2"]) == 0
assert main(["convert", tmp + "/llava.json", "--out", tmp + "/converted"]) == 0
assert main(["validate", tmp + "/converted/data.txt"]) == 0
if {export}:
    assert main(["export", "--format", "webdataset", tmp + "/shards", "--out", tmp + "/wds"]) == 0
print("loaded:", sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
"""


@pytest.mark.slow
def test_xc_prep_runs_with_the_training_stack_unimportable(tmp_path: Path) -> None:
    """validate and shard on the shipped data (a video included), convert and export, with torch,
    transformers, peft and deepspeed blocked."""
    try:
        import webdataset  # noqa: F401

        export = True
    except ImportError:
        export = False
    (tmp_path / "llava.json").write_text(
        '[{"id": 1, "image": "' + str(REPO_ROOT / "data/images/coffee.jpg") + '", "conversations": '
        '[{"from": "human", "value": "<image>\\nWhat is this?"}, {"from": "gpt", "value": "Coffee."}]}]'
    )
    code = BLOCKED_RUN.format(blocked=sorted(TRAINING_STACK), tmp=str(tmp_path), export=export)
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "loaded: []" in run.stdout
    assert (tmp_path / "shards" / "manifest.json").is_file()
    assert not export or (tmp_path / "wds" / "index.json").is_file()
