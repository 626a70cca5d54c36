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
    """A torch model of quack 0.6.5's ``_topk_fwd``, bit for bit as read from ``quack/topk.py``
    without the softmax: index bits in the low mantissa bits, top-k of the encoded keys, the
    decode with the sign of ``decode_sign_positions``; with ``softmax``, an fp32 softmax of the
    (truncated) selected values written in the values' dtype (quack's approximate exp2 aside).
    For CPU tests; the indices and values are checked against the kernel in tests/gpu/test_peers.py."""
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
    vals = (top.view(torch.int32) & ~mask).view(torch.float32)
    values.copy_((torch.softmax(vals, dim=-1) if softmax else vals).to(values.dtype))


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
        self._decode_q: dict = {}
        self._out: dict = {}
        self._repairs: dict = {}

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

    # -- the kernel, as quack's users call it -------------------------------------------------
    def _outputs(self, T: int, E: int, k: int, dtype: torch.dtype, device):
        """The [T, k] values and int32 ids quack writes into, allocated once per shape (outside
        the timed calls): views of buffers with 16-byte-padded rows (quack's stride rule)."""
        key = (T, E, k, dtype, device)
        if key not in self._out:
            div = row_divisibility(dtype, E)
            kp = -(-k // div) * div
            self._out[key] = (torch.empty(T, kp, dtype=dtype, device=device)[:, :k],
                              torch.empty(T, kp, dtype=torch.int32, device=device)[:, :k])
        return self._out[key]

    def _repair_kernel(self, key, qt: torch.Tensor, E: int, device):
        """quack 0.6.5's index-decode repair as one kernel: where the sign bits of outputs p and
        q(p) differ, the column is E-1-index (torch.compile fuses it on CUDA; eager elsewhere).
        Built once per probed shape ``key`` (no host work per call: graph-capturable)."""
        if key not in self._repairs:
            def repair(vals, ids):
                neg = torch.signbit(vals)
                return torch.where(neg != neg[:, qt], (E - 1) - ids, ids)
            self._repairs[key] = torch.compile(repair, fullgraph=True, dynamic=False) if device.type == "cuda" \
                else repair
        return self._repairs[key]

    def _topk(self, logits, k, router, bias, softmax: bool):
        """quack's top-k of the logits (ids repaired where its decode is wrong): (x, ids, vals, repaired)."""
        self.check_device(logits.device)
        T, E = logits.shape
        reason = unsupported_reason(E, k, logits.dtype, router, bias)
        if reason:
            raise Unsupported(reason)
        topk_fwd = self.kernel()
        k = 1 if router.name == "top1" else k
        x = logits if logits.is_contiguous() else logits.contiguous()
        if x.data_ptr() % 16:  # quack assumes 16-byte aligned rows
            x = x.clone()
        qt = self._decode_repair(topk_fwd, E, k, x.dtype, x.device)
        if softmax and qt is not None:
            softmax = False  # the repair reads the values' signs: quack's softmax would erase them
        vals, ids = self._outputs(T, E, k, x.dtype, x.device)
        topk_fwd(x, k, softmax, vals, ids)
        if qt is not None:
            ids = self._repair_kernel((E, k, x.dtype, x.device), qt, E, x.device)(vals, ids)
        return x, ids, vals, softmax

    # -- the stages ----------------------------------------------------------------------------
    def select(self, logits, k, router, bias=None, out=None):
        """quack's kernel alone: ids [T, k] int32 and the k largest logits in their dtype."""
        _, ids, vals, _ = self._topk(logits, k, router, bias, softmax=False)
        return ids, vals

    def route(self, logits, k, router, bias=None, out=None):
        """ids [T, k] int32 and weights [T, k]: quack's fused softmax where the weights are a
        softmax over the selected logits (topk_softmax, softmax_topk renormalised) and its decode
        needs no repair -- weights in the logits' dtype, as quack gives them; otherwise the
        kernel plus the least epilogue that gives the router's reference weights in fp32 (a
        softmax of the selected values, or the router's formula on the chosen experts, e.g. the
        full-row softmax of softmax_topk). ``out`` is not written (quack writes 16-byte-padded rows)."""
        semantics = router.router
        fused = semantics.softmax_over_selected()
        x, ids, vals, fused = self._topk(logits, k, router, bias, softmax=fused)
        if fused:
            return ids, vals
        if semantics.softmax_over_selected() and x.dtype != torch.float32:  # 16-bit values are exact
            return ids, torch.softmax(vals.float(), dim=-1)
        return ids, semantics.weights(x, ids, bias)

    def fuses_softmax(self, router: routing.RouterSpec, E: int, k: int, dtype: torch.dtype, device) -> bool:
        """Does ``route`` return quack's own fused-softmax weights for this case?"""
        return (router.router.softmax_over_selected()
                and self._decode_q.get((E, 1 if router.name == "top1" else k, dtype, device)) is None)

    # -- the check's tolerance ------------------------------------------------------------------
    def route_tolerance(self, dtype: torch.dtype, logits: torch.Tensor, router: routing.RouterSpec, k: int) -> dict:
        """kwargs for ``check_route`` on the checked call's logits and router.

        Selection. 16-bit logits: quack's selection is exact, only the order among exactly
        equal scores may differ, so the default holds (selection scores equal). fp32 logits:
        quack orders values by their fp32 bits with the low ``log2(E)`` mantissa bits replaced
        by the column, so it can swap two logits a, b (or pick b over a at the k-th place) when
        ``|a - b| < 2**(log2(E) - 23) * max(|a|, |b|)``. With ``delta = 2**(log2(E) - 22)``
        (twice that, relative) and ``gap = delta * max|x|`` (the largest logit gap that may be
        misordered): scores that are the logits (topk_softmax, topk_hard) differ by <= delta
        relative; scores exp(x - lse) or sigmoid(x) by <= expm1(gap).

        Weights. Each returned weight is compared with the reference weight of its own expert:
        the fp32 epilogue gives it to 1e-5. quack's fused softmax writes weights in the logits'
        dtype: bf16 within 2**-8 relative (its rounding, 2**-9, and quack's approximate exp2),
        fp16 within 2**-10; fp32 within 2 * gap + 1e-5 (its softmax reads the truncated values).
        """
        E = logits.shape[1]
        fp32 = dtype == torch.float32
        delta = 2.0 ** (math.log2(E) - 22)
        gap = delta * float(logits.detach().float().abs().max()) if logits.numel() and fp32 else 0.0
        out = {}
        if fp32:
            out["selection_rtol"] = delta if router.name in ("topk_hard", "topk_softmax") else math.expm1(gap)
        if self.fuses_softmax(router, E, k, dtype, logits.device):
            out["weight_rtol"] = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -10}.get(dtype, 2 * gap) + 1e-5
        return out

    def select_tolerance(self, dtype: torch.dtype, logits: torch.Tensor) -> dict:
        """kwargs for ``check_select``: fp32 values come back with their low log2(E) mantissa
        bits cleared (relative error < 2**(log2(E) - 23)), and near-ties may swap within that."""
        if dtype != torch.float32:
            return {}
        return {"value_rtol": 2.0 ** (math.log2(logits.shape[1]) - 22)}
