"""CuTeDSL kernels for MoE routing (``impl=cute``), written for Hopper (sm_90a).

One module per kernel:

* :mod:`moebench.kernels.pack`    -- tokens ``x [T, H]`` to expert-contiguous rows ``[R, H]``
  (gather: each packed row reads its token; scatter: each token is read once and written
  to its slots' rows).
* :mod:`moebench.kernels.combine` -- packed rows ``y [R, H]`` back to tokens ``[T, H]``:
  gate-weighted sum over a token's slots, fp32 accumulation, no atomics.
* :mod:`moebench.kernels.common`  -- the row tiling shared by both, dtype maps, the
  compile cache and the host-side argument checks.

Nothing here imports ``cutlass`` at package import time: ``import moebench`` stays cheap on
machines without CuTeDSL or a GPU. The kernel modules import it when first used.
"""
