"""Shared test fixtures."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """One torch thread, restored afterwards: tiny matrices run fastest on one, and timings stay stable on a
    shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
