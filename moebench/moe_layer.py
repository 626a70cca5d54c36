"""``bench=moe_layer``: one MoE layer forward with E experts of their own SwiGLU FFN, stage by stage.

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
    total       the whole layer, gate to combine, timed as one call
    dense_gemm  the same job's ceiling: dense bf16 x @ W1[0]^T then a @ W2[0]^T with M = the rows
                the expert GEMMs compute (T*k dropless), same H and I -- torch.mm (cuBLAS)

Weights (seeded, std 1/sqrt(fan_in), allocated once per job in the job's dtype, no fp32 copies):
``Wg`` [H, E]; ``W1`` [E, 2I, H] (rows ``[0, I)`` the gate projection, ``[I, 2I)`` the up
projection, the ``nn.Linear`` layout); ``W2`` [E, H, I]. ``x`` ~ N(0, 1), so every intermediate
and the output are O(1) and the bf16 tolerance means something.

Routing distribution: the logits are the gate GEMM of ``x``. ``logits=uniform`` (the default)
adds nothing: ``x @ Wg`` is already i.i.d. normal per (token, expert). Any other ``logits`` kind
(zipf, hot, from_file) is drawn as usual and added as a fixed per-token prior inside the gate
GEMM (``torch.addmm(prior, x, Wg)``, one call), so skewed loads reach the expert GEMMs.

Expert GEMMs (``bench.gemm``):

* ``loop``: a Python loop of ``torch.mm`` per expert over its rows (what naive code does); it
  reads the expert offsets on the host (one sync per GEMM), so it cannot be captured with
  ``timing=graph`` (``unsupported`` rows there).
* ``grouped_mm``: ``torch._grouped_mm(packed, W.mT, offs=offsets[1:])`` (int32 cumulative ends).
* ``quack_varlen``: quack's varlen-M GEMM (``quack.gemm_interface.gemm``, ``cu_seqlens_m=offsets``).
* ``quack_gather``: the same with gather-A (``A=x``, ``A_idx=gather_idx``): the pack is fused
  into gemm1, so the ``pack`` row is ``unsupported`` with the message "fused into gemm1" (not
  measured on its own; its cost is inside gemm1). Under ``pad_to_capacity`` the padding rows
  gather token 0 (``gather_idx`` clamped) instead of zeros: combine never reads them, and the
  gemm checks compare the rows that hold tokens.
* ``quack_gated`` / ``quack_gather_gated``: gemm1 with quack's gated epilogue
  (``gemm_act(activation="swiglu", concat_layout=("B",))``), so SiLU(gate)*up is computed in
  gemm1's epilogue and ``h`` is never written; the ``activation`` row says "fused into gemm1".

quack needs a CUDA GPU and 16-bit inputs; without them its rows are ``unsupported`` with the
reason (never a fallback). quack picks its GEMM config itself: untuned, its per-arch default (on
SM90 ``128x192_pp_c2x1``: 128x192 tiles, pingpong, 2x1 clusters; varlen and gather-A GEMMs never
take its nvMMH heuristic, which is for plain dense GEMMs); ``bench.quack_tuned=true`` runs its
autotuner on the first call (untimed, cached on disk under ~/.quack); ``bench.quack_config=<name>``
pins one SM90 config for every quack GEMM of the job (``quack_config_fields`` has the spelling:
``128x256_coop_c1x2``, ``default``, or a dict of GemmConfig fields), checked against quack's SM90
tile rules when the config is resolved; it names the GEMM path in the rows
(``gemm_impl`` / ``stage_impl`` ``quack_varlen[128x256_coop_c1x2]``) and excludes
``quack_tuned``. It applies to the quack_* paths only (``loop`` and ``grouped_mm`` ignore it).

Rows beyond ``offsets[E]`` (the tail a capacity leaves) belong to no expert: the grouped GEMMs
do not compute them and combine never reads them, so every check compares rows ``[0, offsets[E])``.

Columns (besides the harness ones): ``flops`` and ``tflops`` (gate 2*T*H*E; gemm1 4*M*H*I;
gemm2 2*M*I*H; experts and dense_gemm 6*M*H*I; total both, M = rows the expert GEMMs compute =
``offsets[E]``), ``pct_of_dense`` (a GEMM row's TFLOP/s over the dense_gemm row's),
``routing_share`` on the total row ((gate + route + metadata + pack + combine) / total time; a
fused pack counts 0), ``intermediate``, ``gemm_impl``, ``expert_rows`` (M).

Correctness (before anything is timed, outputs poisoned first): gate against an fp32 matmul;
route/metadata/pack/combine exactly as the other benches (``moebench.harness``); every GEMM
stage, the expert FFN and the layer against the torch implementation (the ``loop`` path, bf16)
at the job's shape; the dense GEMM on a sample of rows against fp32; and, on shapes small enough
(``bench.fp32_reference=auto``: at most 2e10 expert FLOPs on the CPU, 4e12 on a GPU), the layer
output against :func:`moe_layer_reference`, an fp32 loop over experts from the routing decisions
in token order that shares no code with pack, the GEMM paths or combine.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from moebench import routing
from moebench.check import Mismatch, assert_close, poison
from moebench.config import BENCHES, ConfigError, JobSpec, resolve, shape_preset
from moebench.harness import Harness, Inputs, check_then_time
from moebench.impls.base import Unsupported
from moebench.logits import make_logits
from moebench.timing import Timer, copy_bandwidth_GBps

log = logging.getLogger("moebench")

BENCH = "moe_layer"
STAGES = BENCHES[BENCH]
#: stages run by the job's routing implementations (``impl``, ``impl_<stage>``) through the harness
ROUTING_STAGES = ("route", "metadata", "pack", "combine")
#: the stages whose time is the "routing" part of the layer (routing_share)
SHARE_STAGES = ("gate", "route", "metadata", "pack", "combine")
GEMMS = ("loop", "grouped_mm", "quack_varlen", "quack_gather", "quack_gated", "quack_gather_gated")
FP32_REFERENCE = ("auto", True, False)
#: expert FLOPs (6*T*S*H*I) up to which ``fp32_reference=auto`` runs the fp32 reference
FP32_REFERENCE_MAX_FLOPS = {"cpu": 2e10, "cuda": 4e12}
#: (rtol, atol) of the job's dtype chain against the fp32 reference (several roundings deep:
#: h, a, y and the output are each rounded to the dtype; measured max |err| / (1 + |ref|) on
#: bf16 is about 0.007 at tiny to mid shapes, a lost or misrouted slot is O(0.1))
FP32_REFERENCE_TOLERANCE = {torch.bfloat16: (3e-2, 3e-2), torch.float16: (5e-3, 5e-3),
                            torch.float32: (1e-4, 1e-4)}
#: rows of the dense GEMM checked against fp32
DENSE_CHECK_ROWS = 256

#: ``bench.quack_config``: the GemmConfig fields one may pin, and quack's SM90 default
#: (``quack.gemm_config.default_config`` on sm_90: what untuned quack runs for varlen-M GEMMs)
QUACK_CONFIG_KEYS = ("tile_m", "tile_n", "pingpong", "cluster_m", "cluster_n", "max_swizzle_size",
                     "is_dynamic_persistent")
QUACK_SM90_DEFAULT = {"tile_m": 128, "tile_n": 192, "pingpong": True, "cluster_m": 2, "cluster_n": 1,
                      "max_swizzle_size": 8, "is_dynamic_persistent": False}
QUACK_CONFIG_NAME = re.compile(r"(\d+)x(\d+)_(pp|coop)_c(\d+)x(\d+)(?:_sw(\d+))?(_dyn)?")
QUACK_CONFIG_ACCEPTED = ("accepted: null (quack's default, or the autotuner with bench.quack_tuned=true), "
                         "default (quack's SM90 default pinned: 128x192_pp_c2x1), a name "
                         "<tile_m>x<tile_n>_<pp|coop>_c<cluster_m>x<cluster_n>[_sw<max_swizzle_size>][_dyn] "
                         "(e.g. 128x192_pp_c1x2, 128x256_coop_c1x2), or a dict of "
                         + ", ".join(QUACK_CONFIG_KEYS) + " (missing keys from the default)")


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSettings:
    intermediate: int
    gemm: str = "grouped_mm"
    quack_tuned: bool = False
    fp32_reference: str | bool = "auto"
    #: the canonical name of the pinned quack GemmConfig (``bench.quack_config``), None for quack's own choice
    quack_config: str | None = None


def settings_of(cfg: DictConfig, job: JobSpec) -> LayerSettings:
    """The MoE-layer keys of a composed config, validated (ConfigError one-liners)."""
    if job.timing.mode == "rotated":
        raise ConfigError("timing=rotated is not accepted with bench=moe_layer (its stages run for milliseconds "
                          "on inputs far larger than the L2); accepted: events, graph")
    inter = cfg.get("intermediate")
    if inter is None and (cfg.get("shape_name") or "auto") == "auto":
        # shape=auto: the preset this machine got (tiny or seed) carries the FFN size
        inter = shape_preset(job.shape).get("intermediate")
    if inter is None:
        raise ConfigError("intermediate=None is not accepted with bench=moe_layer; set the expert FFN size "
                          "(intermediate=<integer >= 1>; every shape preset carries one)")
    if isinstance(inter, bool) or not isinstance(inter, int) or inter < 1:
        raise ConfigError(f"intermediate={inter!r} is not accepted; intermediate must be an integer >= 1")
    b = cfg.bench
    gemm = b.get("gemm", "grouped_mm")
    if gemm not in GEMMS:
        raise ConfigError(f"bench.gemm={gemm!r} is not accepted; accepted: {', '.join(GEMMS)}")
    tuned = b.get("quack_tuned", False)
    if not isinstance(tuned, bool):
        raise ConfigError(f"bench.quack_tuned={tuned!r} is not accepted; accepted: true, false")
    ref = b.get("fp32_reference", "auto")
    if isinstance(ref, str) and ref.lower() in ("true", "false"):
        ref = ref.lower() == "true"
    if not any(ref is v or (isinstance(ref, str) and ref == v) for v in FP32_REFERENCE):
        raise ConfigError(f"bench.fp32_reference={ref!r} is not accepted; accepted: auto, true, false")
    raw = b.get("quack_config")
    qc = quack_config_of(raw, gemm)
    if qc is not None and tuned:
        raw = OmegaConf.to_container(raw) if isinstance(raw, DictConfig) else raw
        raise ConfigError(f"bench.quack_config={raw!r} and bench.quack_tuned=true are mutually exclusive "
                          "(a pinned GEMM config or quack's autotuner); set one of them")
    return LayerSettings(inter, gemm, tuned, ref, qc)


def quack_config_name(fields: dict) -> str:
    """The canonical name of GemmConfig fields, e.g. ``128x192_pp_c1x2`` (``_sw<n>`` when the
    swizzle is not 8, ``_dyn`` with the dynamic persistent scheduler); parses back to the same fields."""
    f = {**QUACK_SM90_DEFAULT, **fields}
    name = (f"{f['tile_m']}x{f['tile_n']}_{'pp' if f['pingpong'] else 'coop'}"
            f"_c{f['cluster_m']}x{f['cluster_n']}")
    if f["max_swizzle_size"] != QUACK_SM90_DEFAULT["max_swizzle_size"]:
        name += f"_sw{f['max_swizzle_size']}"
    return name + ("_dyn" if f["is_dynamic_persistent"] else "")


def quack_config_fields(value) -> dict:
    """``bench.quack_config`` (a name or a dict; see QUACK_CONFIG_ACCEPTED) -> all GemmConfig fields
    of QUACK_CONFIG_KEYS, checked against quack's SM90 tile rules (ConfigError one-liners)."""
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    what = f"bench.quack_config={value!r} is not accepted"
    if isinstance(value, str):
        if value == "default":
            return dict(QUACK_SM90_DEFAULT)
        m = QUACK_CONFIG_NAME.fullmatch(value)
        if m is None:
            raise ConfigError(f"{what}; {QUACK_CONFIG_ACCEPTED}")
        tm, tn, kind, cm, cn, sw, dyn = m.groups()
        fields = {"tile_m": int(tm), "tile_n": int(tn), "pingpong": kind == "pp", "cluster_m": int(cm),
                  "cluster_n": int(cn), "max_swizzle_size": int(sw) if sw else QUACK_SM90_DEFAULT["max_swizzle_size"],
                  "is_dynamic_persistent": bool(dyn)}
    elif isinstance(value, dict):
        bad = [k for k in value if k not in QUACK_CONFIG_KEYS]
        if bad:
            raise ConfigError(f"{what}: unknown key(s) {', '.join(map(str, bad))}; {QUACK_CONFIG_ACCEPTED}")
        fields = {**QUACK_SM90_DEFAULT, **value}
        for k, v in fields.items():
            want_bool = isinstance(QUACK_SM90_DEFAULT[k], bool)
            if want_bool != isinstance(v, bool) or not isinstance(v, (bool, int)):
                raise ConfigError(f"{what}: {k}={v!r} must be {'true/false' if want_bool else 'an integer'}; "
                                  f"{QUACK_CONFIG_ACCEPTED}")
    else:
        raise ConfigError(f"{what}; {QUACK_CONFIG_ACCEPTED}")
    problem = _sm90_config_problem(fields)
    if problem:
        raise ConfigError(f"{what}: {problem}; {QUACK_CONFIG_ACCEPTED}")
    return fields


