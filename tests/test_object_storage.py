"""Shards on an S3-compatible object store: a real S3 server (moto's, in a thread on 127.0.0.1 and a
free port) started by these tests, reached over HTTP by the product's own clients (pyarrow's S3
file system, boto3 for the lease); nothing is mocked. Needs the `[s3]` extra and moto[server]."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main as xc_prep
from pipeline.shard_folder import lock_output
from schemas import storage
from schemas.manifest import TOKENIZER_NAME, Manifest
from schemas.shards import ShardReader
from schemas.storage import StorageError, open_store

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

REPO_ROOT = Path(__file__).resolve().parents[1]
HD_NUM = 2


@dataclass
class S3:
    endpoint: str
    env: dict[str, str]

    def bucket(self, name: str) -> str:
        """A new, empty bucket; returns its s3:// URL."""
        boto3.client("s3").create_bucket(Bucket=name)
        return f"s3://{name}"


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    """A moto S3 server for this module, and the standard AWS variables pointing at it."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.setattr(storage, "READ_BACKOFF_S", 0.01)
        yield S3(endpoint, env)
    server.stop()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data.txt with a text source and an image source (two real photos), and a tiny tokenizer."""
    from PIL import Image
    from skimage import data as skdata

    from pipeline.tokenization import build_tiny_tokenizer

    root = tmp_path_factory.mktemp("s3_data")
    build_tiny_tokenizer(root / TOKENIZER_NAME)
    (root / "images").mkdir()
    for name in ("astronaut", "chelsea", "coffee"):
        Image.fromarray(getattr(skdata, name)()).save(root / "images" / f"{name}.jpg", quality=90)

    def turn(q: str, a: str) -> list[dict[str, str]]:
        return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]

    texts = [
        {"id": f"t{i}", "conversations": turn(f"Count to {i}.", " ".join(["one"] * i))} for i in range(1, 6)
    ]
    images = [
        {"id": f"i{i}", "image": f"images/{name}.jpg", "conversations": turn("What is this?", f"A {name}.")}
        for i, name in enumerate(("astronaut", "chelsea", "coffee"))
    ]
    (root / "text.json").write_text(json.dumps(texts))
    (root / "image.json").write_text(json.dumps(images))
    (root / "data.txt").write_text(f"text.json {len(texts) / 1000}\nimage.json {len(images) / 1000}\n")
    return root


def shard_argv(dataset: Path, out: str, *extra: str) -> list[str]:
    return [
        "shard", str(dataset / "data.txt"), "--tokenizer", str(dataset / TOKENIZER_NAME),
        "--hd-num", str(HD_NUM), "--max-length", "2048", "--samples-per-shard", "2", "--out", out,
        "--workers", "1", *extra,
    ]  # fmt: skip


