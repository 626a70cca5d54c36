"""Device benchmark of impl=cute's router and metadata kernels: variants, per-kernel times.

    source .gpu/setup.sh && python3 notes/bench_router.py [--quick]

For each shape (bf16, uniform logits, softmax_topk, dropless) and each variant of the route
kernel (experts per lane, threads, prefetch), checked against the reference first (ids in
order, the full metadata), then timed two ways:

* ``rot``: moebench's ``timing=rotated`` timer (``moebench.timing``): route + metadata over
  enough different logits buffers that every call reads its logits from DRAM, captured in
  one CUDA graph, per call, median of 50 replays: one call back to back with others,
  without the graph-launch latency of one replay.
* ``prof``: torch.profiler's device time of each kernel (mean of 20 calls).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from moebench import routing as R
from moebench.check import check_metadata
from moebench.kernels import metadata as km
from moebench.kernels import router as kr
from moebench.logits import make_logits
from moebench.timing import Timer, TimingSpec, rotations

SHAPES = [(16384, 256, 8), (16384, 128, 8), (16384, 128, 2), (65536, 256, 8), (16384, 8, 2)]
ROUTE_VARIANTS = {
    "v32t512": dict(prefetch=False),
    "v32t512p": dict(prefetch=True),
    "v16t1024p": dict(max_per_lane=16, threads=1024, prefetch=True),
}


def chain(lg, k, rv, fn_idx, outs):
    """route + metadata into preallocated outputs (graph-capturable)."""
    ids, w, hist, tile = kr.route(lg, k, **rv)
    counts, offsets, routed, gather, scatter = outs
    fn_idx(ids, w, hist.view(torch.int32), counts, offsets, routed, gather, scatter, w, tile, 0)
    return ids, w, counts, offsets, routed, gather, scatter


def profile(fn, n=20):
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    per = {}
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            name = "route" if "Router" in e.key else "meta" if "Metadata" in e.key else e.key[:24]
            per[name] = e.device_time_total / max(e.count, 1)
    return per


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="the first shape only")
    args = ap.parse_args()
    dev = torch.device("cuda")
    timer = Timer(TimingSpec("rotated", warmup=1, repeats=50), dev)
    rows = []
    for T, E, k in SHAPES[:1] if args.quick else SHAPES:
        nrot = rotations(T * E * 2)
        lgs = [make_logits("uniform", T, E, seed=s, dtype=torch.bfloat16, device=dev) for s in range(nrot)]
        router, cap = R.RouterSpec(), R.CapacitySpec()
        rids, rw = R.route(lgs[0], k, router)
        ref = R.build_metadata(rids, rw, E, cap)
        outs = [tuple(torch.empty(n, dtype=torch.int32, device=dev) for n in (E, E + 1, E, T * k)) +
                (torch.empty(T, k, dtype=torch.int32, device=dev),) for _ in range(nrot)]
        fi = km.compile_indices(E, k, False, False, False)
        for rname, rv in ROUTE_VARIANTS.items():
            row = dict(T=T, E=E, k=k, route=rname, nrot=nrot)
            try:
                for o in outs[0]:
                    o.fill_(-7)
                ids, w, counts, offsets, routed, gather, scatter = chain(lgs[0], k, rv, fi, outs[0])
                assert torch.equal(ids, rids.to(torch.int32)), "ids differ from the reference"
                torch.testing.assert_close(w, rw.float(), atol=1e-5, rtol=1e-5)
                got = R.RoutingMetadata(num_experts=E, counts=counts, offsets=offsets, gather_idx=gather,
                                        scatter_idx=scatter, weights=w, routed_counts=routed)
                check_metadata(got, ref)
                row["rot_us"] = timer.time(None, rotated=lambda: [
                    lambda i=i: chain(lgs[i], k, rv, fi, outs[i]) for i in range(nrot)]).median_us
                row["route_rot_us"] = timer.time(None, rotated=lambda: [
                    lambda i=i: kr.route(lgs[i], k, **rv) for i in range(nrot)]).median_us
                row.update({f"prof_{n}": v for n, v in profile(lambda: chain(lgs[0], k, rv, fi, outs[0])).items()})
                row["status"] = "ok"
            except Exception as e:  # noqa: BLE001 -- one variant failing must not end the sweep
                row["status"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            print(json.dumps(row), flush=True)
            rows.append(row)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "bench_router.json"), "w") as f:
            json.dump(rows, f, indent=1)
    print(f"card: {torch.cuda.get_device_name()}")
    print(f"{'T':>6} {'E':>4} {'k':>2} {'route':>10} {'route rot':>9} {'both rot':>8} "
          f"{'route prof':>10} {'meta prof':>9}  status")
    for r in rows:
        f = lambda key: f"{r[key]:.1f}" if key in r else "-"  # noqa: E731
        print(f"{r['T']:>6} {r['E']:>4} {r['k']:>2} {r['route']:>10} {f('route_rot_us'):>9} "
              f"{f('rot_us'):>8} {f('prof_route'):>10} {f('prof_meta'):>9}  {r['status'][:60]}")


if __name__ == "__main__":
    main()
