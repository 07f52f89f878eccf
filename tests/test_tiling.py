"""HD dynamic partition: every golden row (size, grid, tokens, tile means, bytes) and the PNGs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.tiling import grid_of, hd_grid, hd_size, hd_transform, to_tiles
from schemas.sample import image_token_count

# Rows whose padded bytes equal the official sha256 (Pillow 13, as the golden run): all of them.
MIN_SHA256_MATCHES = 210


def golden_input(ixc_dir: Path, name: str) -> Path:
    kind, file = name.split("/", 1)
    if kind == "upstream":
        return ixc_dir / "upstream-example/data/images" / file
    return ixc_dir / "golden/hd" / f"input__{file}"


def tile_means(padded: np.ndarray) -> np.ndarray:
    """Mean R, G, B per tile, row-major → float[N, 3] (sums rows first: 30× faster than .mean)."""
    rows, cols = grid_of(padded)
    column_sums = padded.reshape(rows, 560, cols * 560 * 3).sum(axis=1, dtype=np.uint32)
    sums = column_sums.reshape(rows, cols, 560, 3).sum(axis=2)
    return sums.reshape(rows * cols, 3) / (560 * 560)


def test_hd_transform_equals_golden_rows(ixc_dir: Path) -> None:
    rows = [json.loads(line) for line in (ixc_dir / "golden/hd/hd_transform.jsonl").read_text().splitlines()]
    images: dict[str, Image.Image] = {}
    sha_matches = 0
    for row in rows:
        where = f"{row['input']} hd {row['hd_num']} {row['style']}"
        if row["input"] not in images:  # each input is decoded once for its 14 rows
            images[row["input"]] = Image.open(golden_input(ixc_dir, row["input"])).convert("RGB")
        img = images[row["input"]]
        assert list(img.size) == row["src_size"], where
        args = (row["hd_num"], row["style"])
        assert list(hd_size(*img.size, *args)) == row["out_size"], where
        assert list(hd_grid(*img.size, *args)) == row["grid"], where
        assert image_token_count(*row["grid"]) == row["tokens"], where

        padded = hd_transform(img, *args)
        assert padded.dtype == np.uint8 and [padded.shape[1], padded.shape[0]] == row["out_size"], where
        np.testing.assert_allclose(tile_means(padded), np.array(row["tile_mean"]), atol=0.5, err_msg=where)
        sha_matches += hashlib.sha256(padded.tobytes()).hexdigest() == row["sha256_rgb"]
    assert len(rows) == 210
    assert sha_matches >= MIN_SHA256_MATCHES


@pytest.mark.parametrize(
    ("png", "source"),
    [
        ("upstream__panda__hd18_train.png", "upstream/panda.jpeg"),
        ("synthetic__4000x500__hd18_train.png", "synthetic/4000x500.png"),
        ("synthetic__559x561__hd18_train.png", "synthetic/559x561.png"),
    ],
)
def test_padded_image_equals_golden_png(ixc_dir: Path, png: str, source: str) -> None:
    expected = np.asarray(Image.open(ixc_dir / "golden/hd" / png).convert("RGB"))
    padded = hd_transform(Image.open(golden_input(ixc_dir, source)).convert("RGB"), 18, "train")
    np.testing.assert_array_equal(padded, expected)


@pytest.mark.parametrize(
    ("size", "grid", "tokens"),
    [  # docs/IXC25.md#tokens-per-image, training transform at hd 18
        ((336, 336), (1, 1), 841),
        ((640, 480), (2, 2), 2061),
        ((1280, 720), (3, 4), 5281),
        ((1920, 1080), (3, 5), 6481),
        ((800, 1200), (4, 3), 5301),
        ((4000, 500), (2, 9), 7661),
    ],
)
def test_spec_examples(size: tuple[int, int], grid: tuple[int, int], tokens: int) -> None:
    assert hd_grid(*size, 18, "train") == grid
    assert image_token_count(*grid) == tokens


def test_grid_never_exceeds_hd_num() -> None:
    for hd_num in (1, 4, 9, 18, 25):
        for w, h in [(1, 1), (10000, 3), (3, 10000), (561, 560), (1000, 999), (7001, 333)]:
            for style in ("train", "infer"):
                rows, cols = hd_grid(w, h, hd_num, style)
                assert 1 <= rows * cols <= hd_num, (w, h, hd_num, style)


def test_train_pads_centred_infer_pads_bottom() -> None:
    img = Image.new("RGB", (700, 175), (0, 0, 0))  # resized to 1120×280 in both styles (scale 2)
    train = hd_transform(img, 18, "train")
    infer = hd_transform(img, 18, "infer")
    assert train.shape == infer.shape == (560, 1120, 3)
    assert (train[:140] == 255).all() and (train[140:420] == 0).all() and (train[420:] == 255).all()
    assert (infer[:280] == 0).all() and (infer[280:] == 255).all()
    # A portrait image is transposed, so its padding goes left and right.
    tall = hd_transform(img.transpose(Image.Transpose.TRANSPOSE), 18, "train")
    np.testing.assert_array_equal(tall, train.transpose(1, 0, 2))


def white_black_white(padded: np.ndarray) -> tuple[int, int, int]:
    """(white rows above, black image rows, white rows below) of a padded black image."""
    white = (padded == 255).all(axis=(1, 2))
    black = (padded == 0).all(axis=(1, 2))
    top = int(white.argmin())
    image = int(black[top:].argmin()) if not black[top:].all() else len(black) - top
    assert white[:top].all() and black[top : top + image].all() and white[top + image :].all()
    return top, image, len(white) - top - image


@pytest.mark.parametrize(
    ("size", "rows"),
    [((700, 171), (143, 273, 144)), ((1000, 333), (0, 559, 1))],  # padding of 287 rows, and of 1
)
def test_odd_padding_puts_the_extra_row_below_the_image(
    size: tuple[int, int], rows: tuple[int, int, int]
) -> None:
    """docs/IXC25.md#hd-transform: training centres the image with top = floor(pad / 2), so the odd row goes below;
    inference pads below only. Needs no ../shared (the golden rows check the same on photos)."""
    img = Image.new("RGB", size, (0, 0, 0))
    train = hd_transform(img, 18, "train")
    assert white_black_white(train) == rows
    tall = hd_transform(img.transpose(Image.Transpose.TRANSPOSE), 18, "train")
    np.testing.assert_array_equal(tall, train.transpose(1, 0, 2))  # the extra column goes right
    assert white_black_white(hd_transform(img, 18, "infer"))[0] == 0  # no padding above


def test_to_tiles_row_major() -> None:
    padded = np.zeros((2 * 560, 3 * 560, 3), dtype=np.uint8)
    for r in range(2):
        for c in range(3):
            padded[r * 560 : (r + 1) * 560, c * 560 : (c + 1) * 560] = 10 * r + c
    tiles = to_tiles(padded)
    assert grid_of(padded) == (2, 3)
    assert tiles.shape == (6, 560, 560, 3)
    assert [int(t[0, 0, 0]) for t in tiles] == [0, 1, 2, 10, 11, 12]
    np.testing.assert_allclose(tile_means(padded)[:, 0], [0, 1, 2, 10, 11, 12])
    assert all((t == t[0, 0, 0]).all() for t in tiles)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="style"):
        hd_grid(100, 100, 18, "eval")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hd_num"):
        hd_grid(100, 100, 0)
    with pytest.raises(ValueError, match="positive"):
        hd_grid(0, 100)
    # Extreme aspect ratios never give a zero-height resize (upstream would crash).
    assert hd_transform(Image.new("RGB", (20000, 1)), 18, "infer").shape == (560, 10080, 3)
