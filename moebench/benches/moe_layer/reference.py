"""The MoE layer's weights, its input, the SwiGLU, and two references: the torch
implementation (pack, a ``torch.mm`` per expert, SwiGLU, combine) in the job's dtype, and an
fp32 loop over the experts that shares no code with pack, the GEMM paths or combine -- and its
gradients by torch autograd (:func:`moe_layer_reference_grads`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


#: (rtol, atol) of the job's dtype chain against the fp32 reference (several roundings deep:
#: h, a, y and the output are each rounded to the dtype; measured max |err| / (1 + |ref|) on
#: bf16 is about 0.007 at tiny to mid shapes, a lost or misrouted slot is O(0.1))
FP32_REFERENCE_TOLERANCE = {torch.bfloat16: (3e-2, 3e-2), torch.float16: (5e-3, 5e-3),
                            torch.float32: (1e-4, 1e-4)}


def expert_flops(tokens_times_slots: int, hidden: int, intermediate: int) -> float:
    """SwiGLU forward FLOPs of M expert rows: 6*M*H*I (gate/up 4*M*H*I, down 2*M*I*H)."""
    return 6.0 * tokens_times_slots * hidden * intermediate


#: FLOPs of a GEMM stage by direction, in units of its forward: a GEMM's backward is two GEMMs of
#: its size (the input's gradient and the weight's), so fwd + bwd of the experts is 18*M*H*I
DIRECTION_FLOPS = {"fwd": 1.0, "bwd": 2.0, "fwdbwd": 3.0}


#: (rtol, atol in units of the reference's RMS) of a gradient against a torch-autograd reference:
#: a weight gradient (and d_Wg) sums over an expert's rows (the tokens): it grows as sqrt(rows),
#: and so does the rounding of its O(1) terms, so the atol follows the gradient's own magnitude.
#: rtol is the chain tolerance (FP32_REFERENCE_TOLERANCE: a gradient is as many roundings deep as
#: the output -- d_y, d_a, d_h, d_packed, d_x each rounded to the dtype). Measured on the CPU, bf16,
#: the torch layer's autograd against the fp32 reference's (T 128..4096, E 8..64): error std 0.005
#: RMS, and at rtol 3e-2 an atol of up to 0.048 RMS needed (the tail grows with the element
#: count); 0.1 RMS is still stricter than the forward's atol 0.03 on outputs of RMS 0.15..0.25.
#: A systematic error (a scaled, transposed or misrouted gradient, a lost route gradient) is far
#: outside it; one token's row in a weight gradient summed over ~T*k/E rows is not.
GRAD_TOLERANCE = {torch.bfloat16: (3e-2, 0.1), torch.float16: (5e-3, 0.015), torch.float32: (1e-4, 1e-3)}


def grad_tolerance(ref: torch.Tensor, dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) of a gradient against the reference ``ref`` (:data:`GRAD_TOLERANCE`, the atol
    scaled by ``ref``'s RMS). A zero reference (an unweighted combine gives the router no
    gradient) must be matched exactly."""
    rtol, atol = GRAD_TOLERANCE[dtype]
    rms = float(ref.detach().float().pow(2).mean().sqrt()) if ref.numel() else 0.0
    return rtol, atol * rms


@dataclass
class LayerWeights:
    """Router and expert weights, in the job's dtype."""

    wg: torch.Tensor  # [H, E]
    w1: torch.Tensor  # [E, 2I, H]: rows [0, I) gate projection, [I, 2I) up projection
    w2: torch.Tensor  # [E, H, I]

    @property
    def intermediate(self) -> int:
        return self.w2.shape[2]

    @property
    def experts(self) -> int:
        return self.w1.shape[0]


def make_weights(experts: int, hidden: int, intermediate: int, dtype=torch.bfloat16, device="cpu",
                 seed: int = 17) -> LayerWeights:
    """Seeded N(0, 1/fan_in) weights drawn in place in ``dtype`` (no fp32 temporaries)."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed + 2)

    def draw(shape, fan_in):
        return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, fan_in ** -0.5, generator=g)

    E, H, I = experts, hidden, intermediate
    return LayerWeights(draw((H, E), H), draw((E, 2 * I, H), H), draw((E, H, I), I))


def make_x(tokens: int, hidden: int, dtype=torch.bfloat16, device="cpu", seed: int = 17) -> torch.Tensor:
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    return torch.empty(tokens, hidden, dtype=dtype, device=device).normal_(0.0, 1.0, generator=g)


def swiglu(h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """SiLU(gate) * up of ``h`` = [gate | up] ([R, 2I] -> [R, I])."""
    I = h.shape[1] // 2
    return torch.mul(F.silu(h[:, :I]), h[:, I:], out=out)


def moe_layer_reference(x: torch.Tensor, w: LayerWeights, ids: torch.Tensor, slot_weights: torch.Tensor,
                        kept: torch.Tensor, weighted: bool = True) -> torch.Tensor:
    """The layer in fp32, independently of pack, the GEMM paths and combine:
    ``out[t] = sum over kept slots j of w[t, j] * W2[e] (silu(W1g[e] x_t) * W1u[e] x_t)``, e = ids[t, j].

    One expert at a time over the tokens that chose it (in token order); each expert's weights
    are converted to fp32 one at a time (transient). ``kept`` [T, S] marks the slots a capacity
    keeps (``scatter_idx >= 0``), ``slot_weights`` [T, S] the gate weights (unused when not
    ``weighted``: each kept slot counts 1). Returns fp32 [T, H]."""
    T, H = x.shape
    I = w.intermediate
    xf = x.float()
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    ids = ids.long()
    for e in range(w.experts):
        tok, slot = ((ids == e) & kept).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        h = xf[tok] @ w.w1[e].float().T
        a = F.silu(h[:, :I]) * h[:, I:]
        y = a @ w.w2[e].float().T
        c = slot_weights[tok, slot].float() if weighted else torch.ones(tok.numel(), device=x.device)
        out.index_add_(0, tok, y * c[:, None])
    return out




def moe_layer_reference_grads(x: torch.Tensor, w: LayerWeights, prior: torch.Tensor | None, ids: torch.Tensor,
                              kept: torch.Tensor, weights_of: Callable[[torch.Tensor], torch.Tensor],
                              weighted: bool, d_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """fp32 torch autograd of the layer from the gate on: ``logits = x @ Wg (+ prior)``, the gate
    weights ``weights_of(logits)`` [T, S] of the (fixed) experts ``ids`` zeroed where a slot is
    dropped (``kept``), then :func:`moe_layer_reference`. Returns (out, d_x, d_Wg, d_W1, d_W2)
    in fp32 for the upstream gradient ``d_out`` (the selection and the prior get none)."""
    xl = x.detach().float().requires_grad_(True)
    wg, w1, w2 = (t.detach().float().requires_grad_(True) for t in (w.wg, w.w1, w.w2))
    with torch.enable_grad():
        logits = xl @ wg if prior is None else torch.addmm(prior.float(), xl, wg)
        slot_w = torch.where(kept, weights_of(logits).float(), 0.0)
        out = moe_layer_reference(xl, LayerWeights(wg, w1, w2), ids, slot_w, kept, weighted)
        leaves = (xl, wg, w1, w2)
        grads = torch.autograd.grad(out, leaves, d_out.float(), allow_unused=True)
    return (out.detach(), *(torch.zeros_like(v) if g is None else g for g, v in zip(grads, leaves)))
