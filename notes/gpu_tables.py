"""Print the closing-note tables from one device call's sweeps: python3 notes/gpu_tables.py DIR..."""

import sys

import pandas as pd

from moebench.results import load

pd.set_option("display.width", 250)
pd.set_option("display.max_columns", 30)
df = load(sys.argv[1:])
card = ", ".join(sorted(set(df.gpu_name.dropna())))
print(f"card: {card}; copy GB/s per job: median {df.copy_GBps.median():.0f} (min {df.copy_GBps.min():.0f}, max {df.copy_GBps.max():.0f})")
bad = df[df.status != "ok"]
print(f"rows: {len(df)} ok {int((df.status == 'ok').sum())}; non-ok by status: {bad.status.value_counts().to_dict()}")
for (st, msg), n in bad.groupby(["status", bad.message.str.slice(0, 90)]).size().items():
    print(f"  {n:3d} x {msg}")
ok = df[df.status == "ok"]


def table(sel, title):
    if sel.empty:
        return
    print(f"\n== {title}")
    t = sel.pivot_table(index=["bench", "stage", "shape_name"], columns="stage_impl",
                        values=["time_us_median", "pct_of_copy"], aggfunc="median")
    print(t.round(1).to_string())


table(ok[ok.bench.isin(["pack", "combine"]) & (ok.router == "softmax_topk")], "pack / combine (us, % of same-job copy)")
table(ok[(ok.bench == "topk") & (ok.router == "softmax_topk")], "top-k softmax_topk (us)")
rt = ok[ok.bench == "router"]
if not rt.empty:
    print("\n== router (us, median; timing mode per row)")
    print(rt.pivot_table(index=["shape_name", "stage", "timing_mode"], columns="stage_impl", values="time_us_median",
                         aggfunc="median").round(1).to_string())
tk = ok[ok.bench == "topk"]
if not tk.empty:
    print("\n== top-k by E, k, dtype (us)")
    print(tk.pivot_table(index=["experts", "topk", "dtype"], columns="stage_impl", values="time_us_median",
                         aggfunc="median").round(1).to_string())
table(ok[(ok.bench == "routing")], "routing end to end")
cap = ok[(ok.bench == "capacity") & (ok.stage == "total")]
if not cap.empty:
    print("\n== capacity (stage total)")
    print(cap[["shape_name", "logits", "capacity_factor", "stage_impl", "avg_drop_rate", "token_drop_rate",
               "load_max_over_mean", "time_us_median", "bw_GBps_strict", "pct_of_copy"]]
          .sort_values(["logits", "capacity_factor", "stage_impl"]).round(4).to_string(index=False))

ep = ok[ok.bench == "ep_dispatch"] if "rank" in ok else ok.iloc[0:0]
if not ep.empty:
    print("\n== ep_dispatch (per rank)")
    print(ep[["world_size", "tokens", "hidden", "experts", "topk", "rank", "stage", "time_us_median",
              "time_us_slowest_rank", "bytes_sent", "algbw_GBps", "busbw_GBps", "pct_of_raw", "recv_imbalance"]]
          .sort_values(["world_size", "tokens", "stage", "rank"]).round(1).to_string(index=False))
