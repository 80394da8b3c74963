"""Shared fixtures: one prepared copy of the embedded default corpus per test session."""
import os

import pytest


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
