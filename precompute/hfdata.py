"""`--data` through Hugging Face `datasets`: what `datasets.load_dataset` accepts, streamed.

Used for everything the hand-written JSONL / Parquet reader (data.py) does not read: a hub
dataset id (with `--data-config` / `--split`), a local dataset folder (a hub snapshot: data
files + a README.md dataset card with `configs:`), a `save_to_disk` folder, and data files
of the other formats `datasets` reads (csv/tsv, optionally compressed, e.g. .csv.gz).

Every source is read as an IterableDataset (`streaming=True`; a `save_to_disk` folder's
Arrow files through the `arrow` builder, not memory-mapped), so rows arrive one at a time
and memory does not grow with the dataset. Each row's `where` is "<dataset> split <split> row <i>", as precise as the file
reader's "<file> line <n>". Imported only when such a source is opened: `--help` and JSONL
runs never import `datasets`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .data import DataError, RowSource

# data-file extensions `datasets` reads here (after a compression suffix is removed)
CSV = (".csv", ".tsv")
_SAVED = ("state.json", "dataset_info.json")  # a Dataset.save_to_disk folder
_SAVED_DICT = "dataset_dict.json"  # a DatasetDict.save_to_disk folder


def _offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


class HFSource:
    """One split of a `datasets` dataset, streamed."""

    def __init__(self, url: str, config: str | None = None, split: str | None = None) -> None:
        self.url, self.config, self.split = url, config, split
        path = Path(url)
        if path.is_dir() and ((path / _SAVED[0]).is_file() or (path / _SAVED_DICT).is_file()):
            self.kind = "saved"
        elif path.is_dir():
            self.kind = "folder"
        elif path.is_file() or any(c in url for c in "*?[") or \
                _strip_compression(url.lower()).endswith(CSV):
            self.kind = "files"
        else:
            self.kind = "hub"
        self._builder = None
        self._resolve()

    @property
    def name(self) -> str:
        return self.url + (f" (config {self.config})" if self.config else "")

    # ------------------------------------------------------------------------- opening
    def _fail(self, e: BaseException) -> DataError:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if self.kind == "hub" and _offline():
            return DataError(
                f"{self.url!r} is not a local file or folder and not a dataset in the Hugging "
                "Face cache (offline: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set); check the "
                "path, or download it first (`datasets.load_dataset(...)` with network on)")
        where = "dataset" if self.kind in ("hub", "saved", "folder") else "data"
        return DataError(f"cannot load the {where} {self.name!r} ({type(e).__name__}: {msg}); "
                         "--data takes a JSONL/Parquet/CSV file or glob, a dataset folder "
                         "(hub snapshot or save_to_disk) or a hub dataset id, with "
                         "--data-config / --split")

    def _resolve(self) -> None:
        """Pick the split (checked now, before anything is scored) and note the data files."""
        if self.kind == "saved":
            splits = self._saved_splits()
            self._pick_split(splits)
            self._builder = self._saved_builder()
            return
        import datasets

        try:
            if self.kind == "files":
                ext = _strip_compression(self.url.lower())
                if not ext.endswith(CSV):
                    raise DataError(f"{self.url!r}: unknown format; use .jsonl / .json (JSON "
                                    "lines), .parquet or .csv / .tsv, optionally compressed "
                                    "(.gz), or a dataset folder")
                kw = {"delimiter": "\t"} if ext.endswith(".tsv") else {}
                self._builder = datasets.load_dataset_builder(
                    "csv", data_files=self.url, **kw)
            else:
                self._builder = datasets.load_dataset_builder(self.url, name=self.config)
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - datasets raises many kinds; one line
            raise self._fail(e) from None
        files = self._builder.config.data_files or {}
        splits = list(files) or list(self._builder.info.splits or {})
        self._pick_split(splits)

    def _pick_split(self, splits: list[str]) -> None:
        if self.split is None:
            if "train" in splits or not splits:
                self.split = "train"
            elif len(splits) == 1:
                self.split = splits[0]
            else:
                raise DataError(f"{self.name!r} has splits {', '.join(map(str, splits))}; "
                                "choose one with --split")
        elif splits and self.split not in splits:
            raise DataError(f"{self.name!r} has no split {self.split!r}; it has "
                            f"{', '.join(map(str, splits))}: pass one of them to --split")

    def _saved_splits(self) -> list[str]:
        d = Path(self.url)
        if (d / _SAVED_DICT).is_file():
            try:
                return [str(s) for s in json.loads((d / _SAVED_DICT).read_text())["splits"]]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise DataError(f"{self.url}: unreadable {_SAVED_DICT} ({e}); is it a complete "
                                "save_to_disk folder?") from None
        return ["train"]  # a single Dataset: one split, named train here

    def _saved_dir(self) -> Path:
        d = Path(self.url)
        return d / self.split if (d / _SAVED_DICT).is_file() else d

    def _saved_builder(self) -> Any:
        """A save_to_disk folder's Arrow files, streamed by `datasets`' arrow builder: record
        batch by record batch from a plain file (`load_from_disk` memory-maps the whole
        table: every page read stays in the process's RSS)."""
        import datasets

        d = self._saved_dir()
        if Path(self.split).name != self.split or self.split in (".", ".."):
            raise DataError(f"--split {self.split!r} is not a split name")
        try:
            state = json.loads((d / _SAVED[0]).read_text())
            names = [str(f["filename"]) for f in state["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{d}: unreadable {_SAVED[0]} ({type(e).__name__}: {e}); is it a "
                            "complete save_to_disk folder?") from None
        bad = [n for n in names if Path(n).name != n or n in ("", ".", "..")
               or not (d / n).is_file()]
        if bad or not names:
            raise DataError(f"{d}/{_SAVED[0]} names data files {bad or names} that are not files "
                            "in that folder; is it a complete save_to_disk folder?")
        self._saved_files = [str(d / n) for n in names]
        try:
            return datasets.load_dataset_builder("arrow", data_files={self.split: self._saved_files})
        except Exception as e:  # noqa: BLE001 - one line
            raise self._fail(e) from None

    def _iterable(self) -> Any:
        try:
            return self._builder.as_streaming_dataset(split=self.split)
        except Exception as e:  # noqa: BLE001 - one line
            raise self._fail(e) from None

    # ------------------------------------------------------------------------- reading
    def files(self) -> list[str]:
        """The local files behind the split (empty for a dataset only on the hub)."""
        if self.kind == "saved":
            return self._saved_files
        data_files = (self._builder.config.data_files or {}).get(self.split, [])
        files = [str(f) for f in data_files]
        return files if files and all(Path(f).is_file() for f in files) else []

    def sha256(self) -> str:
        """Content hash of the split's files (as data.files_sha256); for a hub dataset read
        from the cache: its id, config, split and the builder's hash (which holds the revision)."""
        files = self.files()
        h = hashlib.sha256(json.dumps([self.kind, self.config, self.split]).encode())
        if not files:
            h.update(f"{self.url}\0{getattr(self._builder, 'hash', '')}".encode())
            return h.hexdigest()
        from .data import files_sha256

        h.update(files_sha256(files).encode())
        return h.hexdigest()

    def rows(self, limit: int | None = None) -> Iterator[RowSource]:
        it = iter(self._iterable())
        index = 0
        while limit is None or index < limit:
            try:
                row = next(it)
            except StopIteration:
                break
            except DataError:
                raise
            except Exception as e:  # noqa: BLE001 - a parse error inside datasets: one line
                msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise DataError(f"{self.name} split {self.split}: cannot read row {index} "
                                f"({type(e).__name__}: {msg}); check the file is complete and in "
                                "the format its name says") from None
            yield RowSource(index, f"{self.name} split {self.split} row {index}", row)
            index += 1
        if index == 0:
            raise DataError(f"the dataset {self.name} split {self.split} has no rows")


def _strip_compression(name: str) -> str:
    for ext in (".gz", ".bz2", ".xz", ".zst", ".lz4", ".zip"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name
