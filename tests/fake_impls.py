"""Deliberately wrong implementations, to prove the harness catches them."""

import torch

from moebench import routing
from moebench.impls.reference_impl import ReferenceImpl
from moebench.impls.torch_impl import TorchImpl


class SkipsLastRow(ReferenceImpl):
    """Packs every row but the last: the poisoned output must expose it."""

    name = "skips_last_row"

    def pack(self, x, meta, out=None):
        ref = routing.pack(x, meta)
        out[:-1] = ref[:-1]
        return out


class SwapsExperts(ReferenceImpl):
    """Routes every token to the reference's experts in reverse slot order."""

    name = "swaps_experts"

    def route(self, logits, k, router, bias=None, out=None):
        ids, w = routing.route(logits, k, router, bias)
        return torch.flip(ids, [1]), torch.flip(w, [1])


class WeightsInWrongSlots(TorchImpl):
    """The right experts (an implementation free to order equal scores its own way), with each
    token's weights rotated one slot: every weight belongs to another expert."""

    name = "weights_in_wrong_slots"

    def route(self, logits, k, router, bias=None, out=None):
        ids, w = routing.route(logits, k, router, bias)
        return ids, torch.roll(w, 1, dims=1)


class WrongAfterFirstCall(ReferenceImpl):
    """Packs right on its first call and wrong on every later one: only a check of what was
    timed (the output of the last timed call) catches it."""

    name = "wrong_after_first_call"

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.calls = 0

    def pack(self, x, meta, out=None):
        self.calls += 1
        out = routing.pack(x, meta, out)
        if self.calls > 1:
            out[0] += 1
        return out


class WrongOnDeviceAfterFirstCall(ReferenceImpl):
    """Like WrongAfterFirstCall, but the fault is device work (a counter tensor the call itself
    increments), so it happens in CUDA-graph replays too: only a check of a replay's output
    catches it under timing=graph or timing=rotated."""

    name = "wrong_on_device_after_first_call"

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.step = None

    def pack(self, x, meta, out=None):
        if self.step is None:
            self.step = torch.zeros((), dtype=x.dtype, device=x.device)
        out = routing.pack(x, meta, out)
        out[0] += self.step
        self.step.add_(1)
        return out


class FP8OneBitOff(ReferenceImpl):
    """Quantizes like the reference but one FP8 value a bit off (the last mantissa bit of the
    last row's first value): the bit-exact check must catch it."""

    name = "fp8_one_bit_off"

    def pack_fp8(self, x, meta, quant, out=None):
        q, s = routing.pack_fp8(x, meta, quant)
        q.view(torch.uint8)[-1, 0] ^= 1
        return q, s


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
