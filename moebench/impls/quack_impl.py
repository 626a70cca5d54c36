"""impl=quack: the route stage through quack's top-k kernel (``quack.topk``, CuTeDSL).

quack has a top-k (optionally followed by a softmax over the k selected values) and no
pack, combine or metadata kernel: those stages stay missing here (``Unsupported``); they
are never run through torch under this name.

What quack's top-k does (quack-kernels 0.6.5, ``quack/topk.py``)
-----------------------------------------------------------------
* Rows of ``x [T, N]`` (fp16 / bf16 / fp32) are loaded as fp32; the column index is
  written into the low ``log2(N)`` mantissa bits of every value and the rows go through a
  bitonic top-k network on those keys. Values come back sorted descending with the index
  bits cleared, in ``x``'s dtype; indices are int32.
* Equal values resolve toward the lower column (the index bits are inverted for values
  >= 0), like the reference -- for 16-bit inputs, whose fp32 image has >= 13 zero low
  mantissa bits, this is exact. Two caveats make ``exact_ties = False`` here:
  - fp32 inputs lose their low ``log2(N)`` mantissa bits, so two values that differ only
    there tie (and the lower column wins) and the returned values are truncated;
  - +0.0 and -0.0 (which the reference treats as equal) are ordered +0 > -0, and -0.0
    ties resolve toward the *higher* column.
  The harness then checks the selection scores of the chosen experts as multisets (see
  ``route_tolerance``) instead of the ids themselves.
* Index decode bug (0.6.5): after the top-k, thread ``t`` of a row's ``tpr`` threads
  decodes its share of the k outputs (vectors of ``vo = min(k, 4)``), undoing the index
  inversion by the sign of ``topk_vals[i]`` -- its *local* slot ``i`` -- instead of the
  output it holds. Output ``p`` (vector ``g = p // vo``) is thus decoded with the sign of
  output ``q = (g // tpr) * vo + p % vo``; where the two signs differ the index comes back
  as ``E - 1 - col``. That needs ``tpr > 1`` (E >= 128) and k >= 8 and a top-k of mixed
  signs (e.g. zipf / hot logits). ``route`` repairs it from the sign bits of the returned
  values (a few [T, k] kernels, only for the shapes that have such outputs, and only
  where a one-off probe of the kernel shows the bug), see ``decode_sign_positions``. -0.0 logits are decoded wrongly in any position (their
  inverted index is read back without inversion) and are not repaired: a routing whose
  top-k holds -0.0 is a ``mismatch`` row.
* Constraints (asserted at compile time): N a power of two <= 4096, k a power of two
  <= 128, a row of x at least one 16-byte vector; the row strides of x, values and
  indices must be divisible by ``gcd(16 bytes / x's element size, N)`` elements -- so the
  [T, k] outputs are views of buffers whose rows are padded to that many elements.
* The fused softmax (``softmax=True``) is a softmax over the k selected values written
  in ``x``'s dtype (bf16 weights for bf16 logits), with the fp32 truncation above and
  approximate exp2 / reciprocal. That is ``topk_softmax`` semantics only up to rounding
  far beyond the reference's fp32 weights, so it is not used: quack selects, and the
  weights are computed in fp32 from the exact logits of the selected experts.

Routers
-------
Top-k selection is done on the logits for every router whose semantics object says quack
can select like the reference (``Router.quack``: softmax_topk, top1, topk_softmax,
topk_hard, sigmoid_bias without a bias); this selects the same experts as the reference
because the selection score is a monotone function of the logit within a row. The weights
are the router's reference formula (``Router.weights``) on the experts quack chose, in fp32.
Unsupported, with the reason: the other routers and options, and shapes/dtypes outside
quack's constraints.
"""

from __future__ import annotations

import math

import torch

from dataclasses import dataclass

from moebench import routing
from moebench.impls.base import Impl, ImplConfig, Unsupported

DTYPES = (torch.float16, torch.bfloat16, torch.float32)

NOT_INSTALLED = "quack-kernels is not installed (pip install -e .[quack])"

