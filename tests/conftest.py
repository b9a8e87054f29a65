import os

# Tests never need the Hugging Face hub; fail fast instead of waiting on an unreachable network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

import textgym  # noqa: E402,F401  (registers the envs)
from textgym import models  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir():
    return models.tiny_path()


@pytest.fixture()
def tiny():
    """A fresh (model, tokenizer) of textgym/tiny: tests may train or modify it."""
    torch.manual_seed(0)
    return models.load(models.TINY)
