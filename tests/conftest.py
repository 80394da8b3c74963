"""Shared fixtures: one prepared copy of the embedded default corpus per test session.

The suite runs on the CPU, also on a GPU machine: CUDA is hidden before torch is first imported, so
that "auto" devices pick the CPU and forked gloo workers never meet a CUDA context their parent
created (CUDA cannot be used in a process forked after it was initialised). The GPU tests live apart
in tests/gpu, collected only with LLM_GPU_TESTS=1 (`make gpu-check`); they start their processes
fresh (torchrun), never by fork.
"""
import os

GPU_TESTS = os.environ.get("LLM_GPU_TESTS") == "1"
if not GPU_TESTS:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
collect_ignore = [] if GPU_TESTS else ["gpu"]

import pytest  # noqa: E402  (after CUDA is hidden)
import torch  # noqa: E402

from tests.cuda_rules import strict_scaled_mm  # noqa: E402

# One intra-op thread: the tests' tensors are tiny, so a second thread buys little, and OpenMP's
# spinning workers slow every op 10-100x whenever the cores are shared (spawned ranks, other jobs).
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory):
    """Point the default-data cache at a session folder: tests never write into the user's cache."""
    path = tmp_path_factory.mktemp("data-cache")
    os.environ["LLM_DATA_CACHE"] = str(path)
    return path


@pytest.fixture(autouse=True)
def fp8_matmuls_under_cudas_rules(monkeypatch):
    """Every FP8 matmul of every test (and of the ranks it forks) raises where CUDA's would: the CPU
    kernel takes any shape and layout, cuBLASLt does not (tests/cuda_rules.py)."""
    monkeypatch.setattr(torch, "_scaled_mm", strict_scaled_mm)


@pytest.fixture(scope="session")
def stdlib_data(data_cache):
    import data
    return data.ensure_default_data("bytes")
