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
  histogram (two launches; one CTA, one launch, up to ``decode_tokens`` tokens).
* ``route_metadata`` (decode, ``kernels/decode.py``): up to ``decode_tokens`` tokens, logits to
  ids, weights and the full metadata in ONE launch (the route's CTAs, then the last of them
  builds the metadata); above, the route then the metadata (two).
* ``pack``: ``pack_mode=scatter`` walks the tokens in order, so memory reads each token
  once (the strict bytes), and writes it to its slots' rows; when the metadata may hold
  empty rows (a capacity, padding) the same launch zeros them from ``gather_idx``.
  ``scatter_per_slot`` picks one row group per (token, slot) (true) or per token (false);
  ``auto``: per slot for rows of 8 KB or more, and for shorter rows where the (token, slot)
  pairs are fewer than ``FEW_CTAS`` (a decode batch). ``pack_mode=gather`` copies each packed
  row from its token (``x`` read once per slot: slower, 55-70 % of copy against ~87 %).
  ``auto`` takes scatter whenever it applies (S <= 16 slots), gather otherwise.
* ``pack_fp8`` (``bench.quant``): the scatter pack quantizing each 128-channel block to FP8
  e4m3 with its fp32 / power-of-two scale on the way (``kernels/pack_fp8.py``, bit-exact);
  its tiling is static, from ``threads``, ``max_iters``, ``cache_hint`` and the ``fp8_*`` options.
