"""Prompt sources: load the prompts an environment starts its episodes from.

Everything becomes a :class:`PromptSet`: a list of prompt strings plus optional
per-prompt metadata columns (for example reference texts that a reward
function compares the generation with).

:func:`load_prompts` accepts

* a :class:`PromptSet` (returned as is);
* a list or tuple of strings (or of dict records, like JSON rows);
* a path to a ``.txt`` file (one prompt per non-empty line) or to a tabular
  ``.jsonl``, ``.json``, ``.csv`` or ``.parquet`` file;
* a ``datasets.Dataset`` / ``datasets.DatasetDict`` or a ``pandas.DataFrame``;
* a dict spec ``{"dataset": name_or_dir, "split": ..., "column": ...,
  "config": ...}``;
* any other string (not an existing path, no known file suffix), which is
  loaded with ``datasets.load_dataset(name, config, split=split or "train")``.

For tabular sources the prompt column is ``column`` if given, else the first of
``"prompt"``, ``"text"``, ``"query"``, ``"question"`` present; every other
column becomes metadata.
"""

from __future__ import annotations

import json
import operator
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

__all__ = [
    "DATA_DIR",
    "PROMPT_COLUMNS",
    "FILE_SUFFIXES",
    "PromptSet",
    "load_prompts",
    "sentiment_prompts",
    "corpus_path",
]

DATA_DIR: Path = Path(__file__).resolve().parent / "data"
PROMPT_COLUMNS: tuple[str, ...] = ("prompt", "text", "query", "question")
FILE_SUFFIXES: tuple[str, ...] = (".txt", ".jsonl", ".json", ".csv", ".parquet")
SENTIMENT_SPLITS: tuple[str, ...] = ("train", "test")
_SPEC_KEYS: tuple[str, ...] = ("dataset", "split", "column", "config")

PromptSource = Union["PromptSet", Sequence[str], str, os.PathLike, Mapping[str, Any], Any]


@dataclass(frozen=True)
class PromptSet:
    """Prompts plus per-prompt metadata columns (each as long as ``prompts``).

    The fields cannot be reassigned; the lists are private copies of the input.
    Indexing gives ``(prompt, {column: value})``.
    """

    prompts: list[str]
    metadata: dict[str, list] = field(default_factory=dict)

    def __post_init__(self) -> None:
        prompts = list(self.prompts)
        if not prompts:
            raise ValueError("empty prompt set: at least one prompt is required")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise ValueError(
                    f"prompts must be strings, but prompt {i} is "
                    f"{type(p).__name__}: {p!r}"
                )
        metadata = {str(k): list(v) for k, v in self.metadata.items()}
        for name, values in metadata.items():
            if len(values) != len(prompts):
                raise ValueError(
                    f"metadata column {name!r} has {len(values)} values, "
                    f"expected {len(prompts)} (one per prompt)"
                )
        object.__setattr__(self, "prompts", prompts)
        object.__setattr__(self, "metadata", metadata)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> tuple[str, dict[str, Any]]:
        i = operator.index(i)
        return self.prompts[i], {k: v[i] for k, v in self.metadata.items()}

    def head(self, n: int) -> "PromptSet":
        """The first ``n`` prompts with their metadata."""
        return PromptSet(self.prompts[:n], {k: v[:n] for k, v in self.metadata.items()})

    def metadata_for(self, indices: Sequence[int]) -> dict[str, list]:
        """Metadata of the rows ``indices``, as one list per column (batch order)."""
        return {k: [v[i] for i in indices] for k, v in self.metadata.items()}


def _pick_column(names: Sequence[str], column: str | None, where: str) -> str:
    """The prompt column: ``column`` if given, else the first of PROMPT_COLUMNS present."""
    if column is not None:
        if column not in names:
            raise ValueError(
                f"column {column!r} not found in {where}; available columns: {list(names)}"
            )
        return column
    for name in PROMPT_COLUMNS:
        if name in names:
            return name
    raise ValueError(
        f"no prompt column in {where}: none of {list(PROMPT_COLUMNS)} is present; "
        f"available columns: {list(names)}. Pass column=... to choose one"
    )


