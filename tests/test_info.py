"""`xc-prep info`: summary, --json, --verify naming the damaged file; `preview --shards` selection."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import skimage.data
from PIL import Image

from pipeline.cli import main
from pipeline.preview import locate_sample
from pipeline.shard import shard
from pipeline.shard_config import ShardConfig
from pipeline.tokenization import build_tiny_tokenizer
from schemas.manifest import Manifest


def conversation(question: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": f"About {question}"}]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two sources (4 text records; 2 image records + 1 bad one), two samples per shard."""
    root = tmp_path_factory.mktemp("info")
    Image.fromarray(skimage.data.chelsea()).save(root / "cat.jpg", quality=90)
    text = [{"id": i, "conversations": conversation(f"topic {i}")} for i in range(4)]
    images = [{"id": i, "conversations": conversation("the cat"), "image": "cat.jpg"} for i in range(2)]
    images.append({"id": 2, "conversations": conversation("a lost cat"), "image": "lost.jpg"})
    (root / "text.json").write_text(json.dumps(text))
    (root / "images.json").write_text(json.dumps(images))
    (root / "data.txt").write_text("text.json 0.2\nimages.json 0.1\n")
    config = ShardConfig(
        data_txt=Path("data.txt"),
        out=root / "shards",
        tokenizer=build_tiny_tokenizer(root / "tiny.model"),
        hd_num=2,
        samples_per_shard=2,
    )
    with contextlib.chdir(root), contextlib.redirect_stdout(None):
        assert shard(config) == 0
    return root / "shards"


def test_summary_names_sources_and_fingerprint(shards: Path, capsys) -> None:
    assert main(["info", str(shards)]) == 0
    out = capsys.readouterr().out
    assert "001-text" in out and "002-images" in out and "hd_num 2" in out and "tile_codec raw" in out
    assert "1 rejected record(s)" in out


def test_json_totals_and_verify_ok(shards: Path, capsys) -> None:
    assert main(["info", str(shards), "--json", "--verify"]) == 0
    data = json.loads(capsys.readouterr().out)
    manifest = Manifest.load(shards)
    assert data["manifest"] == json.loads(manifest.dumps())
    assert data["totals"]["samples_written"] == 6 and data["totals"]["rejected"] == 1
    assert data["totals"]["shards"] == 3
    assert data["totals"]["bytes"] == sum(sh.bytes for s in manifest.sources for sh in s.shards)
    assert data["verify"] == {"ok": True, "problems": []}


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "tokenizer"])
def test_verify_names_the_damaged_file(shards: Path, tmp_path: Path, capsys, damage: str) -> None:
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    target = copy / "002-images" / "shard-00000.arrow"
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(bytes(data[:-10]))
    elif damage == "delete":
        target.unlink()
    else:
        target = copy / "tokenizer.model"
        target.write_bytes(target.read_bytes() + b"\0")
    assert main(["info", str(copy), "--verify"]) == 1
    err = capsys.readouterr().err
    assert str(target) in err and "problem(s)" in err


def test_not_a_shard_folder(tmp_path: Path, capsys) -> None:
    assert main(["info", str(tmp_path)]) == 1
    assert "no manifest" in capsys.readouterr().err


def test_locate_sample_global_and_per_source(shards: Path) -> None:
    manifest = Manifest.load(shards)
    assert locate_sample(manifest, 0) == ("001-text/shard-00000.arrow", 0)
    assert locate_sample(manifest, 3) == ("001-text/shard-00001.arrow", 1)
    assert locate_sample(manifest, 4) == ("002-images/shard-00000.arrow", 0)
    assert locate_sample(manifest, 1, "images.json") == ("002-images/shard-00000.arrow", 1)
    with pytest.raises(ValueError, match="out of range: 6 sample"):
        locate_sample(manifest, 6)
    with pytest.raises(ValueError, match="not in the manifest"):
        locate_sample(manifest, 0, "nope")


def test_preview_of_a_stored_sample(shards: Path, capsys) -> None:
    assert main(["preview", "--shards", str(shards), "--source", "002-images", "--sample", "1"]) == 0
    out = capsys.readouterr().out
    assert "002-images/shard-00000.arrow row 1" in out and "images.json record 1 (id 1)" in out
    assert "<image " in out and "⟦" in out
    assert main(["preview", "--shards", str(shards), "--sample", "99"]) == 1
    assert "out of range" in capsys.readouterr().err
    assert main(["preview", "images.json", "--shards", str(shards)]) == 2
