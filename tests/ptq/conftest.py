"""The post-training tests run many tiny ops (AdaRound steps on small layers): one intra-op thread
keeps them from waiting on each other on a shared machine (about ten times faster on 2 busy cores)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
