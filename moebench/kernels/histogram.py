"""The per-tile expert histogram the metadata kernel starts from (``moebench.kernels.metadata``).

The tokens are cut into *tiles* (``tile`` tokens, a runtime value, at most ~TARGET_TILES
tiles); ``hist[b, e]`` (int16, rows padded to ``hist_cols(E)``, a multiple of 8: whole 16-byte
vectors) counts the assignments of tile ``b`` to expert ``e``. The router kernel writes it as
a by-product (``moebench.kernels.router``); :class:`ExpertHistogram` computes it from ids that
came from elsewhere, one CTA per tile counting in shared memory.
"""

from __future__ import annotations

import cuda.bindings.driver as cuda
import torch

import cutlass
import cutlass.cute as cute
from cutlass import Int16, Int32

from moebench.kernels.common import COMPILE_OPTIONS, CompileCache, fake_stream, fake_table

#: the tokens are cut into about this many tiles (one CTA each in both launches)
TARGET_TILES = 128
#: most tokens per tile: a tile's count of one expert fits the int16 histogram
MAX_TILE = 16384
_cache = CompileCache()


class ExpertHistogram:
    """ids [T, S] -> hist [tiles, hist_cols(E)] int16: assignments of each tile of ``tile``
    tokens per expert (the padding columns 0)."""

    def __init__(self, E: int, S: int, threads: int = 256):
        self.E, self.S, self.threads = E, S, threads

    @cute.jit
    def __call__(self, mIds: cute.Tensor, mHist: cute.Tensor, tile: Int32, stream: cuda.CUstream):
        self.kernel(mIds, mHist, tile).launch(grid=[mHist.shape[0], 1, 1], block=[self.threads, 1, 1],
                                              stream=stream)

    @cute.kernel
    def kernel(self, mIds: cute.Tensor, mHist: cute.Tensor, tile: Int32):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        smem = cutlass.memory.SmemAllocator()
        sHist = smem.allocate_tensor(Int32, cute.make_layout(hist_cols(self.E)), byte_alignment=16)
        clear_hist(sHist, tidx, self.threads)
        cute.arch.sync_threads()
        self.count_tile(mIds, tile, bidx, tidx, sHist)
        cute.arch.sync_threads()
        store_hist_row(mHist, bidx, sHist, tidx, self.threads)

    @cute.jit
    def count_tile(self, mIds: cute.Tensor, tile: Int32, b: Int32, tidx: Int32, sHist: cute.Tensor):
        """Add tile ``b``'s assignments to the CTA's counts ``sHist`` (cleared and synced by the
        caller, who syncs after)."""
        S = self.S
        t0 = b * tile
        n = (cutlass.min(t0 + tile, mIds.shape[0]) - t0) * S
        for a in cutlass.range(tidx, n, self.threads, unroll=1):  # (token, slot) pairs of the tile
            tl = a // S
            e = mIds[t0 + tl, a - tl * S]
            if e >= 0:
                cute.arch.atomic_add(sHist.iterator + e, Int32(1), scope="cta")


@cute.jit
def clear_hist(sHist: cute.Tensor, tidx: Int32, threads: cutlass.Constexpr[int]):
    """Zero a CTA's int32 expert counts (the caller syncs after)."""
    for e in cutlass.range(tidx, cute.size(sHist), threads, unroll=1):
        sHist[e] = 0


@cute.jit
def store_hist_row(mHist: cute.Tensor, b: Int32, sHist: cute.Tensor, tidx: Int32, threads: cutlass.Constexpr[int]):
    """Row ``b`` of the int16 histogram from a CTA's int32 counts (all ``hist_cols`` of them)."""
    for e in cutlass.range(tidx, mHist.shape[1], threads, unroll=1):
        mHist[b, e] = sHist[e].to(Int16)


def hist_cols(E: int) -> int:
    """Columns of the int16 histogram: E rounded up to 8 (rows of whole 16-byte vectors)."""
    return -(-E // 8) * 8


def fake_hist(tiles, E: int):
    """hist [tiles, hist_cols(E)] int16 as its writers see it: contiguous, 16-byte aligned."""
    cols = hist_cols(E)
    return cute.runtime.make_fake_tensor(Int16, (tiles, cols), stride=(cols, 1), assumed_align=16)


def fake_hist_words(tiles, E: int):
    """The same histogram as the metadata kernel reads it: int32 words of two counts."""
    w = hist_cols(E) // 2
    return cute.runtime.make_fake_tensor(Int32, (tiles, w), stride=(w, 1), assumed_align=16)


def new_hist(T: int, E: int, tile: int, device) -> torch.Tensor:
    return torch.empty(num_tiles(T, tile), hist_cols(E), dtype=torch.int16, device=device)


def tile_size(T: int) -> int:
    """Tokens per tile: a multiple of 32 giving at most ~TARGET_TILES tiles (more above
    TARGET_TILES * MAX_TILE tokens)."""
    return 32 * max(1, min(-(-T // (32 * TARGET_TILES)), MAX_TILE // 32))


def num_tiles(T: int, tile: int) -> int:
    return max(1, -(-T // tile))


def compile_histogram(E: int, S: int):
    def build():
        T, B = cute.sym_int(), cute.sym_int()
        return cute.compile(ExpertHistogram(E, S), fake_table(Int32, T, S), fake_hist(B, E), Int32(1),
                            fake_stream(), options=COMPILE_OPTIONS)

    return _cache.get(("hist", E, S), build)


def histogram(ids: torch.Tensor, E: int, tile: int) -> torch.Tensor:
    """hist [tiles, hist_cols(E)] int16 of contiguous int32 ``ids [T, S]``."""
    T, S = ids.shape
    hist = new_hist(T, E, tile, ids.device)
    if T == 0:
        return hist.zero_()
    compile_histogram(E, S)(ids, hist, tile)
    return hist
