"""The select stage's kernels, for ncu: cute's (as configured by IMPL overrides) and quack's, at
T 16384 over DTYPE logits of E experts and k slots, 3 calls each (the last one is read). (Fifteenth session: string values such as
select_tuning=route are kept as strings.)

  ncu --clock-control none -k regex:'TopK' --section ... python3 runs/sample/h200_s13/ncu_select.py DTYPE E k [impl.key=v ...]"""
import sys

import torch

from moebench import routing as R
from moebench.impls.cute_impl import CuteImpl
from moebench.impls.quack_impl import QuackImpl
from moebench.logits import make_logits

dtype, E, k = getattr(torch, sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])


def value(v: str):  # true / false, numbers; anything else (route, auto) as the string
    if v in ("true", "false"):
        return v == "true"
    try:
        return int(v)
    except ValueError:
        return v


opts = {a.split("=")[0].removeprefix("impl."): value(a.split("=", 1)[1]) for a in sys.argv[4:]}
lg = make_logits("uniform", 16384, E, seed=1, dtype=dtype, device="cuda")
for im in (CuteImpl(**opts), QuackImpl()):
    for _ in range(3):
        im.select(lg, k, R.RouterSpec())
    torch.cuda.synchronize()
