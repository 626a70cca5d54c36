"""impl=sonic: SonicMoE's routing kernels (``sonicmoe``, pure Python on CuTeDSL, quack and
Triton; CUDA only), called the way its own MoE layer calls them (``sonicmoe.functional``):

* ``route``: its top-k custom op ``sonicmoe::_topk_fwd`` -- top-k over the softmax
  (``softmax_topk``, ``top1``; ``norm_topk_probs`` = renormalize) or the softmax over the top-k
  (``topk_softmax`` with normalize=softmax, temperature 1), fp32 weights, int32 ids, written
  into outputs allocated once per shape (outside the timed calls);
* ``metadata``: ``TC_topk_router_metadata_triton`` (three Triton kernels: a tiled histogram, a
  scan, a per-tile sort), dropless: counts, offsets, the gather index and both scatter indices,
  in the reference's order (token order inside an expert);
* ``combine``: ``token_gather_and_sum_varlen_K_triton``, the gather-and-weighted-sum its layer
  ends with (fp32 accumulation), dropless;
* no ``select`` (its top-k kernels fuse the softmax) and no ``pack``: its layer gathers the
  tokens inside the up-projection GEMM (gather-A);
* ``layer`` (the ``total`` row of ``bench=moe_layer``): its whole layer,
  ``moe_TC_softmax_topk_layer`` -- the router GEMM, the top-k and metadata above, gemm1 with the
  token gather and SwiGLU in its epilogue (quack's ``gemm_gated``), gemm2 and its weighted
  combine; backward through its autograd functions. Its GEMMs run as quack's interface runs
  them by default, autotuned on their first call (``tuned=True``).

A router, option, capacity or shape SonicMoE does not handle is ``Unsupported`` with the reason;
so is a machine where ``sonicmoe`` does not import (it pins nvidia-cutlass-dsl 4.4.2; its router
and metadata kernels also run on the main stack's CuTeDSL).
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch

from moebench.impls.base import Impl, ImplConfig, Unsupported
from moebench.routing import RouterSpec, RoutingMetadata

NOT_INSTALLED = "sonic-moe is not installed (on the GPU machine: MOEBENCH_GPU_EXTRA=\"sonic-moe==0.1.2.post1\")"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_EXPERTS, MAX_TOPK = 4096, 128


@dataclass
class SonicConfig(ImplConfig):
    _target_: str = "moebench.impls.sonic_impl.SonicImpl"
    name: str = "sonic"


def _import(what: str):
    try:
        if what == "topk":
            from sonicmoe.functional.forward import _topk_fwd
            return _topk_fwd
        if what == "metadata":
            from sonicmoe.functional.triton_kernels import TC_topk_router_metadata_triton
            return TC_topk_router_metadata_triton
        if what == "layer":
            from sonicmoe.functional import moe_TC_softmax_topk_layer
            return moe_TC_softmax_topk_layer
        from sonicmoe.functional.reduction_over_k_gather import token_gather_and_sum_varlen_K_triton
        return token_gather_and_sum_varlen_K_triton
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] == "sonicmoe":
            raise Unsupported(NOT_INSTALLED) from None
        raise Unsupported(f"sonic-moe could not be imported: {type(e).__name__}: {e}") from None
    except Exception as e:  # noqa: BLE001 -- an import failing inside its dependencies (CuTeDSL, quack)
        raise Unsupported(f"sonic-moe could not be imported: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def route_mode(router: RouterSpec) -> tuple[bool, bool]:
    """(is_softmax_over_topk, norm_topk_probs) of SonicMoE's top-k for this router, or Unsupported."""
    n = router.name
    if n in ("softmax_topk", "top1"):
        return False, n == "softmax_topk" and router.renormalize
    if n == "topk_softmax" and router.normalize == "softmax" and router.temperature == 1.0:
        return True, False
    raise Unsupported(f"impl=sonic routes softmax_topk (± renormalize), top1 and topk_softmax (normalize=softmax, "
                      f"temperature 1): SonicMoE's top-k fuses a softmax before or after the selection; "
                      f"router={n} is not one of them")


