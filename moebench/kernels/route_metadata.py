"""Logits -> full routing metadata in one launch: the router's tile (``router.TopKRouter``),
a grid-wide barrier, then the metadata of the same tile (``metadata.MetadataIndices``).

Two launches (router, then metadata) pay a kernel launch and the second kernel's ramp between
them; here every CTA routes its tile, writes its ids, weights and histogram row, waits at a
grid barrier until every tile has done so, and goes on with phases 1-4 of the metadata on
the same tile. The grid is launched *cooperative*, so all its CTAs are resident at once (the
launch fails rather than deadlock when they cannot be), with at most one tile per SM.

The barrier state is two int32 words in global memory (arrivals, generation) that the
kernel leaves as it found them: the last CTA to arrive resets the arrivals and bumps the
generation the others wait on. A state belongs to one stream (``barrier_state``), so two
launches that could overlap never share one; a CUDA graph keeps the state it was captured
with (a graph is never replayed concurrently with itself).
"""

from __future__ import annotations

import cuda.bindings.driver as cuda

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32

from moebench.kernels.metadata import MetadataIndices
from moebench.kernels.router import TopKRouter


@cute.jit
def grid_barrier(mBar: cute.Tensor, ctas: Int32):
    """All ``ctas`` CTAs of the grid meet here (every thread of each calls it); the global
    writes before it are visible to every CTA after it."""
    tidx, _, _ = cute.arch.thread_idx()
    cute.arch.sync_threads()
    if tidx == 0:
        cute.arch.fence_acq_rel_gpu()
        gen = cute.arch.load(mBar.iterator + 1, Int32, sem="acquire", scope="gpu")
        arrived = cute.arch.atomic_add(mBar.iterator, Int32(1), sem="acq_rel", scope="gpu")
        if arrived == ctas - 1:  # the last one: reset the arrivals, open the barrier
            cute.arch.atomic_exch(mBar.iterator, Int32(0), sem="relaxed", scope="gpu")
            cute.arch.atomic_add(mBar.iterator + 1, Int32(1), sem="release", scope="gpu")
        else:
            while cute.arch.load(mBar.iterator + 1, Int32, sem="acquire", scope="gpu") == gen:
                pass
        cute.arch.fence_acq_rel_gpu()
    cute.arch.sync_threads()


class RouteMetadata:
    """logits [T, E] -> ids, weights, hist (as TopKRouter) and counts, offsets, routed counts,
    gather and scatter indices, kept weights (as MetadataIndices), one cooperative launch."""

    def __init__(self, router: TopKRouter, meta: MetadataIndices):
        assert router.threads == meta.threads and router.E == meta.E and router.k == meta.S
        self.router, self.meta = router, meta

    @cute.jit
    def __call__(self, mLogits: cute.Tensor, mBias: cute.Tensor, mIds: cute.Tensor, mWeights: cute.Tensor,
                 mHist: cute.Tensor, mCounts: cute.Tensor, mOffsets: cute.Tensor, mRouted: cute.Tensor,
                 mGather: cute.Tensor, mScatter: cute.Tensor, mKeptW: cute.Tensor, mBar: cute.Tensor, tile: Int32,
                 cap: Int32, stream: cuda.CUstream):
        assert mLogits.element_type == self.router.dtype
        self.kernel(mLogits, mBias, mIds, mWeights, mHist, mCounts, mOffsets, mRouted, mGather, mScatter, mKeptW,
                    mBar, tile, cap).launch(grid=[mHist.shape[0], 1, 1], block=[self.router.threads, 1, 1],
                                            stream=stream, cooperative=True)

    @cute.kernel
    def kernel(self, mLogits: cute.Tensor, mBias: cute.Tensor, mIds: cute.Tensor, mWeights: cute.Tensor,
               mHist: cute.Tensor, mCounts: cute.Tensor, mOffsets: cute.Tensor, mRouted: cute.Tensor,
               mGather: cute.Tensor, mScatter: cute.Tensor, mKeptW: cute.Tensor, mBar: cute.Tensor, tile: Int32,
               cap: Int32):
        smem = cutlass.memory.SmemAllocator()
        self.router.route_tile(smem, mLogits, mBias, mIds, mWeights, mHist, tile)
        grid_barrier(mBar, mHist.shape[0])
        self.meta.tile_indices(smem, mIds, mWeights, mHist, mCounts, mOffsets, mRouted, mGather, mScatter, mKeptW,
                               tile, cap)