* ``combine``: one row group per token sums its kept slots' rows in fp32 (no atomics).
* pack and combine grids of fewer than ``split_ctas`` CTAs split each row's chunks over more
  CTAs (the grid's height, a runtime value: the same kernels), so a few tokens use many SMs;
  grids of fewer CTAs than the GPU has SMs move one vector per thread (``kernels/common.py``,
  ``FEW_CTAS``), and a combine whose packed rows total at most ``prefetch_mb`` MiB prefetches
  them into the L2 before their indices arrive (one memory round trip, not two, at decode); one
  of at most ``stage_rows`` packed rows (a token or two) copies them all into shared memory
  with the index loads instead (no L2 round trip after the indices).

Handled: bf16, fp16 and fp32; any number of tokens and rows (T = 0 returns at once);
H a multiple of 8 elements; up to 16 slots per token for combine and scatter-pack (the
``expert_choice`` router has S = E slots: its combine is unsupported, its pack gathers).
Everything else is ``Unsupported`` with the reason. CuTeDSL is imported at first use, so
importing this module costs nothing where cutlass or a GPU is missing.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import torch

from moebench.errors import ConfigError
from moebench.impls.base import Impl, ImplConfig, Unsupported, accepted
from moebench.routing import CapacitySpec, RouterSpec, RoutingMetadata

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
PACK_MODES = ("auto", "gather", "scatter")
CACHE_HINTS = ("none", "stream")
#: the kernels unroll over a token's slots up to this many
MAX_SLOTS = 16
#: H granularity: a 16-byte vector of bf16 / fp16 (two of fp32)
H_MULTIPLE = 8
INT32_MAX = 2**31 - 1


THREADS = (128, 256, 512, 1024)
ROUTER_MAX_PER_LANE = (0, 1, 2, 4, 8, 16, 32, 64)
#: the route kernel's shared-memory row ring: steps of rows it holds (0: through registers)
ROUTER_STAGES = (0, 2, 3, 4, 6, 8)
#: the route kernel's register cap: CTAs an SM (0: none)
ROUTER_MIN_CTAS = (0, 1, 2, 3, 4, 6, 8)
#: impl.router_merge=auto selects by sorting networks up to this many tokens, where a call is
#: one short chain of dependent steps. H200, rotated, same call (runs/sample/h200_s13/call4):
#: logits -> metadata at T 1-32 0.02-0.13 us faster (deepseek_v3 T 4 3.57 -> 3.47, qwen3 T 32
#: 3.54 -> 3.42); at T 16384 bf16 E 256 k 8 slower (call 1: route 8.40 -> 8.80, select 7.09 ->
#: 7.35), fp32 k 2 slower (E 128 route 6.56 -> 7.83), fp32 k 8 even
MERGE_TOKENS = 32
#: most tokens a CTA of the select stage takes (impl.select_tile)
MAX_SELECT_TILE = 16384
#: impl.select_tuning=auto: the select stage of fp32 logits from FP32_SELECT_MIN_E experts on (above
#: MERGE_TOKENS tokens) runs in more, smaller CTAs: 32 tokens a CTA of 256 threads, 16 experts a
#: lane, registers capped for 4 CTAs an SM (64, no spill), no prefetch. H200, T 16384, rotated, same
#: call (runs/sample/h200_s14/call2), select us, the route's tuning -> this: E 256 k 8 12.13 ->
#: 11.63, k 2 8.65 -> 6.98 (7.38 with 16 a lane alone); E 128 k 8 7.59 -> 7.01, k 2 5.98 -> 4.73;
#: bf16 lost with it (E 256 k 8 7.13 -> 8.02), E 8 even
FP32_SELECT = dict(tile=32, threads=256, max_per_lane=16, min_ctas=4, prefetch=False)
FP32_SELECT_MIN_E = 128
SELECT_TUNINGS = ("auto", "route")
#: the decode path's defaults (kernels/decode.py, kernels/common.py): tokens up to which logits
#: (or ids) become metadata in one launch, its threads per CTA, the pack / combine grid size
#: below which rows are split over more CTAs. One launch up to one CTA's tokens (32 at E 256):
#: on an H200 (deepseek_v3_decode, rotated) the multi-CTA one-launch path lost to two launches
#: from T 128 (logits -> metadata 7.55 vs 7.31 us at T 128, 12.03 vs 8.32 at T 512)
DECODE_TOKENS, DECODE_THREADS, SPLIT_CTAS = 32, 256, 1024
#: up to this many (token, slot) pairs in one CTA the one-launch metadata is written without the
#: scan (kernels/decode.py, FusedRouteMetadata.direct)
DIRECT_PAIRS = 32
#: above that, up to this many pairs in one CTA (dropless, unaligned, E at most decode_threads),
#: it is written with warp ranks and one barrier (FusedRouteMetadata.warp_ranks)
WARP_PAIRS = 256
#: combine: packed rows of at most this many MiB in all are prefetched into the L2, and at most
#: this many packed rows are staged whole in shared memory instead (kernels/combine.py)
PREFETCH_MB, STAGE_ROWS, MAX_STAGE_ROWS = 8, 8, 12
MAX_DECODE_TOKENS = 4096
#: the FP8 pack's tiling (kernels/pack_fp8.py): channels a thread quantizes and stores at once,
#: how the scales are stored, tokens per row group, threads per row group (0: up to 128)
FP8_VECS = (8, 16)
FP8_SCALE_STORES = ("lanes", "row")
FP8_TOKENS = (1, 2, 3, 4)
FP8_TPRS = (0, 16, 32, 64, 128, 256, 512, 1024)


@dataclass
class CuteConfig(ImplConfig):
    _target_: str = "moebench.impls.cute_impl.CuteImpl"
    name: str = "cute"
    pack_mode: str = "auto"
    scatter_per_slot: Any = "auto"
    threads: int = 256
    cache_hint: str = "none"
    #: rows one row group of pack / combine walks (0: each kernel's default)
    max_iters: int = 0
    #: the FP8 pack (``bench.quant``; with ``threads``, ``max_iters``, ``cache_hint``): channels
    #: per thread store (8 | 16), scales stored by each block's lane or once per row from shared
    #: memory (lanes | row), tokens per row group, threads per row group (0: the row's vectors
    #: up to 128), CTAs per SM the registers are capped for (0: no cap)
    fp8_vec: int = 16
    fp8_scales: str = "row"
    fp8_tokens: int = 1
    fp8_tpr: int = 0
    fp8_min_ctas: int = 0
    #: the route kernel: threads per CTA, most experts a lane holds (0: the kernel's choice, 16
    #: for fp32 logits from E 128 and k 2 at 512+ threads, else 32; 64 only where the selection
    #: is keyed, kernels.lanes.WIDE_PER_LANE), prefetch of the next row
    router_threads: int = 512
    router_max_per_lane: int = 0
    router_prefetch: bool = True
    #: the route kernel's rows through a shared-memory ring of this many steps (cp.async, steps
    #: ahead; 0: through registers, with router_prefetch; not in the one-launch decode kernel)
    #: and its keys selected by sorting networks instead of one pass a slot (router_merge:
    #: auto = up to MERGE_TOKENS tokens, true, false)
    router_stages: int = 0
    router_merge: Any = "auto"
    #: the route kernel's registers capped so this many CTAs fit an SM (0: ptxas's choice; not in
    #: the one-launch decode kernel)
    router_min_ctas: int = 0
    #: the select stage's tokens a CTA (0: the tuning's, below) and its tuning: auto = FP32_SELECT
    #: for fp32 logits from FP32_SELECT_MIN_E experts above MERGE_TOKENS tokens, else the route's;
    #: route = the route kernel's (router_*, and its tile, about T / 128)
    select_tile: int = 0
    select_tuning: str = "auto"
    #: decode: up to this many tokens, logits -> metadata (route_metadata) and ids -> metadata
    #: are one launch each (0: never), with this many threads per CTA
    decode_tokens: int = DECODE_TOKENS
    decode_threads: int = DECODE_THREADS
    #: decode: up to this many (token, slot) pairs in one CTA (at most decode_threads),
    #: dropless and unaligned, the one-launch metadata is written without the scan (0: never)
    decode_direct_pairs: int = DIRECT_PAIRS
    #: decode: above decode_direct_pairs, up to this many pairs in one CTA (dropless, unaligned,
    #: E at most decode_threads) the one-launch metadata is ranked per warp, one barrier (0: never)
    decode_warp_pairs: int = WARP_PAIRS
    #: pack / combine grids of fewer CTAs than this are split along the rows (0: never)
    split_ctas: int = SPLIT_CTAS
    #: combine: packed rows of at most this many MiB in all are prefetched into the L2 (0: never)
    prefetch_mb: int = PREFETCH_MB
    #: combine: at most this many packed rows are staged whole in shared memory (0: never)
    stage_rows: int = STAGE_ROWS

    def __post_init__(self):
        accepted("impl.pack_mode", self.pack_mode, PACK_MODES)
        accepted("impl.cache_hint", self.cache_hint, CACHE_HINTS)
        accepted("impl.threads", self.threads, THREADS)
        v = self.scatter_per_slot
        if not (v == "auto" or isinstance(v, bool)):
            raise ConfigError(f"impl.scatter_per_slot={v!r} is not accepted; accepted: auto, true, false")
        if isinstance(self.max_iters, bool) or not 0 <= self.max_iters <= 64:
            raise ConfigError(f"impl.max_iters={self.max_iters!r} is not accepted; an integer in 0..64 (0: the "
                              "kernel's default)")
        accepted("impl.fp8_vec", self.fp8_vec, FP8_VECS)
        accepted("impl.fp8_scales", self.fp8_scales, FP8_SCALE_STORES)
        accepted("impl.fp8_tokens", self.fp8_tokens, FP8_TOKENS)
        accepted("impl.fp8_tpr", self.fp8_tpr, FP8_TPRS)
        if isinstance(self.fp8_min_ctas, bool) or not 0 <= self.fp8_min_ctas <= 32:
            raise ConfigError(f"impl.fp8_min_ctas={self.fp8_min_ctas!r} is not accepted; an integer in 0..32 (0: no "
                              "register cap)")
        accepted("impl.router_threads", self.router_threads, THREADS)
        accepted("impl.router_max_per_lane", self.router_max_per_lane, ROUTER_MAX_PER_LANE)
        accepted("impl.router_stages", self.router_stages, ROUTER_STAGES)
        accepted("impl.router_min_ctas", self.router_min_ctas, ROUTER_MIN_CTAS)
        v = self.router_merge
        if not (v == "auto" or isinstance(v, bool)):
            raise ConfigError(f"impl.router_merge={v!r} is not accepted; accepted: auto, true, false")
        v = self.select_tile
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_SELECT_TILE:
            raise ConfigError(f"impl.select_tile={v!r} is not accepted; an integer in 0..{MAX_SELECT_TILE} (0: the select "
                              "tuning's tile)")
        accepted("impl.select_tuning", self.select_tuning, SELECT_TUNINGS)
        accepted("impl.decode_threads", self.decode_threads, THREADS)
        for key, top in (("decode_tokens", MAX_DECODE_TOKENS), ("decode_direct_pairs", max(THREADS)),
                         ("decode_warp_pairs", max(THREADS)),
                         ("split_ctas", 1 << 20), ("prefetch_mb", 1024), ("stage_rows", MAX_STAGE_ROWS)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= top:
                raise ConfigError(f"impl.{key}={v!r} is not accepted; an integer in 0..{top} (0: off)")

    @property
    def tune(self) -> dict:
        """The pack / combine kernels' tuning keywords."""
        return {"threads": self.threads, "hint": self.cache_hint, **({"max_iters": self.max_iters}
                                                                    if self.max_iters else {})}

    @property
    def fp8_tune(self) -> dict:
        """The FP8 pack kernel's tuning keywords (its own default for what is left out)."""
        return {"threads": self.threads, "hint": self.cache_hint, "vec": self.fp8_vec, "scales": self.fp8_scales,
                "tokens": self.fp8_tokens, "tpr": self.fp8_tpr, "min_ctas": self.fp8_min_ctas,
                **({"max_iters": self.max_iters} if self.max_iters else {})}

    @property
    def router_tune(self) -> dict:
        return {"threads": self.router_threads, "max_per_lane": self.router_max_per_lane,
                "prefetch": self.router_prefetch, "stages": self.router_stages, "merge": self.router_merge,
                "min_ctas": self.router_min_ctas}


def _kernels() -> types.SimpleNamespace:
    """The kernel modules, imported on first use (CuTeDSL is heavy and optional)."""
    try:
        from moebench.kernels import backward, combine, decode, metadata, pack, pack_fp8, router
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise Unsupported(f"impl=cute needs nvidia-cutlass-dsl ({e})") from e
    return types.SimpleNamespace(backward=backward, combine=combine, decode=decode, metadata=metadata, pack=pack,
                                 pack_fp8=pack_fp8, router=router)


#: most experts and slots the router kernel handles (32 lanes x 32 experts; k unrolled)
MAX_EXPERTS, MAX_TOPK = 1024, 16
#: where the route kernel's histogram rides along with the ids it returns
_HIST_ATTR = "_moebench_route_hist"


def router_static(router: RouterSpec, k: int, E: int, has_bias: bool) -> dict:
    """The router kernel's static configuration for a reference router (its semantics object
    says how the kernel computes it, ``Router.cute``), or Unsupported."""
    static = router.router.cute(E, has_bias)
    if E > MAX_EXPERTS:
        raise Unsupported(f"experts={E}: the router kernel holds at most {MAX_EXPERTS} experts per token")
    if k > MAX_TOPK:
        raise Unsupported(f"topk={k}: the router kernel unrolls at most {MAX_TOPK} slots")
    return static


class CuteImpl(Impl):
    name = "cute"
    devices = ("cuda",)

    def __init__(self, name: str | None = None, **options):
        super().__init__(name, **options)
        config = CuteConfig(name=self.name, **options)  # the same checks as the resolved config
        self.pack_mode = config.pack_mode
        self.scatter_per_slot = None if config.scatter_per_slot == "auto" else config.scatter_per_slot
        self.tune = config.tune
        self.fp8_tune = config.fp8_tune
        self.router_tune = config.router_tune
        self.decode_tokens, self.decode_threads = config.decode_tokens, config.decode_threads
        self.decode_direct_pairs = config.decode_direct_pairs
        self.decode_warp_pairs = config.decode_warp_pairs
        self.split_ctas = config.split_ctas
        self.prefetch_bytes = config.prefetch_mb << 20
        self.stage_rows = config.stage_rows
        # the combine kernel's keywords (the forward combine and the pack backward)
        self._combine_tune = dict(split_ctas=self.split_ctas, prefetch_bytes=self.prefetch_bytes,
                                  stage_rows=self.stage_rows, **self.tune)
        self._select_out: dict = {}
        self.select_tile, self.select_tuning = config.select_tile or None, config.select_tuning

    def tune_route(self, T: int) -> dict:
        """The route kernel's tuning keywords for T tokens (router_merge=auto resolved)."""
        merge = self.router_tune["merge"]
        return dict(self.router_tune, merge=merge is True or (merge == "auto" and T <= MERGE_TOKENS))

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
        krouter = _kernels().router
        ids, weights, hist, tile = krouter.route(logits, k, bias, out=out, **static, **self.tune_route(T))
        setattr(ids, _HIST_ATTR, (hist, tile, ids._version))
        return ids, weights

    def select(self, logits, k, router, bias=None, out=None):
        """The route kernel with no weights and no histogram: ids and the selected logits in their
        own dtype (exact, like quack's values)."""
        self.check_device(logits.device)
        if logits.dtype not in DTYPES:
            raise Unsupported(f"impl=cute selects on bfloat16/float16/float32 logits, not {logits.dtype}")
        T, E = logits.shape
        k = 1 if router.name == "top1" else k
        if E > MAX_EXPERTS or k > MAX_TOPK:
            raise Unsupported(f"experts={E}, topk={k}: the router kernel holds at most {MAX_EXPERTS} experts and "
                              f"{MAX_TOPK} slots")
        krouter = _kernels().router
        key = (T, k, logits.dtype, logits.device)
        if key not in self._select_out:
            self._select_out[key] = (torch.empty(T, k, dtype=torch.int32, device=logits.device),
                                     torch.empty(T, k, dtype=logits.dtype, device=logits.device))
        ids, vals, _, _ = krouter.route(logits, k, None, out=self._select_out[key], score="logit", weight="value",
                                        hist=False, values_in_dtype=True, **self.tune_select(T, E, logits.dtype))
        return ids, vals

    def tune_select(self, T: int, E: int, dtype: torch.dtype) -> dict:
        """The select stage's tile and kernel tuning for T tokens of E logits of ``dtype``
        (impl.select_tuning, impl.select_tile)."""
        tune = dict(self.tune_route(T), tile=self.select_tile)
        if self.select_tuning == "auto" and dtype == torch.float32 and E >= FP32_SELECT_MIN_E and T > MERGE_TOKENS:
            tune.update(FP32_SELECT, tile=self.select_tile or FP32_SELECT["tile"])
        return tune

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
        k = _kernels()
        kmeta = k.metadata
        carried = getattr(ids, _HIST_ATTR, None)
        tile = kmeta.tile_size(T)
        w = weights if weights.dtype == torch.float32 and weights.is_contiguous() else weights.float().contiguous()
        if (carried is not None and carried[1] == tile and carried[2] == ids._version
                and carried[0].shape[1] == kmeta.hist_cols(E)):
            hist = carried[0]  # the route kernel's by-product: no histogram launch
        else:
            ids = ids if ids.dtype == torch.int32 and ids.is_contiguous() else ids.to(torch.int32).contiguous()
            if 0 < T <= self.decode_tokens:  # decode: histogram and metadata in one launch of one CTA
                res = k.decode.metadata(ids, w, E, R, cap, capacity.pad_to_capacity, capacity.renormalize_after_drop,
                                        capacity.align, threads=self.decode_threads)
                if res is not None:
                    return self._meta(capacity, cap, *res)
            hist = kmeta.histogram(ids, E, tile)
        return self._meta(capacity, cap, *kmeta.indices(
            ids, w, hist, tile, E, R, cap, capacity.pad_to_capacity, capacity.renormalize_after_drop, capacity.align))

    @staticmethod
    def _meta(capacity: CapacitySpec, cap, counts, offsets, routed, gather, scatter, kept_w) -> RoutingMetadata:
        return RoutingMetadata(num_experts=counts.shape[0], counts=counts, offsets=offsets, gather_idx=gather,
                               scatter_idx=scatter, weights=kept_w, routed_counts=routed, capacity=cap,
                               padded=capacity.pad_to_capacity and cap is not None, align=capacity.align)

    def route_metadata(self, logits, k, router, bias=None, num_experts=None, capacity=None, num_rows=None):
        """Logits to (ids, weights, metadata); at most ``decode_tokens`` tokens in one launch
        (``kernels/decode.py``), else the route kernel then the metadata kernel (two)."""
        self.check_device(logits.device)
        T, E = logits.shape
        capacity = capacity if capacity is not None else CapacitySpec()
        if not (0 < T <= self.decode_tokens) or (num_experts is not None and num_experts != E):
            return super().route_metadata(logits, k, router, bias, num_experts, capacity, num_rows)
        if logits.dtype not in DTYPES:
            raise Unsupported(f"impl=cute routes bfloat16/float16/float32 logits, not {logits.dtype}")
        static = router_static(router, k, E, bias is not None)
        if router.name == "top1":
            k = 1
        if capacity.drop_policy != "position" and not capacity.dropless:
            raise Unsupported(f"capacity.drop_policy={capacity.drop_policy}: impl=cute drops by position only "
                              "(the probs policy needs a per-expert sort by weight)")
        cap = capacity.capacity(T, k, E)
        R = capacity.packed_rows(T, k, E, num_rows)
        if R > INT32_MAX:
            raise Unsupported(f"R={R} packed rows; int32 row indices hold at most {INT32_MAX}")
        if not logits.is_contiguous() or logits.data_ptr() % 16:
            logits = logits.contiguous() if not logits.is_contiguous() else logits.clone()
        tune = {key: v for key, v in self.tune_route(T).items() if key not in ("threads", "stages", "min_ctas")}
        res = _kernels().decode.route_metadata(
            logits, k, bias, E, R, cap, capacity.pad_to_capacity, capacity.renormalize_after_drop, capacity.align,
            threads=self.decode_threads, direct_pairs=self.decode_direct_pairs,
            warp_pairs=self.decode_warp_pairs,
            **dict(static, has_bias=bias is not None), **tune)
        if res is None:  # too much shared memory, or captured on a stream with no ticket counter yet
            return super().route_metadata(logits, k, router, bias, num_experts, capacity, num_rows)
        ids, w, *meta = res
        return ids, w, self._meta(capacity, cap, *meta)

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
        kpack = _kernels().pack
        tune = self.tune
        if mode == "scatter":
            tune = dict(tune, **kpack.scatter_tuning(kpack.TORCH_TO_CUTE[x.dtype], H, self.scatter_per_slot,
                                                          T * meta.num_slots))
        return kpack.pack(x, meta.gather_idx, meta.scatter_idx, out, mode=mode,
                          zero_empty=meta.may_have_empty_rows, split_ctas=self.split_ctas, **tune)

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
        kcombine = _kernels().combine
        return kcombine.combine(y, meta.scatter_idx, meta.weights, out, weighted=weighted, **self._combine_tune)

    def pack_fp8(self, x, meta, quant, out=None):
        """The quantizing scatter pack (``kernels.pack_fp8``): bf16 / fp16 x, H a multiple of 128."""
        self._check_rows(x, "x")
        T, H = x.shape
        R, S = meta.num_rows, meta.num_slots
        if x.dtype not in (torch.bfloat16, torch.float16):
            raise Unsupported(f"impl=cute quantizes bfloat16/float16 x to FP8, not {x.dtype}")
        if H % 128:
            raise Unsupported(f"H={H} is not a multiple of 128 (one scale per 128 channels)")
        if S > MAX_SLOTS:
            raise Unsupported(f"the FP8 pack unrolls over at most {MAX_SLOTS} slots per token; this routing has S={S}")
        if meta.num_tokens != T:
            raise ValueError(f"x has {T} tokens but the metadata has {meta.num_tokens}")
        if out is None:
            out = (torch.empty(R, H, dtype=torch.float8_e4m3fn, device=x.device),
                   torch.empty(R, H // 128, dtype=torch.float32, device=x.device))
        else:
            self._check_out(out[0], (R, H), torch.float8_e4m3fn, x.device, "pack fp8 rows")
            self._check_out(out[1], (R, H // 128), torch.float32, x.device, "pack fp8 scales")
        kq = _kernels().pack_fp8
        return kq.pack_fp8(x, meta.gather_idx, meta.scatter_idx, out[0], out[1], mode=quant.removeprefix("fp8_"),
                           zero_empty=meta.may_have_empty_rows, **self.fp8_tune)

    # -- backward (training) ---------------------------------------------------------------
    def route_backward(self, logits, ids, weights, d_weights, router, bias=None):
        self.check_device(logits.device)
        if logits.dtype not in DTYPES:
            raise Unsupported(f"impl=cute routes bfloat16/float16/float32 logits, not {logits.dtype}")
        T, E = logits.shape
        static = router_static(router, ids.shape[1], E, bias is not None)
        kb = _kernels().backward
        d_logits = torch.empty_like(logits, memory_format=torch.contiguous_format)
        return kb.route_backward(logits, ids, weights, d_weights, d_logits, **static)

    def pack_backward(self, d_packed, meta):
        """An unweighted combine of the packed rows' gradients (the combine kernel)."""
        self._check_rows(d_packed, "d_packed")
        T, S = meta.scatter_idx.shape
        if S > MAX_SLOTS:
            raise Unsupported(f"pack backward sums at most {MAX_SLOTS} slots per token; this routing has S={S}")
        kcombine = _kernels().combine
        out = d_packed.new_empty(T, d_packed.shape[1])
        return kcombine.combine(d_packed, meta.scatter_idx, meta.weights, out, weighted=False, **self._combine_tune)

    def combine_backward(self, d_out, y, meta, weighted=True):
        self._check_rows(y, "y")
        T, S = meta.scatter_idx.shape
        if S > MAX_SLOTS:
            raise Unsupported(f"combine backward unrolls at most {MAX_SLOTS} slots per token; this routing has S={S}")
        kb = _kernels().backward
        d_y = torch.empty_like(y, memory_format=torch.contiguous_format)
        d_w = torch.empty(T, S, dtype=torch.float32, device=y.device)
        return kb.combine_backward(d_out, y, meta.scatter_idx, meta.weights, meta.gather_idx, d_y, d_w,
                                   weighted=weighted, zero_empty=meta.may_have_empty_rows, **self.tune)
