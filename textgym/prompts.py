"""Data sources, the prompts an environment starts its episodes from, and how a prompt is encoded.

:func:`load_records` is textgym's one reader of data: the rows of a file, a dataset or a list,
for prompts (:func:`load_prompts`), SFT demonstrations (``textgym.pipeline.sft``) and preference data
(``textgym.pipeline.rm``) alike. It accepts

* a path to a ``.txt`` file (one row per non-empty line) or to a tabular ``.jsonl``, ``.json``,
  ``.csv`` or ``.parquet`` file;
* a ``datasets.Dataset`` / ``datasets.DatasetDict`` or a ``pandas.DataFrame``;
* a list or tuple of rows (dict records, like JSON rows, or plain values such as strings);
* a dict spec ``{"dataset": source, "split": ..., "config": ...}``;
* a Hugging Face dataset directory (``load_dataset`` or ``save_to_disk`` layout) or any other
  string (not an existing path, no known file suffix), which is loaded with
  ``datasets.load_dataset(name, config, split=split or "train")``.

Everything :func:`load_prompts` reads becomes a :class:`PromptSet`: a list of prompt strings plus
optional per-prompt metadata columns (for example reference texts that a reward function compares
the generation with). It takes what :func:`load_records` takes, a :class:`PromptSet` (returned as
is), and a spec may also name the prompt ``column``. For tabular sources the prompt column is
``column`` if given, else the first of ``"prompt"``, ``"text"``, ``"query"``, ``"question"``
present; every other column becomes metadata.

:func:`encode_prompt` gives the token ids a policy is conditioned on: the environments and SFT
both encode prompts with it, so a model fine-tuned by one sees prompts as the other shows them.
"""

from __future__ import annotations

import json
import operator
import os
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

__all__ = [
    "DATA_DIR",
    "PROMPT_COLUMNS",
    "FILE_SUFFIXES",
    "PromptSet",
    "load_records",
    "load_prompts",
    "encode_prompt",
    "sentiment_prompts",
    "corpus_path",
]

DATA_DIR: Path = Path(__file__).resolve().parent / "data"
PROMPT_COLUMNS: tuple[str, ...] = ("prompt", "text", "query", "question")
FILE_SUFFIXES: tuple[str, ...] = (".txt", ".jsonl", ".json", ".csv", ".parquet")
SENTIMENT_SPLITS: tuple[str, ...] = ("train", "test")
_RECORD_SPEC_KEYS: tuple[str, ...] = ("dataset", "split", "config")
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

    def head(self, n: int) -> PromptSet:
        """The first ``n`` prompts with their metadata."""
        return PromptSet(self.prompts[:n], {k: v[:n] for k, v in self.metadata.items()})

    def repeat(self, k: int) -> PromptSet:
        """Each prompt ``k`` times in a row (with its metadata): ``k`` completions of every prompt."""
        return PromptSet([p for p in self.prompts for _ in range(k)],
                         {key: [v for v in values for _ in range(k)] for key, values in self.metadata.items()})

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


# --- records: the one reader of data sources ---------------------------------------------------


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
    return [row for _, row in json_lines_numbered(path)]


def json_lines_numbered(path: str | os.PathLike) -> list[tuple[int, Any]]:
    """``(line number, record)`` of each non-blank line of a JSON Lines file (numbers from 1), so
    that a reader can name the line of a record it refuses; a line that is not JSON is a
    ``ValueError`` naming file and line."""
    path = Path(path)
    rows = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            raise ValueError(
                f"file {str(path)!r}, line {number}: not valid JSON ({err.msg} at column {err.colno})"
            ) from None
    return rows


def _column_records(columns: Mapping[str, Any], where: str) -> list[dict]:
    """Records of a table given as ``{column: [values, ...]}`` (columns of one length)."""
    lengths = {k: len(v) if isinstance(v, list) else None for k, v in columns.items()}
    if None in lengths.values() or len(set(lengths.values())) > 1:
        raise ValueError(
            f"{where} holds an object of columns, whose values must be lists of one length; "
            f"got lengths {lengths}"
        )
    n = len(next(iter(columns.values()), []))
    return [{str(k): v[i] for k, v in columns.items()} for i in range(n)]


def _dataframe_records(df: Any) -> list[dict]:
    # Parquet list columns come back as NumPy arrays (and values may be NumPy scalars): make them
    # Python lists and values.
    return [
        {str(k): v.tolist() if hasattr(v, "tolist") and not isinstance(v, str) else v for k, v in r.items()}
        for r in df.to_dict("records")
    ]