def _sm90_config_problem(f: dict) -> str | None:
    """Why quack's SM90 GEMM refuses these fields (the checks of quack.gemm_sm90.GemmSm90.__init__), or None."""
    tm, tn = f["tile_m"], f["tile_n"]
    if f["pingpong"]:
        if tm not in (64, 128, 192):
            return f"a pingpong tile_m must be 64, 128 or 192, not {tm}"
        n_max = {64: 256, 128: 208, 192: 128}[tm]
        if tn < 16 or tn % 16 or tn > n_max:
            return f"a pingpong {tm}-row tile needs tile_n a multiple of 16 up to {n_max}, not {tn}"
    else:
        if tm not in (64, 128, 192, 256, 320):
            return f"a cooperative tile_m must be 64, 128, 192, 256 or 320, not {tm}"
        if tm in (192, 320):
            n_max = 256 if tm == 192 else 160
            if tn < 32 or tn % 32 or tn > n_max:
                return f"a cooperative {tm}-row tile needs tile_n a multiple of 32 up to {n_max}, not {tn}"
        elif not (tn >= 16 and ((tn % 16 == 0 and tn <= 256) or (tn % 32 == 0 and tn <= 512))):
            return f"a cooperative tile needs tile_n a multiple of 16 up to 256 or of 32 up to 512, not {tn}"
    cm, cn = f["cluster_m"], f["cluster_n"]
    if cm not in (1, 2, 4) or cn not in (1, 2, 4) or cm * cn > 8:
        return f"cluster_m and cluster_n must be 1, 2 or 4 with at most 8 CTAs a cluster, not {cm}x{cn}"
    if f["max_swizzle_size"] < 1:
        return f"max_swizzle_size must be >= 1, not {f['max_swizzle_size']}"
    return None


