import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(min(2, torch.get_num_threads()))

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _threads_kept():
    """A test that sets torch's thread count (the benchmarks' ``--threads``) does not leave it
    set: later tests compare runs in this process with runs in child processes on two threads
    (float sums in another order differ at 1e-6)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_master_port(monkeypatch):
    """Lightning writes MASTER_PORT into os.environ on first use and reuses it; a later
    ``ddp_spawn`` test in the same pytest process can then hit EADDRINUSE. Let each test pick a
    free port."""
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
