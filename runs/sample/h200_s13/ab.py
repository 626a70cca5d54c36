"""Thirteenth session, one device process: run.py's jobs (moebench.runner.run_job on the composed
config: fresh inputs, the check before timing) written to OUT/<n>/results.parquet, so
moebench.results.load reads the folder like a sweep. Every variant is an impl key, so each row
says what ran (cfg.impl.router_stages / router_merge).

  topk:   (fp32: its fp32 half; bf16miss: bf16 E 128 k 2, E 8 k 2 and 8; fp32k4: fp32 E 256 and 128, k 4)
          bench=topk (route and select) at T 16384 over E {8, 128, 256} x k {2, 8}, bf16 and
          fp32: quack; cute as it was (rows through registers, one pass a slot), with the rows
          through a shared-memory ring of 4 steps (impl.router_stages=4), with the merge
          selection (impl.router_merge=true), and both
  decode: bench=router (route, route_metadata) at deepseek_v3_decode and qwen3_30b_a3b_decode,
          T 1, 4, 8, 16, 32: the cute variants, and (olddispatch) the one-launch kernel's dispatch
          as it was (old_dispatch.py)

  confirm: bench=router at deepseek_v3_decode T 4, 16 and qwen3_30b_a3b_decode T 32: the variants

  Call 4's fp32 rows also had a tag noreload: a kernel option of that tree (after a tie, the
  exact selection loaded the row again instead of keeping it in registers; base = reload on),
  removed after call 4 (slower: E 256 k 8 select 12.37 against 12.01). Call 5 ran `confirm`
  with a leftover patch of that option: its route rows failed with an AttributeError in this
  script (the metadata rows ran); the patch is gone since.

  python3 runs/sample/h200_s13/ab.py OUT SECONDS [topk|fp32|bf16miss|decode|confirm ...] [NAME=override,override ...]
  (NAME=...: variants of cute to run instead of ring4 / merge / merge_ring4, base kept)
  (every job's table in OUT/<n>/, all of them together in OUT.parquet)"""
import sys
import time

from moebench.config import compose
from moebench.results import load
from moebench.runner import run_job

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import old_dispatch  # noqa: E402  (the decode kernel's dispatch before this session, tag olddispatch)

out, budget = sys.argv[1], float(sys.argv[2])
parts = [a for a in sys.argv[3:] if "=" not in a] or ["topk"]
extra = dict(a.split("=", 1) for a in sys.argv[3:] if "=" in a)  # more variants: name=k=v,k=v
VARIANTS = {"base": [], "ring4": ["impl.router_stages=4"], "merge": ["impl.router_merge=true"],
            "merge_ring4": ["impl.router_merge=true", "impl.router_stages=4"]}
if extra:  # the variants named on the command line instead of the four above (base kept)
    VARIANTS = {"base": [], **{name: ov.split(",") for name, ov in extra.items()}}

jobs = []
GRID = [(d, E, k) for d in ("float32", "bfloat16") for E, k in ((256, 8), (256, 2), (128, 8), (128, 2), (8, 8), (8, 2))]
SHAPES = {"topk": GRID, "fp32": GRID[:6],  # bf16 where cute's select missed 0.9x quack (tenth session)
          "bf16miss": [("bfloat16", 128, 2), ("bfloat16", 8, 8), ("bfloat16", 8, 2)],
          "fp32k4": [("float32", 256, 4), ("float32", 128, 4)]}  # added in the fourteenth session
for part in parts:
    for dtype, E, k in SHAPES.get(part, []):
        base = ["bench=topk", "tokens=16384", f"experts={E}", f"topk={k}", "timing=rotated", f"dtype={dtype}"]
        jobs.append(("quack", base + ["impl=quack"]))
        for name, ov in VARIANTS.items():
            jobs.append((name, base + ["impl=cute"] + ov))
if "confirm" in parts:  # the shipped default against a variant, at three decode points
    for shape, T in (("deepseek_v3_decode", 4), ("deepseek_v3_decode", 16), ("qwen3_30b_a3b_decode", 32)):
        for name, ov in VARIANTS.items():
            jobs.append((name, ["bench=router", f"shape={shape}", f"tokens={T}", "timing=rotated", "impl=cute"] + ov))
if "decode" in parts:
    for shape in ("deepseek_v3_decode", "qwen3_30b_a3b_decode"):
        for T in (1, 4, 8, 16, 32):
            base = ["bench=router", f"shape={shape}", f"tokens={T}", "timing=rotated"]
            for name, ov in VARIANTS.items():
                jobs.append((name, base + ["impl=cute"] + ov))
            jobs.append(("olddispatch", base + ["impl=cute"]))

t0 = time.time()
seen: dict = {}  # (job without the variant, stage) -> {tag: us}
for n, (tag, args) in enumerate(jobs):
    if time.time() - t0 > budget:
        print(f"ab: time is up after {n} of {len(jobs)} jobs", flush=True)
        break
    t1 = time.time()
    (old_dispatch.install if tag == "olddispatch" else old_dispatch.restore)()
    try:
        df = run_job(compose(args), f"{out}/{n}", sweep_dir=out, job_num=n, overrides=" ".join(args) + f" [{tag}]")
        for _, r in df.iterrows():
            if r["status"] == "ok":
                seen.setdefault((" ".join(a for a in args[:6] if not a.startswith("impl")), r["stage"]), {})[tag] = r["time_us_median"]
        msg = "; ".join(f"{r['stage']} {r['status']} " + (f"{r['time_us_median']:.2f} us k {r.get('kernel_us', float('nan')):.2f}"
                                                           if r["status"] == "ok" else str(r["message"])[:160])
                        for _, r in df.iterrows())
    except Exception as e:  # a failed job is a line, the next one runs
        msg = f"FAILED {type(e).__name__}: {str(e)[:300]}"
    print(f"ab {n:3d} {time.time() - t1:5.1f}s [{tag}] {' '.join(args)}: {msg}", flush=True)

load(out).to_parquet(f"{out}.parquet")
tags = ["quack"] + [t for t in dict.fromkeys(t for _, t in [(0, j[0]) for j in jobs]) if t != "quack"]
print("job | stage | " + " | ".join(tags) + " | best cute / quack")
for (job, stage), row in seen.items():
    cute = [row[t] for t in tags[1:] if t in row]
    ratio = f"{min(cute) / row['quack']:.2f}" if cute and "quack" in row else "-"  # no quack: -
    print(f"{job} | {stage} | " + " | ".join(f"{row[t]:.2f}" if t in row else "-" for t in tags) + f" | {ratio}")
