"""Recorded episodes: textgym's offline dataset, one Parquet row per episode.

A recording is a directory of two files:

- ``episodes.parquet``: one row per finished episode, the columns of ``SCHEMA`` (below);
- ``recording.json``: what played them: ``format`` (``"textgym-episodes"``), ``version``, the env's
  id and settings (``env_id``, ``env_kwargs``), the policy and reference models, ``vocab_size``,
  the prompts' split, the seed, the number of completions per prompt and ``seconds``, the time
  playing them took (what the data cost to produce).

Why not Minari (Farama's format for Gymnasium offline datasets): Minari stores an observation per
step, and a textgym observation is the whole token sequence so far (``input_ids`` and
``attention_mask`` of ``max_prompt_tokens + max_new_tokens`` entries), so a Minari episode holds
every prefix: on the sentiment task (40 + 20 tokens) about 60 times the bytes of the episode's
tokens. An episode's token ids determine every observation of it (observation ``t`` is the prompt
followed by the first ``t`` completion ids), so one row per episode loses nothing.

The row of an episode, with ``T`` its completion's length:

============== ================== =====================================================================
column         type               meaning
============== ================== =====================================================================
episode        int64              its position in the recording
prompt_index   int64              index into the prompts it was drawn from (-1: none)
prompt         string             the prompt's text
prompt_ids     list<int32>        the prompt's token ids, without padding
completion     string             the completion's text (what the reward scored)
completion_ids list<int32>        the ``T`` actions: token ids, the EOS included when it ended the episode
logprobs       list<float32>      ``T`` log-probs of the actions under the distribution that sampled them
ref_logprobs   list<float32>      ``T`` log-probs of the actions under the reference model
score          float64            the reward function's score
kl             float64            ``sum_t logprobs - ref_logprobs`` (k1, see ``textgym.kl``)
kl_coef        float64            the KL coefficient of the env when the episode ended
reward         float64            the episode's return as training sees it (``textgym.sampling.episode_return``)
============== ================== =====================================================================

Every episode ends ``terminated`` (EOS or the length limit, see ``TextGenEnv``). Reading checks the
schema and every row and names the file, episode and column of the first bad value; nothing is
unpickled (Parquet and JSON only).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from textgym.assets import atomic_dir

FORMAT = "textgym-episodes"
VERSION = 1
EPISODES_FILE = "episodes.parquet"
META_FILE = "recording.json"

SCHEMA = pa.schema([
    ("episode", pa.int64()),
    ("prompt_index", pa.int64()),
    ("prompt", pa.string()),
    ("prompt_ids", pa.list_(pa.int32())),
    ("completion", pa.string()),
    ("completion_ids", pa.list_(pa.int32())),
    ("logprobs", pa.list_(pa.float32())),
    ("ref_logprobs", pa.list_(pa.float32())),
    ("score", pa.float64()),
    ("kl", pa.float64()),
    ("kl_coef", pa.float64()),
    ("reward", pa.float64()),
])
META_KEYS = {"format": str, "version": int, "env_id": str, "env_kwargs": dict, "vocab_size": int}
# A log-prob is <= 0; float32 rounding of a probability-1 token may leave it a hair above.
_LOGPROB_SLACK = 1e-4


class RecordingError(ValueError):
    """A recording that does not follow the format: the message names the file and the field."""


@dataclass
class Recording:
    """A loaded recording: ``episodes`` (a ``datasets.Dataset`` of the columns of ``SCHEMA``),
    ``meta`` (``recording.json``) and the directory it came from."""

    episodes: datasets.Dataset
    meta: dict
    path: Path

    def __len__(self) -> int:
        return len(self.episodes)


def write_recording(out: str | Path, rows: list[dict], meta: dict) -> Path:
    """Write ``rows`` (dicts with the columns of ``SCHEMA``) and ``meta`` as a recording in ``out``.

    ``out`` must not exist or be an empty directory (one recording per directory); the directory
    appears whole or not at all. ``meta`` gets ``format``, ``version`` and ``n_episodes``; it must
    be JSON (no objects) and carry ``env_id``, ``env_kwargs`` and ``vocab_size``. The rows are
    checked as ``load_recording`` checks them before anything is written."""
    out = ensure_new_directory(out)
    if not rows:
        raise ValueError("no episodes to record")
    meta = {"format": FORMAT, "version": VERSION, **meta, "n_episodes": len(rows)}
    _check_meta(meta, META_FILE)
    try:
        text = json.dumps(meta, indent=1, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"recording metadata must be plain JSON: {err}") from err
    missing = [name for name in SCHEMA.names if name not in rows[0]]
    if missing:
        raise ValueError(f"episode rows lack column(s) {', '.join(missing)}; a row has: {', '.join(SCHEMA.names)}")
    table = pa.Table.from_pylist([{name: row[name] for name in SCHEMA.names} for row in rows], schema=SCHEMA)
    _check_rows(table, meta["vocab_size"], EPISODES_FILE)
    if out.exists():
        out.rmdir()  # empty, checked above: atomic_dir puts the finished directory in its place
    with atomic_dir(out) as tmp:
        pq.write_table(table, tmp / EPISODES_FILE)
        (tmp / META_FILE).write_text(text + "\n")
    return out


def ensure_new_directory(out: str | Path) -> Path:
    """``out`` as a Path, refused if it exists and is not an empty directory: one recording per directory."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not an empty directory: one recording per "
                              "directory (choose a new one or remove it)")
    return out


