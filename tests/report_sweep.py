"""A small synthetic sweep for the report's tests: two cards x two timing modes, every
implementation with a fixed style plus one without (``triton_x``), bandwidth-bound and
latency-bound stages, a capacity grid over three distributions, an MoE layer with two GEMM
paths, and per-expert loads. Every number depends on its card and timing mode through a factor
of its own, so the values of one (card, timing) never occur in another: an axis that mixed two
would plot a value foreign to the facet its gid names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from moebench import results

CARDS = {"NVIDIA H200": 1.0, "NVIDIA H100 80GB HBM3": 1.3179}
MODES = {"events": 1.0, "rotated": 1.0713}
#: the six implementations with a style, and one without
IMPLS = ("cute", "quack", "sonic", "torch", "compile", "reference", "triton_x")
SHAPES = {"seed": (16384, 4096, 128, 2), "deepseek_v3": (16384, 7168, 256, 8)}
DISTRIBUTIONS = {"uniform": 0.0, "zipf": 0.31, "hot": 0.47}
CAPACITY_FACTORS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
GEMM_PATHS = ("grouped_mm", "quack_varlen")


def _counts(card: str, logits: str, experts: int, topk: int, tokens: int) -> list[int]:
    """A load that depends on the card (its generator), the distribution and the routing."""
    mean = tokens * topk // experts
    skew = DISTRIBUTIONS[logits]
    rank = np.arange(experts, dtype=float)
    w = (1.0 + rank) ** -(3.0 * skew) + 0.37 + 0.011 * np.sin(rank * (1.7 if card == "NVIDIA H200" else 2.3))
    c = np.maximum(1, np.round(w / w.mean() * mean)).astype(int)
    if card != "NVIDIA H200":
        c[0] += 7  # another generator: another mean, so no load / mean in common with the H200
    return [int(v) for v in c]


def _base(card, mode, **kw) -> dict:
    row = {"bench": "pack", "stage": "pack", "impl": "torch", "stage_impl": "torch", "shape_name": "seed",
           "tokens": 16384, "hidden": 4096, "experts": 128, "topk": 2, "dtype": "bfloat16", "device": "cuda",
           "router": "softmax_topk", "logits": "uniform", "capacity": "dropless", "timing_mode": mode,
           "status": "ok", "message": "", "gpu_name": card, "torch_version": "2.13.0", "weighted": True,
           "drop_policy": "position", "pad_to_capacity": False}
    return {**row, **kw}


def synthetic_rows() -> list[dict]:
    rows = []
    for card, fc in CARDS.items():
        for mode, fm in MODES.items():
            f = fc * fm
            for shape, (T, H, E, k) in SHAPES.items():
                dims = dict(shape_name=shape, tokens=T, hidden=H, experts=E, topk=k)
                counts = _counts(card, "uniform", E, k, T)
                for i, impl in enumerate(IMPLS):
                    for stage, extra in (("pack", 0.0), ("combine", 3.1)):
                        t = (101.3 + 17.9 * i + extra) * f * H / 4096
                        rows.append(_base(card, mode, bench=stage, stage=stage, impl=impl, stage_impl=impl,
                                          time_us_median=t, pct_of_copy=9317.0 / t * (H / 4096),
                                          copy_GBps=3000.0 * fc, expert_counts=counts,
                                          output_dir=f"{card}/{mode}/{stage}/{impl}", **dims))
                rows.append(_base(card, mode, bench="pack", stage="pack", impl="sonic", stage_impl="sonic",
                                  status="unsupported", message="no such case", output_dir=f"{card}/{mode}/x",
                                  **dims))
            for E in (8, 64, 256):
                for k in (2, 8):
                    for i, impl in enumerate(("cute", "quack", "sonic", "torch")):
                        for stage, extra in (("route", 0.0), ("metadata", 1.9)):
                            t = (3.17 + 1.3 * i + E / 61.0 + k * 0.73 + extra) * f
                            rows.append(_base(card, mode, bench="router", stage=stage, impl=impl, stage_impl=impl,
                                              experts=E, topk=k, time_us_median=t, pct_of_copy=7.3 / f,
                                              output_dir=f"{card}/{mode}/router/{impl}/{E}/{k}"))
            for path_i, path in enumerate(GEMM_PATHS):
                T, H, E, k = SHAPES["deepseek_v3"]
                parts = {"gate": 101.0, "route": 12.3, "metadata": 17.7, "pack": 765.0,
                         "gemm1": 13700.0 - 900 * path_i, "activation": 1530.0, "gemm2": 7510.0 - 300 * path_i,
                         "combine": 716.0}
                job = dict(bench="moe_layer", impl="cute", gemm_impl=path, intermediate=2048,
                           shape_name="deepseek_v3", tokens=T, hidden=H, experts=E, topk=k,
                           output_dir=f"{card}/{mode}/moe_layer/{path}")
                for stage, t in parts.items():
                    impl = path if stage.startswith("gemm") else ("torch" if stage in ("gate", "activation")
                                                                  else "cute")
                    rows.append(_base(card, mode, stage=stage, stage_impl=impl, time_us_median=t * f,
                                      tflops=(560.0 - 40 * path_i) / f if stage.startswith("gemm") else None, **job))
                experts = parts["gemm1"] + parts["activation"] + parts["gemm2"]
                total = sum(parts.values()) * 0.97
                rows.append(_base(card, mode, stage="experts", stage_impl=path, time_us_median=experts * f,
                                  tflops=519.0 / f, **job))
                rows.append(_base(card, mode, stage="total", time_us_median=total * f, tflops=484.0 / f,
                                  stage_impl=f"gate=torch,route=cute,metadata=cute,pack=cute,gemm={path},combine=cute",
                                  **job))
                rows.append(_base(card, mode, stage="dense_gemm", stage_impl="torch", time_us_median=17800.0 * f,
                                  tflops=650.0 / f, **job))
            for logits, skew in DISTRIBUTIONS.items():
                for cf in CAPACITY_FACTORS:
                    drop = min(0.9, max(0.0, skew + 0.5 * (1.0 - cf) + 0.02)) + (0.0131 if fc > 1 else 0.0)
                    waste = max(0.0, 1.0 - (1.0 - drop) / cf) + (0.0071 if fc > 1 else 0.0)
                    for stage in ("metadata", "pack", "combine", "total"):
                        rows.append(_base(card, mode, bench="capacity", stage=stage, impl="torch",
                                          stage_impl="torch" if stage != "total" else
                                          "metadata=torch,pack=torch,combine=torch",
                                          logits=logits, capacity=f"cf={cf:g}", capacity_factor=cf,
                                          avg_drop_rate=drop, token_drop_rate=drop / 3, padding_waste=waste,
                                          time_us_median=(57.0 + 11.3 * cf + 3.3 * skew) * f,
                                          pct_of_copy=61.0 / f if stage in ("pack", "combine") else None,
                                          expert_counts=_counts(card, logits, 128, 2, 16384),
                                          output_dir=f"{card}/{mode}/capacity/{logits}/{cf}"))
    return rows


def synthetic_frame() -> pd.DataFrame:
    return pd.DataFrame(synthetic_rows())


def write_sweep(dest: Path) -> Path:
    """The rows as a sweep folder (one results.parquet per card, mode and bench), so the tests
    read them back with ``moebench.results.load`` like a real sweep."""
    df = synthetic_frame()
    df = df[[c for c in df.columns if c in results.COLUMNS]].astype(object)
    df = df.where(df.notna(), None)
    for n, (_, g) in enumerate(df.groupby(["gpu_name", "timing_mode", "bench"], sort=True)):
        results.write(g.to_dict("records"), dest / str(n) / results.FILENAME)
    return dest
