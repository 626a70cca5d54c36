"""The expert GEMMs of the MoE layer (``bench.gemm``): gemm1 (gate/up), the SwiGLU and gemm2
(down) over the packed expert rows, by a loop of ``torch.mm``, ``torch._grouped_mm`` or quack's
varlen-M GEMM (optionally with gather-A, the pack fused into gemm1, and the gated SwiGLU
epilogue); their backward (training); the layer's buffers; and the torch implementation of the
layer built on the loop, with its gradients by torch autograd.

Backward (``*_train`` runs a stage's forward keeping what its backward needs, ``*_backward``
gives the gradients of its inputs and weights from a gradient of its output):

* ``loop`` and ``grouped_mm``: torch autograd of the forward (``torch.mm`` per expert,
  ``torch._grouped_mm``, whose autograd computes d_A = grouped_mm(d_out, W) and d_W =
  grouped_mm(d_out^T, A) per group), one graph per stage, so each stage's backward is what
  ``torch.autograd`` runs for it;
* ``quack_varlen``: quack's varlen GEMMs as quack's own MLP backward calls them -- d_A =
  ``gemm(d_out, W, cu_seqlens_m=offsets)``, d_W = ``gemm(d_out.T, A, cu_seqlens_k=offsets)``
  (varlen-K: one [N, K] block per expert, summed over its rows) -- and torch autograd of the
  SwiGLU between them;
* ``quack_gated``: the forward stores gemm1's pre-activation (interleaved gate/up, what quack's
  gated epilogue writes); gemm2's backward is ``gemm_dgated(d_y, W2, preact, "swiglu")``: d_a
  and the SwiGLU backward in one GEMM epilogue, giving d_h (interleaved) and the recomputed
  a for d_W2; gemm1's backward reads the interleaved d_h against the concat [gate; up] W1 with
  ``concat_layout=("B",)`` (d_packed) and ``("out",)`` (d_W1), quack's ``_MLPGatedConcatOps``;
* the gather-A paths: no backward (``unsupported``).

The backward GEMMs take quack's default config (``bench.quack_tuned`` applies; a pinned
``bench.quack_config`` is a forward config and pins the forward GEMMs only).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from moebench import routing
from moebench.benches.moe_layer.quack_config import quack_config_fields
from moebench.benches.moe_layer.reference import LayerWeights, swiglu
from moebench.check import poison
from moebench.errors import Unsupported

GEMMS = ("loop", "grouped_mm", "quack_varlen", "quack_gather", "quack_gated", "quack_gather_gated")


class ExpertGemm:
    """gemm1 (gate/up), activation and gemm2 (down) over the packed expert rows.

    ``gemm1`` takes the packed rows [R, H] -- or x [T, H] when ``fuses_pack`` (gather-A) -- and
    returns h [R, 2I], or a [R, I] when ``fuses_act``. ``gemm2`` takes a [R, I] and returns
    y [R, H]. Rows past ``offsets[E]`` are left unspecified. ``out`` buffers are used where the
    implementation writes into a given tensor; what is returned is what counts.
    """

    name = "base"
    devices = ("cpu", "cuda")
    fuses_pack = False
    fuses_act = False
    host_sync = False  # reads the expert offsets on the host (not capturable in a CUDA graph)

    def __init__(self, tuned: bool = False, config: str | None = None):
        self.tuned = tuned
        self.config = config  # a pinned quack GemmConfig's canonical name (quack_* GEMMs only)

    @property
    def label(self) -> str:
        """The GEMM path as the rows name it: ``bench.gemm``, with a pinned config in brackets."""
        return f"{self.name}[{self.config}]" if self.config else self.name

    def check(self, device: torch.device, dtype: torch.dtype, timing_mode: str, hidden: int,
              intermediate: int) -> None:
        if device.type not in self.devices:
            raise Unsupported(f"bench.gemm={self.name} runs on {'/'.join(self.devices)} only (device={device.type})")
        if self.host_sync and timing_mode == "graph":
            raise Unsupported(f"bench.gemm={self.name} reads the expert offsets on the host (one sync per GEMM); "
                              "it cannot be captured with timing=graph")

    def gemm1(self, a, meta, w, out):
        raise NotImplementedError

    def activation(self, h, out):
        if self.fuses_act:
            raise Unsupported(f"fused into gemm1 (bench.gemm={self.name}: SwiGLU in gemm1's epilogue)")
        return swiglu(h, out)

    def gemm2(self, a, meta, w, out):
        raise NotImplementedError

    # -- training: forward keeping what the backward needs, and the backward ---------------
    def check_backward(self) -> None:
        """Raises Unsupported where this path has no backward."""

    def gemm1_train(self, inp, meta, w, bufs):
        """gemm1 forward for training: (h, or a when ``fuses_act``; the context of its backward)."""
        return _Graph.trace(lambda p, w1: self._gemm1_graph(p, meta, w1), inp, w.w1)

    def gemm1_backward(self, ctx, d_h, meta, w, grads):
        """(d_inp [R, H], d_W1 [E, 2I, H]) from d_h [R, 2I] (interleaved when ``fuses_act``)."""
        return ctx.grad(d_h)

    def activation_train(self, h, bufs):
        self.activation(h[:0], bufs.a[:0])  # raises Unsupported when fused into gemm1
        return _Graph.trace(swiglu, h)

    def activation_backward(self, ctx, d_a):
        return ctx.grad(d_a)[0]

    def gemm2_train(self, a, meta, w, bufs, preact=None):
        """gemm2 forward for training (``preact``: gemm1's pre-activation, for a fused SwiGLU's backward)."""
        return _Graph.trace(lambda al, w2: self._gemm2_graph(al, meta, w2), a, w.w2)

    def gemm2_backward(self, ctx, d_y, meta, w, grads):
        """(d_a [R, I] -- d_h [R, 2I] when ``fuses_act``: the SwiGLU's backward in the GEMM --, d_W2 [E, H, I])."""
        return ctx.grad(d_y)

    def _gemm1_graph(self, a, meta, w1):
        raise NotImplementedError

    def _gemm2_graph(self, a, meta, w2):
        raise NotImplementedError

    def ffn_train(self, inp, meta, w, bufs):
        """gemm1 -> activation -> gemm2 for training: (y [R, H], the context of :meth:`ffn_backward`)."""
        h, c1 = self.gemm1_train(inp, meta, w, bufs)
        a, ca = (h, None) if self.fuses_act else self.activation_train(h, bufs)
        y, c2 = self.gemm2_train(a, meta, w, bufs, preact=getattr(c1, "preact", None))
        return y, (c1, ca, c2)

    def ffn_backward(self, ctx, d_y, meta, w, grads):
        """(d_inp, d_W1, d_W2) of the expert FFN from d_y."""
        c1, ca, c2 = ctx
        d, d_w2 = self.gemm2_backward(c2, d_y, meta, w, grads)
        if not self.fuses_act:
            d = self.activation_backward(ca, d)
        d_inp, d_w1 = self.gemm1_backward(c1, d, meta, w, grads)
        return d_inp, d_w1, d_w2


def _leaf(t: torch.Tensor) -> torch.Tensor:
    """A new autograd leaf over ``t``'s storage (the job's tensors themselves stay untouched)."""
    return t.detach().requires_grad_(True)


@dataclass
class _Graph:
    """One stage's autograd graph: its output and the leaves it differentiates (kept, so a
    ``bench.direction=bwd`` row can run the backward again and again)."""

    out: torch.Tensor
    leaves: tuple[torch.Tensor, ...]

    @classmethod
    def trace(cls, fn, *inputs: torch.Tensor) -> tuple[torch.Tensor, "_Graph"]:
        """``fn`` on new leaves over ``inputs``, its graph recorded: (its output detached, the graph)."""
        leaves = tuple(_leaf(t) for t in inputs)
        with torch.enable_grad():
            out = fn(*leaves)
        return out.detach(), cls(out, leaves)

    def grad(self, d_out):
        return torch.autograd.grad(self.out, self.leaves, d_out, retain_graph=True)


def mm_blocks(a: torch.Tensor, weight: torch.Tensor, meta) -> torch.Tensor:
    """Differentiable ``a[s:t] @ weight[e].T`` per expert block, zeros past ``offsets[E]``
    (a ``torch.mm`` per expert and a concatenation; reads the offsets on the host)."""
    offs = meta.offsets.tolist()
    blocks = [torch.mm(a[offs[e]:offs[e + 1]], weight[e].T) for e in range(len(offs) - 1) if offs[e + 1] > offs[e]]
    tail = a.new_zeros(a.shape[0] - offs[-1], weight.shape[1])
    return torch.cat(blocks + [tail])


class LoopGemm(ExpertGemm):
    """A Python loop of ``torch.mm`` over the experts (the torch reference of the GEMM stages)."""

    name = "loop"
    host_sync = True

    @staticmethod
    def _blocks(meta):
        offs = meta.offsets.tolist()
        return [(e, offs[e], offs[e + 1]) for e in range(len(offs) - 1) if offs[e + 1] > offs[e]]

    def gemm1(self, a, meta, w, out):
        for e, s, t in self._blocks(meta):
            torch.mm(a[s:t], w.w1[e].T, out=out[s:t])
        return out

    def gemm2(self, a, meta, w, out):
        for e, s, t in self._blocks(meta):
            torch.mm(a[s:t], w.w2[e].T, out=out[s:t])
        return out

    def _gemm1_graph(self, a, meta, w1):
        return mm_blocks(a, w1, meta)

    def _gemm2_graph(self, a, meta, w2):
        return mm_blocks(a, w2, meta)


class GroupedMMGemm(ExpertGemm):
    """``torch._grouped_mm`` with ``offs`` = the cumulative row counts (int32); allocates its output."""

    name = "grouped_mm"

    def check(self, device, dtype, timing_mode, hidden, intermediate):
        super().check(device, dtype, timing_mode, hidden, intermediate)
        if not hasattr(torch, "_grouped_mm"):
            raise Unsupported(f"torch {torch.__version__} has no torch._grouped_mm")

    @staticmethod
    def _offs(meta):
        return meta.offsets[1:].to(torch.int32)

    def gemm1(self, a, meta, w, out):
        return torch._grouped_mm(a, w.w1.mT, offs=self._offs(meta))

    def gemm2(self, a, meta, w, out):
        return torch._grouped_mm(a, w.w2.mT, offs=self._offs(meta))

    def _gemm1_graph(self, a, meta, w1):
        return torch._grouped_mm(a, w1.mT, offs=self._offs(meta))

    def _gemm2_graph(self, a, meta, w2):
        return torch._grouped_mm(a, w2.mT, offs=self._offs(meta))


class QuackGemm(ExpertGemm):
    """quack's varlen-M GEMM (``cu_seqlens_m`` = offsets), optionally with gather-A and the gated
    SwiGLU epilogue."""

    name = "quack_varlen"
    devices = ("cuda",)

    def check(self, device, dtype, timing_mode, hidden, intermediate):
        if device.type != "cuda":
            raise Unsupported(f"bench.gemm={self.name} runs on cuda only (quack's CuTeDSL GEMM; device={device.type})")
        super().check(device, dtype, timing_mode, hidden, intermediate)
        if dtype not in (torch.bfloat16, torch.float16):
            raise Unsupported(f"bench.gemm={self.name} takes 16-bit inputs (bfloat16/float16), not {dtype}")
        for what, v in (("hidden", hidden), ("intermediate", intermediate)):
            if v % 8:
                raise Unsupported(f"bench.gemm={self.name} needs {what} a multiple of 8 (16-byte rows); {what}={v}")
        self._interface()
        if self.config:
            self._gemm_config()
            cap = torch.cuda.get_device_capability(device)
            if cap[0] != 9:
                raise Unsupported(f"bench.quack_config={self.config} is an SM90 (Hopper) GEMM config; this GPU is "
                                  f"sm_{cap[0]}{cap[1]}")
        if self.fuses_act:
            self._gated_epilogue()

    def _gemm_config(self):
        """quack's GemmConfig for the pinned ``bench.quack_config`` (built once: quack's epilogue plan
        cache keys a pinned config by identity), or None (quack's default or its autotuner)."""
        if not self.config:
            return None
        if getattr(self, "_pinned", None) is None:
            from quack.gemm_config import GemmConfig

            self._pinned = GemmConfig(**quack_config_fields(self.config), device_capacity=9)
        return self._pinned

    def _gated_epilogue(self):
        """Build quack's SwiGLU epilogue (what gemm_act builds on its first call; cached by quack).
        quack fingerprints the epilogue's dependencies and keys only code under a ``site-packages``
        folder by name: with quack / cutlass imported from elsewhere (the .gpu bundle unpacked into
        ~/.moebench-gpu) it refuses with a TypeError -- an ``unsupported`` row saying so."""
        try:  # importing the library already builds epilogues
            from quack.epilogue.library import linear_act_mod

            linear_act_mod("swiglu", gated=True, has_c=False, has_rowvec=False, has_colvec=False)
        except TypeError as e:
            if "semantic key" not in str(e):
                raise
            raise Unsupported(f"bench.gemm={self.name}: quack's gated epilogue cannot fingerprint its dependencies "
                              "here (cutlass is imported from outside a site-packages folder; install quack and "
                              "nvidia-cutlass-dsl under one, e.g. unpack the .gpu bundle into "
                              "~/.moebench-gpu/site-packages)") from e

    def _interface(self):
        try:
            from quack import gemm_interface
        except Exception as e:  # noqa: BLE001 -- ImportError or a failing dependency import
            raise Unsupported(f"bench.gemm={self.name} needs quack-kernels ({type(e).__name__}: {e})") from e
        return gemm_interface

    def _a_idx(self, meta):
        # padding rows (gather_idx -1) inside an expert's block would read out of bounds:
        # gather token 0 there (never combined); rows holding tokens are unchanged
        return meta.gather_idx.clamp(min=0) if meta.may_have_empty_rows else meta.gather_idx

    def _varlen_gemm(self, a, b, out, offsets, a_idx=None):
        """quack's varlen-M GEMM: ``gemm`` (default config or the autotuner), or with a pinned config
        the function under quack's autotune decorator, ``gemm_tuned.fn(..., config=)`` -- what
        ``gemm(tuned=False)`` calls with the default config (``gemm`` itself takes no config)."""
        q = self._interface()
        cfg = self._gemm_config()
        if cfg is None:
            return q.gemm(a, b, out=out, cu_seqlens_m=offsets, A_idx=a_idx, tuned=self.tuned)
        q.gemm_tuned.fn(a, b, out, C=None, cu_seqlens_m=offsets, A_idx=a_idx, config=cfg)
        return out

    def gemm1(self, a, meta, w, out):
        q = self._interface()
        a_idx = self._a_idx(meta) if self.fuses_pack else None
        if self.fuses_act:
            _, post = q.gemm_act(a, w.w1.mT, activation="swiglu", postact_out=out, cu_seqlens_m=meta.offsets,
                                 A_idx=a_idx, store_preact=False, concat_layout=("B",), tuned=self.tuned,
                                 config=self._gemm_config())
            return post
        return self._varlen_gemm(a, w.w1.mT, out, meta.offsets, a_idx)

    def gemm2(self, a, meta, w, out):
        return self._varlen_gemm(a, w.w2.mT, out, meta.offsets)

    # -- training: quack's varlen (and dgated) GEMM backward --------------------------------
    def check_backward(self):
        if self.fuses_pack:
            raise Unsupported(f"bench.gemm={self.name} has no backward here: gather-A fuses the pack into gemm1, and "
                              "d_W1 = d_h^T x[gather_idx] would gather the B operand of quack's varlen-K GEMM "
                              "(A_idx gathers A only); not built")

    def _bwd_gemm(self, a, b, out, **kw):
        """One backward GEMM: quack's default config (or its autotuner with bench.quack_tuned)."""
        return self._interface().gemm(a, b, out=out, tuned=self.tuned, **kw)

    def gemm1_train(self, inp, meta, w, bufs):
        if not self.fuses_act:
            return self.gemm1(inp, meta, w, bufs.h), _QuackCtx(inp)
        q = self._interface()
        preact, post = q.gemm_act(inp, w.w1.mT, activation="swiglu", preact_out=bufs.h, postact_out=bufs.a,
                                  cu_seqlens_m=meta.offsets, store_preact=True, concat_layout=("B",),
                                  tuned=self.tuned, config=self._gemm_config())
        return post, _QuackCtx(inp, preact)

    def gemm1_backward(self, ctx, d_h, meta, w, grads):
        d_h = d_h.contiguous()  # k-major A (varlen-M), m-major d_h.T (varlen-K); a no-op for autograd's d_h
        concat = ("B",) if self.fuses_act else None  # d_h interleaved [g0, u0, g1, ...] against W1's [gate; up]
        d_inp = self._bwd_gemm(d_h, w.w1, grads.d_packed, cu_seqlens_m=meta.offsets, concat_layout=concat)
        d_w1 = self._bwd_gemm(d_h.T, ctx.inp, grads.d_w1, cu_seqlens_k=meta.offsets,
                              concat_layout=("out",) if self.fuses_act else None)
        return d_inp, d_w1

    def gemm2_train(self, a, meta, w, bufs, preact=None):
        return self.gemm2(a, meta, w, bufs.y), _QuackCtx(a, preact)

    def gemm2_backward(self, ctx, d_y, meta, w, grads):
        if self.fuses_act:
            # d_h = dSwiGLU(d_y @ W2[e], preact) in the epilogue; a recomputed from preact for d_W2
            d, a = self._interface().gemm_dgated(d_y, w.w2, ctx.preact, activation="swiglu", dx_out=grads.d_h,
                                                 postact_out=grads.d_a, cu_seqlens_m=meta.offsets,
                                                 tuned=self.tuned)
        else:
            d, a = self._bwd_gemm(d_y, w.w2, grads.d_a, cu_seqlens_m=meta.offsets), ctx.inp
        return d, self._bwd_gemm(d_y.T, a, grads.d_w2, cu_seqlens_k=meta.offsets)


@dataclass
class _QuackCtx:
    inp: torch.Tensor  # the stage's input rows (the B operand of its weight gradient)
    preact: torch.Tensor | None = None  # gemm1's interleaved pre-activation (fused SwiGLU)


class QuackGatherGemm(QuackGemm):
    name = "quack_gather"
    fuses_pack = True


class QuackGatedGemm(QuackGemm):
    name = "quack_gated"
    fuses_act = True


class QuackGatherGatedGemm(QuackGemm):
    name = "quack_gather_gated"
    fuses_pack = True
    fuses_act = True


GEMM_CLASSES = {c.name: c for c in (LoopGemm, GroupedMMGemm, QuackGemm, QuackGatherGemm, QuackGatedGemm,
                                    QuackGatherGatedGemm)}
assert tuple(GEMM_CLASSES) == GEMMS


def make_gemm(name: str, tuned: bool = False, config: str | None = None) -> ExpertGemm:
    """The GEMM path ``name``; ``config`` (a ``bench.quack_config`` name) pins quack's GemmConfig and
    applies to the quack_* paths only."""
    cls = GEMM_CLASSES[name]
    return cls(tuned, config if issubclass(cls, QuackGemm) else None)


@dataclass
class Buffers:
    """The layer's activations, allocated once per job (R = packed rows)."""

    logits: torch.Tensor  # [T, E]
    packed: torch.Tensor  # [R, H]
    h: torch.Tensor  # [R, 2I]
    a: torch.Tensor  # [R, I]
    y: torch.Tensor  # [R, H]
    out: torch.Tensor  # [T, H]

    @classmethod
    def allocate(cls, T, H, E, I, R, dtype, device, gate_up: bool = True):
        def e(*shape):
            return torch.empty(shape, dtype=dtype, device=device)

        return cls(e(T, E), e(R, H), e(R, 2 * I) if gate_up else e(0, 2 * I), e(R, I), e(R, H), e(T, H))

    def all(self) -> tuple[torch.Tensor, ...]:
        return self.logits, self.packed, self.h, self.a, self.y, self.out

    def poison(self):
        for t in self.all():
            poison(t)


@dataclass
class GradBuffers:
    """The gradients a backward writes where it takes an output buffer (quack's GEMMs, the
    gate's torch.mm), allocated once per job with ``bench.direction`` bwd / fwdbwd."""

    d_x: torch.Tensor  # [T, H] (the gate row's d_x)
    d_wg: torch.Tensor  # [H, E]
    d_packed: torch.Tensor  # [R, H]
    d_h: torch.Tensor  # [R, 2I]
    d_a: torch.Tensor  # [R, I] (quack_gated: the recomputed a)
    d_w1: torch.Tensor  # [E, 2I, H]
    d_w2: torch.Tensor  # [E, H, I]

    @classmethod
    def allocate(cls, T, H, E, I, R, dtype, device, gemm_grads: bool = True):
        """``gemm_grads=False`` (a path whose backward allocates its own: torch autograd): the
        expert GEMMs' gradient buffers are empty."""
        def e(*shape):
            return torch.empty(shape if gemm_grads else (0,) * len(shape), dtype=dtype, device=device)

        x, wg = torch.empty(T, H, dtype=dtype, device=device), torch.empty(H, E, dtype=dtype, device=device)
        return cls(x, wg, e(R, H), e(R, 2 * I), e(R, I), e(E, 2 * I, H), e(E, H, I))

    def all(self) -> tuple[torch.Tensor, ...]:
        return self.d_x, self.d_wg, self.d_packed, self.d_h, self.d_a, self.d_w1, self.d_w2


def expert_ffn(eg: ExpertGemm, inp: torch.Tensor, meta, w: LayerWeights, bufs: Buffers) -> torch.Tensor:
    """gemm1 -> activation -> gemm2: packed rows (or x, gather-A) to expert outputs y [R, H]."""
    h = eg.gemm1(inp, meta, w, bufs.a if eg.fuses_act else bufs.h)
    a = h if eg.fuses_act else eg.activation(h, bufs.a)
    return eg.gemm2(a, meta, w, bufs.y)


def torch_layer(x, w: LayerWeights, meta, weighted: bool = True):
    """The torch implementation (pack, a ``torch.mm`` per expert, SwiGLU, combine) in x's dtype:
    the reference of every GEMM path at benchmark shapes. Returns (packed, h, a, y, out); the
    rows past ``offsets[E]`` of h, a, y are zeros."""
    R, H, I = meta.num_rows, x.shape[1], w.intermediate
    packed = routing.pack(x, meta)
    h = x.new_zeros(R, 2 * I)
    a = x.new_zeros(R, I)
    y = x.new_zeros(R, H)
    eg = LoopGemm()
    eg.gemm1(packed, meta, w, h)
    n = int(meta.offsets[-1])
    swiglu(h[:n], a[:n])
    eg.gemm2(a, meta, w, y)
    return packed, h, a, y, routing.combine(y, meta, weighted=weighted)


def torch_ffn_grads(packed: torch.Tensor, w: LayerWeights, meta, d_y: torch.Tensor,
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """torch autograd of the expert FFN (a ``torch.mm`` per expert, SwiGLU) in ``dtype`` on the
    rows [0, offsets[E]) of ``packed``, from the upstream gradient ``d_y``: the forward's y and
    the gradients d_a, d_h, d_packed (rows [0, offsets[E])), d_w1, d_w2."""
    n = int(meta.offsets[-1])
    p = packed[:n].detach().to(dtype).requires_grad_(True)
    w1, w2 = (t.detach().to(dtype).requires_grad_(True) for t in (w.w1, w.w2))
    with torch.enable_grad():
        h = mm_blocks(p, w1, meta)
        h.retain_grad()
        a = swiglu(h)
        a.retain_grad()
        y = mm_blocks(a, w2, meta)
        y.backward(d_y[:n].to(dtype))
    zeros = torch.zeros_like
    return {"y": y.detach(), "d_a": a.grad, "d_h": h.grad,
            "d_packed": p.grad if p.grad is not None else zeros(p),
            "d_w1": w1.grad if w1.grad is not None else zeros(w1), "d_w2": w2.grad if w2.grad is not None else zeros(w2)}


def torch_layer_grads(x: torch.Tensor, w: LayerWeights, prior: torch.Tensor | None, meta, weights_of,
                      weighted: bool, d_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """torch autograd of the torch layer in x's dtype -- the gate GEMM, the router's weights
    ``weights_of(logits)`` of the (fixed) routing ``meta`` zeroed where dropped, ``routing.pack``,
    a ``torch.mm`` per expert, SwiGLU, ``routing.combine`` -- from ``d_out``: (out, d_x, d_Wg,
    d_W1, d_W2). The job-shape reference of the layer's backward."""
    xl, wg, w1, w2 = (_leaf(t) for t in (x, w.wg, w.w1, w.w2))
    kept = meta.scatter_idx >= 0
    with torch.enable_grad():
        logits = xl @ wg if prior is None else torch.addmm(prior, xl, wg)
        m = dataclasses.replace(meta, weights=torch.where(kept, weights_of(logits).float(), 0.0))
        y = mm_blocks(swiglu(mm_blocks(routing.pack(xl, m), w1, m)), w2, m)
        out = routing.combine(y, m, weighted=weighted)
        leaves = (xl, wg, w1, w2)
        grads = torch.autograd.grad(out, leaves, d_out.to(out.dtype), allow_unused=True)
    return (out.detach(), *(torch.zeros_like(v) if g is None else g for g, v in zip(grads, leaves)))


def prepoison(shape, dtype, device) -> None:
    """Leave a NaN-filled block of this size in the caching allocator, so an implementation that
    allocates its own output (torch._grouped_mm) most likely gets poisoned memory."""
    if device.type == "cuda":
        t = torch.empty(shape, dtype=dtype, device=device)
        poison(t)
        del t


