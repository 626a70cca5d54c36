"""GPU-only checks of the metadata build: no host synchronisation, and CUDA-graph capture.

Skipped without a CUDA GPU (conftest); run on the device with ``pytest -m gpu``.
The CPU suite checks the same property by a source scan (tests/test_routing.py).
"""

from __future__ import annotations

import pytest
import torch

from moebench import routing as R

pytestmark = pytest.mark.gpu

CAPS = [
    pytest.param(R.CapacitySpec(), id="dropless"),
    pytest.param(R.CapacitySpec(1.0), id="cf1-position"),
    pytest.param(R.CapacitySpec(1.25, drop_policy="probs"), id="cf1.25-probs"),
    pytest.param(R.CapacitySpec(1.0, pad_to_capacity=True, renormalize_after_drop=True), id="cf1-padded-renorm"),
]


def _inputs(seed, T=2048, E=64, k=8, H=128):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(T, E, device="cuda", generator=g)
    logits[:, 3] += 2.0  # a hot expert, so a capacity drops something
    ids, w = R.route(logits, k, R.RouterSpec(renormalize=True))
    x = torch.randn(T, H, device="cuda", generator=g)
    return ids, w, x


def _same_meta(a, b):
    for f in ("counts", "offsets", "gather_idx", "scatter_idx", "routed_counts"):
        assert torch.equal(getattr(a, f).cpu(), getattr(b, f).cpu()), f
    # renormalised weights divide by a sum whose reduction order differs between devices
    assert torch.allclose(a.weights.cpu(), b.weights.cpu(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("cap", CAPS)
def test_metadata_pack_combine_do_not_sync(cap):
    ids, w, x = _inputs(0)
    E = 64
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        meta = R.build_metadata(ids, w, E, cap)
        out = R.combine(R.pack(x, meta), meta)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    ref = R.build_metadata(ids.cpu(), w.cpu(), E, cap)
    _same_meta(meta, ref)
    assert torch.allclose(out.cpu(), R.combine(R.pack(x.cpu(), ref), ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cap", CAPS)
def test_metadata_pack_combine_capture_in_a_cuda_graph(cap):
    E = 64
    ids, w, x = _inputs(1)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up off the default stream, as CUDA graphs ask
        for _ in range(2):
            R.combine(R.pack(x, R.build_metadata(ids, w, E, cap)), R.build_metadata(ids, w, E, cap))
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        meta = R.build_metadata(ids, w, E, cap)
        out = R.combine(R.pack(x, meta), meta)
    ids2, w2, x2 = _inputs(2)
    ids.copy_(ids2)
    w.copy_(w2)
    x.copy_(x2)
    graph.replay()
    torch.cuda.synchronize()
    ref = R.build_metadata(ids2.cpu(), w2.cpu(), E, cap)
    _same_meta(meta, ref)
    assert torch.allclose(out.cpu(), R.combine(R.pack(x2.cpu(), ref), ref), rtol=1e-5, atol=1e-5)
