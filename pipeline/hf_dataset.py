"""Rows of a local Hugging Face dataset for `xc-prep convert`: a `save_to_disk` folder or parquet files.

Rows are read as stored, never decoded: an image cell is `{"bytes": ..., "path": ...}` (the Arrow
storage of the `datasets.Image` feature), which `xc-prep convert` writes out as an image file.
Parquet files are read with pyarrow alone; a saved folder needs `datasets`
(`pip install 'xcomposer-finetune[hf]'`). Nothing is fetched from the network.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import DataError

BATCH_ROWS = 64
"""Rows read at a time: bounds memory by a few rows' image bytes."""

HF_HINTS: dict[str, str] = {
    "hf_missing_datasets": "pip install 'xcomposer-finetune[hf]' (the datasets library reads saved dataset folders)",
    "hf_unreadable": "pass a folder written by Dataset.save_to_disk / DatasetDict.save_to_disk, or .parquet files",
    "hf_split": "choose a split with --split NAME",
}


def is_hf_input(path: Path) -> bool:
    """A folder (a saved dataset) or a parquet file."""
    return path.is_dir() or path.suffix.lower() == ".parquet"


def hf_rows(path: Path, split: str | None = None) -> tuple[int, Iterator[dict[str, Any]], list[str]]:
    """(number of rows, the rows in order, the column names) of a saved dataset folder or parquet file."""
    if path.is_dir():
        return _saved_dataset_rows(path, split)
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow.ArrowInvalid / OSError: not a parquet file
        raise DataError(
            "hf_unreadable", f"not a readable parquet file ({e})", HF_HINTS["hf_unreadable"]
        ) from e
    batches = parquet.iter_batches(batch_size=BATCH_ROWS)
    rows = (row for batch in batches for row in batch.to_pylist())
    return parquet.metadata.num_rows, rows, list(parquet.schema_arrow.names)


def _saved_dataset_rows(path: Path, split: str | None) -> tuple[int, Iterator[dict[str, Any]], list[str]]:
    try:
        import datasets
    except ImportError as e:
        raise DataError(
            "hf_missing_datasets",
            "reading a saved Hugging Face dataset folder needs the datasets library",
            HF_HINTS["hf_missing_datasets"],
        ) from e
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # FileNotFoundError, or datasets' own errors for other folders
        raise DataError(
            "hf_unreadable", f"not a saved Hugging Face dataset ({e})", HF_HINTS["hf_unreadable"]
        ) from e
    if isinstance(loaded, datasets.DatasetDict):
        names = sorted(loaded)
        if split is None and len(names) == 1:
            split = names[0]
        if split not in loaded:
            wanted = "no --split given" if split is None else f"--split {split!r} is not one of them"
            raise DataError(
                "hf_split",
                f"the dataset has the splits {', '.join(names)} ({wanted})",
                HF_HINTS["hf_split"],
            )
        loaded = loaded[split]
    table_rows = loaded.with_format("arrow").iter(batch_size=BATCH_ROWS)  # Arrow tables: images stay bytes
    rows = (row for table in table_rows for row in table.to_pylist())
    return len(loaded), rows, list(loaded.column_names)
