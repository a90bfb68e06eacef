import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(min(2, torch.get_num_threads()))

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_master_port(monkeypatch):
    """Lightning writes MASTER_PORT into os.environ on first use and reuses it; a later
    ``ddp_spawn`` test in the same pytest process can then hit EADDRINUSE. Let each test pick a
    free port."""
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
