import sys
from pathlib import Path

import pytest
import torch

# Make the tests' helper modules (oracle.py, launcher.py, ...) importable as plain modules.
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and a busy 2-core machine makes two threads much slower.

    Modules that train tiny models use it for every test: ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
