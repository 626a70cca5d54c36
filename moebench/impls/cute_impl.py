"""impl=cute: pack and combine as CuTeDSL kernels (``moebench/kernels``), CUDA only.

Route and metadata are not implemented here (the base class reports them missing); chain
them from another implementation per stage, e.g. ``impl=torch impl_pack=cute impl_combine=cute``.

What runs
---------
* ``pack``: ``pack_mode=scatter`` walks the tokens in order, so memory reads each token
  once (the strict bytes), and writes it to its slots' rows; when the metadata may hold
  empty rows (a capacity, padding) the same launch zeros them from ``gather_idx``.
  ``scatter_per_slot`` picks one row group per (token, slot) (true) or per token (false);
  ``auto``: per slot for rows of 8 KB or more. ``pack_mode=gather`` copies each packed
  row from its token (``x`` read once per slot: slower, 55-70 % of copy against ~87 %).
  ``auto`` takes scatter whenever it applies (S <= 16 slots), gather otherwise.
* ``combine``: one row group per token sums its kept slots' rows in fp32 (no atomics).

Handled: bf16, fp16 and fp32; any number of tokens and rows (T = 0 returns at once);
H a multiple of 8 elements; up to 16 slots per token for combine and scatter-pack (the
``expert_choice`` router has S = E slots: its combine is unsupported, its pack gathers).
Everything else is ``Unsupported`` with the reason. CuTeDSL is imported at first use, so
importing this module costs nothing where cutlass or a GPU is missing.
"""

from __future__ import annotations

import torch

from moebench.impls.base import Impl, Unsupported

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
PACK_MODES = ("auto", "gather", "scatter")
CACHE_HINTS = ("none", "stream")
SCATTER_PER_SLOT = ("auto", True, False)
#: the kernels unroll over a token's slots up to this many
MAX_SLOTS = 16
#: H granularity: a 16-byte vector of bf16 / fp16 (two of fp32)
H_MULTIPLE = 8
INT32_MAX = 2**31 - 1


def _kernels():
    """The kernel modules, imported on first use (CuTeDSL is heavy and optional)."""
    try:
        from moebench.kernels import combine, pack
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise Unsupported(f"impl=cute needs nvidia-cutlass-dsl ({e})") from e
    return pack, combine


class CuteImpl(Impl):
    name = "cute"
    devices = ("cuda",)

    def __init__(self, name: str | None = None, pack_mode: str = "auto", scatter_per_slot="auto",
                 threads: int = 256, cache_hint: str = "none", **options):
        super().__init__(name, pack_mode=pack_mode, scatter_per_slot=scatter_per_slot, threads=threads,
                         cache_hint=cache_hint, **options)
        if pack_mode not in PACK_MODES:
            raise ValueError(f"impl.pack_mode={pack_mode!r}; accepted: {', '.join(PACK_MODES)}")
        if cache_hint not in CACHE_HINTS:
            raise ValueError(f"impl.cache_hint={cache_hint!r}; accepted: {', '.join(CACHE_HINTS)}")
        if threads not in (128, 256, 512, 1024):
            raise ValueError(f"impl.threads={threads!r}; accepted: 128, 256, 512, 1024")
        if scatter_per_slot not in SCATTER_PER_SLOT:
            raise ValueError(f"impl.scatter_per_slot={scatter_per_slot!r}; accepted: auto, true, false")
        self.pack_mode = pack_mode
        self.scatter_per_slot = None if scatter_per_slot == "auto" else scatter_per_slot
        self.tune = {"threads": threads, "hint": cache_hint}

    # -- checks ----------------------------------------------------------------------------
    def _check_rows(self, t: torch.Tensor, what: str) -> None:
        self.check_device(t.device)
        if t.dtype not in DTYPES:
            raise Unsupported(f"impl=cute handles bfloat16/float16/float32 {what}, not {t.dtype}")
        if t.dim() != 2:
            raise Unsupported(f"impl=cute expects a 2-D {what}, got shape {tuple(t.shape)}")
        H = t.shape[1]
        if H % H_MULTIPLE:
            raise Unsupported(f"H={H} is not a multiple of {H_MULTIPLE} elements")
        if H == 0:
            raise Unsupported("H=0 is not supported")
        if t.shape[0] > INT32_MAX:
            raise Unsupported(f"{what} has {t.shape[0]} rows; int32 row indices hold at most {INT32_MAX}")

    @staticmethod
    def _check_out(out: torch.Tensor, shape: tuple, dtype: torch.dtype, device: torch.device, what: str) -> None:
        if tuple(out.shape) != shape or out.dtype != dtype or out.device != device:
            raise ValueError(f"{what} output is {tuple(out.shape)} {out.dtype} on {out.device}; "
                             f"expected {shape} {dtype} on {device}")

    def resolve_pack_mode(self, num_slots: int) -> str:
        if self.pack_mode == "auto":
            return "scatter" if num_slots <= MAX_SLOTS else "gather"
        if self.pack_mode == "scatter" and num_slots > MAX_SLOTS:
            raise Unsupported(f"pack_mode=scatter unrolls over at most {MAX_SLOTS} slots per token; "
                              f"this routing has S={num_slots} (use pack_mode=gather or auto)")
        return self.pack_mode

    # -- stages ----------------------------------------------------------------------------
    def pack(self, x, meta, out=None):
        self._check_rows(x, "x")
        T, H = x.shape
        R = meta.num_rows
        if meta.num_tokens != T:
            raise ValueError(f"x has {T} tokens but the metadata has {meta.num_tokens}")
        if R > INT32_MAX:
            raise Unsupported(f"R={R} packed rows; int32 row indices hold at most {INT32_MAX}")
        mode = self.resolve_pack_mode(meta.num_slots)
        if out is None:
            out = x.new_empty(R, H)
        else:
            self._check_out(out, (R, H), x.dtype, x.device, "pack")
        if mode == "scatter" and T * meta.num_slots > INT32_MAX:
            raise Unsupported(f"T*S={T * meta.num_slots} (token, slot) pairs; int32 indices hold at most {INT32_MAX}")
        kpack, _ = _kernels()
        tune = self.tune
        if mode == "scatter":
            tune = dict(tune, **kpack.scatter_tuning(kpack.TORCH_TO_CUTE[x.dtype], H, self.scatter_per_slot))
        return kpack.pack(x, meta.gather_idx, meta.scatter_idx, out, mode=mode,
                          zero_empty=meta.may_have_empty_rows, **tune)

    def combine(self, y, meta, out=None, weighted=True):
        self._check_rows(y, "y")
        T, S = meta.scatter_idx.shape
        H = y.shape[1]
        if S > MAX_SLOTS:
            raise Unsupported(f"combine unrolls over at most {MAX_SLOTS} slots per token; this routing has "
                              f"S={S} (router=expert_choice has S=E)")
        if y.shape[0] != meta.num_rows:
            raise ValueError(f"y has {y.shape[0]} rows but the metadata has {meta.num_rows}")
        if T > INT32_MAX:
            raise Unsupported(f"T={T} tokens; int32 row indices hold at most {INT32_MAX}")
        if out is None:
            out = y.new_empty(T, H)
        else:
            self._check_out(out, (T, H), y.dtype, y.device, "combine")
        _, kcombine = _kernels()
        return kcombine.combine(y, meta.scatter_idx, meta.weights, out, weighted=weighted, **self.tune)