def local_files(root: Path) -> dict[str, bytes]:
    """Every file of a local shard folder but its lock (an object store's lease is gone after a run)."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() != ".work/lock"
    }


def store_files(url: str) -> dict[str, bytes]:
    store = open_store(url)
    return {rel: store.read_bytes(rel) for rel in store.list_files()}


@pytest.fixture(scope="module")
def local_shards(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("local") / "shards"
    assert xc_prep(shard_argv(dataset, str(out))) == 0
    return out


@pytest.fixture(scope="module")
def s3_shards(s3: S3, dataset: Path) -> str:
    url = s3.bucket("shards") + "/run/one"
    assert xc_prep(shard_argv(dataset, url)) == 0
    return url


# ---------------------------------------------------------------- xc-prep shard / info / preview


def test_shards_written_to_an_object_store_are_the_bytes_of_a_local_run(
    local_shards: Path, s3_shards: str
) -> None:
    objects = store_files(s3_shards)
    assert "manifest.json" in objects and ".work/plan.json" in objects
    assert objects == local_files(local_shards)


def test_info_verify_and_preview_read_an_object_store(
    local_shards: Path, s3_shards: str, capsys: pytest.CaptureFixture
) -> None:
    assert xc_prep(["info", s3_shards, "--verify", "--json"]) == 0
    remote = json.loads(capsys.readouterr().out)
    assert xc_prep(["info", str(local_shards), "--json"]) == 0
    local = json.loads(capsys.readouterr().out)
    assert remote["verify"] == {"ok": True, "problems": []}
    assert remote["manifest"] == local["manifest"] and remote["shard_dir"] == s3_shards
    for sample in (0, 6):
        assert xc_prep(["preview", "--shards", s3_shards, "--sample", str(sample), "--json"]) == 0
        from_s3 = capsys.readouterr().out
        assert xc_prep(["preview", "--shards", str(local_shards), "--sample", str(sample), "--json"]) == 0
        assert from_s3 == capsys.readouterr().out
    assert xc_prep(["preview", "--shards", s3_shards, "--sample", "6"]) == 0
    assert f"{s3_shards}/002-image/shard-00000.arrow row 1" in capsys.readouterr().out


def test_export_from_an_object_store_writes_the_tars_of_a_local_export(
    s3_shards: str, local_shards: Path, tmp_path: Path
) -> None:
    pytest.importorskip("webdataset")
    assert xc_prep(["export", s3_shards, "--format", "webdataset", "--out", str(tmp_path / "a")]) == 0
    assert xc_prep(["export", str(local_shards), "--format", "webdataset", "--out", str(tmp_path / "b")]) == 0
    tree = lambda root: {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}  # noqa: E731
    assert tree(tmp_path / "a") == tree(tmp_path / "b") and len(tree(tmp_path / "a")) > 1


def test_info_verify_names_a_damaged_object(
    s3: S3, dataset: Path, s3_shards: str, capsys: pytest.CaptureFixture
) -> None:
    url = s3.bucket("damaged")
    src, dst = open_store(s3_shards), open_store(url)
    for rel in src.list_files():
        data = src.read_bytes(rel)
        if rel == "002-image/shard-00001.arrow":
            data = data[:100] + bytes([data[100] ^ 1]) + data[101:]
        dst.write_bytes(rel, data)
    assert xc_prep(["info", url, "--verify"]) == 1
    err = capsys.readouterr().err
    assert f"{url}/002-image/shard-00001.arrow: sha256 does not match the manifest (corrupted)" in err


def test_a_url_with_credentials_or_an_unknown_option_is_refused(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(StorageError, match="credentials go in AWS_ACCESS_KEY_ID"):
        open_store("s3://b/p?secret_key=x")
    assert xc_prep(["info", "s3://b/p?endpoint=x"]) == 2
    assert "unknown option 'endpoint'" in capsys.readouterr().err
    assert xc_prep(["info", "gs://b/p"]) == 2


def test_a_second_writer_on_an_object_store_is_refused(
    s3: S3, dataset: Path, capsys: pytest.CaptureFixture
) -> None:
    url = s3.bucket("locked")
    held = lock_output(open_store(url))  # as if another `xc-prep shard` were writing there
    try:
        assert xc_prep(shard_argv(dataset, url)) == 2
        err = capsys.readouterr().err
        assert "another `xc-prep shard` is writing here" in err and "heartbeat 0 s ago" in err
    finally:
        held.release()
    assert xc_prep(shard_argv(dataset, url)) == 0


KILL_AFTER_TWO_UNITS = """
import os, signal, sys
from pipeline import shard_units
from pipeline.cli import main

real = shard_units.run_unit
done = []
def run_unit(*args, **kwargs):
    if len(done) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    done.append(real(*args, **kwargs))
    return done[-1]
shard_units.run_unit = run_unit
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_run_on_an_object_store_resumes_to_the_bytes_of_an_uninterrupted_one(
    s3: S3,
    dataset: Path,
    local_shards: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    url = s3.bucket("killed") + "/shards"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_TWO_UNITS, *shard_argv(dataset, url)], env=env, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL
    left = open_store(url).list_files()
    assert "manifest.json" not in left, "an incomplete folder must never look complete"
    assert {".work/001-text/shard-00000.json", ".work/001-text/shard-00001.json"} <= set(left)
    # The killed writer's lease is still there: refused until it expires.
    assert xc_prep(shard_argv(dataset, url)) == 2
    assert "A crashed writer's lock expires" in capsys.readouterr().err
    monkeypatch.setattr(storage, "LEASE_TTL_S", 0.5)
    time.sleep(1.0)
    assert xc_prep(shard_argv(dataset, url)) == 0
    assert "2 of 5 work units reused" in capsys.readouterr().out
    assert store_files(url) == local_files(local_shards)


# ---------------------------------------------------------------- reads: ranged, retried, counted