def load_recording(path: str | Path) -> Recording:
    """Read and check the recording in directory ``path``; a malformed one raises
    ``RecordingError`` naming the file and the field (and the episode) at fault."""
    path = Path(path)
    meta_file, episodes_file = path / META_FILE, path / EPISODES_FILE
    for file in (meta_file, episodes_file):
        if not file.is_file():
            raise RecordingError(f"{path} is not a textgym recording: {file.name} is missing "
                                 f"(a recording holds {META_FILE} and {EPISODES_FILE}; see textgym.recordings)")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RecordingError(f"{meta_file}: not JSON ({err})") from err
    _check_meta(meta, str(meta_file))
    try:
        table = pq.read_table(episodes_file)
    except (pa.ArrowException, OSError) as err:
        raise RecordingError(f"{episodes_file}: not a Parquet file ({err})") from err
    table = _conform(table, str(episodes_file))
    _check_rows(table, meta["vocab_size"], str(episodes_file))
    if meta.get("n_episodes") not in (None, table.num_rows):
        raise RecordingError(f"{meta_file}: field 'n_episodes' is {meta['n_episodes']!r} but {EPISODES_FILE} "
                             f"holds {table.num_rows} episodes")
    return Recording(datasets.Dataset(table), meta, path)


def _check_meta(meta: Any, where: str) -> None:
    if not isinstance(meta, dict):
        raise RecordingError(f"{where}: expected a JSON object, got {type(meta).__name__}")
    for key, kind in META_KEYS.items():
        if key not in meta:
            raise RecordingError(f"{where}: field {key!r} is missing (required: {', '.join(META_KEYS)})")
        value = meta[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise RecordingError(f"{where}: field {key!r} must be a {kind.__name__}, got {value!r}")
    if meta["format"] != FORMAT:
        raise RecordingError(f"{where}: field 'format' is {meta['format']!r}, expected {FORMAT!r}")
    if meta["version"] != VERSION:
        raise RecordingError(f"{where}: field 'version' is {meta['version']!r}; this textgym reads version {VERSION}")
    if meta["vocab_size"] < 1:
        raise RecordingError(f"{where}: field 'vocab_size' must be >= 1, got {meta['vocab_size']!r}")


def _conform(table: pa.Table, where: str) -> pa.Table:
    """The columns of ``SCHEMA`` in its order and types (a lossless cast, e.g. int64 ids, is accepted)."""
    columns = []
    for field in SCHEMA:
        if field.name not in table.column_names:
            raise RecordingError(f"{where}: field {field.name!r} is missing (columns: {', '.join(SCHEMA.names)})")
        column = table.column(field.name)
        try:
            columns.append(column.cast(field.type, safe=True))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            raise RecordingError(f"{where}: field {field.name!r} has type {column.type}, expected {field.type} "
                                 f"({err})") from err
    return pa.Table.from_arrays(columns, schema=SCHEMA)


def _check_rows(table: pa.Table, vocab_size: int, where: str) -> None:
    """Every value present; token ids in [0, vocab_size); per completion as many log-probs of each
    kind as actions, at least one, finite and <= 0; the scalars finite. Names the first bad one."""

    def bad(row: int, name: str, problem: str) -> RecordingError:
        episode = table.column("episode")[row].as_py()
        at = f"row {row}" if name == "episode" or episode is None else f"episode {episode} (row {row})"
        return RecordingError(f"{where}: {at}, field {name!r}: {problem}")

    for name in SCHEMA.names:
        column = table.column(name)
        if column.null_count:
            row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
            raise bad(row, name, "missing value")
    lengths = table.column("completion_ids").combine_chunks().value_lengths().to_numpy()
    if (lengths < 1).any():
        raise bad(int(np.flatnonzero(lengths < 1)[0]), "completion_ids", "empty: an episode has at least one action")
    for name in ("logprobs", "ref_logprobs"):
        other = table.column(name).combine_chunks().value_lengths().to_numpy()
        if (other != lengths).any():
            row = int(np.flatnonzero(other != lengths)[0])
            raise bad(row, name, f"{other[row]} values for {lengths[row]} completion_ids (one per action)")
    for name in ("prompt_ids", "completion_ids"):
        column = table.column(name).combine_chunks()
        values, offsets = column.values.to_numpy(), column.offsets.to_numpy()
        wrong = (values < 0) | (values >= vocab_size)
        if wrong.any():
            at = int(np.flatnonzero(wrong)[0])
            row = int(np.searchsorted(offsets, at, side="right") - 1)
            raise bad(row, name, f"token id {values[at]} outside [0, {vocab_size}) (the recording's vocab_size)")
    for name in ("logprobs", "ref_logprobs"):
        column = table.column(name).combine_chunks()
        values, offsets = column.values.to_numpy(), column.offsets.to_numpy()
        wrong = ~np.isfinite(values) | (values > _LOGPROB_SLACK)
        if wrong.any():
            at = int(np.flatnonzero(wrong)[0])
            row = int(np.searchsorted(offsets, at, side="right") - 1)
            raise bad(row, name, f"{float(values[at])!r} is not a log-probability (finite, <= 0)")
    for name in ("score", "kl", "kl_coef", "reward"):
        values = table.column(name).to_numpy()
        if not np.isfinite(values).all():
            row = int(np.flatnonzero(~np.isfinite(values))[0])
            raise bad(row, name, f"{float(values[row])!r} is not a finite number")
    episodes = table.column("episode").to_numpy()
    _, first = np.unique(episodes, return_index=True)
    if len(first) != len(episodes):
        row = min(set(range(len(episodes))) - set(first.tolist()))
        raise bad(row, "episode", f"{episodes[row]} appears twice: episode numbers are unique")


def jsonable(value: Any) -> Any:
    """``value`` with what JSON cannot hold (models, callables, dtypes, paths) as its ``repr``/``str``:
    a recording's metadata describes the env's settings, it never carries objects."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return jsonable(value.item())
    if isinstance(value, Path):
        return str(value)
    return repr(value)
