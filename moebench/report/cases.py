"""What a row measured, in the terms the leaderboard and the figures compare by: the card and
the timing mode it ran under (the facets: never two of either on one axis), what limits its
stage (``STAGE_KINDS``), the implementation that ran it, and the case (stage, shape, dtype,
direction and routing variant) that rows of different implementations share.

``ranked_rows`` is the one selection both the leaderboard and the timed figures draw from
(CPU rows only where there are no GPU rows), and ``fastest_per_impl`` the one reduction: each
implementation's fastest ok row of a case (several benches, jobs or configurations of one
implementation may measure the same case)."""

from __future__ import annotations

import pandas as pd

from moebench.report.tables import _short_impl, _stage_key, ok_rows

#: What limits each stage, which decides how it is ranked and drawn:
#: ``bandwidth``: moves rows of hidden states; its limit is a device-to-device copy (pct_of_copy);
#: ``latency``: small outputs (ids, weights, offsets, counts): time near a launch latency, no limit;
#: ``gemm``: matrix products of the MoE layer; its limit is a dense GEMM of the same FLOPs (pct_of_dense);
#: ``chain``: several stages back to back (a bench's ``total``), ranked, no limit;
#: ``ceiling``: a limit measured beside the stages (drawn as a line, never ranked).
STAGE_KINDS = {
    "route": "latency", "select": "latency", "topk": "latency", "metadata": "latency",
    "route_metadata": "latency", "decode": "latency",
    "pack": "bandwidth", "combine": "bandwidth", "activation": "bandwidth", "backward": "bandwidth",
    "gate": "gemm", "gemm1": "gemm", "gemm2": "gemm", "experts": "gemm", "expert_ffn": "gemm", "ffn": "gemm",
    "total": "chain",
    "dense_gemm": "ceiling", "raw_a2a": "ceiling",
}
#: The limit each kind is measured against: (column, its name in tables).
LIMITS = {"bandwidth": ("pct_of_copy", "copy"), "gemm": ("pct_of_dense", "dense GEMM")}
#: Kinds the leaderboard ranks.
RANKED_KINDS = ("latency", "bandwidth", "gemm", "chain")


def stage_kind(stage, has_bytes: bool = False) -> str:
    """The kind of ``stage``: its entry in ``STAGE_KINDS``; else that of its first part
    (``pack_fp8`` as ``pack``, ``combine_bwd`` as ``combine``); else a backward stage
    (``*_bwd``) is bandwidth-bound; else ``bandwidth`` when its rows carry strict bytes
    (``pct_of_copy``) and ``latency`` when they do not."""
    s = str(stage)
    if s in STAGE_KINDS:
        return STAGE_KINDS[s]
    head = s.split("_", 1)[0]
    if head in STAGE_KINDS and STAGE_KINDS[head] in ("latency", "bandwidth"):
        return STAGE_KINDS[head]
    if s.endswith(("_bwd", "_backward")):
        return "bandwidth"
    return "bandwidth" if has_bytes else "latency"


#: Timing modes in the order tables list them (unknown ones follow, alphabetically).
TIMING_ORDER = ("events", "graph", "rotated", "wall")
TIMING_NOTES = {"events": "CUDA events, L2 flushed", "graph": "CUDA-graph replay, L2 flushed",
                "rotated": "back to back, inputs from DRAM", "wall": "wall clock"}
DIRECTION_ORDER = ("fwd", "bwd", "fwdbwd")
#: The shape of a case; ``intermediate`` only for the kinds it changes (gemm, chain).
SHAPE_COLUMNS = ("shape_name", "tokens", "hidden", "experts", "topk")
#: Routing variants: rows that differ in one of these are different cases.
VARIANT_COLUMNS = ("router", "logits", "cfg.logits.alpha", "capacity", "drop_policy", "pad_to_capacity",
                   "weighted", "capacity_align", "quant")
#: What a variant column means where a table predates it (tight blocks, rows in the dtype).
VARIANT_DEFAULTS = {"capacity_align": "1", "quant": "none"}
#: The facet columns ``with_cases`` adds.
CARD, TIMING, DIRECTION = "card", "timing", "direction"
#: Columns of a case (with the facets): rows equal in all of them compete in one ranking.
CASE_KEY = (CARD, TIMING, DIRECTION, "stage_label", *SHAPE_COLUMNS, "intermediate_", "dtype",
            *VARIANT_COLUMNS)
