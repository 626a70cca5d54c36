import os

import pytest
import torch

# Without a GPU, CuTeDSL targets sm_100: make CPU compile tests build for Hopper.
if not torch.cuda.is_available():
    os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on the device)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every tensor allocated with ``torch.empty`` (the kernels' host code, say) starts as poison."""
    from moebench.check import poison

    real_empty = torch.empty

    def empty(*size, **kw):
        return poison(real_empty(*size, **kw))

    monkeypatch.setattr(torch, "empty", empty)
