"""Shared fixtures: one prepared copy of the embedded default corpus per test session."""
import os

import pytest
import torch

# One intra-op thread: the tests' tensors are tiny, so a second thread buys little, and OpenMP's spinning
# workers slow every op by 10-100x whenever the cores are shared (with spawned ranks, or with other jobs).
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory):
    """Point the default-data cache at a session folder, so tests never write into the user's cache."""
    path = tmp_path_factory.mktemp("data-cache")
    os.environ["LLM_DATA_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def stdlib_data(data_cache):
    import data
    return data.ensure_default_data("bytes")
