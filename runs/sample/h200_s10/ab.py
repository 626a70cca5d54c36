"""Tenth session, one device process: run.py's jobs (moebench.runner.run_job on the composed
config: fresh inputs, the check before timing) written to OUT/<n>/results.parquet, so
moebench.results.load reads the folder like a sweep.

cute's route kernel runs as shipped (new) or as before this session (before: every warp runs the
tile's steps, a 4-byte store per slot, select with the histogram and fp32 values; the kernels
recompile). Call 1 (its log: call1.log) also timed the steps in between (vec: the slots
written as vectors; nohist: and select without the histogram); call 2 (call2.log) ran small and
decode with a per-thread loop bound for the stop of idle warps (its fp32 E 256 route lost 15 %:
the compiler took the loop as divergent, 3144 SASS instructions against 2592; the bound is
marked warp-uniform since, 2600).

  topk:   bench=topk (route and select) at T 16384 over E {8, 128, 256} x k {2, 8}, bf16 and
          fp32: quack, cute before and new; fp32 at k 8, E 128 and 256 also with 256 threads a
          CTA or 16 experts a lane (their kernels spill at 512 threads' 128 registers)
  small:  the same at E 8 (E 256 k 8 as a control), and 1, 2 or 4 lanes per token for the new
          kernel (impl.router_max_per_lane 32 / 4 / 2)
  decode: bench=router and bench=topk at the three decode presets, T 1, 16, 128, 512: quack,
          cute before and new; bench=combine at T 1 and 2: cute with the packed rows staged in
          shared memory (the default) or not (impl.stage_rows=0), and compile at T 1

  python3 runs/sample/h200_s10/ab.py OUT SECONDS [topk|small|decode ...]
  (every job's table in OUT/<n>/, all of them together in OUT.parquet)"""
import sys
import time

from moebench.config import compose
from moebench.results import load
from moebench.kernels import decode as kd
from moebench.kernels import router as kr
from moebench.runner import run_job

out, budget = sys.argv[1], float(sys.argv[2])
parts = sys.argv[3:] or ["topk"]
_route, _init = kr.route, kr.TopKRouter.__init__


def variant(name: str):
    def init(self, *a, **kw):
        _init(self, *a, **kw)
        if name == "before":
            self.store_vec, self.stop_idle_warps = 1, False

    def route(logits, k, bias=None, out=None, **static):
        if name == "before":
            static.pop("hist", None)
            if static.pop("values_in_dtype", False):
                out = None  # fp32 values: the caller's buffers are in the logits' dtype
        return _route(logits, k, bias, out=out, **static)

    kr.TopKRouter.__init__, kr.route = init, route
    kr._cache.clear()
    kd._cache.clear()
    kd._plans.clear()


jobs = []
if "topk" in parts:
    for dtype in ("bfloat16", "float32"):
        for E, k in ((8, 8), (8, 2), (128, 8), (128, 2), (256, 8), (256, 2)):
            base = ["bench=topk", "tokens=16384", f"experts={E}", f"topk={k}", "timing=rotated", f"dtype={dtype}"]
            jobs.append(("quack", base + ["impl=quack"], "new"))
            for v in ("before", "new"):
                jobs.append((v, base + ["impl=cute"], v))
            if dtype == "float32" and E >= 128 and k == 8:  # fewer registers: 128 a thread spill here
                jobs.append(("thr256", base + ["impl=cute", "impl.router_threads=256"], "new"))
                jobs.append(("mpl16", base + ["impl=cute", "impl.router_max_per_lane=16"], "new"))
if "small" in parts:
    for dtype in ("bfloat16", "float32"):
        for E, k in ((8, 8), (8, 2), (256, 8)):
            base = ["bench=topk", "tokens=16384", f"experts={E}", f"topk={k}", "timing=rotated", f"dtype={dtype}"]
            jobs.append(("quack", base + ["impl=quack"], "new"))
            jobs.append(("before", base + ["impl=cute"], "before"))
            for mpl in ((32, 4, 2) if E == 8 else (32,)):
                jobs.append((f"mpl{mpl}", base + ["impl=cute", f"impl.router_max_per_lane={mpl}"], "new"))
if "decode" in parts:
    for shape in ("deepseek_v3_decode", "qwen3_30b_a3b_decode", "gpt_oss_120b_decode"):
        for T in (1, 16, 128, 512):
            for bench in ("router", "topk"):
                base = [f"bench={bench}", f"shape={shape}", f"tokens={T}", "timing=rotated"]
                jobs.append(("quack", base + ["impl=quack"], "new"))
                for v in ("before", "new"):
                    jobs.append((v, base + ["impl=cute"], v))
        for T in (1, 2):
            base = ["bench=combine", f"shape={shape}", f"tokens={T}", "timing=rotated"]
            jobs.append(("stage", base + ["impl=cute"], "new"))
            jobs.append(("no_stage", base + ["impl=cute", "impl.stage_rows=0"], "new"))
        jobs.append(("compile", ["bench=combine", f"shape={shape}", "tokens=1", "timing=rotated", "impl=compile"], "new"))

t0 = time.time()
for n, (tag, args, var) in enumerate(jobs):
    if time.time() - t0 > budget:
        print(f"ab: time is up after {n} of {len(jobs)} jobs", flush=True)
        break
    variant(var)
    t1 = time.time()
    try:
        df = run_job(compose(args), f"{out}/{n}", sweep_dir=out, job_num=n, overrides=" ".join(args) + f" [{tag}]")
        msg = "; ".join(f"{r['stage']} {r['status']} " + (f"{r['time_us_median']:.2f} us k {r.get('kernel_us', float('nan')):.2f}"
                                                           if r["status"] == "ok" else str(r["message"])[:120])
                        for _, r in df.iterrows())
    except Exception as e:  # a failed job is a line, the next one runs
        msg = f"FAILED {type(e).__name__}: {str(e)[:300]}"
    print(f"ab {n:3d} {time.time() - t1:5.1f}s [{tag}] {' '.join(args)}: {msg}", flush=True)

load(out).to_parquet(f"{out}.parquet")