def test_one_sample_is_read_with_ranged_reads_not_the_whole_shard(s3_shards: str) -> None:
    store = open_store(s3_shards)
    file = "002-image/shard-00000.arrow"
    before = storage.read_stats().bytes
    reader = ShardReader.open(store, file)
    opened = storage.read_stats().bytes - before
    sample = reader.read(1)
    read = storage.read_stats().bytes - before - opened
    size = store.size(file)
    assert size is not None and opened < 4096, "opening reads the footer, not the shard"
    assert sample.tiles.nbytes <= read < size - sample.tiles.nbytes / 2, (opened, read, size)
    lengths_before = storage.read_stats().bytes
    tokens, _, tiles = ShardReader.open(store, file).lengths()
    # two footers and each sample's batch header and three int32s: under 1 % of a single tile
    assert storage.read_stats().bytes - lengths_before < 0.01 * 560 * 560 * 3, "lengths read no tile byte"
    assert tokens.tolist()[1] == sample.num_tokens and tiles.tolist()[1] == sample.num_tiles


def test_a_transient_read_error_is_retried_a_bounded_number_of_times(
    s3_shards: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(s3_shards)
    reader = ShardReader.open(store, "002-image/shard-00000.arrow")
    expected = reader.read(0)
    real = storage._RetryingReader._read_at
    failures = {"left": 2}

    def flaky(self: storage._RetryingReader, n: int, pos: int) -> bytes:
        if failures["left"] > 0:
            failures["left"] -= 1
            raise OSError("AWS Error NETWORK_CONNECTION during GetObject operation: connection reset")
        return real(self, n, pos)

    monkeypatch.setattr(storage._RetryingReader, "_read_at", flaky)
    retries = storage.read_stats().retries
    again = ShardReader.open(store, "002-image/shard-00000.arrow").read(0)
    assert storage.read_stats().retries == retries + 2
    assert np.array_equal(again.tiles, expected.tiles) and np.array_equal(again.input_ids, expected.input_ids)
    failures["left"] = storage.READ_ATTEMPTS
    with pytest.raises(ValueError, match=f"failed after {storage.READ_ATTEMPTS} attempts"):
        ShardReader.open(store, "002-image/shard-00000.arrow").read(0)


# ---------------------------------------------------------------- xc-train


TRAIN_FLAGS = [
    "--model", "tiny", "--recipe", "lora", "--learning-rate", "2e-3", "--epochs", "6", "--max-length", "2048",
    "--global-batch-size", "2", "--num-workers", "1", "--warmup-ratio", "0",
]  # fmt: skip


@pytest.mark.slow
def test_train_from_an_object_store_killed_then_resumed_matches_training_from_disk(
    s3: S3, s3_shards: str, local_shards: Path, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    """xc-train --shards s3://...: SIGKILL once step 2 is saved, resume; the loss curve equals an
    uninterrupted run's from the local copy of the same shards (the samples are the same bytes)."""
    from trainer import checkpoint as ckpt

    out = tmp_path / "run"
    argv = ["--shards", s3_shards, "--output-dir", str(out), *TRAIN_FLAGS, "--save-every-steps", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    target = ckpt.checkpoint_root(out) / "step-00000002"
    with (tmp_path / "log").open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "trainer.cli", *argv], env=env, cwd=tmp_path, stdout=log, stderr=log
        )
    deadline = time.monotonic() + 300
    try:
        while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert target.exists(), (tmp_path / "log").read_text()[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL and not (out / "train_summary.json").exists()
    resumed = subprocess.run(
        [sys.executable, "-m", "trainer.cli", *argv, "--resume", "auto"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "data read: " in resumed.stderr
    assert f"from {s3_shards}" in resumed.stderr
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["data_read"]["read_bytes"] > 0 and summary["data_read"]["bytes_per_s_per_worker"] > 0

    ref = tmp_path / "ref"
    argv_local = ["--shards", str(local_shards), "--output-dir", str(ref), *TRAIN_FLAGS, "--resume", "none"]
    done = subprocess.run(
        [sys.executable, "-m", "trainer.cli", *argv_local], env=env, cwd=tmp_path, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    uninterrupted = json.loads((ref / "train_summary.json").read_text())
    a = np.array([h["loss"] for h in summary["history"]])
    e = np.array([h["loss"] for h in uninterrupted["history"]])
    assert len(a) == len(e) and np.allclose(a, e, rtol=1e-5, atol=0), (a, e)
    assert [h["samples"] for h in summary["history"]] == [h["samples"] for h in uninterrupted["history"]]
    shutil.rmtree(out, ignore_errors=True)
    assert Manifest.load(s3_shards).sources[1].samples_written == 3