DTYPE_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float8_e4m3fn": "fp8e4m3",
               "float8_e5m2": "fp8e5m2"}


def _text(df: pd.DataFrame, col: str, default: str = "") -> pd.Series:
    if col not in df.columns:
        return pd.Series(default, index=df.index, dtype=object)
    s = df[col]
    out = s.astype(object).where(s.notna(), default).map(str)
    return out.where(out != "", default)


def card_of(row) -> str:
    """The card a row ran on: ``gpu_name``, or ``CPU`` for CPU rows (no ``gpu_name``)."""
    name = row.get("gpu_name")
    if isinstance(name, str) and name:
        return name
    dev = row.get("device")
    if isinstance(dev, str) and dev and not dev.startswith("cpu"):
        return dev
    return "CPU"


def impl_name(stage_impl) -> str:
    """The implementation of a row: ``stage_impl`` when one (``torch``; a GEMM path of the MoE
    layer); a chain (``route=torch,metadata=torch,...``) by its common implementation, the
    stages that differ in brackets: ``cute (gate=torch, gemm=grouped_mm)``."""
    s = _short_impl(stage_impl)
    if "=" not in s:
        return s
    parts = [p.split("=", 1) for p in s.split(",") if "=" in p]
    values = [v for _, v in parts]
    common = max(dict.fromkeys(values), key=values.count)  # the most frequent, first on ties
    diffs = [f"{k}={v}" for k, v in parts if v != common]
    return f"{common} ({', '.join(diffs)})" if diffs else common


def facet_label(card: str, timing: str | None = None) -> str:
    return card if timing is None else f"{card} · {timing}"


def facet_order(keys) -> list:
    """(card, timing) keys in table order: cards by name (CPU last), timing by ``TIMING_ORDER``."""
    def key(k):
        card, *rest = k if isinstance(k, tuple) else (k,)
        t = rest[0] if rest else ""
        return (card == "CPU", card, TIMING_ORDER.index(t) if t in TIMING_ORDER else len(TIMING_ORDER), t)
    return sorted(keys, key=key)