def _gemm_config_problem(f: dict, gemm: str) -> str | None:
    """What quack's gather-A and gated-epilogue GEMMs additionally refuse (quack.gemm_config.config_supports
    and the SM90 gated epilogue), or None."""
    cls = GEMM_CLASSES[gemm]
    if cls.fuses_pack:
        if f["cluster_n"] != 1:
            return f"bench.gemm={gemm} (gather-A) needs cluster_n=1"
        if f["tile_n"] == 208 or f["is_dynamic_persistent"]:
            return f"bench.gemm={gemm} (gather-A) excludes tile_n=208 and the dynamic scheduler on SM90"
    if cls.fuses_act:
        if f["tile_n"] % 32:
            return f"bench.gemm={gemm} (gated epilogue) needs tile_n a multiple of 32 on SM90"
        if not f["pingpong"] and f["tile_m"] == 192:
            return f"bench.gemm={gemm} (gated epilogue): quack's gated configs exclude cooperative 192-row tiles"
    return None


def quack_config_of(value, gemm: str) -> str | None:
    """``bench.quack_config`` validated for ``bench.gemm`` -> its canonical name (None: not pinned).
    The value is checked whatever the GEMM; it applies to the quack_* GEMMs only."""
    if value is None:
        return None
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    fields = quack_config_fields(value)
    if gemm in GEMM_CLASSES and issubclass(GEMM_CLASSES[gemm], QuackGemm):
        problem = _gemm_config_problem(fields, gemm)
        if problem:
            raise ConfigError(f"bench.quack_config={value!r} is not accepted: {problem}; "
                              f"{QUACK_CONFIG_ACCEPTED}")
    return quack_config_name(fields)