#: SonicMoE's fp32 softmax uses approximate exponentials: on an H200 its weights were up to
#: 2.9e-5 (relative) from the reference's (T 4099, E 128, k 8, bf16 logits); a weight paired
#: with the wrong expert is off by far more
WEIGHT_RTOL = 2e-4


#: what ``SonicImpl.layer`` runs (the ``stage_impl`` of its ``total`` row)
LAYER_LABEL = "sonic:moe_TC_softmax_topk_layer(concat_layout)"


def layer_problem(dtype: torch.dtype, router: RouterSpec, experts: int, k: int) -> str | None:
    """Why SonicMoE's layer cannot run this layer (None: it can)."""
    try:
        route_mode(router)
    except Unsupported as e:
        return str(e)
    if dtype not in (torch.bfloat16, torch.float16):
        return f"SonicMoE's layer runs quack's 16-bit GEMMs (bfloat16/float16), not {dtype}"
    if experts % 8 or experts > MAX_EXPERTS or k > min(16, experts):
        return (f"SonicMoE's layer runs its own top-k kernel for experts <= {MAX_EXPERTS}, a multiple of 8, and "
                f"k <= 16 (experts={experts}, topk={k}; beyond, it falls back to torch.topk)")
    return None


@functools.lru_cache(maxsize=1)
def stack_problem() -> str | None:
    """Why this Python stack cannot run SonicMoE's layer (None: it can): sonic-moe pins one
    nvidia-cutlass-dsl; its GEMMs (quack's) fail on another (quack 0.6.5 on CuTeDSL 4.8.1 rejects
    its gather-A GEMM: "varlen_m: A is (total_m, k), k-major"). Its routing kernels run on either.
    Read once per process: the package metadata lookups take milliseconds of host time, which
    must not sit inside a timed call."""
    from importlib import metadata

    try:
        reqs = metadata.requires("sonic-moe") or []
    except metadata.PackageNotFoundError:
        return NOT_INSTALLED
    pins = [r.split(";")[0].replace(" ", "") for r in reqs if r.replace(" ", "").startswith("nvidia-cutlass-dsl==")]
    have = _version_of("nvidia-cutlass-dsl")
    for pin in pins:
        if have != pin.split("==", 1)[1]:
            return (f"sonic-moe {_version_of('sonic-moe')} pins {pin}; this stack has nvidia-cutlass-dsl {have} "
                    f"and quack-kernels {_version_of('quack-kernels')}: its layer runs in a stack of its own "
                    "(../shared/gpu/bundle.sh with MOEBENCH_GPU_PINS, MOEBENCH_GPU_DIR=.gpu-sonic)")
    return None