def _from_columns(
    columns: Mapping[str, list], column: str | None, where: str
) -> PromptSet:
    """Build a PromptSet from a column table: pick the prompt column, rest is metadata."""
    column = _pick_column(list(columns), column, where)
    if not len(columns[column]):
        raise ValueError(f"empty prompt set: {where} has no rows")
    metadata = {k: list(v) for k, v in columns.items() if k != column}
    return PromptSet(list(columns[column]), metadata)


def _from_records(rows: Sequence[Any], column: str | None, where: str) -> PromptSet:
    """Rows of strings are prompts; rows of dicts are a table (missing keys -> None)."""
    if not rows:
        raise ValueError(f"empty prompt set: {where} has no prompts")
    if not all(isinstance(r, Mapping) for r in rows):
        if column is not None:
            raise ValueError(
                f"column={column!r} given, but {where} holds plain values, not records"
            )
        return PromptSet(list(rows))
    names = list(dict.fromkeys(k for r in rows for k in r))
    return _from_columns({k: [r.get(k) for r in rows] for k in names}, column, where)


def _from_dataframe(df: Any, column: str | None, where: str) -> PromptSet:
    return _from_columns({str(c): df[c].tolist() for c in df.columns}, column, where)


def _read_text(path: Path) -> str:
    """The file's text; a file that is not UTF-8 is a ``ValueError`` naming the file and line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ValueError(
            f"file {str(path)!r} is not UTF-8 text: line {line} (byte {err.start}) holds "
            f"{raw[err.start:err.end]!r} ({err.reason}); save it as UTF-8"
        ) from None


def _json_lines(path: Path) -> list[Any]:
    """The records of a JSON Lines file; a malformed line is a ``ValueError`` naming file and line."""
    rows = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(
                f"file {str(path)!r}, line {number}: not valid JSON ({err.msg} at column {err.colno})"
            ) from None
    return rows


def _from_file(path: Path, column: str | None) -> PromptSet:
    """Load a .txt, .jsonl, .json, .csv or .parquet file."""
    suffix = path.suffix.lower()
    where = f"file {str(path)!r}"
    if suffix not in FILE_SUFFIXES:
        raise ValueError(
            f"unsupported file suffix {suffix!r} for {str(path)!r}; "
            f"valid suffixes: {', '.join(FILE_SUFFIXES)}"
        )
    if suffix == ".txt":
        if column is not None:
            raise ValueError(f"column={column!r} given, but .txt files have no columns")
        lines = _read_text(path).splitlines()
        prompts = [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise ValueError(f"empty prompt set: {where} has no non-empty lines")
        return PromptSet(prompts)
    if suffix == ".jsonl":
        return _from_records(_json_lines(path), column, where)
    if suffix == ".json":
        try:
            data = json.loads(_read_text(path))
        except json.JSONDecodeError as err:
            raise ValueError(f"prompt file {str(path)!r}, line {err.lineno}: not valid JSON ({err.msg} at column "
                             f"{err.colno})") from None
        if isinstance(data, Mapping):  # {column: [values, ...], ...}
            return _from_columns({k: list(v) for k, v in data.items()}, column, where)
        return _from_records(data, column, where)

    import pandas as pd

    if suffix == ".csv":
        _read_text(path)  # a file that is not UTF-8 is refused by name and line
        try:
            header = [str(c) for c in pd.read_csv(path, nrows=0).columns]
        except pd.errors.EmptyDataError:
            raise ValueError(f"empty prompt set: {where} is empty") from None
        chosen = _pick_column(header, column, where)
        # Read the prompt column as text so that a prompt like "42" stays a string.
        return _from_dataframe(pd.read_csv(path, dtype={chosen: str}), chosen, where)
    return _from_dataframe(pd.read_parquet(path), column, where)


def _from_hf(dataset: Any, split: str | None, column: str | None, where: str) -> PromptSet:
    """Load from a ``datasets.Dataset`` or pick ``split`` of a ``DatasetDict``."""
    if isinstance(dataset, Mapping):  # a DatasetDict is a dict of splits
        split = split or "train"
        if split not in dataset:
            raise ValueError(
                f"unknown split {split!r} for {where}; available splits: {list(dataset)}"
            )
        dataset, where = dataset[split], f"{where} split {split!r}"
    return _from_columns(dataset.to_dict(), column, where)


def _load_hf_dataset(
    name: str, config: str | None, split: str | None, column: str | None
) -> PromptSet:
    """Load a Hugging Face hub dataset or local dataset directory by name."""
    import datasets

    split = split or "train"
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except ValueError as e:
        raise ValueError(
            f"could not load split {split!r} of dataset {name!r}: {e}"
        ) from e
    return _from_hf(ds, split, column, f"dataset {name!r}")


def load_prompts(
    source: PromptSource,
    *,
    split: str | None = None,
    column: str | None = None,
    config: str | None = None,
) -> PromptSet:
    """Turn ``source`` into a :class:`PromptSet` (see the module docstring).

    ``split`` selects a split of a ``DatasetDict`` or hub dataset (default
    ``"train"``), ``column`` the prompt column of a tabular source, and
    ``config`` the configuration name of a hub dataset.
    """
    if isinstance(source, PromptSet):
        return source
    hf = sys.modules.get("datasets")  # a Dataset means the caller imported datasets
    if hf is not None and isinstance(source, (hf.Dataset, hf.DatasetDict)):
        return _from_hf(source, split, column, f"the {type(source).__name__}")
    if isinstance(source, Mapping):
        unknown = sorted(set(source) - set(_SPEC_KEYS))
        if unknown or "dataset" not in source:
            raise ValueError(
                f"invalid dataset spec {dict(source)!r}: it needs a 'dataset' key and "
                f"may only have the keys {list(_SPEC_KEYS)}"
            )
        return load_prompts(
            source["dataset"],
            split=source.get("split", split),
            column=source.get("column", column),
            config=source.get("config", config),
        )
    if isinstance(source, (list, tuple)):
        return _from_records(source, column, f"the {type(source).__name__} of prompts")
    if isinstance(source, (str, os.PathLike)):
        if not os.fspath(source):
            raise ValueError("empty prompt source: expected a file path or dataset name")
        path = Path(source)
        if path.is_file():
            return _from_file(path, column)
        if path.is_dir():
            return _load_hf_dataset(str(path), config, split, column)
        if isinstance(source, os.PathLike) or path.suffix.lower() in FILE_SUFFIXES:
            raise FileNotFoundError(f"prompt file not found: {str(source)!r}")
        return _load_hf_dataset(str(source), config, split, column)
    pd = sys.modules.get("pandas")
    if pd is not None and isinstance(source, pd.DataFrame):
        return _from_dataframe(source, column, "the DataFrame")
    raise TypeError(
        f"cannot load prompts from {type(source).__name__}; expected a PromptSet, a "
        "list of strings, a file path, a dataset name or directory, a dataset spec "
        "dict, a datasets.Dataset/DatasetDict or a pandas.DataFrame"
    )


def sentiment_prompts(split: str = "train") -> PromptSet:
    """The shipped movie-review openings (200 train, 50 test) for sentiment tasks."""
    if split not in SENTIMENT_SPLITS:
        raise ValueError(
            f"unknown split {split!r} for sentiment prompts; valid splits: "
            f"{list(SENTIMENT_SPLITS)}"
        )
    return load_prompts(DATA_DIR / f"sentiment_{split}.txt")


def corpus_path() -> Path:
    """Path of the shipped small English corpus (one sentence or paragraph a line)."""
    return DATA_DIR / "corpus.txt"
