"""Shared test set-up: offline, a private cache per session, tiny thread counts."""

import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton kernels run in its interpreter on CPU tensors (tests/kernels); it must be set before anything imports
# triton (transformers may, while other tests are collected). TRITON_INTERPRET=0 runs them compiled on a GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(1)


@pytest.fixture
def tiny_text(tmp_path):
    """A small English text file (plain bytes for the byte-level tiny models)."""
    path = tmp_path / "tiny.txt"
    line = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. "
    path.write_text(line * 40)
    return path


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run a console command in-process: cli("validate", "--quiet") → (exit code, stdout, stderr).

    `entry` is the console script's function (default `cimattn`'s), `prog` its argv[0].
    """

    def run(*args, entry=None, prog="cimattn"):
        from cimattn.cli import main

        monkeypatch.setattr(sys, "argv", [prog, *map(str, args)])
        code = 0
        try:
            (entry or main)()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
