"""Reading data files into records, each with where it came from (``file:line`` or ``file record i``)
so that every error can name it.

JSONL we read ourselves: a line number is the most useful thing an error can give, and it lets us
refuse bytes that are not UTF-8 at the line where they are. Everything else a user may hand us
(Parquet, Arrow, JSON arrays, CSV, a folder written by ``Dataset.save_to_disk``) goes through the
``datasets`` library, which reads local files with no hub; its cache goes to a temporary folder
per process (no shared cache for concurrent ranks to race on, nothing left in the home folder).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Iterator, List, Tuple

Record = Tuple[str, dict]  # (origin, fields): ("data.jsonl:17", {"prompt": ..., "completion": ...})

DATASETS_FORMATS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".csv": "csv"}


def read_jsonl(path: str) -> Iterator[Record]:
    """One record per non-blank line; a line that is not UTF-8, not JSON or not an object is an error."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as problem:
                raise ValueError(f"{where}: not valid UTF-8 (byte 0x{raw[problem.start]:02x} at column "
                                 f"{problem.start + 1}); re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line, object_pairs_hook=_no_duplicate_keys(where))
            except json.JSONDecodeError as problem:
                raise ValueError(f"{where}: not valid JSON ({problem.msg} at column {problem.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
            yield where, record


def read_with_datasets(path: str) -> List[Record]:
    """A local Parquet/Arrow/JSON/CSV file, or a ``save_to_disk`` folder, through ``datasets``."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"data={path!r} is read with the datasets library: pip install datasets") from None
    cache = tempfile.mkdtemp(prefix="gora-datasets-")
    try:
        if os.path.isdir(path):
            table = datasets.load_from_disk(path)
            if isinstance(table, datasets.DatasetDict):
                if "train" not in table:
                    raise ValueError(f"{path}: a DatasetDict without a 'train' split (it has {sorted(table)})")
                table = table["train"]
        else:
            kind = DATASETS_FORMATS[os.path.splitext(path)[1].lower()]
            if kind == "arrow":
                table = datasets.Dataset.from_file(path, in_memory=True)
            elif kind == "csv":  # every column as text, as written: an answer "5.00" stays "5.00", "" stays ""
                table = datasets.load_dataset(kind, data_files=path, split="train", cache_dir=cache,
                                              features=_text_columns(path), keep_default_na=False)
            else:
                table = datasets.load_dataset(kind, data_files=path, split="train", cache_dir=cache)
        return [(f"{path} record {index}", dict(row)) for index, row in enumerate(table)]
    except (ValueError, KeyError):
        raise
    except Exception as problem:  # pyarrow's and datasets' own errors: name the file
        raise ValueError(f"{path}: the datasets library could not read it: {type(problem).__name__}: {problem}") from None
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _text_columns(path: str):
    """datasets Features reading each column of a CSV file (named by its header) as a string."""
    import csv

    import datasets

    with open(path, newline="", encoding="utf-8") as handle:
        header = next(csv.reader(handle), None)
    if not header:
        raise ValueError(f"{path}: an empty CSV file (no header line)")
    return datasets.Features({name: datasets.Value("string") for name in header})


def _no_duplicate_keys(where: str):
    def build(pairs):
        keys = [key for key, _ in pairs]
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        if repeated:
            raise ValueError(f"{where}: the key {repeated[0]!r} appears twice in one object; JSON readers keep only one "
                             "of them, so the record is ambiguous")
        return dict(pairs)

    return build


def read_records(path: str) -> List[Record]:
    """Records of a local data file or folder; the kind follows the extension (``.jsonl`` is ours)."""
    if not os.path.exists(path):
        raise ValueError(f"data file {path!r} does not exist")
    extension = os.path.splitext(path)[1].lower()
    if extension == ".jsonl":
        return list(read_jsonl(path))
    if os.path.isdir(path) or extension in DATASETS_FORMATS:
        return read_with_datasets(path)
    raise ValueError(f"data file {path!r}: unknown kind {extension or '(no extension)'!r}; "
                     f"use .jsonl, {', '.join(DATASETS_FORMATS)} or a folder written by Dataset.save_to_disk")
