"""impl=torch: a strong eager PyTorch -- what a competent engineer writes, not the reference.

* ``route``: the router's scores, ``torch.topk`` (what HF Mixtral/Qwen3 do: an fp32 softmax,
  then the top-k); the weights from the router's own formula. ``torch.topk`` does not promise
  the lower expert among equal scores, so ``exact_ties`` is False and the check compares the
  chosen experts' scores and pairs each weight with its expert. Routers whose selection is not
  one per-token top-k (hash, expert_choice, group-limited's group stage) run the reference
  selection (stable, exact).
* ``metadata``: no sort. The [T, E] routing map (a token picks an expert at most once) and its
  cumulative sum down the tokens give every (token, expert) its rank inside the expert in
  token order -- the reference's order -- so offsets + rank is its packed row (the
  row-id map of Transformer Engine / Megatron-Core's permute). A capacity keeps the first
  ``capacity`` ranks (``drop_policy=position``); ``probs`` needs a per-expert order by weight
  and runs the reference's stable sort.
* ``pack``: one ``index_select`` (zeros where a packed row holds no token). Quantized
  (``pack_fp8``): each token's row quantized once (``routing.quantize_fp8``), then its FP8 row
  and scales gathered -- k times fewer quantizations than packing first.
* ``combine``: on CUDA and dropless, one cuSPARSE SpMM (``torch.sparse.mm``) of the [T, R] CSR
  matrix of each token's slots and weights with the rows: each row read from y, summed with
  fp32 accumulation, no gathered copy (``sparse_combine``). The values take y's dtype, so a
  16-bit combine lists each slot twice, weighted by the fp32 weight's two 16-bit parts hi + lo
  (exact to ~2**-17): rounding the weights to 16 bits alone is off by ~2**-9 of the largest
  product, beyond the tolerance where the products cancel (router=sigmoid_bias with its
  scaling). With dropped or unused slots, and on the CPU (no 16-bit SpMM there): one gather of
  every slot's row (zeroed where dropped) and a ``torch.bmm`` with the same hi + lo weights.
  Measured on an H200 (seventh session, % of copy at seed / qwen3_30b_a3b / deepseek_v3): the
  SpMM 31.1 / 34.1 / 37.3, the gather + bmm 9.1 / 16.2 / 16.7, ``F.embedding_bag`` with hi + lo
  per-sample weights 8.3 / 11.5 / 11.6; with bf16 weights the SpMM reaches 36.5 / 45.0 / 48.2
  but fails the check on sigmoid_bias. Listing each slot's hi and lo entries side by side
  instead of hi entries then lo ones failed the sigmoid_bias check on the H200 (1 % faster).
  Under ``torch.compile`` the reference's per-slot loop, which inductor fuses into one kernel.

Nothing here synchronises with the host, so every stage can be captured in a CUDA graph, and
``impl=compile`` compiles these same functions.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from moebench import routing
from moebench.impls.base import Impl, ImplConfig
from moebench.routing import CapacitySpec, RouterSpec, RoutingMetadata
from moebench.routing.metadata import BEYOND


@dataclass
class TorchConfig(ImplConfig):
    _target_: str = "moebench.impls.torch_impl.TorchImpl"
    name: str = "torch"


def _torch_topk(scores: torch.Tensor, k: int):
    return torch.topk(scores, k, dim=-1, sorted=True)


def uses_reference_selection(router: RouterSpec) -> bool:
    """Routers whose selection is not one per-token top-k of a score: the reference's stable selection."""
    return not router.router.per_token_topk


def route(logits: torch.Tensor, k: int, router: RouterSpec, bias: torch.Tensor | None = None):
    if uses_reference_selection(router):
        return routing.route(logits, k, router, bias)
    return router.router.route(logits, k, bias, topk=_torch_topk)


def select(logits: torch.Tensor, k: int):
    """ids [T, k] int32 and values [T, k] (the logits' dtype) of the k largest logits."""
    vals, ids = torch.topk(logits, k, dim=-1, sorted=True)
    return ids.to(torch.int32), vals


