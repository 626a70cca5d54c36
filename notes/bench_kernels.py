"""Check and time the impl=cute kernels against a same-call device copy (notes/kernels.md).

    source .gpu/setup.sh && PYTHONUNBUFFERED=1 python notes/bench_kernels.py [--out DIR] [--sections ...]

Sections:
  shapes    bf16, T=16384, uniform logits, softmax_topk, dropless, at seed / deepseek_v3 /
            qwen3_30b_a3b: every pack and combine variant is checked against the reference
            (pack bit-exact, combine within tolerance), then timed.
  capacity  seed under capacity_factor=1.0 (with and without pad_to_capacity): scatter+zero
            against gather pack, and combine.
  hw        what the memory does with pack's mix of reads and writes: write-only, read-only,
            and 1-read-k-writes duplication by torch and by the scatter kernel with adjacent
            destination rows.

Timing is moebench.timing.Timer (CUDA events, L2 flushed between repeats, median of 50).
Bytes are the harness's strict bytes: pack (T + R)·H·b, combine (kept + T)·H·b. The copy is
``dst.copy_(src)`` of 1 GiB (bytes read + written), measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from moebench import routing as R
from moebench.check import assert_close, assert_equal, poison
from moebench.logits import make_logits
from moebench.timing import Timer, TimingSpec, copy_bandwidth_GBps

SHAPES = {  # name: (T, H, E, k)
    "seed": (16384, 4096, 128, 2),
    "deepseek_v3": (16384, 7168, 256, 8),
    "qwen3_30b_a3b": (16384, 2048, 128, 8),
}
DEFAULT = {"threads": 256, "hint": "none"}

#: pack variants besides the implementation's default (``auto``, measured first)
PACK_VARIANTS = [
    {"mode": "scatter", "per_slot": False, **DEFAULT},
    {"mode": "scatter", "per_slot": False, "threads": 512, "hint": "none"},
    {"mode": "scatter", "per_slot": True, **DEFAULT},
    {"mode": "scatter", "per_slot": True, "threads": 1024, "hint": "none"},
    {"mode": "scatter", "per_slot": False, **DEFAULT, "max_iters": 2},
    {"mode": "scatter", "per_slot": True, **DEFAULT, "max_iters": 2},
    {"mode": "scatter", "per_slot": True, "threads": 256, "hint": "stream"},
    {"mode": "gather", **DEFAULT},
]
#: combine variants (the first is the implementation's default)
COMBINE_VARIANTS = [
    dict(DEFAULT),
    {"threads": 128, "hint": "none"},
    {**DEFAULT, "max_iters": 1},
    {"threads": 256, "hint": "stream"},
]


def label(v: dict) -> str:
    return ",".join(f"{k}={v[k]}" for k in v)


class Bench:
    def __init__(self, dev):
        self.dev = dev
        self.name = torch.cuda.get_device_name(dev)
        self.timer = Timer(TimingSpec("events", warmup=5, repeats=50), dev)
        self.copy = copy_bandwidth_GBps(dev)
        self.rows = []
        print(f"device: {self.name}; copy {self.copy:.0f} GB/s (1 GiB, read+write)", flush=True)

    def record(self, shape, kernel, variant, fn, nbytes, **extra):
        t = self.timer.time(fn)
        gbs = nbytes / (t.median_us * 1e-6) / 1e9
        row = {"device": self.name, "shape": shape, "kernel": kernel, "variant": variant, "us": t.median_us,
               "p10_us": t.p10_us, "p90_us": t.p90_us, "GBps": gbs, "pct_copy": 100 * gbs / self.copy,
               "copy_GBps": self.copy, **extra}
        self.rows.append(row)
        print(f"  {shape:18s} {kernel:8s} {variant:48s} {t.median_us:9.1f} us {gbs:7.0f} GB/s "
              f"{row['pct_copy']:5.1f} %", flush=True)

    def checked(self, shape, kernel, variant, fn, out, ref, nbytes, exact):
        """Run once on a poisoned output, check, then time."""
        t0 = time.perf_counter()
        poison(out)
        fn()
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        try:
            if exact:
                assert_equal(out, ref, f"{kernel} rows")
            else:
                assert_close(out, ref, f"{kernel} rows", ref.dtype)
        except Exception as e:  # noqa: BLE001
            print(f"  {shape} {kernel} {variant} MISMATCH: {e}", flush=True)
            return
        self.record(shape, kernel, variant, fn, nbytes, first_call_s=first)

    # -- sections ---------------------------------------------------------------------------
    def routing_case(self, shape, cap, pack_variants, combine_variants):
        from moebench.kernels import combine as kc
        from moebench.kernels import pack as kp

        T, H, E, k = SHAPES[shape.split("/")[0]]
        dev, dt = self.dev, torch.bfloat16
        lg = make_logits("uniform", T, E, seed=17, device=dev)
        ids, w = R.route(lg, k, R.RouterSpec())
        meta = R.build_metadata(ids, w, E, cap, T * k)
        g = torch.Generator(device=dev).manual_seed(18)
        x = torch.randn(T, H, generator=g, device=dev).to(dt)
        y = torch.randn(meta.num_rows, H, generator=g, device=dev).to(dt)
        ref_p, ref_c = R.pack(x, meta), R.combine(y, meta)
        kept = int((meta.scatter_idx >= 0).sum())
        b = x.element_size()
        pack_bytes, comb_bytes = (T + meta.num_rows) * H * b, (kept + T) * H * b
        out_p, out_c = torch.empty_like(ref_p), torch.empty_like(ref_c)
        self.record(shape, "pack", "torch", lambda: R.pack(x, meta, out=out_p), pack_bytes)
        self.record(shape, "combine", "torch", lambda: R.combine(y, meta, out=out_c), comb_bytes)
        auto = {"mode": "scatter", **kp.scatter_tuning(kp.TORCH_TO_CUTE[dt], H), **DEFAULT}
        for v in [auto] + [p for p in pack_variants if p != auto]:
            tune = {key: val for key, val in v.items() if key != "mode"}
            fn = (lambda mode=v["mode"], tune=tune: kp.pack(x, meta.gather_idx, meta.scatter_idx, out_p, mode=mode,
                                                           zero_empty=meta.may_have_empty_rows, **tune))
            self.checked(shape, "pack", label(v), fn, out_p, ref_p, pack_bytes, exact=True)
        for v in combine_variants:
            fn = lambda v=v: kc.combine(y, meta.scatter_idx, meta.weights, out_c, weighted=True, **v)  # noqa: E731
            self.checked(shape, "combine", label(v), fn, out_c, ref_c, comb_bytes, exact=False)

    def hw(self):
        from moebench.kernels import pack as kp

        dev = self.dev
        big = torch.empty(1 << 28, dtype=torch.float32, device=dev)
        self.record("hw", "write", "fill_ 1 GiB (write only)", lambda: big.fill_(1.0), 1 << 30)
        self.record("hw", "read", "sum 1 GiB (read only)", lambda: big.sum(), 1 << 30)
        del big
        for shape in ("seed", "qwen3_30b_a3b"):
            T, H, _, k = SHAPES[shape]
            x = torch.randn(T, H, device=dev).to(torch.bfloat16)
            dst = torch.empty(T * k, H, device=dev, dtype=torch.bfloat16)
            nbytes = (T + T * k) * H * 2
            src = torch.empty(nbytes // 8, dtype=torch.float32, device=dev)
            dst2 = torch.empty_like(src)
            self.record(shape, "copy", "copy, same bytes as pack", lambda: dst2.copy_(src), nbytes)
            del src, dst2
            self.record(shape, "dup", "torch: x[t] -> k adjacent rows",
                        lambda: dst.view(T, k, H).copy_(x[:, None].expand(T, k, H)), nbytes)
            adjacent = torch.arange(T * k, device=dev, dtype=torch.int32).view(T, k)
            streams = (torch.arange(k, device=dev)[None] * T + torch.arange(T, device=dev)[:, None]).int()
            for what, sidx in (("adjacent rows", adjacent), ("k streams j*T+t", streams)):
                gidx = torch.empty(T * k, device=dev, dtype=torch.int32)
                gidx[sidx.flatten().long()] = torch.arange(T, device=dev, dtype=torch.int32).repeat_interleave(k)
                for v in PACK_VARIANTS[:1] + PACK_VARIANTS[2:3]:
                    tune = {key: val for key, val in v.items() if key != "mode"}
                    how = "per slot" if tune["per_slot"] else "per token"
                    self.record(shape, "dup", f"cute scatter {how}: {what}",
                                lambda sidx=sidx, gidx=gidx, tune=tune: kp.pack(
                                    x, gidx, sidx, dst, mode="scatter", zero_empty=False, **tune), nbytes)
            # gather with adjacent indices: a copy's 1 load : 1 store per thread, the repeated
            # reads served by the L2, the memory sees the same 1 : k mix as the scatter
            gidx = torch.arange(T, device=dev, dtype=torch.int32).repeat_interleave(k)
            self.record(shape, "dup", "cute gather: adjacent rows",
                        lambda: kp.pack(x, gidx, adjacent, dst, mode="gather", zero_empty=False, **DEFAULT), nbytes)
            del x, dst
            torch.cuda.empty_cache()

    def table(self):
        print(f"\n{self.name}: copy {self.copy:.0f} GB/s")
        print(f"{'shape':18s} {'kernel':8s} {'which':8s} {'variant':48s} {'us':>9s} {'GB/s':>7s} {'%copy':>6s}")
        seen = []
        for r in self.rows:
            if (r["shape"], r["kernel"]) not in seen:
                seen.append((r["shape"], r["kernel"]))
        for shape, kernel in seen:
            sel = [r for r in self.rows if r["shape"] == shape and r["kernel"] == kernel]
            if kernel not in ("pack", "combine"):
                picks = [("", r) for r in sel]
            else:
                ours = [r for r in sel if r["variant"] != "torch"]
                picks = [("torch", sel[0])] + ([("default", ours[0]), ("best", min(ours, key=lambda r: r["us"]))]
                                               if ours else [])
            for which, r in picks:
                print(f"{shape:18s} {kernel:8s} {which:8s} {r['variant'][:48]:48s} {r['us']:9.1f} {r['GBps']:7.0f} "
                      f"{r['pct_copy']:6.1f}")
        sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="folder for the full JSON results")
    ap.add_argument("--sections", default="shapes,capacity,hw")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--quick", action="store_true", help="default variants only")
    args = ap.parse_args()
    sections = args.sections.split(",")
    bench = Bench(torch.device("cuda"))
    pv, cv = (PACK_VARIANTS[:1] + PACK_VARIANTS[-1:], COMBINE_VARIANTS[:1]) if args.quick else (
        PACK_VARIANTS, COMBINE_VARIANTS)
    if "shapes" in sections:
        for shape in args.shapes.split(","):
            bench.routing_case(shape, R.CapacitySpec(), pv, cv)
            torch.cuda.empty_cache()
    if "capacity" in sections:
        caps = (("seed/cf1", R.CapacitySpec(1.0)), ("seed/cf1-padded", R.CapacitySpec(1.0, pad_to_capacity=True)))
        for name, cap in caps:
            bench.routing_case(name, cap, [PACK_VARIANTS[0], PACK_VARIANTS[-1]], COMBINE_VARIANTS[:1])
            torch.cuda.empty_cache()
    if "hw" in sections:
        bench.hw()
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_kernels.json").write_text(json.dumps(bench.rows, indent=1))
    bench.table()


if __name__ == "__main__":
    main()
