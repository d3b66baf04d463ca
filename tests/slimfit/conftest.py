"""Memory-efficient fine-tuning tests (dynamic freezing, lean autograd, memory budget)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """These tests use tiny tensors, where a second thread adds only synchronisation; on a shared,
    busy CPU, OpenMP threads waiting on each other made them 20 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
