"""impl=cute: every routing stage as CuTeDSL kernels (``moebench/kernels``), CUDA only.

What runs
---------
* ``route`` (``kernels/router.py``): one launch from logits to ids and gate weights, with
  the reference's selection and tie-break, for ``softmax_topk`` (± renormalise), ``top1``,
  ``topk_softmax``, ``topk_hard``, ``sigmoid_bias`` and ``group_limited``; any E <= 1024,
  k <= 16. It also writes the per-tile expert histogram, which travels with the ids it
  returns, so ``metadata`` on those ids is one more launch: logits to full metadata in two.
* ``metadata`` (``kernels/metadata.py``): counts, offsets, gather and scatter indices
  without a sort or a host sync, dropless or with a capacity (``position`` policy,
  padded or not, renormalised or not); from ids of another route it first computes the
  histogram (two launches).
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
from moebench.routing import CapacitySpec, RouterSpec, RoutingMetadata

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


def _routing_kernels():
    try:
        from moebench.kernels import metadata, router
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise Unsupported(f"impl=cute needs nvidia-cutlass-dsl ({e})") from e
    return router, metadata


#: most experts and slots the router kernel handles (32 lanes x 32 experts; k unrolled)
MAX_EXPERTS, MAX_TOPK = 1024, 16
#: where the route kernel's histogram rides along with the ids it returns
_HIST_ATTR = "_moebench_route_hist"


def router_static(router: RouterSpec, k: int, E: int, has_bias: bool) -> dict:
    """The router kernel's static configuration for a reference router, or Unsupported."""
    n = router.name
    if n in ("hash", "expert_choice"):
        raise Unsupported(f"router={n} is not a per-token top-k; impl=cute routes softmax_topk, top1, "
                          "topk_softmax, topk_hard, sigmoid_bias and group_limited")
    if E > MAX_EXPERTS:
        raise Unsupported(f"experts={E}: the router kernel holds at most {MAX_EXPERTS} experts per token")
    if k > MAX_TOPK:
        raise Unsupported(f"topk={k}: the router kernel unrolls at most {MAX_TOPK} slots")
    if n in ("softmax_topk", "top1"):
        return dict(score="logit", weight="prob", renormalize=n == "softmax_topk" and router.renormalize)
    if n == "topk_softmax":
        return dict(score="logit", weight="softmax_k" if router.normalize == "softmax" else "sum_k",
                    temperature=router.temperature)
    if n == "topk_hard":
        return dict(score="logit", weight="one")
    grouped = n == "group_limited" and router.n_group > 1
    static = dict(renormalize=True, scaling=router.scaling)
    if router.score == "sigmoid":
        static.update(score="sigmoid", weight="score", has_bias=has_bias)
    else:
        # selection on softmax probabilities equals selection on the logits only while the
        # scores are compared as they are: a bias or a sum of two probabilities compares
        # fp32 softmax values, whose last bit depends on torch's summation order
        if has_bias:
            raise Unsupported(f"router={n} with score=softmax and a bias selects on softmax + bias, which "
                              "the kernel cannot reproduce bit for bit (use router.bias_std=0 or score=sigmoid)")
        if grouped and router.group_score == "top2_sum":
            raise Unsupported(f"router={n} with score=softmax ranks groups by a sum of two softmax values, which "
                              "the kernel cannot reproduce bit for bit (use router.group_score=max or score=sigmoid)")
        static.update(score="logit", weight="prob")
    if grouped:
        gs = E // router.n_group
        if gs > 32:
            raise Unsupported(f"group_limited: groups of {gs} experts; the kernel keeps a group in one lane "
                              "(at most 32 experts per group)")
        static.update(n_group=router.n_group, topk_group=router.topk_group, group_score=router.group_score)
    return static


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
    def route(self, logits, k, router, bias=None, out=None):
        self.check_device(logits.device)
        if logits.dtype not in DTYPES:
            raise Unsupported(f"impl=cute routes bfloat16/float16/float32 logits, not {logits.dtype}")
        T, E = logits.shape
        if T > INT32_MAX:
            raise Unsupported(f"T={T} tokens; int32 indices hold at most {INT32_MAX}")
        static = router_static(router, k, E, bias is not None)
        if router.name == "top1":
            k = 1
        krouter, _ = _routing_kernels()
        ids, weights, hist, tile = krouter.route(logits, k, bias, out=out, **static)
        setattr(ids, _HIST_ATTR, (hist, tile, ids._version))
        return ids, weights

    def metadata(self, ids, weights, num_experts, capacity: CapacitySpec, num_rows=None) -> RoutingMetadata:
        self.check_device(ids.device)
        T, S = ids.shape
        E = num_experts
        if capacity.drop_policy != "position" and not capacity.dropless:
            raise Unsupported(f"capacity.drop_policy={capacity.drop_policy}: impl=cute drops by position only "
                              "(the probs policy needs a per-expert sort by weight)")
        if T * S > INT32_MAX:
            raise Unsupported(f"T*S={T * S} assignments; int32 indices hold at most {INT32_MAX}")
        cap = capacity.capacity(T, S, E)
        R = capacity.packed_rows(T, S, E, num_rows)
        if R > INT32_MAX:
            raise Unsupported(f"R={R} packed rows; int32 row indices hold at most {INT32_MAX}")
        _, kmeta = _routing_kernels()
        carried = getattr(ids, _HIST_ATTR, None)
        tile = kmeta.tile_size(T)
        if (carried is not None and carried[1] == tile and carried[2] == ids._version
                and carried[0].shape[1] == kmeta.hist_cols(E)):
            hist = carried[0]  # the route kernel's by-product: no histogram launch
        else:
            ids = ids if ids.dtype == torch.int32 and ids.is_contiguous() else ids.to(torch.int32).contiguous()
            hist = kmeta.histogram(ids, E, tile)
        w = weights if weights.dtype == torch.float32 and weights.is_contiguous() else weights.float().contiguous()
        counts, offsets, routed, gather, scatter, kept_w = kmeta.indices(
            ids, w, hist, tile, E, R, cap, capacity.pad_to_capacity, capacity.renormalize_after_drop)
        return RoutingMetadata(num_experts=E, counts=counts, offsets=offsets, gather_idx=gather, scatter_idx=scatter,
                               weights=kept_w, routed_counts=routed, capacity=cap,
                               padded=capacity.pad_to_capacity and cap is not None)

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
