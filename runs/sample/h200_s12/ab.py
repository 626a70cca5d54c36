"""Twelfth session, one device process: bench=router at the three decode presets through
moebench.runner.run_job (fresh inputs, the check before timing), each job's table in OUT/<n>/.

  cute's one-launch logits -> metadata: the direct count up to 32 pairs and the scan above
  (impl.decode_warp_pairs=0, the eleventh session's default) against warp ranks above 32 pairs
  (impl.decode_warp_pairs=256), and warp ranks from the first pair (impl.decode_direct_pairs=0)
  at T 1 and 4

  python3 runs/sample/h200_s12/ab.py OUT SECONDS"""
import sys
import time

from moebench.config import compose
from moebench.results import load
from moebench.runner import run_job

out, budget = sys.argv[1], float(sys.argv[2])
jobs = []
for shape in ("deepseek_v3_decode", "qwen3_30b_a3b_decode", "gpt_oss_120b_decode"):
    for T in (1, 4, 8, 16, 32):
        base = ["bench=router", f"shape={shape}", f"tokens={T}", "timing=rotated", "impl=cute"]
        jobs += [("scan", base + ["impl.decode_warp_pairs=0"]), ("warp", base + ["impl.decode_warp_pairs=256"])]
        if T in (1, 4):
            jobs.append(("warp_only", base + ["impl.decode_direct_pairs=0", "impl.decode_warp_pairs=256"]))
t0 = time.time()
for n, (tag, args) in enumerate(jobs):
    if time.time() - t0 > budget:
        print(f"ab: time is up after {n} of {len(jobs)} jobs", flush=True)
        break
    try:
        df = run_job(compose(args), f"{out}/{n}", sweep_dir=out, job_num=n, overrides=" ".join(args) + f" [{tag}]")
        msg = "; ".join(f"{r['stage']} " + (f"{r['time_us_median']:.2f}" if r["status"] == "ok" else str(r["message"])[:100])
                        for _, r in df.iterrows())
    except Exception as e:  # a failed job is a line, the next one runs
        msg = f"FAILED {type(e).__name__}: {str(e)[:300]}"
    print(f"ab {n:3d} [{tag}] {' '.join(args[1:3])}: {msg}", flush=True)
load(out).to_parquet(f"{out}.parquet")