# --------------------------------------------------------------------------------------
# Compile (once per static key) and launch
# --------------------------------------------------------------------------------------

import torch  # noqa: E402

from moebench.kernels.common import (COMPILE_OPTIONS, TORCH_TO_CUTE, CompileCache, fake_stream, fake_table,  # noqa: E402
                                     fake_vector)
from moebench.kernels.metadata import fake_hist, num_tiles, tile_size  # noqa: E402
from moebench.kernels.router import aligned_logits, bias_vector, fake_logits  # noqa: E402

_cache = CompileCache()
_barriers: dict = {}


def barrier_state(device: torch.device) -> torch.Tensor:
    """The grid barrier's two int32 words for the current stream of ``device`` (zeroed once)."""
    stream = torch.cuda.current_stream(device)
    key = (device, stream.cuda_stream)
    st = _barriers.get(key)
    if st is None:
        st = _barriers[key] = torch.zeros(2, dtype=torch.int32, device=device)
    return st


def max_tiles(device: torch.device) -> int:
    """The most tiles one cooperative launch may have: one CTA (512 threads, ~128 registers
    each) per SM."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def compile_route_metadata(dtype, E: int, k: int, capacity: bool, padded: bool, renormalize_kept: bool, **static):
    """The compiled one-launch kernel; ``capacity``, ``padded``, ``renormalize_kept`` as
    MetadataIndices (``capacity``, ``padded``, ``renormalize``), ``static`` as TopKRouter."""
    key = (dtype, E, k, capacity, padded, renormalize_kept, tuple(sorted(static.items())))

    def build():
        T, B, R = cute.sym_int(), cute.sym_int(), cute.sym_int()
        op = RouteMetadata(TopKRouter(dtype, E, k, **static),
                           MetadataIndices(E, k, capacity=capacity, padded=padded, renormalize=renormalize_kept))
        return cute.compile(op, fake_logits(dtype, T, E), fake_vector(Float32, E), fake_table(Int32, T, k),
                            fake_table(Float32, T, k), fake_hist(B, E), fake_vector(Int32, E), fake_vector(Int32, E + 1),
                            fake_vector(Int32, E), fake_vector(Int32, R), fake_table(Int32, T, k),
                            fake_table(Float32, T, k), fake_vector(Int32, 2), Int32(1), Int32(1), fake_stream(),
                            options=COMPILE_OPTIONS)

    return _cache.get(key, build)


def route_metadata(logits: torch.Tensor, k: int, bias: torch.Tensor | None, num_rows: int,
                   capacity: int | None = None, padded: bool = False, renormalize_kept: bool = False, **static):
    """ids, weights, counts, offsets, routed counts, gather, scatter, kept weights from
    contiguous ``logits`` [T, E] (T >= 1, a tile per SM at most: the caller checks
    ``num_tiles(T, tile_size(T)) <= max_tiles``); ``static`` as TopKRouter."""
    T, E = logits.shape
    dev = logits.device
    tile = tile_size(T)
    nb = num_tiles(T, tile)
    ids = torch.empty(T, k, dtype=torch.int32, device=dev)
    weights = torch.empty(T, k, dtype=torch.float32, device=dev)
    hist = torch.empty(nb, E, dtype=torch.int32, device=dev)
    counts = torch.empty(E, dtype=torch.int32, device=dev)
    offsets = torch.empty(E + 1, dtype=torch.int32, device=dev)
    routed = torch.empty(E, dtype=torch.int32, device=dev)
    gather = torch.empty(num_rows, dtype=torch.int32, device=dev)
    scatter = torch.empty(T, k, dtype=torch.int32, device=dev)
    kept_w = weights if capacity is None else torch.empty(T, k, dtype=torch.float32, device=dev)
    fn = compile_route_metadata(TORCH_TO_CUTE[logits.dtype], E, k, capacity is not None, padded,
                                renormalize_kept and capacity is not None, **dict(static, has_bias=bias is not None))
    fn(aligned_logits(logits), bias_vector(bias, E, dev), ids, weights, hist, counts, offsets, routed, gather, scatter, kept_w, barrier_state(dev),
       tile, capacity if capacity is not None else 0)
    return ids, weights, counts, offsets, routed, gather, scatter, kept_w
