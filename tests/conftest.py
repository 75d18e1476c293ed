"""Shared test setup: make the helpers in this folder importable and keep runs deterministic."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.manual_seed(0)


@pytest.fixture
def one_torch_thread():
    """One torch thread for a test module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): tiny models
    gain nothing from threads, and on a busy machine threads waiting for each other slow every op tenfold; one thread
    also keeps the in-process runs comparable with the single-threaded subprocesses."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