def _version_of(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


class SonicImpl(Impl):
    name = "sonic"
    devices = ("cuda",)
    exact_ties = False  # not promised by SonicMoE: the check pairs each weight with its expert
    fused_layer = True
    layer_label = LAYER_LABEL

    def route_tolerance(self, dtype, logits, router, k) -> dict:
        """kwargs for ``check_route``: the approximate-exp weights (``WEIGHT_RTOL``); and, for fp32
        logits, the selection: SonicMoE's top-k (quack's design) orders the fp32 scores by their
        bits with the low log2(E) mantissa bits replaced by the column, so scores within
        2**(log2(E) - 22) (relative) may swap -- as seen on the H200 (1 to 9 of 32768-131072
        slots at T 16384, fp32 logits; none with 16-bit logits, whose scores are farther apart)."""
        out = {"weight_rtol": WEIGHT_RTOL}
        if dtype == torch.float32:
            E = logits.shape[1]
            out["selection_rtol"] = 2.0 ** (math.log2(1 << (E - 1).bit_length()) - 22)
        return out

    def __init__(self, name: str | None = None, **options):
        super().__init__(name, **options)
        self._out: dict = {}

    def route(self, logits, k, router, bias=None, out=None):
        self.check_device(logits.device)
        over_topk, norm = route_mode(router)
        T, E = logits.shape
        k = 1 if router.name == "top1" else k
        if logits.dtype not in DTYPES:
            raise Unsupported(f"SonicMoE's top-k takes bfloat16/float16/float32 logits, not {logits.dtype}")
        if E > MAX_EXPERTS or E % 8 or k > min(MAX_TOPK, E):
            raise Unsupported(f"SonicMoE's top-k needs experts <= {MAX_EXPERTS}, a multiple of 8, and k <= 128 "
                              f"(experts={E}, topk={k})")
        topk_fwd = _import("topk")
        x = logits if logits.is_contiguous() and logits.data_ptr() % 16 == 0 else logits.contiguous().clone()
        key = (T, k, x.device)
        if key not in self._out:
            self._out[key] = (torch.empty(T, k, dtype=torch.float32, device=x.device),
                              torch.empty(T, k, dtype=torch.int32, device=x.device))
        scores, ids = self._out[key]
        topk_fwd(x, k, scores, ids, over_topk, norm)
        return ids, scores

    def metadata(self, ids, weights, num_experts, capacity, num_rows=None) -> RoutingMetadata:
        self.check_device(ids.device)
        T, S = ids.shape
        E = num_experts
        if not capacity.dropless:
            raise Unsupported("SonicMoE's metadata is dropless (every token keeps its k experts): no capacity")
        if capacity.align > 1:
            raise Unsupported(f"capacity.align={capacity.align}: SonicMoE's metadata packs expert blocks tight (its "
                              "token rounding changes which tokens an expert keeps, not the block starts)")
        if num_rows is not None and num_rows != T * S:
            raise Unsupported("SonicMoE's metadata routes every token to exactly k experts (this routing has unused "
                              "slots, e.g. router=expert_choice)")
        if E >= 1 << 16:
            raise Unsupported(f"SonicMoE's metadata keys experts in 16 bits (experts={E})")
        build = _import("metadata")
        dev = ids.device
        ids = ids if ids.dtype == torch.int32 and ids.is_contiguous() else ids.to(torch.int32).contiguous()
        counts = torch.empty(E, dtype=torch.int32, device=dev)
        offsets = torch.empty(E + 1, dtype=torch.int32, device=dev)
        gather = torch.empty(T * S, dtype=torch.int32, device=dev)
        row_entry = torch.empty(T * S, dtype=torch.int32, device=dev)
        scatter = torch.empty(T * S, dtype=torch.int32, device=dev)
        build(ids, E, counts, offsets, gather, row_entry, scatter)
        return RoutingMetadata(num_experts=E, counts=counts, offsets=offsets, gather_idx=gather,
                               scatter_idx=scatter.view(T, S), weights=weights.float(), routed_counts=counts)

    def combine(self, y, meta, out=None, weighted=True):
        self.check_device(y.device)
        T, S = meta.scatter_idx.shape
        H = y.shape[1]
        if meta.capacity is not None or meta.num_rows != T * S:
            raise Unsupported("SonicMoE's combine sums every token's k rows (dropless): no dropped or unused slots")
        gather_sum = _import("combine")
        if out is None:
            out = y.new_empty(T, H)
        w = meta.weights.reshape(-1).float().contiguous() if weighted else None
        gather_sum(y, w, out, meta.scatter_idx.reshape(-1).contiguous(), None, T, S, H, False)
        return out

    def layer(self, x, router_w, w1, w2, k, router, training=False):
        """``sonicmoe.functional.moe_TC_softmax_topk_layer`` as ``sonicmoe.MoE.forward`` calls it
        (W1 and W2 as the permuted views of ``Experts.weight`` it passes), with
        ``concat_layout=True`` (W1's rows gate then up, as here; its default interleaves them)
        and, unless ``training``, its inference mode (no pre-activation kept) under no_grad."""
        self.check_device(x.device)
        problem = layer_problem(x.dtype, router, router_w.shape[0], k) or stack_problem()
        if problem:
            raise Unsupported(problem)
        over_topk, norm = route_mode(router)
        fn = _import("layer")
        with contextlib.nullcontext() if training else torch.no_grad():
            out, logits, _ = fn(x, router_w, w1.permute(1, 2, 0), None, w2.permute(1, 2, 0), None,
                                1 if router.name == "top1" else k, torch.cuda.current_stream(x.device).cuda_stream,
                                "swiglu", is_inference_mode_enabled=not training, is_softmax_over_topk=over_topk,
                                norm_topk_probs=norm, concat_layout=True)
        return out, logits
