"""``bench=moe_layer``: one MoE layer with E experts of their own SwiGLU FFN, stage by stage:
its forward, and with ``bench.direction`` its backward (see Training below).

The chain (one row per stage, then the chain timed end to end)::

    gate        logits = x @ Wg                       [T, H] @ [H, E]      torch.mm (cuBLAS)
    route       ids, weights = router(logits)         the job's impl_route
    metadata    counts, offsets, gather/scatter idx   the job's impl_metadata
    pack        packed = x[gather_idx]                the job's impl_pack (zeros in empty rows)
    gemm1       h = packed @ W1[e]^T  per expert      [rows_e, H] -> [rows_e, 2I]   bench.gemm
    activation  a = silu(h[:, :I]) * h[:, I:]                             torch (or fused, see below)
    gemm2       y = a @ W2[e]^T  per expert           [rows_e, I] -> [rows_e, H]    bench.gemm
    combine     out[t] = sum_j w[t, j] * y[row(t, j)] the job's impl_combine
    experts     gemm1 -> activation -> gemm2 on the packed rows (the expert FFN alone)
    total       the whole layer, gate to combine, timed as one call; for an implementation with
                a whole layer of its own (``Impl.fused_layer``: impl=sonic, SonicMoE's
                ``moe_TC_softmax_topk_layer``) that layer, checked on its own logits and routing
    dense_gemm  the same job's ceiling: dense x @ W1[0]^T then a @ W2[0]^T with M = the rows the
                expert GEMMs compute (T*k dropless), same H and I -- torch.mm (cuBLAS)

Weights (seeded, std 1/sqrt(fan_in), allocated once per job in the job's dtype): ``Wg`` [H, E];
``W1`` [E, 2I, H] (rows ``[0, I)`` the gate projection, ``[I, 2I)`` the up projection, the
``nn.Linear`` layout); ``W2`` [E, H, I]. ``x`` ~ N(0, 1), so every intermediate and the output
are O(1) and the bf16 tolerance means something.

Routing distribution: the logits are the gate GEMM of ``x``. ``logits=uniform`` (the default)
adds nothing: ``x @ Wg`` is already i.i.d. normal per (token, expert). Any other ``logits`` kind
is drawn as usual and added as a fixed per-token prior inside the gate GEMM
(``torch.addmm(prior, x, Wg)``, one call), so skewed loads reach the expert GEMMs.

Expert GEMMs (``bench.gemm``, ``gemms.py``): ``loop`` (a ``torch.mm`` per expert; reads the
offsets on the host, so ``unsupported`` under ``timing=graph``), ``grouped_mm``
(``torch._grouped_mm``), ``quack_varlen`` (quack's varlen-M GEMM), ``quack_gather`` (gather-A:
the pack fused into gemm1, so the ``pack`` row is ``unsupported`` saying so; padding rows gather
token 0, which combine never reads), ``quack_gated`` / ``quack_gather_gated`` (SwiGLU in gemm1's
epilogue; the ``activation`` row says "fused into gemm1"). quack needs a CUDA GPU and 16-bit
inputs; ``bench.quack_tuned`` runs its autotuner on the first (untimed) call; ``bench.quack_config``
pins one SM90 config (``quack_config.py``) and names it in ``gemm_impl`` / ``stage_impl``.

Rows beyond ``offsets[E]`` (the tail a capacity leaves) belong to no expert: the grouped GEMMs
do not compute them and combine never reads them, so every check compares rows ``[0, offsets[E])``.

Columns: ``flops`` and ``tflops`` (gate 2*T*H*E; gemm1 4*M*H*I; gemm2 2*M*I*H; experts and
dense_gemm 6*M*H*I; total both, M = ``offsets[E]``), ``pct_of_dense`` (a GEMM row's or the
total's TFLOP/s over the dense_gemm row's), ``routing_share`` on the total row ((gate + route + metadata + pack +
combine) / total; a fused pack counts 0), ``intermediate``, ``gemm_impl``, ``expert_rows`` (M).

Correctness (outputs poisoned first): gate against an fp32 matmul; the routing stages exactly as
the other benches (``moebench.benches.stages``); every GEMM stage, the expert FFN and the layer
against the torch implementation at the job's shape; the dense GEMM on a sample of rows against
fp32; and, on shapes small enough (``bench.fp32_reference=auto``: at most 2e10 expert FLOPs on the
CPU, 4e12 on a GPU), the layer output against ``moe_layer_reference`` (fp32, independent code).

Training (``bench.direction``): ``bwd`` times each stage's backward from a gradient of its output
(on the reference forward's activations), ``fwdbwd`` its forward then its backward in one call --
every row in the job's direction, as in the other benches (the metadata row has no backward:
``unsupported``, so ``routing_share`` is left empty). The backward of

* ``gate``: d_x = d_logits Wg^T, d_Wg = x^T d_logits (torch.mm) from a seeded d_logits;
* ``route`` / ``pack`` / ``combine``: the job's impl (``impl_<stage>``: route_backward,
  pack_backward, combine_backward), their rows and strict bytes those of ``stages.py``;
* ``gemm1`` / ``activation`` / ``gemm2`` / ``experts``: the GEMM path's (``gemms.py``: torch
  autograd for loop and grouped_mm, quack's varlen GEMMs -- varlen-M for d_A, varlen-K for d_W --
  and ``gemm_dgated`` for quack_gated, where gemm2's backward holds the SwiGLU's, so its gemm1,
  activation and gemm2 rows are ``unsupported`` and ``experts`` / ``total`` time it), from a
  seeded d_y on the rows (gemm1, activation: the reference's d_h, d_a from it);
* ``total``: from a seeded d_out: combine backward (d_y, d_w), the expert FFN's (d_packed, d_W1,
  d_W2), pack backward (d_x), the kept weights' gradient straight through the metadata to the
  route backward (d_logits), and the gate's (d_x += d_logits Wg^T, d_Wg); ``fwdbwd`` runs the
  forward of every stage first, the backward on its own activations;
* ``dense_gemm``: the two dense GEMMs' backward (d_x, d_W1; d_a, d_W2) from seeded gradients.

FLOPs in a direction: the forward's times 1 (fwd), 2 (bwd), 3 (fwdbwd) -- experts and dense_gemm
18*M*H*I fwd + bwd, total plus the gate's 6*T*H*E. Gradients are checked against torch autograd:
of the torch expert FFN / torch layer in the job's dtype at the job's shape, and of
``moe_layer_reference`` (and the FFN) in fp32 where ``bench.fp32_reference`` enables it; the
tolerance is the dtype's chain tolerance with its atol relative to the reference gradient's RMS
(``reference.grad_tolerance``: a weight gradient sums over an expert's rows and grows as their
square root, its rounding with it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from moebench import routing
from moebench.benches.base import Bench, BenchConfig, Call, Case
from moebench.benches.moe_layer.gemms import (GEMM_CLASSES, GEMMS, Buffers, GradBuffers, QuackGemm, expert_ffn,
                                              make_gemm, prepoison, torch_layer)
from moebench.benches.moe_layer.quack_config import (QUACK_CONFIG_ACCEPTED, gemm_config_problem,
                                                     quack_config_fields, quack_config_name)
from moebench.benches.moe_layer.reference import (DIRECTION_FLOPS, FP32_REFERENCE_TOLERANCE, expert_flops,
                                                  make_weights, make_x, moe_layer_reference)
from moebench.benches.moe_layer.training import DENSE_CHECK_ROWS, LayerTraining
from moebench.benches.stages import (COMBINE, METADATA, PACK, ROUTE, Inputs, instantiate_impls, route_then_metadata,
                                     stage_case)
from moebench.check import Mismatch, assert_close, poison
from moebench.errors import ConfigError, Unsupported
from moebench.job import JobSpec
from moebench.logits import make_logits
from moebench.metrics import routing_metrics

#: the stages whose time is the "routing" part of the layer (routing_share)
SHARE_STAGES = ("gate", "route", "metadata", "pack", "combine")
FP32_REFERENCE = ("auto", True, False)
#: expert FLOPs (6*T*S*H*I) up to which ``fp32_reference=auto`` runs the fp32 reference
FP32_REFERENCE_MAX_FLOPS = {"cpu": 2e10, "cuda": 4e12}


def quack_config_of(value, gemm: str) -> str | None:
    """``bench.quack_config`` validated for ``bench.gemm`` -> its canonical name (None: not pinned).
    The value is checked whatever the GEMM; it applies to the quack_* GEMMs only."""
    if value is None:
        return None
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    fields = quack_config_fields(value)
    cls = GEMM_CLASSES.get(gemm)
    if cls is not None and issubclass(cls, QuackGemm):
        problem = gemm_config_problem(fields, gemm, cls.fuses_pack, cls.fuses_act)
        if problem:
            raise ConfigError(f"bench.quack_config={value!r} is not accepted: {problem}; {QUACK_CONFIG_ACCEPTED}")
    return quack_config_name(fields)


@dataclass
class MoeLayerConfig(BenchConfig):
    """The schema of ``conf/bench/moe_layer.yaml``."""

    name: str = "moe_layer"
    gemm: str = "grouped_mm"
    quack_tuned: bool = False
    #: null (quack's choice), a config name, or a dict of GemmConfig fields
    quack_config: Any = None
    #: auto | true | false: the fp32 layer reference (auto: small shapes only)
    fp32_reference: Any = "auto"

    def __post_init__(self):
        super().__post_init__()
        if self.gemm not in GEMMS:
            raise ConfigError(f"bench.gemm={self.gemm!r} is not accepted; accepted: {', '.join(GEMMS)}")
        ref = self.fp32_reference
        if isinstance(ref, str) and ref.lower() in ("true", "false"):
            self.fp32_reference = ref = ref.lower() == "true"
        if not any(ref is v or (isinstance(ref, str) and ref == v) for v in FP32_REFERENCE):
            raise ConfigError(f"bench.fp32_reference={ref!r} is not accepted; accepted: auto, true, false")
        if quack_config_of(self.quack_config, self.gemm) is not None and self.quack_tuned:
            raise ConfigError(f"bench.quack_config={self.quack_config!r} and bench.quack_tuned=true are mutually "
                              "exclusive (a pinned GEMM config or quack's autotuner); set one of them")


@dataclass(frozen=True)
class LayerSettings:
    intermediate: int
    gemm: str = "grouped_mm"
    quack_tuned: bool = False
    fp32_reference: str | bool = "auto"
    #: the canonical name of the pinned quack GemmConfig (``bench.quack_config``), None for quack's own choice
    quack_config: str | None = None


def settings_of(job: JobSpec) -> LayerSettings:
    c = job.bench_config
    return LayerSettings(job.intermediate, c.gemm, c.quack_tuned, c.fp32_reference,
                         quack_config_of(c.quack_config, c.gemm))


def fp32_reference_enabled(s: LayerSettings, job: JobSpec) -> bool:
    if s.fp32_reference != "auto":
        return bool(s.fp32_reference)
    S = job.router.num_slots(job.topk, job.experts)
    limit = FP32_REFERENCE_MAX_FLOPS.get(job.device.type, FP32_REFERENCE_MAX_FLOPS["cpu"])
    return expert_flops(job.tokens * S, job.hidden, s.intermediate) <= limit


@dataclass
class Reference:
    logits: torch.Tensor
    prior: torch.Tensor | None
    bias: torch.Tensor | None
    ids: torch.Tensor
    weights: torch.Tensor
    meta: routing.RoutingMetadata
    rows: int  # offsets[E]: rows the expert GEMMs compute
    packed: torch.Tensor
    h: torch.Tensor
    a: torch.Tensor
    y: torch.Tensor
    out: torch.Tensor
    out32: torch.Tensor | None


class MoeLayerBench(LayerTraining, Bench):
    name = "moe_layer"
    Config = MoeLayerConfig
    stages = ("gate", "route", "metadata", "pack", "gemm1", "activation", "gemm2", "combine", "experts", "total",
              "dense_gemm")
    summary_columns = ("stage", "stage_impl", "status", "time_us_median", "tflops", "pct_of_dense",
                       "bw_GBps_strict", "pct_of_copy", "routing_share", "message")

    @classmethod
    def validate(cls, job):
        if job.timing.mode == "rotated":
            raise ConfigError("timing=rotated is not accepted with bench=moe_layer (its stages run for milliseconds "
                              "on inputs far larger than the L2); accepted: events, graph")
        if job.intermediate is None:
            raise ConfigError("intermediate=None is not accepted with bench=moe_layer; set the expert FFN size "
                              "(intermediate=<integer >= 1>; every shape preset carries one)")

    def __init__(self, job):
        super().__init__(job)
        self.s = settings_of(job)
        self.eg = make_gemm(self.s.gemm, self.s.quack_tuned, self.s.quack_config)

    def describe(self):
        j = self.job
        return (f"bench=moe_layer gemm={self.eg.label} direction={self.direction} impl={j.impl} shape={j.shape} "
                f"T={j.tokens} H={j.hidden} I={self.s.intermediate} E={j.experts} k={j.topk} dtype={j.dtype_name} "
                f"device={j.device}")

    @property
    def direction(self) -> str:
        return getattr(self.job.bench_config, "direction", "fwd")

    def setup(self, timer):
        super().setup(timer)
        job, I = self.job, self.s.intermediate
        T, H, E, dev, dt = job.tokens, job.hidden, job.experts, job.device, job.dtype
        self.impls = instantiate_impls(job)
        self.x = make_x(T, H, dt, dev, job.seed)
        self.w = make_weights(E, H, I, dt, dev, job.seed)
        self.ref = self._reference()
        R, train = self.ref.meta.num_rows, self.direction != "fwd"
        # training with the fused SwiGLU keeps gemm1's pre-activation (h) for its backward
        self.bufs = Buffers.allocate(T, H, E, I, R, dt, dev, gate_up=train or not self.eg.fuses_act)
        self.grads = (GradBuffers.allocate(T, H, E, I, R, dt, dev, gemm_grads=isinstance(self.eg, QuackGemm))
                      if train else None)
        self._grad_refs: dict = {}
        self.inputs = Inputs(self.ref.logits, self.ref.bias, self.ref.ids, self.ref.weights, self.ref.meta,
                             job.router.num_rows(T, job.topk, E), self.x, self.ref.y, self.ref.packed,
                             routing.combine(self.ref.y, self.ref.meta, weighted=job.weighted), self.ref.out)

    def columns(self):
        ref = self.ref
        return {**routing_metrics(ref.meta, ref.ids, ref.logits), "capacity_per_expert": ref.meta.capacity,
                "intermediate": self.s.intermediate, "gemm_impl": self.eg.label, "expert_rows": ref.rows}

    # -- references (untimed) -----------------------------------------------------------
    def gate(self, prior, out=None):
        if prior is None:
            return torch.mm(self.x, self.w.wg, out=out)
        return torch.addmm(prior, self.x, self.w.wg, out=out)

    def _reference(self) -> Reference:
        job = self.job
        T, E, k = job.tokens, job.experts, job.topk
        prior = None
        if job.logits["kind"] != "uniform":
            lg = {key: v for key, v in job.logits.items() if key != "kind"}
            prior = make_logits(job.logits["kind"], T, E, seed=job.seed, dtype=job.dtype, device=job.device, **lg)
        logits = self.gate(prior)
        bias = job.router.expert_bias(E, job.device, job.seed)
        ids, wts = routing.route(logits, k, job.router, bias)
        meta = routing.build_metadata(ids, wts, E, job.capacity, job.router.num_rows(T, k, E))
        packed, h, a, y, out = torch_layer(self.x, self.w, meta, job.weighted)
        out32 = None
        if fp32_reference_enabled(self.s, job):
            out32 = moe_layer_reference(self.x, self.w, ids, meta.weights, meta.scatter_idx >= 0, job.weighted)
        return Reference(logits, prior, bias, ids, wts, meta, int(meta.offsets[-1]), packed, h, a, y, out, out32)

    def _fp32(self) -> bool:
        """Is the fp32 reference on (``bench.fp32_reference``)?"""
        return fp32_reference_enabled(self.s, self.job)

    # -- checks -------------------------------------------------------------------------
    def _compare_rows(self, got: torch.Tensor, ref: torch.Tensor, what: str, after_act: bool = False) -> None:
        """Rows [0, offsets[E]); with gather-A only the rows that hold a token."""
        n = self.ref.rows
        if got.dim() != 2 or got.shape[0] < n or got.shape[1] != ref.shape[1]:
            raise Mismatch(f"{what}: shape {tuple(got.shape)}, expected at least ({n}, {ref.shape[1]})")
        g, r = got[:n], ref[:n]
        if self.eg.fuses_pack and self.ref.meta.may_have_empty_rows:
            sel = self.ref.meta.gather_idx[:n] >= 0
            g, r = g[sel], r[sel]
        assert_close(g, r, what, self.job.dtype, **(self._fused_act_tolerance() if after_act else {}))

    def _fused_act_tolerance(self) -> dict:
        """A fused SwiGLU epilogue computes SiLU(gate)*up on gemm1's fp32 accumulator; the torch
        chain rounds h to the dtype first. Everything downstream of the activation is one
        rounding apart, so it gets the chain tolerance of the fp32 reference (H100, qwen3 shape:
        1 element in 2.7e8 of the expert output was 0.0195 off at |ref| 0.16, over bf16's
        0.016 + 0.016 * |ref|)."""
        if not self.eg.fuses_act:
            return {}
        rtol, atol = FP32_REFERENCE_TOLERANCE[self.job.dtype]
        return {"rtol": rtol, "atol": atol}

    def _check_layer(self, got: torch.Tensor, chain_route=None) -> None:
        job, ref = self.job, self.ref
        want, want32 = ref.out, ref.out32
        if chain_route is not None and not chain_route.exact_ties_for(job.router):
            # a route that may pick another expert among equal scores (checked on its own in the
            # route row): compare with the reference chain on its ids
            ids, wts = chain_route.route(ref.logits, job.topk, job.router, ref.bias)
            meta = routing.build_metadata(ids.contiguous(), wts.contiguous(), job.experts, job.capacity,
                                          self.inputs.num_rows)
            want = torch_layer(self.x, self.w, meta, job.weighted)[-1]
            if want32 is not None:
                want32 = moe_layer_reference(self.x, self.w, ids, meta.weights, meta.scatter_idx >= 0, job.weighted)
        assert_close(got, want, "layer output vs the torch implementation", job.dtype, **self._fused_act_tolerance())
        if want32 is not None:
            rtol, atol = FP32_REFERENCE_TOLERANCE[job.dtype]
            assert_close(got, want32, "layer output vs the fp32 reference", rtol=rtol, atol=atol)

    # -- the calls of the layer's own stages -----------------------------------------------
    def _gemm_check(self):
        self.eg.check(self.job.device, self.job.dtype, self.timer.mode, self.job.hidden, self.s.intermediate)

    def _reset(self, *bufs, rows_of=None):
        def reset():
            for b in bufs:
                poison(b)
            if rows_of is not None:
                prepoison(rows_of, self.job.dtype, self.job.device)
        return reset

    def call(self, stage: str) -> Call:
        """The stage's call in the job's direction."""
        return self._forward_call(stage) if self.direction == "fwd" else self._train_call(stage)

    def _forward_call(self, stage: str) -> Call:
        job, ref, eg, w, b = self.job, self.ref, self.eg, self.w, self.bufs
        R, I = ref.meta.num_rows, self.s.intermediate
        inp = self.x if eg.fuses_pack else ref.packed
        if stage == "gate":
            want = self.x.float() @ w.wg.float()
            if ref.prior is not None:
                want += ref.prior.float()
            return Call(lambda: self.gate(ref.prior, out=b.logits),
                        lambda got: assert_close(got, want, "gate logits", job.dtype), self._reset(b.logits))
        if stage == "gemm1":
            self._gemm_check()
            shape, want = ((R, I), ref.a) if eg.fuses_act else ((R, 2 * I), ref.h)
            out = b.a if eg.fuses_act else b.h
            what = "gemm1 output" + (" (SwiGLU)" if eg.fuses_act else "")
            return Call(lambda: eg.gemm1(inp, ref.meta, w, out),
                        lambda got: self._compare_rows(got, want, what, after_act=True), self._reset(out, rows_of=shape))
        if stage == "activation":
            self._gemm_check()
            eg.activation(ref.h[:0], b.a[:0])  # raises Unsupported when fused into gemm1
            return Call(lambda: eg.activation(ref.h, b.a), lambda got: self._compare_rows(got, ref.a, "activation"),
                        self._reset(b.a))
        if stage == "gemm2":
            self._gemm_check()
            return Call(lambda: eg.gemm2(ref.a, ref.meta, w, b.y),
                        lambda got: self._compare_rows(got, ref.y, "gemm2 output"),
                        self._reset(b.y, rows_of=(R, job.hidden)))
        if stage == "experts":
            self._gemm_check()
            return Call(lambda: expert_ffn(eg, inp, ref.meta, w, b),
                        lambda got: self._compare_rows(got, ref.y, "expert FFN output", after_act=True),
                        self._reset(*b.all(), rows_of=(R, job.hidden)))
        if stage == "total":
            if self.impls[job.impl].fused_layer:
                return self._fused_total(self.impls[job.impl])
            self._gemm_check()
            chain = ("route", "metadata", "combine") + (() if eg.fuses_pack else ("pack",))
            ims = {s: self.impls[job.stage_impls[s]] for s in chain}
            for im in ims.values():
                im.check_device(job.device)
            k, E = job.topk, job.experts

            def layer():
                logits = self.gate(ref.prior, out=b.logits)
                meta = route_then_metadata(ims["route"], ims["metadata"], logits, k, job.router, ref.bias, E,
                                           job.capacity, self.inputs.num_rows)[2]
                rows = self.x if eg.fuses_pack else ims["pack"].pack(self.x, meta, out=b.packed)
                y = expert_ffn(eg, rows, meta, w, b)
                return ims["combine"].combine(y, meta, out=b.out, weighted=job.weighted)

            return Call(layer, lambda got: self._check_layer(got, ims["route"]),
                        self._reset(*b.all(), rows_of=(R, job.hidden)))
        if stage == "dense_gemm":
            n = ref.rows
            h = b.h[:n] if b.h.shape[0] else torch.empty(n, 2 * I, dtype=job.dtype, device=job.device)
            y = b.y[:n]
            a_in, x_in = ref.a[:n], ref.packed[:n]

            def dense():
                torch.mm(x_in, w.w1[0].T, out=h)
                return h, torch.mm(a_in, w.w2[0].T, out=y)

            def check(got):
                m = min(n, DENSE_CHECK_ROWS)
                assert_close(got[0][:m], x_in[:m].float() @ w.w1[0].float().T, "dense gemm1 rows", job.dtype)
                assert_close(got[1][:m], a_in[:m].float() @ w.w2[0].float().T, "dense gemm2 rows", job.dtype)

            return Call(dense, check, self._reset(h, y))
        raise ValueError(stage)

    def _fused_total(self, lay) -> Call:
        """The ``total`` row of an implementation with a whole layer of its own
        (``Impl.fused_layer``: SonicMoE's), gate to combine, in the job's direction: its forward
        (no autograd state: inference), its backward from the seeded d_out through its autograd
        (bwd: on one untimed forward's graph), or both. Its weights are ours, in the layouts it
        takes: the router's weight [E, H] (one copy per job, untimed), W1 and W2 as they are.
        Checked on its own routing: its logits against fp32, then the torch layer (and the fp32
        reference) on the ids its top-k gives on those logits."""
        job, ref, w, b = self.job, self.ref, self.w, self.bufs
        if not job.capacity.dropless or job.capacity.align > 1:
            raise Unsupported(f"impl={lay.name}'s layer is dropless with tight expert blocks (capacity=dropless, "
                              "capacity.align=1)")
        if not job.weighted:
            raise Unsupported(f"impl={lay.name}'s layer always weights its combine (bench.weighted=false)")
        if ref.prior is not None or ref.bias is not None:
            raise Unsupported(f"impl={lay.name}'s layer routes on x @ Wg alone (logits={job.logits['kind']} adds a "
                              "prior inside the gate GEMM; a router bias is not taken)")
        k, train = job.topk, self.direction != "fwd"
        router_w = w.wg.t().contiguous()
        leaves = [t.detach().requires_grad_(train) for t in (self.x, router_w, w.w1, w.w2)]
        d_out = self._upstream("d_out") if train else None

        def forward():  # -> (out, logits)
            return lay.layer(*leaves, k, job.router, training=train)

        def backward(ctx):
            d_x, d_rw, d_w1, d_w2 = torch.autograd.grad(ctx[0], leaves, d_out, retain_graph=self.direction == "bwd")
            return d_x, d_rw.t(), d_w1, d_w2

        routed = {}

        def check_fwd(got):
            out, logits = (t.detach() for t in got)
            assert_close(logits, self.x.float() @ w.wg.float(), f"{lay.name}'s router logits", job.dtype)
            ids, wts = (t.clone() for t in lay.route(logits, k, job.router))  # its own buffers: copies
            routed["ids"], routed["meta"] = ids, routing.build_metadata(ids, wts, job.experts, job.capacity,
                                                                        self.inputs.num_rows)
            want = torch_layer(self.x, w, routed["meta"], job.weighted)[-1]
            rtol, atol = FP32_REFERENCE_TOLERANCE[job.dtype]  # its SwiGLU is fused into gemm1's epilogue
            assert_close(out, want, "layer output vs the torch implementation on its routing", rtol=rtol, atol=atol)
            if ref.out32 is not None:
                want32 = moe_layer_reference(self.x, w, routed["ids"], routed["meta"].weights,
                                             routed["meta"].scatter_idx >= 0, job.weighted)
                assert_close(out, want32, "layer output vs the fp32 reference on its routing", rtol=rtol, atol=atol)

        def check_bwd(got):
            for label, (_, *want) in self._layer_refs(routed["ids"], routed["meta"]):
                for name, gv, wv in zip(("d_x", "d_Wg", "d_W1", "d_W2"), got, want):
                    self._assert_grad(gv, wv, f"{name} vs {label}")

        reset = self._reset(b.out, b.logits)
        if not train:
            return Call(forward, check_fwd, reset)
        if self.direction == "bwd":
            ctx = forward()
            check_fwd(ctx)  # the routing the backward is checked on
            return Call(lambda: backward(ctx), check_bwd, reset)

        def fwdbwd():
            ctx = forward()
            return ctx, backward(ctx)

        return Call(fwdbwd, lambda got: (check_fwd(got[0]), check_bwd(got[1])), reset)

    def stage_impl(self, stage: str) -> str:
        j, eg = self.job, self.eg
        if stage == "activation":
            return eg.label if eg.fuses_act else "torch"
        if stage in ("gemm1", "gemm2", "experts"):
            return eg.label
        if stage == "total":
            if self.impls[j.impl].fused_layer:
                return self.impls[j.impl].layer_label
            pack = "fused" if eg.fuses_pack else j.stage_impls["pack"]
            parts = ["gate=torch"] + [f"{s}={j.stage_impls[s]}" for s in ("route", "metadata")] + [f"pack={pack}"]
            return ",".join(parts + [f"gemm={eg.label}", f"combine={j.stage_impls['combine']}"])
        return "torch"

    def flops(self, stage: str) -> float | None:
        """The stage's forward FLOPs times 1 (fwd), 2 (bwd: two GEMMs per GEMM) or 3 (fwdbwd)."""
        j, n, I = self.job, self.ref.rows, self.s.intermediate
        gate = 2.0 * j.tokens * j.hidden * j.experts
        fwd = {"gate": gate, "gemm1": 4.0 * n * j.hidden * I, "gemm2": 2.0 * n * I * j.hidden,
               "experts": expert_flops(n, j.hidden, I), "dense_gemm": expert_flops(n, j.hidden, I),
               "total": gate + expert_flops(n, j.hidden, I)}.get(stage)
        return None if fwd is None else fwd * DIRECTION_FLOPS[self.direction]

    def cases(self):
        routing_stages = {"route": ROUTE, "metadata": METADATA, "pack": PACK, "combine": COMBINE}
        for stage in self.stages:
            if stage == "pack" and self.eg.fuses_pack:
                def fused():
                    raise Unsupported(f"fused into gemm1 (bench.gemm={self.eg.name} gathers the token rows with "
                                      "A_idx); no separate pack")
                yield Case("pack", self.eg.label, fused)
            elif stage in routing_stages:
                yield stage_case(routing_stages[stage], self.job, self.impls, self.inputs, self.direction)
            else:
                yield Case(stage, self.stage_impl(stage), lambda st=stage: self.call(st), flops=self.flops(stage))

    def finish(self, rows):
        """% of the same job's dense GEMM (in the same direction), routing share of the total."""
        by = {r["stage"]: r for r in rows}
        dense = by.get("dense_gemm", {}).get("tflops")
        for st in ("gemm1", "gemm2", "experts", "total"):
            r = by.get(st)
            if r is not None and dense and r.get("tflops") is not None:
                r["pct_of_dense"] = 100.0 * r["tflops"] / dense
        total = by.get("total")
        if total is not None and total["status"] == "ok":
            parts = []
            for st in SHARE_STAGES:
                r = by[st]
                if r["status"] == "ok":
                    parts.append(r["time_us_median"])
                elif st == "pack" and self.eg.fuses_pack:
                    parts.append(0.0)
                else:
                    parts = None
                    break
            if parts is not None:
                total["routing_share"] = sum(parts) / total["time_us_median"]
        return rows
