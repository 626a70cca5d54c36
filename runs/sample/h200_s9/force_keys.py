"""pytest plugin (``-p force_keys``): the router kernels' fp32 logits take the truncated keys at
every E and k (not only from kernels.router.FP32_KEYS_MIN_K slots on): runs the GPU tests on
the variant that ab.py times as ``keys``."""
from moebench.kernels import router as kr

_init = kr.TopKRouter.__init__


def _forced(self, *a, **kw):
    _init(self, *a, **kw)
    self.keyed = self.score == "logit" and not self.grouped


kr.TopKRouter.__init__ = _forced
