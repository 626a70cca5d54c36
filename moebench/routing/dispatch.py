"""Pack (tokens to expert-contiguous rows) and combine (weighted un-permute back to token
order, fp32 accumulation): the reference of every implementation's pack and combine."""

from __future__ import annotations

import torch

from moebench.routing.metadata import RoutingMetadata

#: quantize on pack: none, or FP8 e4m3 rows with one fp32 scale per 128 channels -- amax / 448
#: (DeepGEMM's per-block cast) or the smallest power of two >= amax / 448 (UE8M0)
QUANTS = ("none", "fp8_block128", "fp8_ue8m0")
FP8_BLOCK = 128

def pack(x: torch.Tensor, meta: RoutingMetadata, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H] -> packed [R, H]: row r is x[gather_idx[r]], zeros where gather_idx is -1."""
    idx = meta.gather_idx.long()
    if out is None:  # differentiable (autograd of the reference chain)
        rows = torch.index_select(x, 0, idx.clamp(min=0))
        return rows.masked_fill((idx < 0).unsqueeze(1), 0) if meta.may_have_empty_rows else rows
    torch.index_select(x, 0, idx.clamp(min=0), out=out)
    if meta.may_have_empty_rows:
        out.masked_fill_((idx < 0).unsqueeze(1), 0)
    return out


def combine(y: torch.Tensor, meta: RoutingMetadata, out: torch.Tensor | None = None,
            weighted: bool = True) -> torch.Tensor:
    """packed [R, H] -> out [T, H]: out[t] = sum_j w[t, j] * y[scatter_idx[t, j]] over kept
    slots (w = 1 when not ``weighted``), accumulated in fp32, written in y's dtype."""
    T, S = meta.scatter_idx.shape
    idx = meta.scatter_idx.long()
    kept = idx >= 0
    w = meta.weights if weighted else kept.float()
    acc_dtype = torch.promote_types(y.dtype, torch.float32)  # fp32 (fp64 stays fp64: gradcheck)
    acc = torch.zeros(T, y.shape[1], dtype=acc_dtype, device=y.device)
    # a dropped / unused slot reads row 0: zero it, or an inf/NaN there would leak in as 0 * inf
    # (static test: slots can be dropped under a capacity, or be -1 when rows < T * S)
    may_drop = meta.capacity is not None or meta.num_rows < T * S
    for j in range(S):
        rows = y.index_select(0, idx[:, j].clamp(min=0)).to(acc_dtype)
        if may_drop:
            rows.masked_fill_(~kept[:, j, None], 0.0)
        acc.addcmul_(rows, torch.where(kept[:, j], w[:, j], 0.0).unsqueeze(1))
    if out is None:
        return acc.to(y.dtype)
    return out.copy_(acc)


# -- backward: torch autograd of the functions above ---------------------------------------

def pack_backward(d_packed: torch.Tensor, meta: RoutingMetadata) -> torch.Tensor:
    """d_x [T, H] of :func:`pack`: what autograd of its index_select (and zeroed empty rows)
    gives -- every packed row's gradient added to its token (an ``index_add``, in d_packed's dtype)."""
    idx = meta.gather_idx.long()
    rows = d_packed.masked_fill((idx < 0).unsqueeze(1), 0) if meta.may_have_empty_rows else d_packed
    d_x = torch.zeros(meta.num_tokens, d_packed.shape[1], dtype=d_packed.dtype, device=d_packed.device)
    return d_x.index_add_(0, idx.clamp(min=0), rows)


def combine_backward(d_out: torch.Tensor, y: torch.Tensor, meta: RoutingMetadata,
                     weighted: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_y [R, H], d_w [T, S] fp32) of :func:`combine` by autograd: d_w is the gradient of the
    gate weights (zero where a slot is dropped); unweighted, d_w is zero."""
    import dataclasses

    y = y.detach().requires_grad_(True)
    w = meta.weights.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = combine(y, dataclasses.replace(meta, weights=w), weighted=weighted)
        d_y, d_w = torch.autograd.grad(out, (y, w), d_out, allow_unused=True)
    if d_w is None:
        d_w = torch.zeros_like(meta.weights)
    return d_y, d_w.float()


# -- quantize on pack -----------------------------------------------------------------------------

def quantize_fp8(rows: torch.Tensor, mode: str = "fp8_block128") -> tuple[torch.Tensor, torch.Tensor]:
    """rows [R, H] -> (q [R, H] float8_e4m3fn, scales [R, H / 128] fp32), ``rows ~ q * scale``
    per 128-channel block. ``amax = max(max |x|, 1e-4)`` per block; ``fp8_block128``:
    ``q = fp8(x * (448 / amax))``, ``scale = amax / 448``; ``fp8_ue8m0``: ``scale = 2**e``, the
    smallest power of two with ``448 * 2**e >= amax``, ``q = fp8(x * 2**-e)``. The cast rounds to
    nearest and saturates at +-448; the divisions are the correctly rounded fp32 quotients, computed
    in fp64 and rounded once (53 >= 2 * 24 + 2 bits: the same value), which stays so under
    ``torch.compile`` -- Triton's fp32 division is approximate, and inductor may turn a division
    by a constant into a multiply by its reciprocal."""
    R, H = rows.shape
    if H % FP8_BLOCK:
        raise ValueError(f"H={H} is not a multiple of {FP8_BLOCK} (one scale per 128 channels)")
    v = rows.float().view(R, H // FP8_BLOCK, FP8_BLOCK)
    amax = v.abs().amax(-1).clamp(min=1e-4)
    if mode == "fp8_block128":
        a = amax.double()
        fmax = torch.full_like(a, 448.0)  # tensor by tensor: eager torch turns a division by a scalar into a multiply
        inv, scale = (fmax / a).float(), (a / fmax).float()
    elif mode == "fp8_ue8m0":
        m, ex = torch.frexp(amax)  # amax = m * 2**ex, m in [0.5, 1)
        e = ex - 9 + (m > 0.875).to(ex.dtype)
        one = torch.ones_like(amax)
        inv, scale = torch.ldexp(one, -e), torch.ldexp(one, e)
    else:
        raise ValueError(f"quantize mode={mode!r}; accepted: fp8_block128, fp8_ue8m0")
    q = (v * inv[..., None]).to(torch.float8_e4m3fn).view(R, H)
    return q, scale


def pack_fp8(x: torch.Tensor, meta: RoutingMetadata, mode: str = "fp8_block128") -> tuple[torch.Tensor, torch.Tensor]:
    """Pack then quantize: the packed rows as FP8 with their block scales (empty rows quantize zeros)."""
    return quantize_fp8(pack(x, meta), mode)
