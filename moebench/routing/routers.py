"""Routers: logits [T, E] -> expert ids [T, S] (int32) and gate weights [T, S] (fp32).

Each router is one class, the one place its semantics live: what it selects on (the
selection scores), how its gate weights follow from the experts it chose, how it breaks
ties, which options it reads, and which implementations reproduce it (and, where one does
not, why). The reference (:func:`route`), the check, ``impl=quack`` and ``impl=cute`` all
read these classes; :class:`RouterSpec` is the configuration value (``conf/router/*.yaml``)
and ``spec.router`` its semantics object.

Conventions: ``S`` slots per token (``topk``; ``E`` for ``expert_choice``, where slot ``j``
is expert ``j`` and unused slots hold -1); equal selection scores resolve toward the lower
expert index (expert choice: toward the lower token index), deterministically.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import ClassVar

import torch

from moebench.errors import ConfigError, Unsupported, shown
from moebench.routing.metadata import ceil_capacity


def stable_topk(scores: torch.Tensor, k: int, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k in descending order; equal scores resolve toward the lower index."""
    vals, idx = torch.sort(scores, dim=dim, descending=True, stable=True)
    return vals.narrow(dim, 0, k), idx.narrow(dim, 0, k)


def _normalize(w: torch.Tensor) -> torch.Tensor:
    return w / w.sum(-1, keepdim=True).clamp_min(1e-20)


def topk_softmax_weights(vals: torch.Tensor, temperature: float = 1.0, normalize: str = "softmax") -> torch.Tensor:
    """Weights of ``topk_softmax`` from the selected fp32 logits [T, k]."""
    v = vals / temperature if temperature != 1.0 else vals  # v / 1.0 is v: skip the kernel
    if normalize == "softmax":
        return torch.softmax(v, dim=-1)
    if normalize == "sum":
        # divide by the (signed) sum of the k: logits can be negative, so clamp only a sum >= 0
        s = v.sum(-1, keepdim=True)
        return v / torch.where(s < 0, s, s.clamp_min(1e-20))
    raise ValueError(f"topk_softmax normalize={normalize!r}; accepted: softmax, sum")


def expert_choice_capacity(tokens: int, k: int, experts: int, capacity_factor: float) -> int:
    """Tokens each expert takes under expert choice: C = ceil(cf * T * k / E), in [1, T]."""
    return min(tokens, max(1, ceil_capacity(capacity_factor, tokens, k, experts)))


@dataclass(frozen=True)
class RouterSpec:
    """A router and its options, as in ``conf/router/*.yaml`` (the schema of that group)."""

    name: str = "softmax_topk"
    renormalize: bool = False
    temperature: float = 1.0
    normalize: str = "softmax"
    bias_std: float = 0.0
    scaling: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    score: str = "sigmoid"
    group_score: str = "top2_sum"
    capacity_factor: float = 1.0

    NAMES: ClassVar[tuple[str, ...]] = ()  # filled below from ROUTERS

    @property
    def router(self) -> Router:
        """The semantics object of this router."""
        if self.name not in ROUTERS:
            raise ValueError(f"router={self.name!r}; accepted: {', '.join(ROUTERS)}")
        return ROUTERS[self.name](self)

    def num_slots(self, topk: int, experts: int) -> int:
        return self.router.slots(topk, experts)

    def num_rows(self, tokens: int, topk: int, experts: int) -> int:
        """Packed rows of a dropless routing: every valid assignment has one."""
        return self.router.rows(tokens, topk, experts)

    def expert_bias(self, experts: int, device, seed: int = 0) -> torch.Tensor | None:
        """The per-expert selection bias (sigmoid_bias / group_limited), seeded."""
        if self.bias_std == 0.0:
            return None
        g = torch.Generator().manual_seed(seed + 7919)
        return (torch.randn(experts, generator=g) * self.bias_std).to(device)


