"""Decode knobs side by side in one process (timing=rotated: 64 input copies in one graph, 20 replays):
the few-CTA tiling (pack / combine) and the combine's L2 prefetch against the old defaults; the
decode route's lanes per token. Checked against the reference before timing."""
import dataclasses
import sys
import torch
from moebench import routing as R
from moebench.check import assert_close
from moebench.impls.cute_impl import CuteImpl
from moebench.logits import make_logits
from moebench.timing import Rotation, Timer, TimingSpec, rotations

dev = torch.device("cuda")
tm = Timer(TimingSpec("rotated", 2, 20), dev)
rows = []
import os
SHAPES = {"deepseek_v3": (7168, 256, 8), "qwen3_30b_a3b": (2048, 128, 8), "gpt_oss_120b": (2880, 128, 4)}
SHAPES = {s: SHAPES[s] for s in os.environ.get("KNOB_SHAPES", ",".join(SHAPES)).split(",")}
TOKENS = [int(t) for t in os.environ.get("KNOB_T", "1,16,128,512").split(",")]
ROUTE = os.environ.get("KNOB_ROUTE", "1") == "1"


def run(shape, stage, T, name, make, nbytes, check=None):
    try:
        calls = [make(i) for i in range(rotations(nbytes))]
        out = calls[0]()
        if check is not None:
            check(out)
        t = tm.time(None, rotated=lambda: Rotation(calls, nbytes))
        rows.append((shape, stage, T, name, round(t.median_us, 2)))
    except Exception as e:  # noqa: BLE001
        rows.append((shape, stage, T, name, f"ERR {type(e).__name__}: {str(e)[:80]}"))
    print(*rows[-1], flush=True)


def clone_meta(m):
    return dataclasses.replace(m, **{f.name: getattr(m, f.name).clone() for f in dataclasses.fields(m)
                                     if isinstance(getattr(m, f.name), torch.Tensor)})


router, cap = R.RouterSpec(), R.CapacitySpec()
for shape, (H, E, k) in SHAPES.items():
    for T in TOKENS:
        if shape == "deepseek_v3" and ROUTE:
            lg = make_logits("zipf", T, E, seed=T, dtype=torch.bfloat16, device="cuda")
            for name, kw in {"default": {}, "mpl16": {"router_max_per_lane": 16}, "mpl8": {"router_max_per_lane": 8}}.items():
                im = CuteImpl(**kw)
                def make(i, im=im):
                    c = lg.clone()
                    return lambda: im.route_metadata(c, k, router, None, E, cap)
                run(shape, "route_metadata", T, name, make, lg.numel() * 2)
        ids, w = R.route(make_logits("zipf", T, E, seed=T, device="cuda"), k, router)
        meta = R.build_metadata(ids, w, E, cap)
        x = torch.randn(T, H, device="cuda").bfloat16()
        y = torch.randn(meta.num_rows, H, device="cuda").bfloat16()
        ref_p, ref_c = R.pack(x, meta), R.combine(y, meta)
        po = torch.empty(meta.num_rows, H, device="cuda", dtype=torch.bfloat16)
        co = torch.empty(T, H, device="cuda", dtype=torch.bfloat16)
        for name, kw in {"default": {}, "old": {"max_iters": 8}}.items():
            im = CuteImpl(**kw)
            def make(i, im=im):
                a, m = x.clone(), clone_meta(meta)
                return lambda: im.pack(a, m, out=po)
            run(shape, "pack", T, name, make, x.numel() * 2, lambda o: assert_close(o, ref_p, "pack", torch.bfloat16, 0, 0))
        old_iters = 16 // k
        for name, kw in {"default": {}, "no_prefetch": {"prefetch_mb": 0}, "old": {"prefetch_mb": 0, "max_iters": old_iters},
                         "prefetch32": {"prefetch_mb": 32}}.items():
            im = CuteImpl(**kw)
            def make(i, im=im):
                a, m = y.clone(), clone_meta(meta)
                return lambda: im.combine(a, m, out=co)
            run(shape, "combine", T, name, make, y.numel() * 2, lambda o: assert_close(o, ref_c, "combine", torch.bfloat16))
import pandas as pd
df = pd.DataFrame(rows, columns=["shape", "stage", "tokens", "variant", "us"])
df.to_csv(sys.argv[1] if len(sys.argv) > 1 else "knobs8.csv", index=False)
print("KNOBS (rotated median us, bf16)")
print(df.pivot_table(index=["shape", "stage", "variant"], columns="tokens", values="us", aggfunc="first").to_string())
