"""Ninth session, one device process: run.py's jobs (moebench.runner.run_job on the composed
config: fresh inputs, the check before timing) written to OUT/<n>/results.parquet, so
moebench.results.load reads the folder like a sweep.

  top-k: bench=topk (route and select) at T 16384, fp32 logits: quack, and cute with each way of
         selecting (the exact per-slot selection, the truncated keys at every k, the default;
         the kernels recompile);
  fp8:   the FP8 pack's tiling options at qwen3_30b_a3b (impl.fp8_*).

  small: bench=topk at E 8 with 1, 2, 4 or 8 lanes per token (impl.router_max_per_lane).

  python3 runs/sample/h200_s9/ab.py OUT SECONDS [topk|small|fp8 ...]"""
import sys
import time

from moebench.config import compose
from moebench.kernels import router as kr
from moebench.runner import run_job

out, budget = sys.argv[1], float(sys.argv[2])
parts = sys.argv[3:] or ["topk", "fp8"]
_init = kr.TopKRouter.__init__


def variant(name: str):
    """The fp32 logits' selection: exact (the per-slot selection, the kernel before the keys),
    keys (the truncated keys at every k; call 4 also timed a variant that took the selected
    logits from the owner lane's registers instead of reading them back: slower everywhere but
    E 256 k 2), or default (the kernel's own choice, kernels.router.FP32_KEYS_MIN_K)."""
    def init(self, *a, **kw):
        _init(self, *a, **kw)
        if name == "exact":
            self.keyed = self.keyed and self.exact_keys
        elif name == "keys":
            self.keyed = self.score == "logit" and not self.grouped
    kr.TopKRouter.__init__ = init
    kr._cache.clear()


jobs = []
if "topk" in parts:
    # call 4 (its log: call4/ab.log, "reload" = keys): (256, 8), (128, 8), (128, 4), (64, 4), (64, 8),
    # (256, 4), (128, 2), (256, 2), (8, 2), (32, 4) with quack, exact, keys and the registers variant
    for E, k in ((256, 8), (128, 8), (256, 4), (128, 4), (128, 2), (256, 2), (8, 2), (8, 8)):
        base = ["bench=topk", "tokens=16384", f"experts={E}", f"topk={k}", "timing=rotated", "dtype=float32"]
        jobs.append(("quack", base + ["impl=quack"], "default"))
        for v in ("exact", "default"):
            jobs.append((v, base + ["impl=cute"], v))
if "small" in parts:  # E 8: the lanes per token (impl.router_max_per_lane 32 = one lane, 4 / 2 / 1 = 2 / 4 / 8 lanes)
    for dtype in ("bfloat16", "float32"):
        for k in (8, 2):
            base = ["bench=topk", "tokens=16384", "experts=8", f"topk={k}", "timing=rotated", f"dtype={dtype}"]
            jobs.append(("quack", base + ["impl=quack"], "default"))
            for mpl in (32, 4, 2, 1):
                jobs.append((f"mpl{mpl}", base + ["impl=cute", f"impl.router_max_per_lane={mpl}"], "default"))
if "fp8" in parts:
    for ov in ((), ("impl.fp8_min_ctas=6",), ("impl.fp8_min_ctas=8",), ("impl.fp8_tpr=64",),
               ("impl.fp8_tpr=64", "impl.threads=128"), ("impl.fp8_tpr=64", "impl.threads=512"),
               ("impl.threads=128",), ("impl.fp8_tpr=64", "impl.fp8_min_ctas=6"), ()):
        for q in ("fp8_block128", "fp8_ue8m0"):
            jobs.append(("fp8", ["shape=qwen3_30b_a3b", "bench=pack", "impl=cute", f"bench.quant={q}", *ov], "default"))

t0 = time.time()
for n, (tag, args, var) in enumerate(jobs):
    if time.time() - t0 > budget:
        print(f"ab: time is up after {n} of {len(jobs)} jobs", flush=True)
        break
    variant(var)
    t1 = time.time()
    try:
        df = run_job(compose(args), f"{out}/{n}", sweep_dir=out, job_num=n, overrides=" ".join(args) + f" [{tag}]")
        msg = "; ".join(f"{r['stage']} {r['status']} " + (f"{r['time_us_median']:.2f} us {r.get('pct_of_copy', float('nan')):.1f} %"
                                                           if r["status"] == "ok" else str(r["message"])[:120])
                        for _, r in df.iterrows())
    except Exception as e:  # a failed job is a line, the next one runs
        msg = f"FAILED {type(e).__name__}: {str(e)[:300]}"
    print(f"ab {n:3d} {time.time() - t1:5.1f}s [{tag}] {' '.join(args)}: {msg}", flush=True)