def with_cases(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` plus the columns cases are compared by: ``card``, ``timing`` (``timing_mode``),
    ``direction`` (``fwd`` where the column is missing or empty), ``kind``, ``impl_label``,
    ``stage_label`` (a chain named by its bench: ``routing total``), ``shape_label`` and the
    text forms of the shape and variant columns (missing values as "")."""
    d = df.copy()
    if d.empty:
        for c in (CARD, TIMING, DIRECTION, "kind", "impl_label", "stage_label", "shape_label", "intermediate_"):
            d[c] = pd.Series(dtype=object)
        return d
    d[CARD] = d.apply(card_of, axis=1)
    d[TIMING] = _text(d, "timing_mode", "?")
    d[DIRECTION] = _text(d, "direction", "fwd")
    has_bytes = d["pct_of_copy"].notna() if "pct_of_copy" in d.columns else pd.Series(False, index=d.index)
    stage = _text(d, "stage", "?")
    d["kind"] = [stage_kind(s, bool(b)) for s, b in zip(stage, has_bytes)]
    d["impl_label"] = _text(d, "stage_impl", "?").map(impl_name)
    bench = _text(d, "bench")
    d["stage_label"] = [f"{b} {s}" if k == "chain" and b and b != s else s
                        for s, b, k in zip(stage, bench, d["kind"])]
    inter = _text(d, "intermediate").map(lambda v: v[:-2] if v.endswith(".0") else v)
    d["intermediate_"] = inter.where(d["kind"].isin(["gemm", "chain"]), "")
    for c in (*SHAPE_COLUMNS, "dtype", *VARIANT_COLUMNS):
        d[c] = _text(d, c, VARIANT_DEFAULTS.get(c, "")).map(lambda v: v[:-2] if v.endswith(".0") else v)
    d["shape_label"] = [shape_text(r) for r in d[[*SHAPE_COLUMNS, "intermediate_"]].to_dict("records")]
    return d


def shape_text(r) -> str:
    """``seed T16384 H4096 E128 k2`` (plus ``I<intermediate>`` where it matters)."""
    dims = [f"{p}{r[c]}" for p, c in (("T", "tokens"), ("H", "hidden"), ("E", "experts"), ("k", "topk"),
                                       ("I", "intermediate_")) if r.get(c)]
    return " ".join([*([r["shape_name"]] if r.get("shape_name") else []), *dims])


def single_card(df: pd.DataFrame) -> pd.Series:
    """Rows of one card: not a rank of a multi-GPU job (``world_size`` > 1)."""
    if "world_size" not in df.columns:
        return pd.Series(True, index=df.index)
    ws = pd.to_numeric(df["world_size"], errors="coerce")
    return ws.isna() | (ws <= 1)


def ranked_rows(df: pd.DataFrame, kinds=RANKED_KINDS) -> pd.DataFrame:
    """The ok rows with a time, of one card, whose stage is of one of ``kinds``, with the case
    columns of ``with_cases``; CPU rows only when no GPU rows are left (``cpu_rows_left_out``)."""
    d = ok_rows(df)
    if d is None or d.empty or "time_us_median" not in d.columns or "stage" not in d.columns:
        return with_cases(pd.DataFrame(columns=["stage", "time_us_median"]))
    d = d[d["time_us_median"].notna() & single_card(d)]
    d = with_cases(d)
    d = d[d["kind"].isin(kinds)]
    return d[d[CARD] != "CPU"] if (d[CARD] != "CPU").any() else d


def cpu_rows_left_out(df: pd.DataFrame) -> int:
    """How many ok, timed CPU rows ``ranked_rows`` leaves out: CPU rows are ranked and drawn
    only where no card's rows are (a CPU run is a smoke test, or a routing statistic as in
    ``runs/sample/capacity_cpu_grid``; its wall-clock times compare with nothing on a card)."""
    d = ok_rows(df)
    if d is None or d.empty or "time_us_median" not in d.columns or "stage" not in d.columns:
        return 0
    d = with_cases(d[d["time_us_median"].notna() & single_card(d)])
    d = d[d["kind"].isin(RANKED_KINDS)]
    cpu = d[CARD] == "CPU"
    return int(cpu.sum()) if (~cpu).any() else 0


def fastest_per_impl(d: pd.DataFrame, key=CASE_KEY) -> pd.DataFrame:
    """Each implementation's fastest row of each case (``key`` plus ``impl_label``), with
    ``n_rows``: how many of its rows the case had."""
    if d.empty:
        return d.assign(n_rows=pd.Series(dtype=int))
    keys = [*key, "impl_label"]
    d = d.sort_values("time_us_median", kind="stable")
    n = d.groupby(keys, sort=False, dropna=False)["time_us_median"].transform("size")
    best = d.assign(n_rows=n).drop_duplicates(subset=keys, keep="first")
    return best


def stage_sort_key(label: str) -> tuple:
    """Pipeline order of a stage label (a chain's ``<bench> total`` after every stage)."""
    parts = str(label).split(" ")
    if len(parts) == 2 and parts[1] == "total":
        return (1, parts[0], ())
    return (0, "", _stage_key(label))


def case_sort_key(r) -> tuple:
    def num(v):
        try:
            return float(v)
        except (TypeError, ValueError):
            return float("inf")
    return (stage_sort_key(r["stage_label"]), r["shape_name"], *(num(r[c]) for c in SHAPE_COLUMNS[1:]),
            r["dtype"], tuple(str(r[c]) for c in VARIANT_COLUMNS))


def variant_text(r, cols) -> str:
    """The routing variant of a row in words, from the variant columns ``cols`` that vary."""
    bits = []
    for c in cols:
        v = str(r[c])
        if not v:
            continue
        if c == "cfg.logits.alpha":
            bits.append(f"alpha={v}")
        elif c == "drop_policy":
            bits.append(f"drop by {v}")
        elif c == "pad_to_capacity":
            bits.append("padded" if v == "True" else "unpadded")
        elif c == "weighted":
            bits.append("weighted" if v == "True" else "unweighted")
        elif c == "capacity_align":  # the defaults (tight blocks, rows in the dtype) go unsaid
            if v != "1":
                bits.append(f"blocks aligned to {v}")
        elif c == "quant":
            if v != "none":
                bits.append(v)
        else:
            bits.append(v)
    return ", ".join(bits)
