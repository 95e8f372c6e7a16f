"""Shared test configuration: GPU tests carry the `cuda` marker and skip cleanly without a GPU."""

import pytest
import torch

# The CPU suite runs tiny models whose ops are far too small to gain from intra-op threads; on a loaded 2-core CI
# machine OpenMP contention made them 10-100x slower. One thread keeps the suite fast and timing-stable.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
