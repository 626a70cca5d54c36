"""Print rows as short tables: (bench, stage, impl [variant]) x case, rotated median µs (blank:
not ok); the seed shape's cases by dtype, E and k, the others by shape and tokens.
  python3 runs/sample/h200_s10/table.py FOLDER_OR_PARQUET ..."""
import sys

import pandas as pd

from moebench.results import load

df = load(sys.argv[1:])
df["us"] = df.time_us_median.where(df.status == "ok")
tag = df.overrides.fillna("").str.extract(r"\[(\w+)\]$")[0].fillna("")
df["who"] = df.stage_impl.str.replace(r"route=(\w+),metadata=\1", r"\1", regex=True) + " " + tag
seed = df.shape_name == "seed"
df["case"] = (df.dtype.str[:4] + " E" + df.experts.astype(str) + " k" + df.topk.astype(str)).where(
    seed, df.shape_name.str.replace("_decode", "").str[:6] + "/" + df.tokens.astype(str))
with pd.option_context("display.width", 250, "display.max_columns", 40):
    for part in (df[seed], df[~seed]):
        if len(part):
            t = part.pivot_table(index=["bench", "stage", "who"], columns="case", values="us", aggfunc="min")
            print(t.round(2).to_string())
bad = df[~df.status.isin(["ok", "unsupported"])]
for _, r in bad.iterrows():
    print("NOT OK", r.bench, r.stage, r.who, r.case, r.status, str(r.message)[:200])