MAX_EXPERTS = 4096
MAX_TOPK = 128


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def row_divisibility(dtype: torch.dtype, experts: int) -> int:
    """Elements every row stride (x, values, indices) must be divisible by: quack compiles
    with ``gcd(128 bits / x's width, N)``."""
    return math.gcd(16 // torch.empty((), dtype=dtype).element_size(), experts)


def unsupported_reason(experts: int, topk: int, dtype: torch.dtype, router: routing.RouterSpec,
                       bias: torch.Tensor | None = None) -> str | None:
    """Why impl=quack cannot route this case, or None when it can (device aside): the router's
    own verdict (``Router.quack``), then quack's shape and dtype constraints."""
    why = router.router.quack(dtype, bias is not None)
    if why:
        return why
    if dtype not in DTYPES:
        return f"quack's top-k takes float16, bfloat16 or float32 logits (dtype={dtype})"
    if not _pow2(experts) or experts > MAX_EXPERTS:
        return f"quack's top-k needs the expert count to be a power of two <= {MAX_EXPERTS} (experts={experts})"
    size = torch.empty((), dtype=dtype).element_size()
    if experts * size < 16:
        return (f"quack's top-k loads rows in 16-byte vectors: experts={experts} in {dtype} is "
                f"{experts * size} bytes (needs experts >= {16 // size})")
    k = 1 if router.name == "top1" else topk
    if not _pow2(k) or k > MAX_TOPK:
        return f"quack's top-k needs k to be a power of two <= {MAX_TOPK} (topk={k})"
    return None


def threads_per_row(experts: int, k: int) -> int:
    """quack's ``TopK._threads_per_row``: threads that share one row."""
    return max(min(experts // k, 32, experts // 64), 1)


def decode_sign_positions(experts: int, k: int) -> list[int]:
    """For each output position p, the position whose sign quack 0.6.5 decodes p's index with
    (== p where the decode is right). See the module docstring."""
    vo = min(k, 4)  # min(k, 16-byte vector of x, 4 int32) for every supported dtype
    tpr = threads_per_row(experts, k)
    return [(p // vo // tpr) * vo + p % vo for p in range(k)]


def emulate_topk_fwd(x: torch.Tensor, k: int, softmax: bool, values: torch.Tensor, indices: torch.Tensor) -> None:
    """A torch model of quack 0.6.5's ``_topk_fwd`` (no softmax), bit for bit as read from
    ``quack/topk.py``: index bits in the low mantissa bits, top-k of the encoded keys, the
    decode with the sign of ``decode_sign_positions``. For CPU tests, and checked against
    the kernel in tests/gpu/test_peers.py."""
    assert not softmax
    T, N = x.shape
    mask = (1 << (N.bit_length() - 1)) - 1
    f = x.float()
    col = torch.arange(N, dtype=torch.int32, device=x.device).expand(T, N)
    enc = torch.where(f >= 0, ~col, col) & mask
    key = ((f.view(torch.int32) & ~mask) | enc).view(torch.float32)
    top = key.sort(dim=1, descending=True).values[:, :k]  # the keys of a row are distinct
    e = top.view(torch.int32) & mask
    sign_src = top[:, decode_sign_positions(N, k)]
    indices.copy_(torch.where(sign_src >= 0, ~e, e) & mask)
    values.copy_((top.view(torch.int32) & ~mask).view(torch.float32).to(values.dtype))


@dataclass
class QuackConfig(ImplConfig):
    _target_: str = "moebench.impls.quack_impl.QuackImpl"
    name: str = "quack"


class QuackImpl(Impl):
    name = "quack"
    devices = ("cuda",)
    # see the module docstring: fp32 truncation and signed zeros
    exact_ties = False

    def __init__(self, name: str | None = None, **options):
        super().__init__(name, **options)
        self._topk_fwd = None
        self._last = None  # (logits, router) of the last route call, for route_tolerance
        self._decode_q: dict = {}

    # -- quack, imported on first use ----------------------------------------------------
    def kernel(self):
        """quack's top-k custom op ``_topk_fwd(x, k, softmax, values, indices)``."""
        if self._topk_fwd is None:
            try:
                from quack.topk import _topk_fwd
            except ModuleNotFoundError as e:
                if (e.name or "").split(".")[0] == "quack":
                    raise Unsupported(NOT_INSTALLED) from None
                raise Unsupported(f"quack-kernels could not be imported: {type(e).__name__}: {e}") from None
            except ImportError as e:
                raise Unsupported(f"quack-kernels could not be imported: {type(e).__name__}: {e}") from None
            self._topk_fwd = _topk_fwd
        return self._topk_fwd

    def _decode_repair(self, topk_fwd, E: int, k: int, dtype: torch.dtype, device) -> torch.Tensor | None:
        """The positions q(p) to repair quack's index decode with (module docstring), or None
        when this shape's decode is right. Decided once per shape by a probe (first call, not
        timed): two rows whose top-k has mixed signs, checked against a stable sort; the
        kernel must agree with either the sort (no repair) or the model of the bug."""
        key = (E, k, dtype, device)
        if key in self._decode_q:
            return self._decode_q[key]
        q = decode_sign_positions(E, k)
        qt = None
        if q != list(range(k)):
            g = torch.Generator().manual_seed(0)
            v = (1 + torch.rand(2, E, generator=g)).to(torch.bfloat16).float()  # exact in every dtype
            v[1] = -v[1]
            v[1, torch.randperm(E, generator=g)[:4]] *= -1  # row 1: exactly 4 positive values
            x = v.to(device=device, dtype=dtype)
            div = row_divisibility(dtype, E)
            kp = -(-k // div) * div
            vals = torch.empty(2, kp, dtype=dtype, device=device)[:, :k]
            ids = torch.empty(2, kp, dtype=torch.int32, device=device)[:, :k]
            topk_fwd(x, k, False, vals, ids)
            truth = routing.stable_topk(x.float(), k)[1].to(torch.int32)
            if not torch.equal(ids, truth):
                model_vals, model_ids = torch.empty_like(vals), torch.empty_like(ids)
                emulate_topk_fwd(x, k, False, model_vals, model_ids)
                if not torch.equal(ids, model_ids):
                    raise RuntimeError(f"quack's top-k (E={E}, k={k}, {dtype}) returned indices that match neither "
                                       "a stable sort nor the model of quack 0.6.5 (emulate_topk_fwd)")
                qt = torch.tensor(q, dtype=torch.long, device=device)
        self._decode_q[key] = qt
        return qt

    # -- the route stage ---------------------------------------------------------------------
    def route(self, logits, k, router, bias=None, out=None):
        """ids [T, k] int32 (a view of a buffer with 16-byte-padded rows) and weights [T, k] fp32.

        ``out`` is not written: quack cannot write rows narrower than 16 bytes, and copying
        into ``out`` would add a kernel to the timed call.
        """
        self.check_device(logits.device)
        T, E = logits.shape
        reason = unsupported_reason(E, k, logits.dtype, router, bias)
        if reason:
            raise Unsupported(reason)
        topk_fwd = self.kernel()
        if router.name == "top1":
            k = 1
        x = logits if logits.is_contiguous() else logits.contiguous()
        if x.data_ptr() % 16:  # quack assumes 16-byte aligned rows
            x = x.clone()
        div = row_divisibility(x.dtype, E)
        kp = -(-k // div) * div
        vals = torch.empty(T, kp, dtype=x.dtype, device=x.device)[:, :k]
        ids = torch.empty(T, kp, dtype=torch.int32, device=x.device)[:, :k]
        topk_fwd(x, k, False, vals, ids)
        qt = self._decode_repair(topk_fwd, E, k, x.dtype, x.device)
        if qt is not None:  # where the sign bits of outputs p and q(p) differ, the column is E-1-index
            neg = torch.signbit(vals)
            ids = torch.where(neg != neg[:, qt], (E - 1) - ids, ids)
        self._last = (logits, router)
        # the weights: the router's reference formula on the experts quack chose, in fp32 from the
        # exact logits (quack's own fp32 values are truncated; its fused softmax is approximate)
        return ids, router.router.weights(x, ids, bias)

    # -- the check's tolerance ------------------------------------------------------------------
    def route_tolerance(self, dtype: torch.dtype, logits: torch.Tensor | None = None,
                        router: routing.RouterSpec | None = None) -> dict:
        """kwargs for ``check_route`` (the checked call is the last ``route`` call unless
        ``logits`` / ``router`` are given).

        16-bit logits: quack's selection is exact, only the order among exactly equal scores
        may differ, so the defaults hold (selection scores equal, weights to 1e-5).

        fp32 logits: quack orders values by their fp32 bits with the low ``log2(E)``
        mantissa bits replaced by the column, so it can swap two logits a, b (or pick b over a
        at the k-th place) when ``|a - b| < 2**(log2(E) - 23) * max(|a|, |b|)``. With
        ``delta = 2**(log2(E) - 22)`` (twice that, relative) and ``gap = delta * max|x|`` (the
        largest logit gap that may be misordered):
        * scores that are the logits (topk_softmax, topk_hard): relative difference <= delta;
        * scores exp(x - lse) (softmax_topk, top1, score=softmax) or sigmoid(x): relative
          difference <= expm1(gap);
        * weights: one swapped logit moves a softmax / normalised weight by <= 2 * that
          (topk_softmax: 2 * gap / temperature).
        """
        if dtype != torch.float32:
            return {}
        if logits is None or router is None:
            if self._last is None:
                raise RuntimeError("route_tolerance(float32) needs the checked logits and router "
                                   "(or a route call before it)")
            logits, router = (logits if logits is not None else self._last[0],
                              router if router is not None else self._last[1])
        E = logits.shape[1]
        delta = 2.0 ** (math.log2(E) - 22)
        gap = delta * float(logits.detach().float().abs().max()) if logits.numel() else 0.0
        n = router.name
        if n == "topk_hard":
            return {"selection_rtol": delta}
        if n == "topk_softmax":
            return {"selection_rtol": delta, "weight_rtol": 1e-5 + 2 * gap / router.temperature}
        # softmax_topk / top1 / sigmoid_bias (sigmoid or softmax scores)
        m = math.expm1(gap)
        return {"selection_rtol": m, "weight_rtol": 1e-5 + 2 * m}
