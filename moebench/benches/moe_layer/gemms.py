"""The expert GEMMs of the MoE layer (``bench.gemm``): gemm1 (gate/up), the SwiGLU and gemm2
(down) over the packed expert rows, by a loop of ``torch.mm``, ``torch._grouped_mm`` or quack's
varlen-M GEMM (optionally with gather-A, the pack fused into gemm1, and the gated SwiGLU
epilogue); the layer's buffers; and the torch implementation of the layer built on the loop."""

from __future__ import annotations

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


def prepoison(shape, dtype, device) -> None:
    """Leave a NaN-filled block of this size in the caching allocator, so an implementation that
    allocates its own output (torch._grouped_mm) most likely gets poisoned memory."""
    if device.type == "cuda":
        t = torch.empty(shape, dtype=dtype, device=device)
        poison(t)
        del t


