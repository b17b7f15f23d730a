"""DataFrames at the edge: save by file suffix, and print the columns people read first with qemu-img sizes."""

from __future__ import annotations

import os

import pandas as pd

from .errors import QsimError, UsageError
from .safeio import atomic_path
from .units import format_size, human_size

SUMMARY_COLUMNS = ["cluster_size", "extended_l2", "l2_cache_size_asked", "l2_cache_bytes", "l2_cache_entry_size",
                   "l2_cache_entries",
                   "l2_lookups", "l2_misses", "l2_disk_reads", "l2_writebacks", "l2_hit_ratio",
                   "metadata_read_bytes", "cow_write_bytes", "zero_fill_bytes", "image_file_bytes"]
SETTING_COLUMNS = {"cluster_size", "l2_cache_bytes", "l2_cache_entry_size", "virtual_size", "l2_cache_ram_bytes"}
AMOUNT_COLUMNS = {"metadata_read_bytes", "metadata_write_bytes", "cow_read_bytes", "cow_write_bytes",
                  "zero_fill_bytes", "image_file_bytes", "guest_read_bytes", "guest_write_bytes"}


def save_frame(frame: pd.DataFrame, path: str) -> None:
    """Write CSV, JSON (records) or Parquet, chosen by the suffix, through qsim.safeio (atomically, never through
    a link or over an image)."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".csv", ".json", ".parquet"):
        raise UsageError(f"--save {path}: unknown suffix for a table (use .csv, .json or .parquet)")
    if suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise QsimError("writing Parquet needs pyarrow: pip install pyarrow (or save as .csv / .json)") from None
    try:
        with atomic_path(path) as tmp:
            if suffix == ".csv":
                frame.to_csv(tmp, index=False)
            elif suffix == ".json":
                frame.to_json(tmp, orient="records", indent=2)
            else:
                frame.to_parquet(tmp, index=False)
    except OSError as exc:
        raise QsimError(f"{path}: cannot write ({exc.strerror or exc})") from None


def human_table(frame: pd.DataFrame, columns: list[str] = SUMMARY_COLUMNS) -> str:
    """The main columns with sizes as qemu-img writes them (64k, 32M) and ratios as percentages."""
    if "cache_size_asked" in frame.columns and "l2_cache_size_asked" in columns and \
            (frame["cache_size_asked"].astype(str) != "default").any():  # a cache-size sweep: show what was asked
        at = columns.index("l2_cache_size_asked") + 1
        columns = columns[:at] + ["cache_size_asked"] + columns[at:]
    shown = frame[[c for c in columns if c in frame.columns]].copy()
    for column in shown.columns:
        if column in SETTING_COLUMNS:
            shown[column] = [format_size(int(v)) for v in shown[column]]
        elif column in AMOUNT_COLUMNS:
            shown[column] = [human_size(int(v)) for v in shown[column]]
        elif column == "l2_hit_ratio":
            shown[column] = [f"{100 * v:.2f}%" for v in shown[column]]
        elif column == "extended_l2":
            shown[column] = ["on" if v else "off" for v in shown[column]]
    names = {"l2_cache_size_asked": "asked", "cache_size_asked": "cache-size"}
    shown.columns = [names.get(c) or c.replace("l2_cache_", "cache_").replace("_bytes", "") for c in shown.columns]
    return shown.to_string(index=False)


def load_frame(path: str) -> pd.DataFrame:
    """Read a table qsim saved (.csv, .json, .parquet)."""
    if not os.path.exists(path):
        raise QsimError(f"{path}: no such file")
    if not os.path.isfile(path):  # a FIFO would block the reader, a folder is no table
        raise QsimError(f"{path}: not a regular file, not a table")
    suffix = os.path.splitext(path)[1].lower()
    try:
        if suffix == ".csv":
            return pd.read_csv(path)
        if suffix == ".json":
            return pd.read_json(path, orient="records")
        if suffix == ".parquet":
            return pd.read_parquet(path)
    except (ValueError, pd.errors.ParserError, OSError, ImportError) as exc:
        raise QsimError(f"{path}: cannot read the table ({exc})") from None
    raise UsageError(f"{path}: unknown suffix (a table saved by qsim: .csv, .json or .parquet)")
