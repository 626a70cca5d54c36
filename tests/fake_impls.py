"""Deliberately wrong implementations, to prove the harness catches them."""

import torch

from moebench import routing
from moebench.impls.torch_impl import TorchImpl


class SkipsLastRow(TorchImpl):
    """Packs every row but the last: the poisoned output must expose it."""

    name = "skips_last_row"

    def pack(self, x, meta, out=None):
        ref = routing.pack(x, meta)
        out[:-1] = ref[:-1]
        return out


class SwapsExperts(TorchImpl):
    """Routes every token to the reference's experts in reverse slot order."""

    name = "swaps_experts"

    def route(self, logits, k, router, bias=None, out=None):
        ids, w = routing.route(logits, k, router, bias)
        return torch.flip(ids, [1]), torch.flip(w, [1])


class KillsItsProcessAtTopk2(TorchImpl):
    """Routes like the reference, except at k = 2, where it kills its own process (as a kernel
    fault that takes the process with it would)."""

    name = "kills_at_topk2"

    def route(self, logits, k, router, bias=None, out=None):
        if k == 2:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        return routing.route(logits, k, router, bias)


class CrashesAtExit(TorchImpl):
    """The reference, whose process then dies of SIGSEGV as it exits (as a CUDA teardown can)."""

    name = "crashes_at_exit"

    def route(self, logits, k, router, bias=None, out=None):
        import atexit
        import os
        import signal

        atexit.register(os.kill, os.getpid(), signal.SIGSEGV)
        return routing.route(logits, k, router, bias)


class SleepsInPackAndCombine(TorchImpl):
    """The reference, with a fixed sleep in pack and in combine: stages whose wall time the
    machine's load barely moves, so two runs of the same code measure alike (compare's tests)."""

    name = "sleeps"
    pack_s = combine_s = 0.010

    def pack(self, x, meta, out=None):
        import time

        time.sleep(self.pack_s)
        return routing.pack(x, meta, out)

    def combine(self, y, meta, out=None, weighted=True):
        import time

        time.sleep(self.combine_s)
        return routing.combine(y, meta, out, weighted)


class SleepsTwiceAsLongInPack(SleepsInPackAndCombine):
    """The same, with pack twice as slow: a planted 2x slowdown (combine unchanged)."""

    pack_s = 0.020