def _read_file(path: Path, text_columns: Callable[[list[str]], Collection[str]] | None) -> list[Any]:
    """The rows of a .txt, .jsonl, .json, .csv or .parquet file."""
    suffix = path.suffix.lower()
    where = f"file {str(path)!r}"
    if suffix not in FILE_SUFFIXES:
        raise ValueError(
            f"unsupported file suffix {suffix!r} for {str(path)!r}; "
            f"valid suffixes: {', '.join(FILE_SUFFIXES)}"
        )
    if suffix == ".txt":
        return [line.strip() for line in _read_text(path).splitlines() if line.strip()]
    if suffix == ".jsonl":
        return _json_lines(path)
    if suffix == ".json":
        try:
            data = json.loads(_read_text(path))
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{where}, line {err.lineno}: not valid JSON ({err.msg} at column {err.colno})"
            ) from None
        if isinstance(data, Mapping):  # {column: [values, ...], ...}
            return _column_records(data, where)
        if not isinstance(data, list):
            raise ValueError(
                f"{where} holds a JSON {type(data).__name__}; expected a list of rows or an object of columns"
            )
        return data

    import pandas as pd  # imported on use: only tabular files need pandas (a slow import)

    if suffix == ".csv":
        _read_text(path)  # a file that is not UTF-8 is refused by name and line
        try:
            if text_columns is None:  # every column is text; an empty cell is ""
                df = pd.read_csv(path, dtype=str, keep_default_na=False)
            else:
                header = [str(c) for c in pd.read_csv(path, nrows=0).columns]
                df = pd.read_csv(path, dtype={c: str for c in text_columns(header)})
        except pd.errors.EmptyDataError:
            return []
        return _dataframe_records(df)
    return _dataframe_records(pd.read_parquet(path))


def _named(what: str, noun: str) -> str:
    return f"{what} {noun}" if what else noun


def _load_dataset(name: str, config: str | None, split: str | None, what: str) -> list[dict]:
    """The rows of ``split`` (default ``"train"``) of a hub dataset or a dataset directory."""
    import datasets  # imported on use: only hub datasets need it (a slow import)

    split = split or "train"
    try:
        if any((Path(name) / f).is_file() for f in ("state.json", "dataset_dict.json")):  # save_to_disk
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(f"no such split; available splits: {list(ds)}")
                ds = ds[split]
            return ds.to_list()
        return datasets.load_dataset(name, config, split=split).to_list()
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"could not load split {split!r} of {_named(what, 'dataset')} {name!r}: {err}") from err


def _check_spec(spec: Mapping, keys: Sequence[str]) -> None:
    unknown = sorted(set(spec) - set(keys))
    if unknown or "dataset" not in spec:
        raise ValueError(
            f"invalid dataset spec {dict(spec)!r}: it needs a 'dataset' key and "
            f"may only have the keys {list(keys)}"
        )


def load_records(
    source: Any,
    split: str | None = None,
    *,
    config: str | None = None,
    what: str = "",
    text_columns: Callable[[list[str]], Collection[str]] | None = None,
) -> list[Any]:
    """The rows of ``source`` (see the module docstring), in order: dicts of named fields, or plain
    values where the source holds them (the stripped non-empty lines of a ``.txt`` file, a JSON list
    of strings, a list of strings).

    ``split`` selects a split of a ``DatasetDict`` or dataset (default ``"train"``), ``config`` the
    configuration of a hub dataset. ``what`` names the data in error messages (``"prompt"``:
    "prompt file not found"). ``text_columns``: given a CSV file's header, the columns read as text,
    the others getting pandas' types; by default every column is text and an empty cell is ``""``.

    Errors name what is wrong where: the file and line of a file that is not UTF-8 or not valid
    JSON, a missing file, an unsupported suffix, an unknown split, a bad spec.
    """
    hf = sys.modules.get("datasets")  # a Dataset means the caller imported datasets
    if hf is not None and isinstance(source, hf.DatasetDict):  # a dict of splits: before Mapping
        split = split or "train"
        if split not in source:
            raise ValueError(f"unknown split {split!r} for the DatasetDict; available splits: {list(source)}")
        return source[split].to_list()
    if hf is not None and isinstance(source, hf.Dataset):
        return source.to_list()
    if isinstance(source, Mapping):
        _check_spec(source, _RECORD_SPEC_KEYS)
        return load_records(source["dataset"], source.get("split", split), config=source.get("config", config),
                            what=what, text_columns=text_columns)
    if isinstance(source, (list, tuple)):
        return [dict(r) if isinstance(r, Mapping) else r for r in source]
    if isinstance(source, (str, os.PathLike)):
        if not os.fspath(source):
            raise ValueError(f"empty {_named(what, 'source')}: expected a file path or dataset name")
        path = Path(source)
        if path.is_file():
            return _read_file(path, text_columns)
        if path.is_dir():
            return _load_dataset(str(path), config, split, what)
        if isinstance(source, os.PathLike) or path.suffix.lower() in FILE_SUFFIXES:  # a Path is never a hub name
            raise FileNotFoundError(f"{_named(what, 'file')} not found: {str(source)!r}")
        return _load_dataset(str(source), config, split, what)
    pd = sys.modules.get("pandas")
    if pd is not None and isinstance(source, pd.DataFrame):
        return _dataframe_records(source)
    raise TypeError(
        f"cannot load {what or 'record'}s from {type(source).__name__}; expected a list of records, a file "
        "path, a dataset name or directory, a dataset spec dict, a datasets.Dataset/DatasetDict or a "
        "pandas.DataFrame"
    )


