"""Routing distributions: how the router logits [T, E] are drawn (``conf/logits``).

Uniform random logits (what every public suite uses) hide imbalance; ``zipf`` and ``hot``
make some experts popular, ``from_file`` replays a real router trace.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moebench.errors import ConfigError, shown


def _positive(key: str, v, minimum: float = 0.0, inclusive: bool = False) -> None:
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and (v >= minimum if inclusive else v > minimum)
    if not ok:
        raise ConfigError(f"{key}={shown(v)} is not accepted; a number {'>=' if inclusive else '>'} {minimum:g}")


# The schema of each option of ``conf/logits`` (an option reads only its own keys).
@dataclass
class UniformLogits:
    """i.i.d. N(0, scale^2) logits (what public suites use)."""

    kind: str = "uniform"
    scale: float = 1.0

    def __post_init__(self):
        _positive("logits.scale", self.scale)


@dataclass
class ZipfLogits:
    """Expert popularity ~ rank^-alpha (ranks in a seeded random order); alpha = 0 is uniform
    popularity, larger alpha concentrates the load on fewer experts."""

    kind: str = "zipf"
    alpha: float = 1.2
    scale: float = 1.0

    def __post_init__(self):
        _positive("logits.alpha", self.alpha, inclusive=True)
        _positive("logits.scale", self.scale)


@dataclass
class HotLogits:
    """A fraction of the tokens boosted onto a few experts."""

    kind: str = "hot"
    hot_fraction: float = 0.5
    hot_experts: int = 2
    hot_boost: float = 10.0
    scale: float = 1.0

    def __post_init__(self):
        if isinstance(self.hot_fraction, bool) or not 0.0 <= self.hot_fraction <= 1.0:
            raise ConfigError(f"logits.hot_fraction={shown(self.hot_fraction)} is not accepted; a number in [0, 1]")
        if self.hot_experts < 1:
            raise ConfigError(f"logits.hot_experts={self.hot_experts!r} is not accepted; an integer >= 1")
        _positive("logits.hot_boost", self.hot_boost, inclusive=True)
        _positive("logits.scale", self.scale)


@dataclass
class FileLogits:
    """A saved [T, E] router trace (.pt or .npy); rows repeat to fill ``tokens``."""

    kind: str = "from_file"
    path: str | None = None

    def __post_init__(self):
        if not self.path:
            raise ConfigError("logits=from_file needs logits.path=<a .pt or .npy [T, E] tensor>")
        if not Path(self.path).expanduser().is_file():
            raise ConfigError(f"logits.path={self.path!r} is not a file; give a .pt or .npy [T, E] tensor")


SCHEMAS = {"uniform": UniformLogits, "zipf": ZipfLogits, "hot": HotLogits, "from_file": FileLogits}
KINDS = tuple(SCHEMAS)


def zipf_bias(experts: int, alpha: float, generator: torch.Generator) -> torch.Tensor:
    """Per-expert logit offsets log(rank**-alpha) (with Gumbel noise: top-1 popularity
    proportional to rank**-alpha).

    Ranks are assigned to experts in a seeded random order, so the popular experts are
    not simply the low indices.
    """
    ranks = torch.randperm(experts, generator=generator).double() + 1.0
    return (-alpha * torch.log(ranks)).float()


def load_trace(path: str | Path) -> torch.Tensor:
    """A saved [T, E] logits tensor: ``.pt`` (torch.save) or ``.npy``."""
    if path is None:
        raise ValueError("logits=from_file needs logits.path=<a .pt or .npy [T, E] tensor>")
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"logits.path={str(path)!r} is not a file; give a .pt or .npy [T, E] tensor")
    if p.suffix == ".npy":
        import numpy as np

        t = torch.from_numpy(np.load(p))
    elif p.suffix in (".pt", ".pth"):
        t = torch.load(p, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"logits.path={str(path)!r} has suffix {p.suffix!r}; accepted: .pt, .npy")
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or 0 in t.shape:
        raise ValueError(f"logits.path={str(path)!r} holds {getattr(t, 'shape', type(t))}; "
                         "expected a [T, E] tensor with T, E >= 1")
    return t


def make_logits(kind: str, tokens: int, experts: int, *, seed: int, dtype=torch.float32, device="cpu",
                alpha: float = 1.2, hot_fraction: float = 0.5, hot_experts: int = 2,
                hot_boost: float = 10.0, path: str | None = None, scale: float = 1.0) -> torch.Tensor:
    """Draw router logits [tokens, experts] of the given distribution, seeded."""
    g = torch.Generator().manual_seed(seed)
    if kind == "from_file":
        t = load_trace(path)
        if t.shape[1] != experts:
            raise ValueError(f"logits.path holds E={t.shape[1]} experts but experts={experts}; set experts={t.shape[1]}")
        reps = -(-tokens // t.shape[0])
        return t.repeat(reps, 1)[:tokens].to(device=device, dtype=dtype)
    x = torch.randn(tokens, experts, generator=g) * scale
    if kind == "uniform":
        pass
    elif kind == "zipf":
        # Gumbel-max: argmax(log p + Gumbel noise) is distributed as p, so each token's first
        # choice follows p ~ rank^-alpha exactly (Gaussian noise would sharpen the skew far
        # beyond rank^-alpha once the top-k picks the largest logits).
        u = torch.rand(tokens, experts, generator=g).clamp_(1e-20, 1.0 - 1e-7)
        x = (zipf_bias(experts, alpha, g) - torch.log(-torch.log(u))) * scale
    elif kind == "hot":
        n_hot = min(hot_experts, experts)
        hot = torch.randperm(experts, generator=g)[:n_hot]
        rows = torch.rand(tokens, generator=g) < hot_fraction
        boost = torch.zeros(tokens, experts)
        boost[:, hot] = hot_boost
        x = x + boost * rows[:, None]
    else:
        raise ValueError(f"logits={kind!r}; accepted: {', '.join(KINDS)}")
    return x.to(device=device, dtype=dtype)
