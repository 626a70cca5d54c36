"""The figures of a results DataFrame, one question each. Every ``fig_*`` function returns a
matplotlib ``Figure``, or ``None`` when the selection it draws is empty (``WHAT[name]`` says
which rows it needs). They are built with the object-oriented API
(``matplotlib.figure.Figure``), never through pyplot, so they neither depend on nor change the
active backend; PNGs are rendered by Agg.

Every axis holds the rows of one card and one timing mode (figures of the routing, which no
timing changes: of one card), tagged in its ``gid`` as ``card|timing`` (``card|*``); every
implementation has one colour and marker (``styles.IMPL_STYLES``) in all of them."""

from __future__ import annotations

import io

from moebench.report.routing_figures import fig_capacity, fig_expert_load
from moebench.report.timed_figures import fig_bandwidth, fig_latency, fig_moe_layer

#: What each figure draws, for the "no rows for ..." line when its selection is empty.
WHAT = {
    "bandwidth": "the bandwidth-bound stages (ok rows of pack, combine, ... with pct_of_copy)",
    "latency": "the latency-bound stages (ok rows of route, select, metadata, ... with a time)",
    "capacity": "drop rate and padding waste vs capacity factor (rows with capacity_factor and avg_drop_rate)",
    "moe_layer": "the MoE layer (ok rows with bench == 'moe_layer')",
    "expert_load": "the per-expert load (rows with expert_counts)",
}

#: The question each figure answers (its heading in report.md).
TITLES = {
    "bandwidth": "How close to a copy is each implementation of a bandwidth-bound stage?",
    "latency": "How do the latency-bound stages scale with E, k and T?",
    "capacity": "What does a capacity factor cost in dropped assignments and padding?",
    "moe_layer": "Where does the MoE layer spend its time, against a dense GEMM of the same FLOPs?",
    "expert_load": "How unbalanced is each routing distribution's expert load?",
}

#: name -> figure function; ``python -m moebench.report`` writes ``<name>.png`` for each.
FIGURES = {
    "bandwidth": fig_bandwidth,
    "latency": fig_latency,
    "capacity": fig_capacity,
    "moe_layer": fig_moe_layer,
    "expert_load": fig_expert_load,
}
#: What each figure's axes are split by: every one by card; the timed ones by timing mode too.
FACETS = {"bandwidth": ("card", "timing"), "latency": ("card", "timing"), "moe_layer": ("card", "timing"),
          "capacity": ("card",), "expert_load": ("card",)}


def png_bytes(fig, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def show(fig, what: str) -> None:
    """Notebook helper: display ``fig`` as a PNG, or print ``no rows for <what>`` when None."""
    if fig is None:
        print(f"no rows for {what}")
        return
    try:
        from IPython import get_ipython
        from IPython.display import Image, display
    except ImportError:
        get_ipython = None
    if get_ipython is not None and get_ipython() is not None:
        display(Image(data=png_bytes(fig)))
    else:
        print(f"[figure: {fig.texts[0].get_text() if fig.texts else what}]")
