"""Shared test set-up: offline, a private cache per session, tiny thread counts."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)


@pytest.fixture
def tiny_text(tmp_path):
    """A small English text file (plain bytes for the byte-level tiny models)."""
    path = tmp_path / "tiny.txt"
    line = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. "
    path.write_text(line * 40)
    return path