def validate(cfg: DictConfig, job: JobSpec) -> LayerSettings:
    """Called by ``config.resolve`` for ``bench=moe_layer``."""
    return settings_of(cfg, job)


def expert_flops(tokens_times_slots: int, hidden: int, intermediate: int) -> float:
    """SwiGLU forward FLOPs of M expert rows: 6*M*H*I (gate/up 4*M*H*I, down 2*M*I*H)."""
    return 6.0 * tokens_times_slots * hidden * intermediate


def fp32_reference_enabled(s: LayerSettings, job: JobSpec) -> bool:
    if s.fp32_reference != "auto":
        return bool(s.fp32_reference)
    S = job.router.num_slots(job.topk, job.experts)
    limit = FP32_REFERENCE_MAX_FLOPS.get(job.device.type, FP32_REFERENCE_MAX_FLOPS["cpu"])
    return expert_flops(job.tokens * S, job.hidden, s.intermediate) <= limit


# --------------------------------------------------------------------------------------
# Weights and the fp32 reference
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Expert GEMM implementations
# --------------------------------------------------------------------------------------


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

    def poison(self):
        for t in (self.logits, self.packed, self.h, self.a, self.y, self.out):
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


def _prepoison(shape, dtype, device) -> None:
    """Leave a NaN-filled block of this size in the caching allocator, so an implementation that
    allocates its own output (torch._grouped_mm) most likely gets poisoned memory."""
    if device.type == "cuda":
        t = torch.empty(shape, dtype=dtype, device=device)
        poison(t)
        del t


