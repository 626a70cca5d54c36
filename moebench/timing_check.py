"""Validate the timer on this GPU: `python -m moebench.timing_check`.

Prints the device copy bandwidth, then times the same cases twice in one process in both
modes (events + L2 flush, CUDA-graph replay) and reports the run-to-run spread, which should
stay under 3 % for kernels of 100 µs and more.
"""

from __future__ import annotations

import argparse

import torch

from moebench import routing
from moebench.timing import Timer, TimingSpec, copy_bandwidth_GBps


def cases(device):
    g = torch.Generator(device=device).manual_seed(0)
    out = {}
    for mib in (64, 512):
        src = torch.randn(mib << 18, generator=g, device=device)
        dst = torch.empty_like(src)
        out[f"copy {mib} MiB"] = (lambda s=src, d=dst: d.copy_(s), 2 * src.numel() * 4)
    T, H, E, k = 16384, 4096, 128, 2
    logits = torch.randn(T, E, generator=g, device=device)
    ids, w = routing.route(logits, k, routing.RouterSpec())
    meta = routing.build_metadata(ids, w, E)
    x = torch.randn(T, H, generator=g, device=device).bfloat16()
    packed = torch.empty(T * k, H, dtype=x.dtype, device=device)
    out["torch pack (seed shape)"] = (lambda: routing.pack(x, meta, out=packed), (1 + k) * T * H * 2)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("timing_check needs a CUDA GPU")
        return 2
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(dev)}: copy {copy_bandwidth_GBps(dev):.0f} GB/s (1 GiB, read+write)")
    print(f"{'case':28s} {'mode':7s} {'run 1 us':>10s} {'run 2 us':>10s} {'spread %':>9s} {'GB/s':>7s}")
    for mode in ("events", "graph"):
        timer = Timer(TimingSpec(mode, warmup=20, repeats=args.repeats), dev)
        for name, (fn, nbytes) in cases(dev).items():
            a, b = timer.time(fn).median_us, timer.time(fn).median_us
            spread = 100 * abs(a - b) / min(a, b)
            print(f"{name:28s} {mode:7s} {a:10.1f} {b:10.1f} {spread:9.2f} {nbytes / (a * 1e-6) / 1e9:7.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
