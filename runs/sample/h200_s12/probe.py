"""Twelfth session: where a rotated replay's time goes, kernel by kernel. For each job (run.py
overrides), each stage's checked call is captured over its rotated input copies like
``timing=rotated``; the replay is timed with events (the harness's figure), then traced with
the CUDA profiler: every kernel's duration inside the graph, the gap from one call's last kernel
to the next call's first, the kernels per call and their launch shapes (grid, block, registers,
shared memory).

  python3 runs/sample/h200_s12/probe.py OUT "override ..." "override ..." ...
  (one line per stage on stdout; the traces as OUT/<n>.json)"""
import json
import statistics
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from moebench.config import compose
from moebench.runner import plan
from moebench.timing import Timer

out = sys.argv[1]


def kernels(path):
    ev = json.load(open(path))["traceEvents"]
    ks = sorted((e for e in ev if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    return ks


def probe(n, args):
    job, bench = plan(compose(args))
    torch.manual_seed(job.seed)
    timer = Timer(job.timing, job.device)
    bench.setup(timer)
    for case in bench.cases():
        try:
            call = case.build()
            call.reset()
            call.check(call.fn())
        except Exception as e:  # noqa: BLE001 -- a line, then the next case
            print(f"probe {n} {' '.join(args)} {case.stage}: {type(e).__name__} {str(e)[:100]}", flush=True)
            continue
        rot = call.copies()
        t = timer._time_rotated(rot)
        graph, _ = timer._capture(rot.calls)
        graph.replay()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                timer.flush_l2()
                graph.replay()
            torch.cuda.synchronize()
        path = f"{out}/{n}_{case.stage}.json"
        prof.export_chrome_trace(path)
        ks = kernels(path)
        calls = len(rot.calls)
        # the flush is one big kernel before each replay: drop kernels of more than 50 us
        ks = [k for k in ks if k["dur"] < 50]
        per_call = len(ks) / (3 * calls)
        durs = [k["dur"] for k in ks]
        gaps = [b["ts"] - (a["ts"] + a["dur"]) for a, b in zip(ks, ks[1:]) if b["ts"] - a["ts"] < 20]
        names = {}
        for k in ks:
            a = k.get("args", {})
            key = (k["name"][:60], str(a.get("grid")), str(a.get("block")), a.get("registers per thread"),
                   a.get("shared memory"))
            names[key] = names.get(key, 0) + 1
        shapes = "; ".join(f"{nm} grid {g} block {b} regs {r} smem {s} x{c // 3}" for (nm, g, b, r, s), c in names.items())
        print(f"probe {n} {' '.join(args)} {case.stage}: rotated {t.median_us:.2f} us ({calls} calls) | "
              f"kernels/call {per_call:.1f} dur med {statistics.median(durs):.2f} | gap med "
              f"{statistics.median(gaps) if gaps else float('nan'):.2f} | {shapes}", flush=True)


for n, a in enumerate(sys.argv[2:]):
    probe(n, a.split())
