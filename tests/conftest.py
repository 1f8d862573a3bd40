"""Test-wide settings: never touch the network; deterministic, small thread count."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests: on a shared 2-core machine two OpenMP threads spin-wait for a busy
    core (measured 6x slower), and tiny forward passes gain nothing from threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