# --- prompts -----------------------------------------------------------------------------------


def _where(source: Any, split: str | None) -> str:
    """How an error message names ``source``."""
    if isinstance(source, (str, os.PathLike)):
        return f"file {str(source)!r}" if Path(source).is_file() else f"dataset {str(source)!r}"
    if isinstance(source, (list, tuple)):
        return f"the {type(source).__name__} of prompts"
    if isinstance(source, Mapping):  # a DatasetDict
        return f"the {type(source).__name__} split {split or 'train'!r}"
    return f"the {type(source).__name__}"


def load_prompts(
    source: PromptSource,
    *,
    split: str | None = None,
    column: str | None = None,
    config: str | None = None,
) -> PromptSet:
    """Turn ``source`` into a :class:`PromptSet` (see the module docstring): its rows are read by
    :func:`load_records`; rows of strings are prompts, rows of records a table.

    ``split`` selects a split of a ``DatasetDict`` or hub dataset (default
    ``"train"``), ``column`` the prompt column of a tabular source, and
    ``config`` the configuration name of a hub dataset.
    """
    if isinstance(source, PromptSet):
        return source
    hf = sys.modules.get("datasets")
    if isinstance(source, Mapping) and not (hf is not None and isinstance(source, hf.DatasetDict)):
        _check_spec(source, _SPEC_KEYS)
        return load_prompts(
            source["dataset"],
            split=source.get("split", split),
            column=source.get("column", column),
            config=source.get("config", config),
        )
    if (column is not None and isinstance(source, (str, os.PathLike)) and os.fspath(source)
            and Path(source).suffix.lower() == ".txt" and Path(source).is_file()):
        raise ValueError(f"column={column!r} given, but .txt files have no columns")
    where = _where(source, split)
    rows = load_records(
        source, split, config=config, what="prompt",
        # A CSV's prompt column is read as text, so that a prompt like "42" stays a string.
        text_columns=lambda header: [_pick_column(header, column, where)],
    )
    return _from_records(rows, column, where)


def encode_prompt(
    tokenizer,
    prompt: str,
    chat_template: bool = False,
    max_tokens: int | None = None,
    *,
    fallback_id: int | None = None,
    on_cut: Callable[[int], None] | None = None,
) -> list[int]:
    """The token ids a policy is conditioned on for ``prompt``, as the environments and SFT use them.

    With ``chat_template`` the prompt is a user turn through the tokenizer's chat template, with the
    generation prompt (no further special tokens); else the plain text with the tokenizer's special
    tokens. An empty prompt still needs a token to condition on: BOS, else ``fallback_id`` (default:
    EOS). More than ``max_tokens`` ids are cut from the left (a completion continues the prompt's
    end); ``on_cut(number of ids before the cut)`` is called first, e.g. to warn.
    """
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    if not ids:  # an empty prompt still needs a token to condition on
        if tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id]
        else:
            ids = [tokenizer.eos_token_id if fallback_id is None else fallback_id]
    if max_tokens is not None and len(ids) > max_tokens:
        if on_cut is not None:
            on_cut(len(ids))
        ids = ids[-max_tokens:]
    return ids


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
