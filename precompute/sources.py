"""`open_data`: the source a `--data URL` names; `check_input`: that source, its config, split
and `--columns` checked up front. Apart from data.py because it picks between data.py's
FileSource and hfdata.py's HFSource, and hfdata builds on data.py (no cycle)."""

from __future__ import annotations

from .data import DataError, FileSource, _format


def _local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def open_data(url: str, config: str | None = None, split: str | None = None):
    """The source `--data URL` names: FileSource for JSONL / Parquet files (the fast,
    line-precise reader; any fsspec URL), hfdata.HFSource for what else `datasets` loads:
    a dataset folder, a `save_to_disk` folder, csv/tsv files, a hub dataset id."""
    import os

    plain = url[len("file://"):] if url.startswith("file://") else url
    is_dir = _local(url) and os.path.isdir(plain)
    named_format = True
    try:
        _format(url.rstrip("/"))
    except DataError:
        named_format = False
    if not is_dir and (named_format or not _local(url)):
        if config is not None or split not in (None, "train"):
            raise DataError(f"{url!r} is a data file: --data-config / --split choose a part of a "
                            "dataset (a folder or a hub id); leave them out")
        return FileSource(url)
    from .hfdata import HFSource

    return HFSource(plain, config, split)


def check_input(url: str, config: str | None = None, split: str | None = None,
                columns: str | dict | None = None) -> None:
    """The data input `--data URL --data-config --split --columns` reads, checked before any
    stage runs: the config and split exist, `--columns` parses and names columns the first
    row has (a pipeline would otherwise find out after the stages before this input's).
    One ValueError naming the problem."""
    from .checks import parse_columns

    mapped = parse_columns(columns)  # a DataError is a ValueError: it goes up as it is
    source = open_data(url, config, split)
    if not mapped:
        return
    first = next(iter(source.rows(limit=1)))
    missing = [f"{role.removesuffix('_column')}={col}" for role, col in mapped.items()
               if col not in first.row]
    if missing:
        raise ValueError(
            f"--columns {', '.join(missing)}: {first.where} has no column "
            f"{' or '.join(repr(m.split('=', 1)[1]) for m in missing)}; its columns are "
            f"{', '.join(map(str, first.row))}")
