"""Correctness checks against the reference: a failed check is a ``mismatch`` row."""

from __future__ import annotations

import torch

from moebench.errors import Mismatch
from moebench.routing import RoutingMetadata

__all__ = ["Mismatch", "TOLERANCE", "assert_close", "assert_equal", "check_metadata", "check_route", "check_select", "poison",
           "poison_free_blocks"]


#: (rtol, atol) for values computed in fp32 and rounded to the dtype (combine, weights)
TOLERANCE = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill an output buffer with values no correct kernel leaves behind."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(-(2**30) if t.dtype in (torch.int32, torch.int64) else 0)


def poison_free_blocks(like: list[torch.Tensor]) -> None:
    """For stages that allocate their own outputs: hand the caching allocator back poisoned
    blocks of the outputs' sizes, so the checked call most likely gets memory holding
    poison, not a previous run's correct values (an unwritten element then shows)."""
    blocks = [poison(torch.empty_like(t)) for t in like if t.numel()]
    del blocks


def assert_equal(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    if got.shape != ref.shape:
        raise Mismatch(f"{what}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
    if got.dtype.is_floating_point and torch.isnan(got).any():
        n = int(torch.isnan(got).sum())
        raise Mismatch(f"{what}: {n} elements unwritten or NaN")
    bad = got != ref.to(got.dtype)
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise Mismatch(f"{what}: {int(bad.sum())} of {ref.numel()} elements differ, first at {i}: "
                       f"{got[tuple(i)].item()} != {ref[tuple(i)].item()}")


def assert_close(got: torch.Tensor, ref: torch.Tensor, what: str, dtype: torch.dtype | None = None,
                 rtol: float | None = None, atol: float | None = None) -> None:
    if got.shape != ref.shape:
        raise Mismatch(f"{what}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
    r, a = TOLERANCE[dtype or got.dtype]
    rtol, atol = rtol if rtol is not None else r, atol if atol is not None else a
    g, f = got.float(), ref.float()
    nan_differs = torch.isnan(g) != torch.isnan(f)
    if nan_differs.any():
        raise Mismatch(f"{what}: {int(nan_differs.sum())} elements NaN in one of result and reference "
                       "(unwritten or wrong)")
    bad = (g - f).abs() > atol + rtol * f.abs()
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise Mismatch(f"{what}: {int(bad.sum())} of {ref.numel()} elements beyond rtol={rtol:g} atol={atol:g}, "
                       f"first at {i}: {g[tuple(i)].item():.6g} vs {f[tuple(i)].item():.6g}")


def _check_selection(gi: torch.Tensor, ri: torch.Tensor, selection: torch.Tensor, selection_rtol: float) -> None:
    """Ids that may differ from the reference only among equal selection scores: in range,
    distinct per token, and the multiset of their selection scores the reference's."""
    if gi.shape != ri.shape:
        raise Mismatch(f"expert ids: shape {tuple(gi.shape)} != reference {tuple(ri.shape)}")
    gl = gi.long()
    if ((gl < 0) | (gl >= selection.shape[1])).any():
        raise Mismatch("expert ids: out of range")
    srt = gl.sort(1).values
    if (srt[:, 1:] == srt[:, :-1]).any():
        raise Mismatch("expert ids: a token got the same expert twice")
    gs = selection.gather(1, gl).sort(1, descending=True).values
    rs = selection.gather(1, ri.long()).sort(1, descending=True).values
    assert_close(gs, rs, "selection scores of the chosen experts", rtol=selection_rtol, atol=0.0)


def check_route(got, ref, *, selection: torch.Tensor | None, exact_ties: bool, weights_of=None, weight_rtol=1e-5,
                weight_atol=1e-6, selection_rtol=0.0) -> None:
    """ids [T, S] and weights [T, S] against the reference.

    An implementation that claims the reference tie-break (``exact_ties``) must return the
    same ids in the same order. Otherwise it may pick a different expert among experts with
    equal selection scores: then the selection scores of its ids must equal the reference's
    (as multisets per token, within ``selection_rtol``), and each weight must be the reference
    weight of the expert in its own slot: ``weights_of(ids)`` gives those
    (``moebench.routing.reference_weights``), so right ids with the weights in the wrong slots
    are a mismatch.
    """
    (gi, gw), (ri, rw) = got, ref
    if exact_ties:
        assert_equal(gi.to(ri.dtype), ri, "expert ids")
        assert_close(gw.float(), rw, "gate weights", rtol=weight_rtol, atol=weight_atol)
        return
    _check_selection(gi, ri, selection, selection_rtol)
    if weights_of is None:
        raise ValueError("check_route without exact_ties needs weights_of (the reference weights of given ids)")
    if gw.shape != gi.shape:
        raise Mismatch(f"gate weights: shape {tuple(gw.shape)} != ids {tuple(gi.shape)}")
    assert_close(gw.float(), weights_of(gi), "gate weights (slot by slot, of the returned experts)",
                 rtol=weight_rtol, atol=weight_atol)


def check_select(got, ref_ids: torch.Tensor, logits: torch.Tensor, *, exact_ties: bool, value_rtol: float = 0.0) -> None:
    """The select stage: ids [T, k] and values [T, k] (the logits of the chosen experts, in any
    float dtype). Ids as in :func:`check_route` (the selection scores are the logits); values
    equal to the logits at the returned ids (within ``value_rtol`` for a kernel that drops low
    mantissa bits)."""
    gi, gv = got
    x = logits.float()
    if exact_ties:
        assert_equal(gi.to(ref_ids.dtype), ref_ids, "expert ids")
    else:
        _check_selection(gi, ref_ids, x, value_rtol)
    if gv.shape != gi.shape:
        raise Mismatch(f"values: shape {tuple(gv.shape)} != ids {tuple(gi.shape)}")
    assert_close(gv.float(), x.gather(1, gi.long()), "selected values", rtol=value_rtol, atol=0.0)


def check_metadata(got: RoutingMetadata, ref: RoutingMetadata) -> None:
    for name in ("counts", "offsets", "gather_idx", "scatter_idx", "routed_counts"):
        assert_equal(getattr(got, name).to(torch.int64), getattr(ref, name).to(torch.int64), name)
    assert_close(got.weights, ref.weights, "weights", rtol=1e-6, atol=1e-7)
