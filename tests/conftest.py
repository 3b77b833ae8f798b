import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _monitor_cache(tmp_path_factory, monkeypatch):
    """The CPU matmul peak cache (mimar.monitor.efficiency): a per-session folder, never
    the user's ~/.cache/mimar."""
    monkeypatch.setenv("MIMAR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "mimar-cache"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