def metadata(ids: torch.Tensor, weights: torch.Tensor, num_experts: int, capacity: CapacitySpec = CapacitySpec(),
             num_rows: int | None = None) -> RoutingMetadata:
    T, S = ids.shape
    E = num_experts
    cap = capacity.capacity(T, S, E)
    if cap is not None and capacity.drop_policy != "position":
        return routing.build_metadata(ids, weights, E, capacity, num_rows)
    R = capacity.packed_rows(T, S, E, num_rows)
    dev = ids.device
    valid = ids >= 0
    e = torch.where(valid, ids, E).long()  # [T, S]; E = no expert (a spare column)
    routing_map = torch.zeros(T, E + 1, dtype=torch.int32, device=dev).scatter_(1, e, 1)
    rank_map = torch.cumsum(routing_map, dim=0, dtype=torch.int32)  # [T, E + 1]: inclusive
    routed = rank_map[-1, :E] if T else torch.zeros(E, dtype=torch.int32, device=dev)
    rank = rank_map.gather(1, e) - 1  # [T, S]: the slot's rank inside its expert, in token order
    kept = valid if cap is None else valid & (rank < cap)
    counts = routed if cap is None else routed.clamp(max=cap)
    A = capacity.align
    if cap is not None and capacity.pad_to_capacity:
        offsets = torch.arange(E + 1, dtype=torch.int32, device=dev) * capacity.aligned(cap)
    else:
        blocks = counts if A == 1 else (counts + (A - 1)) // A * A
        offsets = torch.cat([counts.new_zeros(1), torch.cumsum(blocks, 0, dtype=torch.int32)])
    row = torch.where(kept, offsets[e.clamp(max=E - 1)] + rank, -1)
    scatter = row.to(torch.int32)
    tokens = torch.arange(T, dtype=torch.int32, device=dev)[:, None].expand(T, S)
    gather = torch.full((R + 1,), -1, dtype=torch.int32, device=dev)
    gather.scatter_(0, torch.where(kept, row, R).flatten().long(), tokens.flatten())
    if A > 1:  # the rows past the last block (routing.metadata.BEYOND)
        gather = torch.where(torch.arange(R + 1, device=dev) >= offsets[E], BEYOND, gather)
    w = torch.where(kept, weights.float(), 0.0)
    if capacity.renormalize_after_drop and cap is not None:
        w = w / w.sum(-1, keepdim=True).clamp_min(1e-20)
    return RoutingMetadata(num_experts=E, counts=counts, offsets=offsets, gather_idx=gather[:R], scatter_idx=scatter,
                           weights=w, routed_counts=routed, capacity=cap,
                           padded=capacity.pad_to_capacity and cap is not None, align=A)


def pack(x: torch.Tensor, meta: RoutingMetadata, out: torch.Tensor | None = None) -> torch.Tensor:
    return routing.pack(x, meta, out)


