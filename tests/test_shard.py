"""`xc-prep shard`: invariant and rejects, resume after kill -9, --workers determinism, stored samples
equal `build_sample` / `xc-prep preview`, refusal to mix outputs, the official example data; the
guarantees for every tile codec, and the jpeg codec's tiles close to the exact ones."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from pipeline.build import build_sample
from pipeline.cli import main
from pipeline.preview import load_record, sample_to_preview_json
from pipeline.shard_folder import lock_output
from pipeline.tokenization import Tokenizer, build_tiny_tokenizer
from schemas.manifest import Manifest
from schemas.shards import ShardReader, verify_shards
from schemas.storage import open_store
from schemas.tile_codecs import DEFAULT_JPEG_QUALITY, TILE_CODECS

HD_NUM = 2
SAMPLES_PER_SHARD = 3
KILL_TIMEOUT_S = 60.0
# Record layout of vqa.json: unit 1 (records 3..5) is rejected entirely, so it writes no shard.
EXPECTED_REJECTS = [
    ("vqa.json", 3, "duplicate_id"),
    ("vqa.json", 4, "media_missing"),
    ("vqa.json", 5, "image_corrupt"),
    ("vqa.json", 6, "unknown_role"),
    ("text.json", 3, "last_turn_not_assistant"),
]


# --------------------------------------------------------------------------- fixtures


@dataclass(frozen=True)
class Dataset:
    dir: Path
    tokenizer: Path


def conversation(question: str, answer: str = "The answer is in the picture.") -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def save_jpeg(array: np.ndarray, path: Path, size: tuple[int, int] | None = None) -> None:
    image = Image.fromarray(array).convert("RGB")
    if size is not None:
        image = image.resize(size, Image.Resampling.BICUBIC)
    image.save(path, quality=90)


def write_data(folder: Path) -> None:
    """vqa.json (9 records, 4 bad) and text.json (5 records, 1 bad), listed in data.txt."""
    images = folder / "images"
    images.mkdir(parents=True)
    save_jpeg(skimage.data.chelsea(), images / "chelsea.jpg")
    save_jpeg(skimage.data.coffee(), images / "coffee.jpg")
    whole = (images / "coffee.jpg").read_bytes()
    (images / "corrupt.jpg").write_bytes(whole[: len(whole) // 2])  # header fine, pixels cut off
    two = "Image1: <ImageHere>; Image2: <ImageHere>. What differs?"
    vqa = [
        {"id": "a", "conversations": conversation("What animal is this?"), "image": "images/chelsea.jpg"},
        {"id": "b", "conversations": conversation(two), "image": ["images/chelsea.jpg", "images/coffee.jpg"]},
        {"id": "c", "conversations": conversation("Say hello.", "Hello.")},
        {"id": "a", "conversations": conversation("Again?"), "image": "images/coffee.jpg"},
        {"id": "e", "conversations": conversation("Where?"), "image": "images/missing.jpg"},
        {"id": "f", "conversations": conversation("Broken?"), "image": "images/corrupt.jpg"},
        {"id": "g", "conversations": [{"from": "system", "value": "x"}, {"from": "gpt", "value": "y"}]},
        {"id": "h", "conversations": conversation("Count to three.", "One, two, three.")},
        {
            "id": "i",
            "conversations": conversation("What drink is this?", "Coffee."),
            "image": "images/coffee.jpg",
        },
    ]
    text = [{"id": n, "conversations": conversation(f"Question {n}?", f"Answer {n}.")} for n in range(5)]
    text[3]["conversations"].append({"from": "human", "value": "And then?"})
    (folder / "vqa.json").write_text(json.dumps(vqa))
    (folder / "text.json").write_text(json.dumps(text))
    (folder / "data.txt").write_text("vqa.json 1\ntext.json 0.5\n")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    root = tmp_path_factory.mktemp("shard-data")
    write_data(root / "data")
    return Dataset(root / "data", build_tiny_tokenizer(root / "tiny.model"))


def shard_argv(ds: Dataset, out: Path, *extra: str, data_txt: str = "data.txt") -> list[str]:
    return [
        "shard",
        data_txt,
        "--tokenizer",
        str(ds.tokenizer),
        "--out",
        str(out),
        "--hd-num",
        str(HD_NUM),
        "--samples-per-shard",
        str(SAMPLES_PER_SHARD),
        "--workers",
        "1",
        *extra,
    ]


def run_shard(ds: Dataset, out: Path, *extra: str, data_txt: str = "data.txt") -> int:
    """`xc-prep shard` in process, from the data folder (paths in data.txt are relative to it)."""
    with contextlib.chdir(ds.dir):
        return main(shard_argv(ds, out, *extra, data_txt=data_txt))


@pytest.fixture(scope="module")
def clean_by_codec(dataset: Dataset, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """codec -> one uninterrupted run with --workers 1 and that --tile-codec: the reference output
    (made on first use, read-only for the tests)."""
    made: dict[str, Path] = {}

    def clean_run(codec: str) -> Path:
        if codec not in made:
            out = tmp_path_factory.mktemp(f"clean-{codec}") / "shards"
            assert run_shard(dataset, out, "--tile-codec", codec) == 0
            made[codec] = out
        return made[codec]

    return clean_run


@pytest.fixture(scope="module")
def clean(clean_by_codec: Callable[[str], Path]) -> Path:
    return clean_by_codec("raw")


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under `root` (hidden work files included) by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- tests


def test_invariant_rejects_and_layout(clean: Path) -> None:
    manifest = Manifest.load(clean)
    counts = {s.path: (s.records_read, s.samples_written, s.rejected) for s in manifest.sources}
    assert counts == {"vqa.json": (9, 5, 4), "text.json": (5, 4, 1)}
    for source in manifest.sources:
        assert source.records_read == source.samples_written + source.rejected
    rejects = [json.loads(line) for line in (clean / "rejects.jsonl").read_text().splitlines()]
    assert [(r["file"], r["index"], r["code"]) for r in rejects] == EXPECTED_REJECTS
    assert all(r["message"] for r in rejects) and rejects[0]["id"] == "a"

    vqa = manifest.sources[0]
    assert [(s.file, s.records, s.samples) for s in vqa.shards] == [
        ("001-vqa/shard-00000.arrow", (0, 3), 3),
        ("001-vqa/shard-00002.arrow", (6, 9), 2),  # unit 1 kept nothing: no file
    ]
    assert not (clean / "001-vqa" / "shard-00001.arrow").exists()
    assert (clean / ".work" / "001-vqa" / "shard-00001.json").is_file()
    assert (clean / "tokenizer.model").is_file()
    assert not list(clean.rglob("*.tmp"))
    assert verify_shards(clean) == []

    for source in manifest.sources:  # the manifest's totals are the stored samples' own counts
        tokens = trained = tiles = 0
        for shard in source.shards:
            n_tokens, n_trained, n_tiles = ShardReader(clean / shard.file).lengths()
            tokens, trained, tiles = tokens + n_tokens.sum(), trained + n_trained.sum(), tiles + n_tiles.sum()
        assert (source.total_tokens, source.trained_tokens, source.tiles) == (tokens, trained, tiles)
    assert manifest.sources[0].tiles > 0
    fp = manifest.fingerprint
    assert (fp.hd_num, fp.tile_codec, fp.layout, fp.style) == (HD_NUM, "raw", "official", "train")
    assert fp.tokenizer_sha256 == Tokenizer.from_path(clean / "tokenizer.model").sha256
    assert "--workers" not in manifest.command and "--out" not in manifest.command


@pytest.mark.parametrize("codec", TILE_CODECS)
def test_every_codec_keeps_the_invariant_and_verifies(
    clean_by_codec: Callable[[str], Path], codec: str
) -> None:
    out = clean_by_codec(codec)
    manifest = Manifest.load(out)
    counts = {s.path: (s.records_read, s.samples_written, s.rejected) for s in manifest.sources}
    assert counts == {"vqa.json": (9, 5, 4), "text.json": (5, 4, 1)}
    assert verify_shards(out) == []
    quality = DEFAULT_JPEG_QUALITY if codec == "jpeg" else None
    assert (manifest.fingerprint.tile_codec, manifest.fingerprint.jpeg_quality) == (codec, quality)
    assert ("--jpeg-quality" in manifest.command) == (codec == "jpeg")
    assert all(ShardReader(out / sh.file).codec == codec for s in manifest.sources for sh in s.shards)


@pytest.mark.parametrize("codec", TILE_CODECS)
def test_workers_do_not_change_a_byte(
    dataset: Dataset, clean_by_codec: Callable[[str], Path], tmp_path: Path, codec: str
) -> None:
    out = tmp_path / "shards"
    with contextlib.chdir(dataset.dir):
        argv = shard_argv(dataset, out, "--tile-codec", codec)
        argv[argv.index("--workers") + 1] = "2"
        assert main(argv) == 0
    assert tree_bytes(out) == tree_bytes(clean_by_codec(codec))


def test_rerun_of_finished_folder_is_a_noop(dataset: Dataset, clean: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "shards"
    shutil.copytree(clean, out)
    capsys.readouterr()
    assert run_shard(dataset, out) == 0
    assert "5 of 5 work units reused" in capsys.readouterr().out
    assert tree_bytes(out) == tree_bytes(clean)


@pytest.mark.parametrize(
    ("kill_at", "codec"),
    [
        ("after_plan", "raw"),
        ("first_sidecar", "raw"),
        ("random_0", "raw"),
        ("random_1", "raw"),
        ("first_sidecar", "jpeg"),
        ("random_0", "webp"),
    ],
)
def test_kill_9_then_rerun_equals_a_clean_run(
    dataset: Dataset, tmp_path: Path, capsys, kill_at: str, codec: str
) -> None:
    """SIGKILL just after the plan is written, after the first unit, or at a seeded random moment
    of a later unit (the 5th and the 3rd of 6), always before the run finishes, for each tile
    codec; the rerun reuses the finished units and gives the clean run's bytes."""
    # Larger photos at a higher hd_num, one unit per 2 records: long enough to be killed mid-run.
    photo = np.asarray(Image.open(dataset.dir / "images" / "coffee.jpg"))
    big = tmp_path / "big"
    (big / "images").mkdir(parents=True)
    records = []
    for i in range(12):
        save_jpeg(np.roll(photo, 37 * i, axis=1), big / "images" / f"{i}.jpg", size=(1600, 1200))
        records.append({"id": i, "conversations": conversation("Describe."), "image": f"images/{i}.jpg"})
    (big / "big.json").write_text(json.dumps(records))
    (big / "data.txt").write_text("big.json 1\n")
    ds = Dataset(big, dataset.tokenizer)
    extra = ("--hd-num", "6", "--samples-per-shard", "2", "--tile-codec", codec)
    units = 6

    started = time.monotonic()
    assert run_shard(ds, tmp_path / "clean", *extra) == 0
    unit_s = (time.monotonic() - started) / units
    killed = tmp_path / "killed"
    sidecars = [killed / ".work" / "001-big" / f"shard-{j:05d}.json" for j in range(units)]
    plan = killed / ".work" / "plan.json"
    if kill_at in ("after_plan", "first_sidecar"):
        units_done, delay_s = int(kill_at == "first_sidecar"), 0.0
    else:  # a seeded random moment: 0 to 4 units done (so at least one unit is left), then part of a unit
        rng = np.random.default_rng(int(kill_at.removeprefix("random_")))
        units_done, delay_s = int(rng.integers(0, units - 1)), float(rng.uniform(0.0, 0.5 * unit_s))
    argv = [sys.executable, "-m", "pipeline.cli", *shard_argv(ds, killed), *extra]
    proc = subprocess.Popen(
        argv, cwd=big, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + KILL_TIMEOUT_S
    waited = sidecars[units_done - 1] if units_done else plan
    while not waited.exists() and proc.poll() is None:
        assert time.monotonic() < deadline, f"{waited.name} never written"
        time.sleep(0.002)
    time.sleep(delay_s)
    assert proc.poll() is None, "the run ended before the kill"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # The kill landed mid-run: units_done or more units finished, not all, and no manifest.
    finished = sum(p.exists() for p in sidecars)
    assert proc.returncode == -signal.SIGKILL and units_done <= finished < units, (finished, units_done)
    assert not (killed / "manifest.json").exists(), "the run finished before it could be killed"
    assert verify_shards(killed) != [], "an interrupted folder must never pass for a complete one"

    capsys.readouterr()
    assert run_shard(ds, killed, *extra) == 0
    if finished:
        assert f"{finished} of {units} work units reused" in capsys.readouterr().out
    assert tree_bytes(killed) == tree_bytes(tmp_path / "clean")
    source = json.loads((killed / "manifest.json").read_text())["sources"][0]
    assert source["records_read"] == source["samples_written"] + source["rejected"] == 12


@pytest.mark.parametrize("codec", TILE_CODECS)
def test_damaged_shard_is_rebuilt_on_rerun(
    dataset: Dataset, clean_by_codec: Callable[[str], Path], tmp_path: Path, codec: str
) -> None:
    out = tmp_path / "shards"
    shutil.copytree(clean_by_codec(codec), out)
    shard = out / "001-vqa" / "shard-00002.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert any(str(shard) in p for p in verify_shards(out))
    assert run_shard(dataset, out, "--tile-codec", codec) == 0
    assert tree_bytes(out) == tree_bytes(clean_by_codec(codec))


def test_stored_samples_equal_build_sample_and_preview(dataset: Dataset, clean: Path, capsys) -> None:
    tokenizer = Tokenizer.from_path(dataset.tokenizer)
    manifest = Manifest.load(clean)
    number = 0
    with contextlib.chdir(dataset.dir):
        for source in manifest.sources:
            for shard in source.shards:
                reader = ShardReader(clean / shard.file)
                for row in range(len(reader)):
                    stored = reader.read(row)
                    record = load_record(Path(stored.file), stored.index)
                    built = build_sample(
                        record,
                        tokenizer,
                        source_name=source.name,
                        file=source.path,
                        index=stored.index,
                        hd_num=HD_NUM,
                    )
                    np.testing.assert_array_equal(stored.input_ids, built.input_ids)
                    np.testing.assert_array_equal(stored.labels, built.labels)
                    np.testing.assert_array_equal(stored.tiles, built.tiles)
                    assert stored.images == built.images
                    assert (stored.source, stored.file, stored.id, stored.layout) == (
                        built.source,
                        built.file,
                        built.id,
                        built.layout,
                    )
                    capsys.readouterr()
                    argv = ["preview", stored.file, "--record", str(stored.index)]
                    assert (
                        main(
                            [*argv, "--tokenizer", str(dataset.tokenizer), "--hd-num", str(HD_NUM), "--json"]
                        )
                        == 0
                    )
                    from_json = json.loads(capsys.readouterr().out)
                    assert main(["preview", "--shards", str(clean), "--sample", str(number), "--json"]) == 0
                    from_shards = json.loads(capsys.readouterr().out)
                    assert from_json == from_shards == sample_to_preview_json(stored)
                    number += 1
    assert number == 9


def stored_tiles(out: Path) -> np.ndarray:
    manifest = Manifest.load(out)
    return np.concatenate(
        [sample.tiles for s in manifest.sources for sh in s.shards for sample in ShardReader(out / sh.file)]
    )


def test_webp_stores_the_exact_tiles_and_jpeg_close_ones(clean_by_codec: Callable[[str], Path]) -> None:
    exact = stored_tiles(clean_by_codec("raw"))
    assert len(exact) > 0
    np.testing.assert_array_equal(stored_tiles(clean_by_codec("webp")), exact)
    jpeg = stored_tiles(clean_by_codec("jpeg"))
    error = np.abs(jpeg.astype(np.int16) - exact.astype(np.int16))
    psnr = 10 * np.log10(255**2 / np.mean(error.astype(np.float64) ** 2))
    # hd 2 shrinks these photos into one or two tiles: denser detail than hd 18's upscaled tiles
    # (docs/PERFORMANCE.md#tile-codecs), so a looser bound than the documented figures
    assert error.mean() <= 2.0 and psnr >= 38, (error.mean(), psnr)
    shard_bytes = {
        codec: sum(s.bytes for s in Manifest.load(clean_by_codec(codec)).sources[0].shards)
        for codec in TILE_CODECS
    }
    assert shard_bytes["jpeg"] < shard_bytes["webp"] < shard_bytes["raw"]


def test_jpeg_quality_is_part_of_the_plan(
    dataset: Dataset, clean_by_codec: Callable[[str], Path], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "shards"
    shutil.copytree(clean_by_codec("jpeg"), out)
    before = tree_bytes(out)
    assert run_shard(dataset, out, "--tile-codec", "jpeg", "--jpeg-quality", "95") == 2
    assert f"jpeg_quality: {DEFAULT_JPEG_QUALITY} -> 95" in capsys.readouterr().err
    assert tree_bytes(out) == before
    assert run_shard(dataset, out, "--tile-codec", "jpeg", "--jpeg-quality", "101") == 2
    assert "--jpeg-quality (101) must be in [1, 100]" in capsys.readouterr().err


def test_refuses_to_mix_settings_or_inputs(dataset: Dataset, clean: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "shards"
    shutil.copytree(clean, out)
    before = tree_bytes(out)
    assert run_shard(dataset, out, "--hd-num", "3") == 2
    err = capsys.readouterr().err
    assert "hd_num: 2 -> 3" in err and "--overwrite" in err
    assert tree_bytes(out) == before

    data = tmp_path / "data"  # a changed input file: its own copy of the data
    shutil.copytree(dataset.dir, data)
    ds = Dataset(data, dataset.tokenizer)
    records = json.loads((data / "text.json").read_text())
    (data / "text.json").write_text(json.dumps(records + [{"id": 9, "conversations": conversation("New?")}]))
    assert run_shard(ds, out) == 2
    err = capsys.readouterr().err
    assert "text.json changed" in err and "records 5 -> 6" in err
    (data / "data.txt").write_text("text.json 0.5\n")
    assert run_shard(ds, out) == 2
    assert "data.txt sources" in capsys.readouterr().err
    assert tree_bytes(out) == before

    assert run_shard(ds, out, "--overwrite") == 0
    manifest = Manifest.load(out)
    assert [(s.path, s.records_read) for s in manifest.sources] == [("text.json", 6)]
    assert not (out / "001-vqa").exists() and not (out / ".work" / "001-vqa").exists()
    assert sorted(p.name for p in out.rglob("*.arrow")) == ["shard-00000.arrow", "shard-00001.arrow"]


def test_file_level_errors_stop_before_writing(dataset: Dataset, tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "broken.json").write_text('[{"id": 1, "conversations": []},')
    (data / "data.txt").write_text("broken.json 1\ntext.json abc\n")
    out = tmp_path / "shards"
    assert run_shard(Dataset(data, dataset.tokenizer), out) == 1
    printed = capsys.readouterr().out
    assert "json_syntax" in printed and "source_bad_k" in printed and "nothing was written" in printed
    assert not out.exists()


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--samples-per-shard", "0", "--samples-per-shard (0) must be at least 1"),
        ("--hd-num", "0", "--hd-num (0) must be at least 1"),
        ("--tokenizer", "nowhere.model", "--tokenizer nowhere.model: not found"),
    ],
)
def test_usage_errors_exit_2(
    dataset: Dataset, tmp_path: Path, capsys, flag: str, value: str, message: str
) -> None:
    with contextlib.chdir(dataset.dir):
        argv = shard_argv(dataset, tmp_path / "out")
        argv[argv.index(flag) + 1] = value
        assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_official_example_shards_without_rejects(
    ixc_dir: Path, real_tokenizer_path: Path, monkeypatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(ixc_dir / "upstream-example")
    out = tmp_path / "shards"
    argv = ["shard", "data.txt", "--tokenizer", str(real_tokenizer_path), "--out", str(out)]
    assert main([*argv, "--hd-num", "18", "--tile-codec", "raw", "--workers", "1"]) == 0
    manifest = Manifest.load(out)
    assert [s.rejected for s in manifest.sources] == [0, 0, 0]
    assert all(s.samples_written == s.records_read > 0 for s in manifest.sources)
    assert (out / "rejects.jsonl").read_text() == ""
    golden = {
        (Path(g["file"]).name, g["id"]): g
        for g in map(json.loads, (ixc_dir / "golden/tokens/official_train_tokens.jsonl").open())
    }
    compared = 0
    for source in manifest.sources:
        for shard in source.shards:
            for sample in ShardReader(out / shard.file):
                g = golden[(Path(sample.file).name, sample.id)]
                assert sample.input_ids.tolist() == g["input_ids"] and sample.labels.tolist() == g["labels"]
                compared += 1
    assert compared == len(golden)


def test_rejects_are_validates_errors(dataset: Dataset, clean: Path, tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    with contextlib.chdir(dataset.dir):
        argv = ["validate", "data.txt", "--tokenizer", str(dataset.tokenizer), "--hd-num", str(HD_NUM)]
        assert main([*argv, "--json", str(report_path)]) == 1
    errors: dict[tuple[str, int], set[str]] = {}
    for e in json.loads(report_path.read_text())["errors"]:
        errors.setdefault((e["file"], e["index"]), set()).add(e["code"])
    rejects = [json.loads(line) for line in (clean / "rejects.jsonl").read_text().splitlines()]
    assert {(r["file"], r["index"]) for r in rejects} == set(errors)
    assert all(r["code"] in errors[(r["file"], r["index"])] for r in rejects)


def test_media_policy_is_validates_and_part_of_the_plan(dataset: Dataset, tmp_path: Path, capsys) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(dataset.dir / "images" / "chelsea.jpg", elsewhere / "cat.jpg")
    data = tmp_path / "data"
    data.mkdir()
    record = {"id": 0, "conversations": conversation("Which animal?"), "image": str(elsewhere / "cat.jpg")}
    (data / "outside.json").write_text(json.dumps([record]))
    (data / "data.txt").write_text("outside.json 1\n")
    ds, out = Dataset(data, dataset.tokenizer), tmp_path / "shards"
    assert run_shard(ds, out) == 0
    (reject,) = map(json.loads, (out / "rejects.jsonl").read_text().splitlines())
    assert reject["code"] == "media_outside_roots"
    assert run_shard(ds, out, "--allow-path", str(elsewhere)) == 2
    assert "allow_path: [] -> [" in capsys.readouterr().err
    assert run_shard(ds, out, "--allow-path", str(elsewhere), "--overwrite") == 0
    manifest = Manifest.load(out)
    assert (manifest.sources[0].samples_written, manifest.sources[0].rejected) == (1, 0)
    assert manifest.command[-2:] == ["--allow-path", str(elsewhere)]


def test_a_second_run_on_the_same_folder_is_refused(dataset: Dataset, tmp_path: Path, capsys) -> None:
    out = tmp_path / "shards"
    out.mkdir()
    held = lock_output(open_store(out))  # as if another `xc-prep shard` were writing here
    try:
        assert run_shard(dataset, out) == 2
        assert "another `xc-prep shard` is writing to this folder" in capsys.readouterr().err
    finally:
        held.release()
    assert run_shard(dataset, out) == 0