# --------------------------------------------------------------------------------------
# The bench
# --------------------------------------------------------------------------------------


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


class LayerBench:
    """One job: inputs, weights, references, and a row per stage."""

    def __init__(self, job: JobSpec, s: LayerSettings, timer: Timer):
        self.job, self.s, self.timer = job, s, timer
        self.harness = Harness(job, timer)
        self.eg = make_gemm(s.gemm, s.quack_tuned, s.quack_config)
        T, H, E, I = job.tokens, job.hidden, job.experts, s.intermediate
        dev, dt = job.device, job.dtype
        self.x = make_x(T, H, dt, dev, job.seed)
        self.w = make_weights(E, H, I, dt, dev, job.seed)
        self.ref = self._reference()
        self.bufs = Buffers.allocate(T, H, E, I, self.ref.meta.num_rows, dt, dev, gate_up=not self.eg.fuses_act)
        self.inputs = Inputs(self.ref.logits, self.ref.bias, self.ref.ids, self.ref.weights, self.ref.meta,
                             job.router.num_rows(T, job.topk, E), self.x, self.ref.y, self.ref.packed,
                             routing.combine(self.ref.y, self.ref.meta, weighted=job.weighted), self.ref.out)

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
        if chain_route is not None and not chain_route.exact_ties:
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

    # -- stage cases: (fn, check, reset) ------------------------------------------------------
    def _case(self, stage: str):
        job, ref, eg, w, b = self.job, self.ref, self.eg, self.w, self.bufs
        dev = job.device
        if stage == "gate":
            want = self.x.float() @ w.wg.float()
            if ref.prior is not None:
                want += ref.prior.float()
            return (lambda: self.gate(ref.prior, out=b.logits),
                    lambda got: assert_close(got, want, "gate logits", job.dtype), lambda: poison(b.logits))
        if stage in ("gemm1", "activation", "gemm2", "experts"):
            eg.check(dev, job.dtype, self.timer.mode, job.hidden, self.s.intermediate)
        inp = self.x if eg.fuses_pack else ref.packed
        if stage == "gemm1":
            R = ref.meta.num_rows
            shape, want = ((R, self.s.intermediate), ref.a) if eg.fuses_act else ((R, 2 * self.s.intermediate), ref.h)
            out = b.a if eg.fuses_act else b.h

            def reset():
                poison(out)
                _prepoison(shape, job.dtype, dev)

            return (lambda: eg.gemm1(inp, ref.meta, w, out),
                    lambda got: self._compare_rows(got, want, "gemm1 output" + (" (SwiGLU)" if eg.fuses_act else ""),
                                                       after_act=True),
                    reset)
        if stage == "activation":
            eg.activation(ref.h[:0], b.a[:0])  # raises Unsupported when fused into gemm1
            return (lambda: eg.activation(ref.h, b.a), lambda got: self._compare_rows(got, ref.a, "activation"),
                    lambda: poison(b.a))
        if stage == "gemm2":
            def reset():
                poison(b.y)
                _prepoison((ref.meta.num_rows, job.hidden), job.dtype, dev)

            return (lambda: eg.gemm2(ref.a, ref.meta, w, b.y),
                    lambda got: self._compare_rows(got, ref.y, "gemm2 output"), reset)
        if stage == "experts":
            def reset():
                b.poison()
                _prepoison((ref.meta.num_rows, job.hidden), job.dtype, dev)

            return (lambda: expert_ffn(eg, inp, ref.meta, w, b),
                    lambda got: self._compare_rows(got, ref.y, "expert FFN output", after_act=True), reset)
        if stage == "total":
            eg.check(dev, job.dtype, self.timer.mode, job.hidden, self.s.intermediate)
            chain = ("route", "metadata", "combine") + (() if eg.fuses_pack else ("pack",))
            ims = {s: self.harness.impl_for(s) for s in chain}
            for im in ims.values():
                im.check_device(dev)
            k, E = job.topk, job.experts

            def layer():
                logits = self.gate(ref.prior, out=b.logits)
                ids, wts = ims["route"].route(logits, k, job.router, ref.bias)
                meta = ims["metadata"].metadata(ids, wts, E, job.capacity, self.inputs.num_rows)
                rows = self.x if eg.fuses_pack else ims["pack"].pack(self.x, meta, out=b.packed)
                y = expert_ffn(eg, rows, meta, w, b)
                return ims["combine"].combine(y, meta, out=b.out, weighted=job.weighted)

            def reset():
                b.poison()
                _prepoison((ref.meta.num_rows, job.hidden), job.dtype, dev)

            return layer, lambda got: self._check_layer(got, ims["route"]), reset
        if stage == "dense_gemm":
            n, I = ref.rows, self.s.intermediate
            h = b.h[:n] if b.h.shape[0] else torch.empty(n, 2 * I, dtype=job.dtype, device=dev)
            y = b.y[:n]
            a_in, x_in = ref.a[:n], ref.packed[:n]

            def dense():
                torch.mm(x_in, w.w1[0].T, out=h)
                return h, torch.mm(a_in, w.w2[0].T, out=y)

            def check(got):
                m = min(n, DENSE_CHECK_ROWS)
                assert_close(got[0][:m], x_in[:m].float() @ w.w1[0].float().T, "dense gemm1 rows", job.dtype)
                assert_close(got[1][:m], a_in[:m].float() @ w.w2[0].float().T, "dense gemm2 rows", job.dtype)

            return dense, check, lambda: (poison(h), poison(y))
        raise ValueError(stage)

    def stage_impl(self, stage: str) -> str:
        j, eg = self.job, self.eg
        if stage in ROUTING_STAGES:
            return eg.label if (stage == "pack" and eg.fuses_pack) else j.stage_impls[stage]
        if stage == "activation":
            return eg.label if eg.fuses_act else "torch"
        if stage in ("gemm1", "gemm2", "experts"):
            return eg.label
        if stage == "total":
            pack = "fused" if eg.fuses_pack else j.stage_impls["pack"]
            parts = ["gate=torch"] + [f"{s}={j.stage_impls[s]}" for s in ("route", "metadata")] + [f"pack={pack}"]
            return ",".join(parts + [f"gemm={eg.label}", f"combine={j.stage_impls['combine']}"])
        return "torch"

    def flops(self, stage: str) -> float | None:
        j, n, I = self.job, self.ref.rows, self.s.intermediate
        gate = 2.0 * j.tokens * j.hidden * j.experts
        return {"gate": gate, "gemm1": 4.0 * n * j.hidden * I, "gemm2": 2.0 * n * I * j.hidden,
                "experts": expert_flops(n, j.hidden, I), "dense_gemm": expert_flops(n, j.hidden, I),
                "total": gate + expert_flops(n, j.hidden, I)}.get(stage)

    def run_stage(self, stage: str) -> dict:
        job = self.job
        row = {"stage_impl": self.stage_impl(stage)}
        if stage in ROUTING_STAGES:
            if stage == "pack" and self.eg.fuses_pack:
                return {**row, "status": "unsupported",
                        "message": f"unsupported: fused into gemm1 (bench.gemm={self.eg.name} gathers the token rows "
                                   "with A_idx); no separate pack"}
            return self.harness.run_stage(stage, self.inputs)
        return {**row, **check_then_time(lambda: self._case(stage), self.timer, job.device, job.tokens, stage)}

    def run(self, progress=None) -> list[dict]:
        rows = []
        for i, stage in enumerate(STAGES, 1):
            t0 = time.perf_counter()
            row = {"stage": stage, **self.run_stage(stage)}
            rows.append(row)
            if progress:
                progress(i, len(STAGES), row, time.perf_counter() - t0)
        return finish_rows(rows, self)


