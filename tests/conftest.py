"""Fixtures shared by several test modules."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread is faster, and much faster on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def plain_argv(monkeypatch):
    """LightningCLI warns when both sys.argv (here: pytest's) and args are given."""
    monkeypatch.setattr("sys.argv", ["cli.py"])
