"""`xc-prep export --format webdataset`: read back with `webdataset.WebDataset`, every sample equals
the Arrow shards' (tokens, labels, image grids and spans, provenance, tiles); deterministic bytes."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main as prep_main
from pipeline.tokenization import build_tiny_tokenizer
from schemas.manifest import Manifest
from schemas.shards import ShardReader

wds = pytest.importorskip("webdataset")
REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shard_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The shipped example data (text, one image, two images, a video) sharded with each tile codec."""
    root = tmp_path_factory.mktemp("export")
    tokenizer = build_tiny_tokenizer(root / "tokenizer.model")
    out = {}
    with contextlib.chdir(REPO_ROOT):
        for codec in ("raw", "webp", "jpeg"):
            out[codec] = root / f"shards-{codec}"
            argv = [
                "shard",
                "data/data.txt",
                "--tokenizer",
                str(tokenizer),
                "--hd-num",
                "2",
                "--out",
                str(out[codec]),
            ]
            assert (
                prep_main([*argv, "--tile-codec", codec, "--samples-per-shard", "3", "--workers", "1"]) == 0
            )
    return out


def arrow_samples(shard_dir: Path) -> list:
    manifest = Manifest.load(shard_dir)
    return [
        s
        for source in manifest.sources
        for shard in source.shards
        for s in ShardReader(shard_dir / shard.file)
    ]


def npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def tiles_of(sample: dict) -> np.ndarray:
    if "tiles.npy" in sample:
        return npy(sample["tiles.npy"])
    names = sorted(k for k in sample if k.startswith("tile.") and k.endswith((".webp", ".jpg")))
    return (
        np.stack([np.asarray(Image.open(io.BytesIO(sample[n]))) for n in names])
        if names
        else np.zeros((0, 560, 560, 3), np.uint8)
    )


@pytest.mark.parametrize("codec", ["raw", "webp", "jpeg"])
def test_webdataset_export_reads_back_equal_to_the_arrow_shards(
    shard_dirs: dict[str, Path], tmp_path: Path, codec: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "wds"
    assert prep_main(["export", "--format", "webdataset", str(shard_dirs[codec]), "--out", str(out)]) == 0
    assert "10 samples" in capsys.readouterr().out
    index = json.loads((out / "index.json").read_text())
    assert index["samples"] == 10 and index["fingerprint"]["tile_codec"] == codec
    urls = [str(out / t["file"]) for t in index["tars"]]
    read = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    expected = arrow_samples(shard_dirs[codec])
    assert len(read) == len(expected) == 10
    assert sum(s.num_tiles for s in expected) > 0 and any(len(s.images) > 1 for s in expected)
    for sample, arrow in zip(read, expected, strict=True):
        np.testing.assert_array_equal(npy(sample["input_ids.npy"]), arrow.input_ids)
        np.testing.assert_array_equal(npy(sample["labels.npy"]), arrow.labels)
        assert npy(sample["input_ids.npy"]).dtype == np.int32
        meta = json.loads(sample["json"])
        assert meta["images"] == [{"grid": list(im.grid), "span": list(im.span)} for im in arrow.images]
        assert (meta["source"], meta["file"], meta["index"], meta["id"], meta["layout"]) == (
            arrow.source,
            arrow.file,
            arrow.index,
            arrow.id,
            arrow.layout,
        )
        assert (meta["num_tokens"], meta["num_trained"], meta["num_tiles"]) == (
            arrow.num_tokens,
            arrow.num_trained,
            arrow.num_tiles,
        )
        np.testing.assert_array_equal(tiles_of(sample), arrow.tiles)
    keys = [s["__key__"] for s in read]
    assert len(set(keys)) == len(keys) and "." not in "".join(keys)
    groups = [list(group) for _, group in itertools.groupby(read, key=lambda s: s["__url__"])]
    assert [(g[0]["__key__"], g[-1]["__key__"]) for g in groups] == [
        (t["first_key"], t["last_key"]) for t in index["tars"]
    ]


def test_export_is_deterministic_and_leaves_no_temp_files(
    shard_dirs: dict[str, Path], tmp_path: Path
) -> None:
    for name in ("a", "b"):
        assert (
            prep_main(
                ["export", "--format", "webdataset", str(shard_dirs["raw"]), "--out", str(tmp_path / name)]
            )
            == 0
        )
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and not [p for p in files_a if p.name.startswith(".")]
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_export_refuses_damaged_shards_and_wrong_folders(
    shard_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = shard_dirs["raw"]
    assert prep_main(["export", "--format", "webdataset", str(src), "--out", str(src)]) == 2
    assert prep_main(["export", "--format", "webdataset", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert prep_main(["export", str(src), "--out", str(tmp_path / "o")]) == 2  # --format is required
    damaged = tmp_path / "damaged"
    shutil.copytree(src, damaged)
    shard = next(damaged.rglob("*.arrow"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert prep_main(["export", "--format", "webdataset", str(damaged), "--out", str(tmp_path / "o")]) == 1
    assert "sha256 does not match" in capsys.readouterr().err
    assert not (tmp_path / "o" / "index.json").exists()