def finish_rows(rows: list[dict], bench: LayerBench) -> list[dict]:
    """FLOPs, TFLOP/s, % of the same job's dense GEMM, routing share of the total."""
    by = {r["stage"]: r for r in rows}
    for r in rows:
        f = bench.flops(r["stage"])
        r["flops"] = f
        if f is not None and r["status"] == "ok":
            r["tflops"] = f / (r["time_us_median"] * 1e-6) / 1e12
    dense = by.get("dense_gemm", {}).get("tflops")
    for st in ("gemm1", "gemm2", "experts", "total"):
        r = by.get(st)
        if r is not None and dense and r.get("tflops") is not None and st != "total":
            r["pct_of_dense"] = 100.0 * r["tflops"] / dense
    total = by.get("total")
    if total is not None and total["status"] == "ok":
        parts = []
        for st in SHARE_STAGES:
            r = by[st]
            if r["status"] == "ok":
                parts.append(r["time_us_median"])
            elif st == "pack" and bench.eg.fuses_pack:
                parts.append(0.0)
            else:
                parts = None
                break
        if parts is not None:
            total["routing_share"] = sum(parts) / total["time_us_median"]
    return rows


# --------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------

SUMMARY = ["stage", "stage_impl", "status", "time_us_median", "tflops", "pct_of_dense", "bw_GBps_strict",
           "pct_of_copy", "routing_share", "message"]


