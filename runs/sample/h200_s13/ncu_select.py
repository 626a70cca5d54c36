"""The select stage's kernels, for ncu: cute's (as configured by IMPL overrides) and quack's, at
T 16384 over DTYPE logits of E experts and k slots, 3 calls each (the last one is read).

  ncu --clock-control none -k regex:'TopK' --section ... python3 runs/sample/h200_s13/ncu_select.py DTYPE E k [impl.key=v ...]"""
import sys

import torch

from moebench import routing as R
from moebench.impls.cute_impl import CuteImpl
from moebench.impls.quack_impl import QuackImpl
from moebench.logits import make_logits

dtype, E, k = getattr(torch, sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
opts = {a.split("=")[0].removeprefix("impl."): eval(a.split("=")[1].title() if a.split("=")[1] in ("true", "false")
                                                    else a.split("=")[1]) for a in sys.argv[4:]}
lg = make_logits("uniform", 16384, E, seed=1, dtype=dtype, device="cuda")
for im in (CuteImpl(**opts), QuackImpl()):
    for _ in range(3):
        im.select(lg, k, R.RouterSpec())
    torch.cuda.synchronize()
