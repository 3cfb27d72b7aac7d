"""Shared pytest setup: make the top-level scripts importable and keep CPU tests deterministic."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Under pytest-xdist (README's command: -n 2, one process per core) each process keeps to one intra-op thread, so the
# two do not fight over the cores; tests that start their own processes still choose their own threads.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors on a 2-core machine: one intra-op thread avoids OpenMP hand-off and oversubscription costs
    (10-50x slower otherwise when the machine is busy). Test modules opt in with
    pytestmark = pytest.mark.usefixtures("one_thread")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