class Router:
    """The semantics of one router. Subclasses set ``name`` and ``options`` and override what
    differs; the defaults describe a per-token top-k of :meth:`scores`."""

    name: ClassVar[str] = ""
    #: the RouterSpec fields this router reads (besides ``name``)
    options: ClassVar[tuple[str, ...]] = ()
    #: the tie rule the reference applies
    ties: ClassVar[str] = "equal selection scores resolve toward the lower expert index"
    #: is the selection one per-token top-k of :meth:`scores`?
    per_token_topk: ClassVar[bool] = True

    def __init__(self, spec: RouterSpec):
        self.spec = spec

    @classmethod
    def schema(cls) -> type:
        """The schema of ``conf/router/<name>.yaml``: RouterSpec's ``name`` and the options this
        router reads, with RouterSpec's types and defaults (any other key is rejected)."""
        hints = typing.get_type_hints(RouterSpec)
        default = {f.name: f.default for f in dataclasses.fields(RouterSpec)}
        default["name"] = cls.name
        schema = dataclasses.make_dataclass(f"{cls.__name__}Config",
                                            [(n, hints[n], dataclasses.field(default=default[n]))
                                             for n in ("name",) + cls.options])
        schema.__module__ = __name__
        return schema

    # -- shape and configuration ------------------------------------------------------
    def check(self, experts: int, topk: int) -> None:
        """Raise a one-line ConfigError if this router cannot route ``topk`` of ``experts``."""

    def slots(self, topk: int, experts: int) -> int:
        return topk

    def rows(self, tokens: int, topk: int, experts: int) -> int:
        return tokens * topk

    # -- the reference ----------------------------------------------------------------
    def scores(self, logits: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
        """The fp32 [T, E] scores a per-token top-k selects on, or None where the selection is
        not one per-token top-k (hash, expert choice, group-limited)."""
        return logits.float()

    def select(self, logits: torch.Tensor, k: int, bias: torch.Tensor | None = None, topk=stable_topk) -> torch.Tensor:
        """Expert ids [T, S] (int64), best first. ``topk(scores, k) -> (values, indices)``: the
        reference's stable top-k (ties toward the lower expert), or another (``torch.topk``)."""
        return topk(self.scores(logits, bias), k)[1]

    def weights(self, logits: torch.Tensor, ids: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The reference gate weights [T, S] (fp32) of the experts ``ids`` -- slot by slot, for any
        choice of experts (the check pairs each returned weight with its expert through this)."""
        raise NotImplementedError

    def route(self, logits: torch.Tensor, k: int, bias: torch.Tensor | None = None, topk=stable_topk):
        ids = self.select(logits, k, bias, topk)
        return ids.to(torch.int32), self.weights(logits, ids, bias).float()

    def gradient_form(self) -> tuple[str, bool, float, float]:
        """How the weights follow from the logits, for their backward: (kind, renormalize,
        temperature, scaling) with kind ``prob`` (the softmax over all E at the chosen experts),
        ``softmax_k`` / ``sum_k`` (over the chosen logits / temperature), ``score`` (the chosen
        sigmoid scores) or ``one`` (constant); then renormalised over the slots and scaled."""
        return ("one", False, 1.0, 1.0)

    def selects_logits(self, has_bias: bool) -> bool:
        """Is the selection a per-token top-k of the logits themselves (the score a monotone
        function of the logit)? Then a top-k kernel on the logits selects like the reference,
        and the ``select`` stage (ids and values, no weights) applies."""
        return False

    def softmax_over_selected(self) -> bool:
        """Are the weights a softmax over the selected logits (what top-k kernels fuse)?"""
        return False

    # -- which implementations reproduce it -------------------------------------------
    def cute(self, experts: int, has_bias: bool) -> dict:
        """The static configuration of ``kernels.router`` that computes this router exactly,
        or Unsupported with the reason."""
        raise Unsupported(f"router={self.name} is not a per-token top-k; impl=cute routes "
                          f"{', '.join(n for n, r in ROUTERS.items() if r.cute is not Router.cute)}")

    def quack(self, dtype: torch.dtype, has_bias: bool) -> str | None:
        """Why quack's top-k (16-bit exact, fp32 with the low log2(E) mantissa bits dropped)
        cannot select like the reference, or None when it can."""
        return f"router={self.name} has no top-k selection to hand to quack"


def _f32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in (at least) fp32: 16-bit values upcast, fp64 kept (gradcheck runs in fp64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _probs(logits: torch.Tensor) -> torch.Tensor:
    """fp32 softmax over all experts (read in the logits' dtype, computed in fp32)."""
    return torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))


def _gathered_probs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return _probs(logits).gather(1, ids.long())


class SoftmaxTopk(Router):
    """Softmax over all experts, then the top-k probabilities (Mixtral with ``renormalize``,
    Qwen3's norm_topk_prob)."""

    name = "softmax_topk"
    options = ("renormalize",)

    def _renormalize(self) -> bool:
        return self.spec.renormalize

    def scores(self, logits, bias=None):
        return _probs(logits)

    def weights(self, logits, ids, bias=None):
        w = _gathered_probs(logits, ids)
        return _normalize(w) if self._renormalize() else w

    def route(self, logits, k, bias=None, topk=stable_topk):
        # the weights are the selected probabilities themselves: one softmax
        w, ids = topk(self.scores(logits), 1 if self.name == "top1" else k)
        return ids.to(torch.int32), (_normalize(w) if self._renormalize() else w).float()

    def selects_logits(self, has_bias):
        return True

    def softmax_over_selected(self):
        return self._renormalize()  # p_i / sum of the selected p = softmax of the selected logits

    def gradient_form(self):
        return ("prob", self._renormalize(), 1.0, 1.0)

    def cute(self, experts, has_bias):
        # softmax is monotone in the logit: the kernel selects on the logits
        return dict(score="logit", weight="prob", renormalize=self._renormalize())

    def quack(self, dtype, has_bias):
        return None


class Top1(SoftmaxTopk):
    """Switch Transformer: softmax, the top-1 probability."""

    name = "top1"
    options = ()

    def _renormalize(self) -> bool:
        return False

    def check(self, experts, topk):
        if topk != 1:
            raise ConfigError(f"router=top1 routes each token to one expert; topk={topk} is not accepted (use topk=1)")

    def select(self, logits, k, bias=None, topk=stable_topk):
        return super().select(logits, 1, bias, topk)


class TopkSoftmax(Router):
    """The seed's ``softk``: top-k on the logits, then a softmax (or sum-normalisation) over the k."""

    name = "topk_softmax"
    options = ("temperature", "normalize")

    def check(self, experts, topk):
        s = self.spec
        if s.normalize not in ("softmax", "sum"):
            raise ConfigError(f"router.normalize={s.normalize!r} is not accepted; accepted: softmax, sum")
        if isinstance(s.temperature, bool) or not isinstance(s.temperature, (int, float)) or s.temperature <= 0:
            raise ConfigError(f"router.temperature={shown(s.temperature)} is not accepted; a number > 0")

    def weights(self, logits, ids, bias=None):
        vals = _f32(logits.gather(1, ids.long()))
        return topk_softmax_weights(vals, self.spec.temperature, self.spec.normalize)

    def selects_logits(self, has_bias):
        return True

    def softmax_over_selected(self):
        return self.spec.normalize == "softmax" and self.spec.temperature == 1.0

    def gradient_form(self):
        kind = "softmax_k" if self.spec.normalize == "softmax" else "sum_k"
        return (kind, False, float(self.spec.temperature), 1.0)

    def cute(self, experts, has_bias):
        weight = "softmax_k" if self.spec.normalize == "softmax" else "sum_k"
        return dict(score="logit", weight=weight, temperature=self.spec.temperature)

    def quack(self, dtype, has_bias):
        if self.spec.normalize == "sum" and dtype == torch.float32:
            return ("impl=quack routes topk_softmax normalize=sum only for 16-bit logits: fp32 logits lose their "
                    "low log2(E) mantissa bits in quack's top-k, and a sum-normalised weight is not bounded "
                    "under the resulting near-tie swaps")
        return None


class TopkHard(Router):
    """Top-k on the logits, unit weights (the seed's hard routing)."""

    name = "topk_hard"

    def weights(self, logits, ids, bias=None):
        return torch.ones(ids.shape, dtype=torch.float32, device=logits.device)

    def selects_logits(self, has_bias):
        return True

    def cute(self, experts, has_bias):
        return dict(score="logit", weight="one")

    def quack(self, dtype, has_bias):
        return None


class SigmoidBias(Router):
    """DeepSeek-V3's gate: sigmoid (or softmax) scores, a per-expert bias added for the
    selection only; the weights are the unbiased scores of the chosen experts, normalised over
    the k and multiplied by ``scaling``."""

    name = "sigmoid_bias"
    options = ("bias_std", "scaling", "score")

    def _scores(self, logits):
        return torch.sigmoid(_f32(logits)) if self.spec.score == "sigmoid" else _probs(logits)

    def scores(self, logits, bias=None):
        s = self._scores(logits)
        return s if bias is None else s + bias.float()

    def weights(self, logits, ids, bias=None):
        if self.spec.score == "sigmoid":  # the sigmoid of the chosen logits only
            s = torch.sigmoid(_f32(logits.gather(1, ids.long())))
        else:
            s = _gathered_probs(logits, ids)
        return _normalize(s) * self.spec.scaling

    def selects_logits(self, has_bias):
        return not has_bias

    def gradient_form(self):
        return ("score" if self.spec.score == "sigmoid" else "prob", True, 1.0, float(self.spec.scaling))

    def check(self, experts, topk):
        if self.spec.score not in ("sigmoid", "softmax"):
            raise ConfigError(f"router.score={self.spec.score!r} is not accepted; accepted: sigmoid, softmax")

    def cute(self, experts, has_bias):
        static = dict(renormalize=True, scaling=self.spec.scaling)
        if self.spec.score == "sigmoid":
            return dict(static, score="sigmoid", weight="score", has_bias=has_bias)
        # selection on softmax probabilities equals selection on the logits only while the
        # scores are compared as they are: a bias (or a sum of two probabilities) compares fp32
        # softmax values, whose last bit depends on torch's summation order
        if has_bias:
            raise Unsupported(f"router={self.name} with score=softmax and a bias selects on softmax + bias, which "
                              "the kernel cannot reproduce bit for bit (use router.bias_std=0 or score=sigmoid)")
        return dict(static, score="logit", weight="prob")

    def quack(self, dtype, has_bias):
        if has_bias:
            return ("impl=quack routes router=sigmoid_bias only without a bias: the selection scores "
                    "sigmoid(x)+bias are fp32 and quack's top-k drops their low log2(E) mantissa bits: near-ties "
                    "then pick other experts than the reference, whose (unbiased) gate weights differ by the bias "
                    "difference; use bias_std=0")
        return None


class GroupLimited(SigmoidBias):
    """DeepSeek-V3 node-limited routing: keep the ``topk_group`` best of ``n_group`` expert
    groups (a group's score: the sum of its top-2 biased scores, or its max), then the top-k
    of the experts in them."""

    name = "group_limited"
    per_token_topk = False
    options = SigmoidBias.options + ("n_group", "topk_group", "group_score")

    def check(self, experts, topk):
        super().check(experts, topk)
        s = self.spec
        if s.group_score not in ("top2_sum", "max"):
            raise ConfigError(f"router.group_score={s.group_score!r} is not accepted; accepted: top2_sum, max")
        if s.n_group < 1 or experts % s.n_group:
            raise ConfigError(f"router.n_group={s.n_group} does not divide experts={experts}; "
                              f"accepted: a divisor of {experts}")
        if not 1 <= s.topk_group <= s.n_group:
            raise ConfigError(f"router.topk_group={s.topk_group} is not accepted; 1..n_group={s.n_group}")
        if topk > s.topk_group * experts // s.n_group:
            raise ConfigError(f"topk={topk} exceeds the experts of topk_group={s.topk_group} groups "
                              f"({s.topk_group * experts // s.n_group})")

    def scores(self, logits, bias=None):
        return None  # a top-k over the groups first: not one per-token top-k of one score

    def selects_logits(self, has_bias):
        return False

    def select(self, logits, k, bias=None, topk=stable_topk):
        choice = super().scores(logits, bias)
        n_group = self.spec.n_group
        if n_group > 1:
            T, E = choice.shape
            grouped = choice.view(T, n_group, E // n_group)
            if self.spec.group_score == "top2_sum":
                gscore = topk(grouped, min(2, E // n_group))[0].sum(-1)
            else:
                gscore = grouped.max(-1).values
            _, gidx = topk(gscore, self.spec.topk_group)
            gmask = torch.zeros(T, n_group, dtype=torch.bool, device=choice.device).scatter_(1, gidx, True)
            emask = gmask.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)
            choice = choice.masked_fill(~emask, float("-inf"))
        return topk(choice, k)[1]

    def cute(self, experts, has_bias):
        s = self.spec
        grouped = s.n_group > 1
        if grouped and s.score == "softmax" and s.group_score == "top2_sum":
            raise Unsupported(f"router={self.name} with score=softmax ranks groups by a sum of two softmax values, "
                              "which the kernel cannot reproduce bit for bit (use router.group_score=max or "
                              "score=sigmoid)")
        static = super().cute(experts, has_bias)
        if grouped:
            gs = experts // s.n_group
            if gs > 32:
                raise Unsupported(f"group_limited: groups of {gs} experts; the kernel keeps a group in one lane "
                                  "(at most 32 experts per group)")
            static.update(n_group=s.n_group, topk_group=s.topk_group, group_score=s.group_score)
        return static

    def quack(self, dtype, has_bias):
        return ("impl=quack has no route for router=group_limited: group-limited selection (top groups, then a "
                "top-k masked to them) is not one per-token top-k, and its selection scores sigmoid(x)+bias are "
                "fp32, which quack's top-k truncates")


class Hash(Router):
    """Hash Layers: a fixed token -> expert hash, unit weights / k. We have no token ids, so the
    hash is of the token position; slot j takes the next expert after slot 0's (k <= E)."""

    name = "hash"
    per_token_topk = False

    def scores(self, logits, bias=None):
        return None

    def select(self, logits, k, bias=None, topk=stable_topk):
        T, E = logits.shape
        t = torch.arange(T, device=logits.device, dtype=torch.int64)
        h = (t * 2654435761) % (2**32)
        first = (h ^ (h >> 16)) % E
        return (first[:, None] + torch.arange(k, device=logits.device)[None, :]) % E

    def weights(self, logits, ids, bias=None):
        return torch.full(ids.shape, 1.0 / ids.shape[1], dtype=torch.float32, device=logits.device)

    def quack(self, dtype, has_bias):
        return "impl=quack has no route for router=hash: it selects no top-k (a fixed hash of the token position)"


class ExpertChoice(Router):
    """Expert choice: each expert takes its top-C tokens by softmax score, C = ceil(cf*T*k/E).
    Tokens get a variable number of experts: slots are [T, E], slot j is expert j (-1 where
    expert j did not choose the token). Equal scores resolve toward the lower token index."""

    name = "expert_choice"
    per_token_topk = False
    options = ("capacity_factor",)
    ties = "equal scores resolve toward the lower token index"

    def slots(self, topk, experts):
        return experts

    def rows(self, tokens, topk, experts):
        return experts * expert_choice_capacity(tokens, topk, experts, self.spec.capacity_factor)

    def check(self, experts, topk):
        cf = self.spec.capacity_factor
        if isinstance(cf, bool) or not isinstance(cf, (int, float)) or cf <= 0:
            raise ConfigError(f"router.capacity_factor={shown(cf)} is not accepted; a number > 0")

    def scores(self, logits, bias=None):
        return None

    def select(self, logits, k, bias=None, topk=stable_topk):
        T, E = logits.shape
        probs = _probs(logits)
        C = expert_choice_capacity(T, k, E, self.spec.capacity_factor)
        _, tok = topk(probs.t(), C)  # [E, C]
        chosen = torch.zeros(E, T, dtype=torch.bool, device=logits.device).scatter_(1, tok, True).t()
        return torch.where(chosen, torch.arange(E, device=logits.device).expand(T, E), -1)

    def weights(self, logits, ids, bias=None):
        return torch.where(ids >= 0, _gathered_probs(logits, ids.clamp(min=0)), 0.0)

    def gradient_form(self):
        return ("prob", False, 1.0, 1.0)

    def quack(self, dtype, has_bias):
        return ("impl=quack has no route for router=expert_choice: it is a top-C per expert over the tokens, "
                "not a per-token top-k")


ROUTERS: dict[str, type[Router]] = {r.name: r for r in (SoftmaxTopk, TopkSoftmax, SigmoidBias, GroupLimited, Top1,
                                                         TopkHard, Hash, ExpertChoice)}
RouterSpec.NAMES = tuple(ROUTERS)


def route(logits: torch.Tensor, k: int, spec: RouterSpec, bias: torch.Tensor | None = None):
    """Reference router: logits [T, E] -> (ids [T, S] int32, weights [T, S] fp32)."""
    return spec.router.route(logits, k, bias)


def selection_scores(logits: torch.Tensor, spec: RouterSpec, bias: torch.Tensor | None = None):
    """The [T, E] fp32 scores a per-token top-k router selects on, or None (see Router.scores)."""
    return spec.router.scores(logits, bias)


def reference_weights(logits: torch.Tensor, ids: torch.Tensor, spec: RouterSpec,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """The reference gate weight of each (token, slot) for the experts ``ids`` -- what an
    implementation that returned ``ids`` must have returned as weights, slot by slot."""
    return _f32(spec.router.weights(logits, ids, bias))


def route_backward(logits: torch.Tensor, ids: torch.Tensor, d_weights: torch.Tensor, spec: RouterSpec,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """d_logits [T, E] (the logits' dtype): torch autograd of the router's weights of the experts
    ``ids`` (``reference_weights``); the selection and the selection bias have no gradient."""
    x = logits.detach().requires_grad_(True)
    with torch.enable_grad():
        w = reference_weights(x, ids, spec, bias)
        if not w.requires_grad:  # constant weights (topk_hard, hash)
            return torch.zeros_like(logits)
        (g,) = torch.autograd.grad(w, x, d_weights.to(w.dtype))
    return g
