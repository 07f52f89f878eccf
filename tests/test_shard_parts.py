"""`xc-prep shard` on many machines: `--part I/N` + `--finalize`, and `--engine ray`, each byte for
byte the local pool's output (every file of the folder compared, `.work/` included)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import skimage.data
from PIL import Image

from pipeline.cli import main
from pipeline.tokenization import build_tiny_tokenizer

SAMPLES_PER_SHARD = 2


def conversation(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two sources, 7 work units, photos, and records that are rejected (they go to rejects.jsonl)."""
    root = tmp_path_factory.mktemp("parts-data")
    (root / "images").mkdir()
    for name in ("chelsea", "coffee", "astronaut"):
        image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        image.resize((320, 240)).save(root / "images" / f"{name}.jpg", quality=90)
    vqa = [
        {
            "id": f"v{i}",
            "conversations": conversation("What is this?", f"A {name}."),
            "image": f"images/{name}.jpg",
        }
        for i, name in enumerate(
            ["chelsea", "coffee", "astronaut", "missing", "coffee", "chelsea", "astronaut"]
        )
    ]
    text = [{"id": i, "conversations": conversation(f"Question {i}?", f"Answer {i}.")} for i in range(6)]
    text[4]["conversations"].append({"from": "human", "value": "And then?"})  # ends with a question
    (root / "vqa.json").write_text(json.dumps(vqa))
    (root / "text.json").write_text(json.dumps(text))
    (root / "data.txt").write_text("vqa.json 1\ntext.json 0.5\n")
    build_tiny_tokenizer(root / "tiny.model")
    return root


def shard(data: Path, out: Path, *extra: str) -> int:
    argv = ["shard", "data.txt", "--tokenizer", str(data / "tiny.model"), "--out", str(out)]
    argv += ["--hd-num", "4", "--samples-per-shard", str(SAMPLES_PER_SHARD), *extra]
    with contextlib.chdir(data):
        return main(argv)


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under `root` (hidden work files included) by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pool_output(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The reference: one host, the local process pool (2 workers)."""
    out = tmp_path_factory.mktemp("pool") / "shards"
    assert shard(data, out, "--workers", "2") == 0
    files = tree_bytes(out)
    assert (
        sum(1 for name in files if name.endswith(".arrow")) == 7 and b"missing.jpg" in files["rejects.jsonl"]
    )
    return files


@pytest.mark.parametrize("n", [1, 2, 3])
def test_parts_then_finalize_are_byte_identical_to_one_host(
    data: Path, pool_output: dict[str, bytes], tmp_path: Path, n: int, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "shards"
    for i in reversed(range(n)):  # in any order, as a job array's tasks finish
        assert shard(data, out, "--part", f"{i}/{n}", "--workers", "1") == 0
        assert f"part {i}/{n}: " in capsys.readouterr().out
        assert not (out / "manifest.json").exists()
    assert shard(data, out, "--finalize") == 0
    assert tree_bytes(out) == pool_output


def test_finalize_names_the_parts_not_finished(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "shards"
    assert shard(data, out, "--finalize") == 1
    assert "no --part run has finished here yet" in capsys.readouterr().err
    assert shard(data, out, "--part", "1/3", "--workers", "1") == 0
    capsys.readouterr()
    assert shard(data, out, "--finalize") == 1
    err = capsys.readouterr().err
    assert "5 of 7 work units are not finished" in err and "parts not finished (of 3): 0/3, 2/3" in err
    assert not (out / "manifest.json").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--part", "3/3"], "--part '3/3': expected I/N with 0 <= I < N"),
        (["--part", "x"], "expected I/N"),
        (["--part", "0/2", "--finalize"], "--part and --finalize do not combine"),
        (["--part", "0/2", "--overwrite"], "--part and --overwrite do not combine"),
    ],
)
def test_bad_part_flags_are_usage_errors(
    data: Path, tmp_path: Path, flags: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    assert shard(data, tmp_path / "shards", *flags) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_engine_ray_is_byte_identical_to_the_local_pool(
    data: Path, pool_output: dict[str, bytes], tmp_path: Path
) -> None:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = tmp_path / "shards"
        assert shard(data, out, "--engine", "ray") == 0
        assert tree_bytes(out) == pool_output
        # a part run on Ray, then the rest on the local pool: still the same folder
        out2 = tmp_path / "mixed"
        assert shard(data, out2, "--engine", "ray", "--part", "0/2") == 0
        assert shard(data, out2, "--part", "1/2") == 0
        assert shard(data, out2, "--finalize") == 0
        assert tree_bytes(out2) == pool_output
    finally:
        ray.shutdown()


def test_engine_ray_without_a_cluster_says_how_to_start_one(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # nothing listens there
    assert shard(data, tmp_path / "shards", "--engine", "ray") == 2
    err = capsys.readouterr().err
    assert "--engine ray: no Ray cluster at '127.0.0.1:1'" in err and "ray start --head" in err
    assert not (tmp_path / "shards" / "manifest.json").exists()