def pack_fp8(x: torch.Tensor, meta: RoutingMetadata, quant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize the tokens, then gather their FP8 rows and scales (bit-exact against the
    reference's pack-then-quantize: the quantization is per row); empty rows quantize zeros."""
    q, s = routing.quantize_fp8(x, quant)
    idx = meta.gather_idx.long()
    rows = q.view(torch.uint8).index_select(0, idx.clamp(min=0))
    scales = s.index_select(0, idx.clamp(min=0))
    if meta.may_have_empty_rows:
        _, s0 = routing.quantize_fp8(x.new_zeros(1, x.shape[1]), quant)
        empty = (idx < 0).unsqueeze(1)
        rows = rows.masked_fill(empty, 0)
        scales = torch.where(empty, s0, scales)
    return rows.view(torch.float8_e4m3fn), scales


def combine(y: torch.Tensor, meta: RoutingMetadata, out: torch.Tensor | None = None,
            weighted: bool = True) -> torch.Tensor:
    if torch.compiler.is_compiling():
        # inductor fuses the reference's per-slot gathers and fp32 multiply-adds into one kernel
        return routing.combine(y, meta, out, weighted)
    T, S = meta.scatter_idx.shape
    H = y.shape[1]
    idx = meta.scatter_idx
    kept = idx >= 0
    # every slot holds a row, and the CSR matrix has no more entries per token (2 S for 16 bits:
    # hi + lo) than it has columns: cuSPARSE refuses nnz > T * R ("invalid value", T 1, R = S)
    entries = S if y.dtype == torch.float32 else 2 * S
    if y.is_cuda and meta.capacity is None and meta.num_rows >= max(T * S, entries):
        return sparse_combine(y, idx, meta.weights if weighted else kept.float())
    rows = y.index_select(0, idx.flatten().clamp(min=0)).view(T, S, H)
    # a dropped / unused slot reads row 0: zero it (an inf or NaN there must not leak in as 0 * inf)
    if meta.capacity is not None or meta.num_rows < T * S:
        rows = rows.masked_fill(~kept[:, :, None], 0)
    w = meta.weights if weighted else kept.float()
    w = torch.where(kept, w, 0.0).float()
    if y.dtype == torch.float32:
        res = torch.bmm(w.view(T, 1, S), rows).view(T, H)
    else:
        # the fp32 weights as two 16-bit parts, hi + lo (exact to ~2**-17), so the batched product
        # runs on the 16-bit rows with fp32 accumulation: rounding the weights to a 16-bit dtype
        # alone is off by ~2**-9 of the largest product, beyond the tolerance where the products
        # cancel (router=sigmoid_bias with its scaling, seen on an H200)
        hi = w.to(y.dtype)
        lo = (w - hi.float()).to(y.dtype)
        if S <= 2:  # one [1, 2S] x [2S, H] product per token (H200: cuBLAS is slow on [2, S] x [S, H] at S 2)
            res = torch.bmm(torch.cat([hi, lo], 1).view(T, 1, 2 * S), torch.cat([rows, rows], 1)).view(T, H)
        else:  # one [2, S] x [S, H] product per token, then hi + lo
            part = torch.bmm(torch.stack([hi, lo], 1), rows)
            res = part[:, 0] + part[:, 1]
    if out is None:
        return res.to(y.dtype)
    return out.copy_(res)


def sparse_combine(y: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """out = A @ y for the [T, R] CSR matrix of the slots' rows and weights (cuSPARSE's SpMM,
    fp32 accumulation): every row read once from y, no gathered copy. A 16-bit y takes its
    values in its dtype, so each slot is listed twice, weighted hi then lo."""
    T, S = idx.shape
    cols, vals = idx, w.float()
    if y.dtype != torch.float32:
        hi = vals.to(y.dtype)
        cols, vals = torch.cat([idx, idx], 1), torch.cat([hi, (vals - hi.float()).to(y.dtype)], 1)
    n = cols.shape[1]
    crow = torch.arange(0, T * n + 1, n, dtype=cols.dtype, device=y.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        a = torch.sparse_csr_tensor(crow, cols.reshape(-1), vals.reshape(-1), size=(T, y.shape[0]),
                                    check_invariants=False)
        return torch.sparse.mm(a, y)


def route_backward(logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, d_weights: torch.Tensor,
                   router: RouterSpec) -> torch.Tensor:
    """d_logits through the router's weights formula (``Router.gradient_form``), written out in
    a few [T, S] and [T, E] kernels (no autograd graph); ``weights`` are the forward's."""
    kind, renorm, temp, scaling = router.router.gradient_form()
    if kind == "one":
        return torch.zeros_like(logits)
    x = logits.float()
    valid = ids >= 0
    idl = ids.long().clamp(min=0)
    dw = torch.where(valid, d_weights.float(), 0.0)
    xs = x.gather(1, idl)
    if kind == "prob":
        p = torch.softmax(x, dim=-1)
        r = p.gather(1, idl)
    elif kind == "score":
        r = torch.sigmoid(xs)
    elif kind == "softmax_k":
        r = torch.softmax(xs / temp, dim=-1)
    else:  # sum_k: the signed sum, clamped only when >= 0 (like the reference)
        v = xs / temp
        s = v.sum(-1, keepdim=True)
        sc = torch.where(s < 0, s, s.clamp_min(1e-20))
        r = v / sc
    r = torch.where(valid, r, 0.0)
    if renorm:
        tot = r.sum(-1, keepdim=True).clamp_min(1e-20)
        w = scaling * r / tot
        dr = scaling / tot * (dw - (w * dw).sum(-1, keepdim=True) / scaling)
    else:
        dr = scaling * dw
    zeros = torch.zeros_like(x)
    c = (r * dr).sum(-1, keepdim=True)
    if kind == "prob":
        return (p * (zeros.scatter_add(1, idl, torch.where(valid, dr, 0.0)) - c)).to(logits.dtype)
    if kind == "score":
        g = dr * r * (1 - r)
    elif kind == "softmax_k":
        g = r * (dr - c) / temp
    else:
        g = (dr - c * (sc == s)) / sc / temp
    return zeros.scatter_add(1, idl, torch.where(valid, g, 0.0)).to(logits.dtype)


def pack_backward(d_packed: torch.Tensor, meta: RoutingMetadata) -> torch.Tensor:
    """An unweighted combine: every token's kept rows' gradients summed (fp32 accumulation)."""
    return combine(d_packed, meta, weighted=False)


def combine_backward(d_out: torch.Tensor, y: torch.Tensor, meta: RoutingMetadata,
                     weighted: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """d_y: every slot's weighted copy of d_out written to its row (``index_copy_``; rows no kept
    slot points at are zero); d_w: one batched product of each token's rows with its d_out."""
    T, S = meta.scatter_idx.shape
    R, H = y.shape
    idx = meta.scatter_idx
    kept = idx >= 0
    w = torch.where(kept, meta.weights if weighted else 1.0, 0.0).to(d_out.dtype)
    d_y = d_out.new_zeros(R + 1, H) if meta.may_have_empty_rows else d_out.new_empty(R + 1, H)
    d_y.index_copy_(0, torch.where(kept, idx, R).flatten().long(), (d_out[:, None, :] * w[:, :, None]).view(T * S, H))
    if not weighted:
        return d_y[:R], torch.zeros(T, S, dtype=torch.float32, device=y.device)
    rows = y.index_select(0, idx.flatten().clamp(min=0)).view(T, S, H)
    d_w = torch.bmm(rows, d_out.view(T, H, 1)).view(T, S).float()
    return d_y[:R], torch.where(kept, d_w, 0.0)


class TorchImpl(Impl):
    name = "torch"
    exact_ties = False

    def exact_ties_for(self, router: RouterSpec) -> bool:
        return uses_reference_selection(router)

    def route(self, logits, k, router, bias=None, out=None):
        return route(logits, k, router, bias)

    def select(self, logits, k, router, bias=None, out=None):
        return select(logits, 1 if router.name == "top1" else k)

    def metadata(self, ids, weights, num_experts, capacity, num_rows=None):
        return metadata(ids, weights, num_experts, capacity, num_rows)

    def pack(self, x, meta, out=None):
        return pack(x, meta, out)

    def combine(self, y, meta, out=None, weighted=True):
        return combine(y, meta, out, weighted)

    def pack_fp8(self, x, meta, quant, out=None):
        return pack_fp8(x, meta, quant)

    def route_backward(self, logits, ids, weights, d_weights, router, bias=None):
        return route_backward(logits, ids, weights, d_weights, router)

    def pack_backward(self, d_packed, meta):
        return pack_backward(d_packed, meta)

    def combine_backward(self, d_out, y, meta, weighted=True):
        return combine_backward(d_out, y, meta, weighted)
