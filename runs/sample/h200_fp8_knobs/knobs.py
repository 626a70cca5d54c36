"""The FP8 pack's tiling knobs on the device, in one process: each job is run.py's job
(moebench.runner.run_job on the composed config: the same inputs with planted extremes, the
bit-exact check before timing, the same-job copy) written to OUT/<n>/results.parquet, so
moebench.results.load reads the folder like a sweep.  python3 .scratch/fp8_knobs.py OUT SECONDS"""
import os
import sys
import time

from moebench.config import compose
from moebench.runner import run_job

out, budget = sys.argv[1], float(sys.argv[2])
SHAPES = tuple(os.environ.get("FP8_SHAPES", "qwen3_30b_a3b,deepseek_v3,seed").split(","))  # the worst first
Q8, UE = "fp8_block128", "fp8_ue8m0"
ROW = ("impl.fp8_scales=row",)
V16 = ("impl.fp8_vec=16",)
# (quants, overrides): the most informative first, so a cut-short run still has them at every shape
KNOBS = [
    ((Q8, UE), ()),                                   # the default (the kernel measured at 79.7-86 %)
    ((Q8, UE), V16 + ROW),                            # 16-byte fp8 stores, a row's scales in one store
    ((Q8, UE), ROW),
    ((Q8,), V16),
    ((Q8,), ("capacity.align=128",)),                 # the FP8 pack's zero rows (align=1: the rows above)
    ((Q8,), V16 + ROW + ("capacity.align=128",)),
    ((Q8,), V16 + ROW + ("impl.fp8_tokens=2",)),      # two tokens per row group, loads in flight together
    ((Q8,), ROW + ("impl.fp8_tokens=2",)),
    ((Q8,), ROW + ("impl.fp8_tpr=256",)),             # wider row groups (qwen3: one unit per thread)
    ((Q8,), V16 + ROW + ("impl.fp8_tpr=64",)),        # narrower: more units per thread
    ((Q8,), ROW + ("impl.fp8_min_ctas=6",)),          # registers capped for 6 CTAs / SM (deepseek spills)
    ((Q8,), ROW + ("impl.threads=512",)),
    ((Q8,), V16 + ROW + ("impl.cache_hint=stream",)),
    ((Q8,), ROW + ("impl.max_iters=8",)),             # deepseek: 7 x 1 units
    ((Q8,), ROW + ("impl.max_iters=2",)),             # seed 2 x 2, deepseek 1 x 7
    ((Q8,), V16 + ROW + ("impl.threads=128",)),
    ((Q8,), ROW + ("impl.fp8_min_ctas=8",)),          # qwen3: 32 registers without spills
]
jobs = [(s, q, ov) for quants, ov in KNOBS for q in quants for s in SHAPES]
t0 = time.time()
for n, (shape, quant, ov) in enumerate(jobs):
    if time.time() - t0 > budget:
        print(f"knobs: time is up after {n} of {len(jobs)} jobs", flush=True)
        break
    args = [f"shape={shape}", "bench=pack", "impl=cute", f"bench.quant={quant}", *ov]
    t1 = time.time()
    try:
        df = run_job(compose(args), f"{out}/{n}", sweep_dir=out, job_num=n, overrides=" ".join(args))
        r = df.iloc[0]
        msg = f"{r['status']} {r['time_us_median']:.1f} us {r['pct_of_copy']:.1f} %" if r["status"] == "ok" else \
            f"{r['status']} {str(r['message'])[:200]}"
    except Exception as e:  # a failed job is a line, the next one runs
        msg = f"FAILED {type(e).__name__}: {str(e)[:300]}"
    print(f"knob {n:3d} {time.time() - t1:4.1f}s {' '.join(args)}: {msg}", flush=True)