def summary(df) -> str:
    import pandas as pd

    v = df[[c for c in SUMMARY if c in df.columns]].copy()
    v["message"] = v["message"].fillna("").str.slice(0, 70)
    v["stage_impl"] = v["stage_impl"].fillna("").str.slice(0, 40)
    for c, f in (("time_us_median", "{:.1f}"), ("tflops", "{:.1f}"), ("pct_of_dense", "{:.1f}"),
                 ("bw_GBps_strict", "{:.0f}"), ("pct_of_copy", "{:.1f}"), ("routing_share", "{:.3f}")):
        v[c] = v[c].map(lambda x, f=f: "" if pd.isna(x) else f.format(x))
    v = v.rename(columns={"time_us_median": "us", "tflops": "TFLOP/s", "pct_of_dense": "%dense",
                          "bw_GBps_strict": "GB/s", "pct_of_copy": "%copy", "routing_share": "routing"})
    return v.to_string(index=False)


def run_job(cfg: DictConfig, output_dir: str | Path, *, sweep_dir: str = "", job_num: int = 0,
            overrides: str = ""):
    """``bench=moe_layer``: validate, measure every stage, write ``results.parquet``, print the table."""
    from moebench.app import _progress, job_columns, write_rows
    from moebench.env import environment
    from moebench.metrics import routing_metrics

    job = resolve(cfg)
    s = settings_of(cfg, job)
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    log.info("bench=%s gemm=%s impl=%s shape=%s T=%d H=%d I=%d E=%d k=%d dtype=%s device=%s", BENCH,
             make_gemm(s.gemm, s.quack_tuned, s.quack_config).label,
             job.impl, job.shape, job.tokens, job.hidden, s.intermediate, job.experts, job.topk, job.dtype_name,
             job.device)
    torch.manual_seed(job.seed)
    timer = Timer(job.timing, job.device)
    copy = copy_bandwidth_GBps(job.device)
    t0 = time.perf_counter()
    bench = LayerBench(job, s, timer)
    log.info("moe_layer: weights, inputs and references in %.1fs (fp32 reference: %s)", time.perf_counter() - t0,
             "yes" if bench.ref.out32 is not None else "no")
    ref = bench.ref
    common = {
        **job_columns(job), **routing_metrics(ref.meta, ref.ids, ref.logits), **environment(job.device),
        "timing_mode": timer.mode, "copy_GBps": copy, "capacity_per_expert": ref.meta.capacity,
        "intermediate": s.intermediate, "gemm_impl": bench.eg.label, "expert_rows": ref.rows,
        "output_dir": str(Path(output_dir).resolve()), "sweep_dir": sweep_dir, "job_num": job_num,
        "overrides": overrides, "config": json.dumps(container, sort_keys=True, default=str),
    }
    path, df = write_rows(bench.run(progress=_progress), common, copy, output_dir, container)
    print(f"\n{BENCH} gemm={bench.eg.label} on {common['gpu_name'] or 'cpu'} T={job.tokens} H={job.hidden} "
          f"I={s.intermediate} E={job.experts} k={job.topk} (copy {copy:.0f} GB/s, timing {timer.mode}) -> {path}")
    print(summary(df))
    return df
