"""Tests for textgym.prompts: every prompt source, metadata, shipped data, errors."""

import json

import datasets
import pandas as pd
import pytest

from textgym.prompts import (
    DATA_DIR,
    PromptSet,
    corpus_path,
    load_prompts,
    load_records,
    sentiment_prompts,
)

ROWS = [
    {"prompt": "The film opens with", "reference": "a storm", "label": 1},
    {"prompt": "I did not expect", "reference": "to cry", "label": 0},
    {"prompt": "By the third act,", "reference": "I was asleep", "label": 0},
]
PROMPTS = [r["prompt"] for r in ROWS]


@pytest.fixture(autouse=True)
def _local_hf_cache(tmp_path, monkeypatch):
    """Keep datasets' cache out of the user's home directory."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def _check_table(ps: PromptSet) -> None:
    assert ps.prompts == PROMPTS
    assert ps.metadata == {
        "reference": ["a storm", "to cry", "I was asleep"],
        "label": [1, 0, 0],
    }


# --- PromptSet -------------------------------------------------------------------


def test_promptset_indexing_and_metadata():
    ps = PromptSet(["a", "b", "c"], {"ref": ["x", "y", "z"]})
    assert len(ps) == 3
    assert ps[1] == ("b", {"ref": "y"})
    assert ps[-1] == ("c", {"ref": "z"})
    assert ps.metadata_for([2, 0, 2]) == {"ref": ["z", "x", "z"]}
    assert PromptSet(["a"])[0] == ("a", {})
    assert PromptSet(["a"]).metadata_for([0, 0]) == {}


def test_promptset_copies_and_is_frozen():
    prompts, refs = ["a", "b"], ["x", "y"]
    ps = PromptSet(prompts, {"ref": refs})
    prompts.append("c")
    refs.append("z")
    assert ps.prompts == ["a", "b"] and ps.metadata["ref"] == ["x", "y"]
    with pytest.raises(AttributeError):
        ps.prompts = ["q"]


def test_promptset_errors():
    with pytest.raises(ValueError, match="empty prompt set"):
        PromptSet([])
    with pytest.raises(ValueError, match=r"prompts must be strings.*prompt 1 is int"):
        PromptSet(["a", 5])
    with pytest.raises(ValueError, match=r"metadata column 'ref' has 1 values, expected 2"):
        PromptSet(["a", "b"], {"ref": ["x"]})


# --- in-memory sources -----------------------------------------------------------


def test_promptset_is_returned_as_is():
    ps = PromptSet(["a"])
    assert load_prompts(ps) is ps


@pytest.mark.parametrize("seq", [["a", "b"], ("a", "b")])
def test_list_and_tuple(seq):
    ps = load_prompts(seq)
    assert ps.prompts == ["a", "b"] and ps.metadata == {}


def test_list_of_records():
    _check_table(load_prompts(ROWS))
    ps = load_prompts(ROWS, column="reference")
    assert ps.prompts == ["a storm", "to cry", "I was asleep"]
    assert set(ps.metadata) == {"prompt", "label"}


def test_dataframe():
    _check_table(load_prompts(pd.DataFrame(ROWS)))


def test_datasets_dataset_and_dict():
    ds = datasets.Dataset.from_list(ROWS)
    _check_table(load_prompts(ds))
    dd = datasets.DatasetDict({"train": ds, "test": ds.select([1])})
    _check_table(load_prompts(dd))  # default split is "train"
    test = load_prompts(dd, split="test")
    assert test.prompts == ["I did not expect"] and test.metadata["label"] == [0]


# --- files -----------------------------------------------------------------------


def test_txt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("first prompt\n\n   \n  second prompt  \nthird\n")
    assert load_prompts(path).prompts == ["first prompt", "second prompt", "third"]
    assert load_prompts(str(path)).prompts == ["first prompt", "second prompt", "third"]


def test_jsonl_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    _check_table(load_prompts(path))


def test_jsonl_of_strings(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('"one"\n"two"\n')
    assert load_prompts(path).prompts == ["one", "two"]


def test_json_file_records_columns_and_strings(tmp_path):
    records = tmp_path / "records.json"
    records.write_text(json.dumps(ROWS))
    _check_table(load_prompts(records))
    columns = tmp_path / "columns.json"
    columns.write_text(json.dumps(pd.DataFrame(ROWS).to_dict(orient="list")))
    _check_table(load_prompts(columns))
    strings = tmp_path / "strings.json"
    strings.write_text(json.dumps(["x", "y"]))
    assert load_prompts(strings).prompts == ["x", "y"]


def test_csv_file(tmp_path):
    path = tmp_path / "p.csv"
    pd.DataFrame(ROWS).to_csv(path, index=False)
    _check_table(load_prompts(path))


def test_csv_numeric_prompt_stays_string(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("question,answer\n42,yes\n7,no\n")
    ps = load_prompts(path)
    assert ps.prompts == ["42", "7"] and ps.metadata == {"answer": ["yes", "no"]}


def test_parquet_file(tmp_path):
    path = tmp_path / "p.parquet"
    pd.DataFrame(ROWS).to_parquet(path)
    _check_table(load_prompts(path))


@pytest.mark.parametrize("name", ["text", "query", "question"])
def test_default_prompt_columns(tmp_path, name):
    path = tmp_path / "p.csv"
    pd.DataFrame({"id": [1, 2], name: ["a", "b"]}).to_csv(path, index=False)
    ps = load_prompts(path)
    assert ps.prompts == ["a", "b"] and ps.metadata == {"id": [1, 2]}


def test_prompt_column_preference_order(tmp_path):
    ps = load_prompts([{"question": "q", "text": "t", "prompt": "p"}])
    assert ps.prompts == ["p"] and ps.metadata == {"question": ["q"], "text": ["t"]}


def test_explicit_column(tmp_path):
    path = tmp_path / "p.parquet"
    pd.DataFrame({"review_start": ["a", "b"], "prompt": ["x", "y"]}).to_parquet(path)
    ps = load_prompts(path, column="review_start")
    assert ps.prompts == ["a", "b"] and ps.metadata == {"prompt": ["x", "y"]}


# --- datasets: local directory, hub names, dict specs ----------------------------


@pytest.fixture()
def dataset_dir(tmp_path):
    d = tmp_path / "my_dataset"
    d.mkdir()
    (d / "train.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    (d / "test.jsonl").write_text(json.dumps({"prompt": "held out", "reference": "r", "label": 2}))
    return d


def test_local_dataset_directory(dataset_dir):
    _check_table(load_prompts(str(dataset_dir)))
    test = load_prompts(dataset_dir, split="test")
    assert test.prompts == ["held out"] and test.metadata["reference"] == ["r"]


def test_local_dataset_directory_unknown_split(dataset_dir):
    with pytest.raises(ValueError, match=r"split 'validation'.*my_dataset.*'train', 'test'"):
        load_prompts(dataset_dir, split="validation")


def test_dict_spec(dataset_dir, tmp_path):
    spec = {"dataset": str(dataset_dir), "split": "test", "column": "reference"}
    ps = load_prompts(spec)
    assert ps.prompts == ["r"] and ps.metadata == {"prompt": ["held out"], "label": [2]}
    csv = tmp_path / "p.csv"
    pd.DataFrame(ROWS).to_csv(csv, index=False)
    _check_table(load_prompts({"dataset": csv}))


def test_hub_name_calls_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(name, config=None, *, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    _check_table(load_prompts("someone/movie-reviews"))
    load_prompts({"dataset": "imdb", "config": "plain_text", "split": "test"})
    load_prompts("glue", config="sst2", split="validation")
    assert calls == [
        ("someone/movie-reviews", None, "train"),
        ("imdb", "plain_text", "test"),
        ("glue", "sst2", "validation"),
    ]


# --- load_records: the one reader of prompts, demonstrations and preference data -------------------


def test_load_records_reads_every_kind_of_source(tmp_path, dataset_dir):
    rows = [{"prompt": "p", "chosen": "42", "rejected": ""}]
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text(json.dumps(rows[0]) + "\n")
    csv = tmp_path / "r.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    assert load_records(jsonl) == rows
    assert load_records(csv) == rows  # by default every CSV column is text and an empty cell is ""
    assert load_records({"dataset": str(csv)}) == rows
    assert load_records(pd.DataFrame(rows)) == rows
    assert load_records(datasets.Dataset.from_list(rows)) == rows
    ranked = [{"prompt": "p", "completions": ["a", "b"], "ranks": [1, 0]}]
    pd.DataFrame(ranked).to_parquet(tmp_path / "r.parquet")
    assert load_records(tmp_path / "r.parquet") == ranked  # list columns come back as lists
    assert load_records(["a", "b"]) == ["a", "b"]
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(saved))
    assert load_records(saved) == rows
    assert load_records(dataset_dir, "test") == [{"prompt": "held out", "reference": "r", "label": 2}]
    with pytest.raises(ValueError, match=r"could not load split 'dev' of dataset .*available splits: \['train'\]"):
        load_records(saved, "dev")
    with pytest.raises(FileNotFoundError, match=r"preference file not found: .*nope\.csv"):
        load_records(tmp_path / "nope.csv", what="preference")
    columns = tmp_path / "columns.json"
    columns.write_text('{"prompt": ["a", "b"], "x": ["c"]}')
    with pytest.raises(ValueError, match=r"columns\.json' holds an object of columns.*one length"):
        load_records(columns)


# --- shipped data ----------------------------------------------------------------


def test_sentiment_splits():
    train, test = sentiment_prompts("train"), sentiment_prompts("test")
    assert sentiment_prompts().prompts == train.prompts
    assert (len(train), len(test)) == (200, 50)
    assert len(set(train.prompts)) == 200 and len(set(test.prompts)) == 50
    assert not set(train.prompts) & set(test.prompts)
    for split in ("train", "test"):
        lines = (DATA_DIR / f"sentiment_{split}.txt").read_text().split("\n")
        assert lines[-1] == ""  # file ends with a newline
        for line in lines[:-1]:
            assert line and line == line.strip() and line.isascii()
            assert 6 <= len(line.split()) <= 20


def test_corpus():
    path = corpus_path()
    assert path == DATA_DIR / "corpus.txt" and path.is_file()
    text = path.read_text()
    lines = text.splitlines()
    assert text.isascii() and 600 <= len(lines) <= 900
    assert 40_000 <= len(text.encode()) <= 60_000
    assert all(line.strip() for line in lines)


# --- errors ----------------------------------------------------------------------


def test_error_unknown_sentiment_split():
    with pytest.raises(ValueError, match=r"unknown split 'dev'.*\['train', 'test'\]"):
        sentiment_prompts("dev")


def test_error_unknown_datasetdict_split():
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)})
    with pytest.raises(ValueError, match=r"unknown split 'test'.*available splits: \['train'\]"):
        load_prompts(dd, split="test")


def test_error_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        load_prompts(str(tmp_path / "missing.csv"))
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        load_prompts(tmp_path / "nothing_here")  # a Path is never a hub name


def test_error_unknown_suffix(tmp_path):
    path = tmp_path / "p.tsv"
    path.write_text("prompt\ta\n")
    with pytest.raises(ValueError, match=r"unsupported file suffix '\.tsv'.*\.txt, \.jsonl, \.json, \.csv, \.parquet"):
        load_prompts(path)


def test_error_missing_column(tmp_path):
    path = tmp_path / "p.csv"
    pd.DataFrame(ROWS).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"column 'review' not found.*\['prompt', 'reference', 'label'\]"):
        load_prompts(path, column="review")
    with pytest.raises(ValueError, match=r"no prompt column.*available columns: \['body', 'id'\]"):
        load_prompts([{"body": "b", "id": 1}])
    with pytest.raises(ValueError, match="column='prompt' given, but .txt files have no columns"):
        load_prompts(DATA_DIR / "sentiment_test.txt", column="prompt")


@pytest.mark.parametrize("source", [[], (), pd.DataFrame({"prompt": []})])
def test_error_empty_in_memory(source):
    with pytest.raises(ValueError, match="empty prompt set"):
        load_prompts(source)


@pytest.mark.parametrize(
    "name, content",
    [("p.txt", "\n  \n"), ("p.jsonl", "\n"), ("p.json", "[]"), ("p.csv", ""), ("p2.csv", "prompt,x\n")],
)
def test_error_empty_files(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match="empty prompt set"):
        load_prompts(path)


def test_error_empty_parquet(tmp_path):
    path = tmp_path / "p.parquet"
    pd.DataFrame({"prompt": pd.Series([], dtype=str)}).to_parquet(path)
    with pytest.raises(ValueError, match="empty prompt set"):
        load_prompts(path)


def test_error_non_string_prompts(tmp_path):
    with pytest.raises(ValueError, match=r"prompt 1 is int: 3"):
        load_prompts(["ok", 3])
    path = tmp_path / "p.parquet"
    pd.DataFrame({"prompt": [1.5, 2.5]}).to_parquet(path)
    with pytest.raises(ValueError, match=r"prompt 0 is float: 1\.5"):
        load_prompts(path)


def test_error_bad_spec_and_type():
    with pytest.raises(ValueError,
                       match=r"invalid dataset spec.*'dataset' key.*\['dataset', 'split', 'column', 'config'\]"):
        load_prompts({"name": "imdb"})
    with pytest.raises(ValueError, match="invalid dataset spec"):
        load_prompts({"dataset": "imdb", "splt": "test"})
    with pytest.raises(ValueError, match="empty prompt source"):
        load_prompts("")
    with pytest.raises(TypeError, match="cannot load prompts from int"):
        load_prompts(42)


def test_head_keeps_metadata_aligned():
    ps = PromptSet(["a", "b", "c"], {"references": ["x", "y", "z"]})
    head = ps.head(2)
    assert head.prompts == ["a", "b"] and head.metadata == {"references": ["x", "y"]}
    assert len(ps.head(10)) == 3
