"""Device benchmark of impl=cute's router and metadata kernels, with a per-kernel breakdown.

    source .gpu/setup.sh && python3 notes/bench_router.py [--threads 256 512]

For each shape (T 16384, bf16, uniform logits, softmax_topk): route alone, route +
metadata (two launches) timed with moebench.timing.Timer (graph mode: the calls captured
in a CUDA graph, L2 flushed before each replay, median of 100), checked against the
reference first; then torch.profiler's device time of each kernel (mean of 20 calls).
"""

from __future__ import annotations

import argparse

import torch

from moebench import routing as R
from moebench.check import check_metadata
from moebench.impls.cute_impl import CuteImpl
from moebench.kernels import metadata as km
from moebench.logits import make_logits
from moebench.timing import Timer, TimingSpec

SHAPES = [(16384, 256, 8), (16384, 128, 8), (16384, 128, 2), (65536, 256, 8)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[256])
    args = ap.parse_args()
    timer = Timer(TimingSpec("graph", warmup=10, repeats=100), torch.device("cuda"))
    rows = []
    for T, E, k in SHAPES:
        lg = make_logits("uniform", T, E, seed=0, dtype=torch.bfloat16, device="cuda")
        router, cap = R.RouterSpec(), R.CapacitySpec()
        rids, rw = R.route(lg, k, router)
        ref = R.build_metadata(rids, rw, E, cap)
        for nt in args.threads:
            im = CuteImpl()
            orig = km.compile_indices

            def compile_nt(*a, _nt=nt, **kw):  # the indices kernel with `nt` threads
                key = ("indices",) + a + (_nt,)
                return km._cache.get(key, lambda: _build(*a, _nt))

            km.compile_indices = compile_nt
            try:
                ids, w = im.route(lg, k, router)
                check_metadata(im.metadata(ids, w, E, cap), ref)
                t_route = timer.time(lambda: im.route(lg, k, router)).median_us
                t_both = timer.time(lambda: im.metadata(*im.route(lg, k, router), E, cap)).median_us
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for _ in range(20):
                        im.metadata(*im.route(lg, k, router), E, cap)
                    torch.cuda.synchronize()
                per = {}
                for e in prof.key_averages():
                    if e.device_type == torch.autograd.DeviceType.CUDA:
                        per[e.key[:40]] = e.device_time_total / max(e.count, 1)
            finally:
                km.compile_indices = orig
            rows.append((T, E, k, nt, t_route, t_both, per))
    print(f"card: {torch.cuda.get_device_name()}")
    print(f"{'T':>6} {'E':>4} {'k':>2} {'thr':>4} {'route us':>9} {'route+meta us':>14}  kernels (device us each)")
    for T, E, k, nt, a, b, per in rows:
        ks = ", ".join(f"{n}: {v:.1f}" for n, v in per.items())
        print(f"{T:>6} {E:>4} {k:>2} {nt:>4} {a:>9.1f} {b:>14.1f}  {ks}")


def _build(E, S, capacity, padded, renormalize, nt):
    import cutlass.cute as cute
    from cutlass import Float32, Int32

    from moebench.kernels.common import COMPILE_OPTIONS, fake_stream, fake_table, fake_vector
    T, B, Rr = cute.sym_int(), cute.sym_int(), cute.sym_int()
    return cute.compile(
        km.MetadataIndices(E, S, capacity=capacity, padded=padded, renormalize=renormalize, threads=nt),
        fake_table(Int32, T, S), fake_table(Float32, T, S), km.fake_hist(B, E), fake_vector(Int32, E),
        fake_vector(Int32, E + 1), fake_vector(Int32, E), fake_vector(Int32, Rr), fake_table(Int32, T, S),
        fake_table(Float32, T, S), Int32(1), Int32(1), fake_stream(), options=COMPILE_OPTIONS)


if __name__ == "__main__":
    main()
