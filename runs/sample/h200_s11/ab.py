"""Eleventh session, one device process: run.py's jobs (moebench.runner.run_job on the composed
config: fresh inputs, the check before timing) written to OUT/<n>/results.parquet, so
moebench.results.load (and runs/sample/h200_s10/table.py) reads the folder like a sweep.

  direct: bench=router (route, metadata, route_metadata) at the three decode presets, T 1 to 32:
          cute as shipped (the one-launch metadata written without the scan up to
          impl.decode_direct_pairs pairs) against the scan (impl.decode_direct_pairs=0), and
          quack at T 1 and 16
  stages: bench=pack and bench=combine at the decode presets, T 1 and 16: cute against compile
          and torch (the best-peer question of issue 18)

  pack:   bench=pack at the decode presets, T 1, 2, 16, 128: cute's pack modes (auto, gather,
          scatter, scatter with a row group per slot) against compile

  python3 runs/sample/h200_s11/ab.py OUT SECONDS [direct|stages|pack ...]
  (every job's table in OUT/<n>/, all of them together in OUT.parquet)"""
import sys
import time

from moebench.config import compose
from moebench.results import load
from moebench.runner import run_job

out, budget = sys.argv[1], float(sys.argv[2])
parts = sys.argv[3:] or ["direct"]
SHAPES = ("deepseek_v3_decode", "qwen3_30b_a3b_decode", "gpt_oss_120b_decode")

jobs = []
if "direct" in parts:
    for shape in SHAPES:
        for T in (1, 2, 4, 8, 16, 32):
            base = ["bench=router", f"shape={shape}", f"tokens={T}", "timing=rotated"]
            jobs.append(("direct", base + ["impl=cute"]))
            jobs.append(("scan", base + ["impl=cute", "impl.decode_direct_pairs=0"]))
            if T in (1, 16):
                jobs.append(("", base + ["impl=quack"]))
if "stages" in parts:
    for shape in SHAPES:
        for T in (1, 16):
            for bench in ("pack", "combine"):
                for impl in ("cute", "compile", "torch"):
                    jobs.append(("", [f"bench={bench}", f"shape={shape}", f"tokens={T}", "timing=rotated",
                                      f"impl={impl}"]))
if "pack" in parts:
    for shape in SHAPES:
        for T in (1, 2, 16, 128):
            base = ["bench=pack", f"shape={shape}", f"tokens={T}", "timing=rotated"]
            jobs.append(("", base + ["impl=compile"]))
            for mode in ("auto", "gather", "scatter"):
                jobs.append((mode, base + ["impl=cute", f"impl.pack_mode={mode}"]))
            jobs.append(("per_slot", base + ["impl=cute", "impl.pack_mode=scatter", "impl.scatter_per_slot=true"]))

t0 = time.time()
for n, (tag, args) in enumerate(jobs):
    if time.time() - t0 > budget:
        print(f"ab: time is up after {n} of {len(jobs)} jobs", flush=True)
        break
    t1 = time.time()
    try:
        df = run_job(compose(args), f"{out}/{n}", sweep_dir=out, job_num=n,
                     overrides=" ".join(args) + (f" [{tag}]" if tag else ""))
        msg = "; ".join(f"{r['stage']} {r['status']} " + (f"{r['time_us_median']:.2f} us k {r.get('kernel_us', float('nan')):.2f}" if r["status"] == "ok"
                                                           else str(r["message"])[:120]) for _, r in df.iterrows())
    except Exception as e:  # a failed job is a line, the next one runs
        msg = f"FAILED {type(e).__name__}: {str(e)[:300]}"
    print(f"ab {n:3d} {time.time() - t1:5.1f}s [{tag}] {' '.join(args)}: {msg}", flush=True)

load(out).to_parquet(f"{out}.parquet")
