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


@pytest.fixture
def no_model(monkeypatch):
    """Building a model (a student or a teacher) in train.py fails the test: argument checks must come first."""
    import train  # the repository's train.py, imported by the test module that asks for this fixture

    def refuse(*args, **kwargs):
        raise AssertionError('a model was built before the arguments were checked')
    monkeypatch.setattr(train, 'create_student', refuse)
    monkeypatch.setattr(train.timm, 'create_model', refuse)
