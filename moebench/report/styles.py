"""How the figures look: one colour and one marker per implementation, the same in every
figure (Okabe-Ito's colour-blind-safe palette), stable fallbacks for implementations not in
that list, palettes for things that are not implementations (stages, routing distributions,
shapes), and legends placed outside the axes so that they never cover data."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

#: The implementations everyone meets, each with a colour (Okabe & Ito, 2008) and a marker.
#: Black is left to the limit lines (100 % of copy, the dense GEMM, the mean load).
IMPL_STYLES = {
    "cute": ("#D55E00", "o"),       # vermillion
    "quack": ("#0072B2", "s"),      # blue
    "sonic": ("#009E73", "^"),      # bluish green
    "torch": ("#56B4E9", "v"),      # sky blue
    "compile": ("#E69F00", "D"),    # orange
    "reference": ("#CC79A7", "X"),  # reddish purple
}
#: For any other implementation (a GEMM path, a mixed chain): colours apart from the six above
#: (Paul Tol's indigo, olive, wine, sand; a grey and a brown) and markers none of them use.
FALLBACK_COLORS = ("#332288", "#999933", "#882255", "#DDCC77", "#777777", "#661100")
FALLBACK_MARKERS = ("P", "*", "h", "<", ">", "p", "d", "8")
#: The colour of limit lines (drawn with ``gid="limit"``: not data).
LIMIT_COLOR = "black"
#: Stages of a stacked breakdown (not implementations: their own palette, Tol's "light").
STAGE_COLORS = {"gate": "#BBCC33", "route": "#AAAA00", "select": "#AAAA00", "metadata": "#EEDD88",
                "route_metadata": "#EEDD88", "pack": "#77AADD", "gemm1": "#EE8866", "activation": "#FFAABB",
                "gemm2": "#99DDFF", "experts": "#EE8866", "combine": "#44BB99"}
STAGE_FALLBACK = ("#DDDDDD", "#BBBBBB", "#999999")
#: Routing distributions (``logits``): Tol's muted palette, away from the implementations' hues.
DISTRIBUTION_COLORS = {"uniform": "#332288", "zipf": "#882255", "hot": "#999933", "from_file": "#777777"}
DISTRIBUTION_MARKERS = {"uniform": "o", "zipf": "s", "hot": "^", "from_file": "D"}
LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 3)), (0, (7, 2, 2, 2)))


@dataclass(frozen=True)
class Style:
    color: str
    marker: str


def impl_styles(names) -> dict[str, Style]:
    """A style per implementation name. The six of ``IMPL_STYLES`` keep theirs; every other
    name gets a fallback chosen from a hash of the name (stable from run to run), moved on to
    the next free colour while one is free, so no two names share a colour unless there are
    more than ``len(FALLBACK_COLORS)`` of them (then their markers differ)."""
    out: dict[str, Style] = {}
    unknown = sorted({str(n) for n in names} - set(IMPL_STYLES))
    for n in {str(n) for n in names} & set(IMPL_STYLES):
        out[n] = Style(*IMPL_STYLES[n])
    used_colors: set[str] = set()
    used: set[tuple[str, str]] = set()
    nc, nm = len(FALLBACK_COLORS), len(FALLBACK_MARKERS)
    for n in unknown:
        h = zlib.crc32(n.encode())
        ci, mi = h % nc, (h // nc) % nm
        for step in range(nc):
            if FALLBACK_COLORS[(ci + step) % nc] not in used_colors:
                ci = (ci + step) % nc
                break
        color = FALLBACK_COLORS[ci]
        for step in range(nm):
            if (color, FALLBACK_MARKERS[(mi + step) % nm]) not in used:
                mi = (mi + step) % nm
                break
        style = Style(color, FALLBACK_MARKERS[mi])
        used_colors.add(style.color)
        used.add((style.color, style.marker))
        out[n] = style
    return out


def impl_order(names) -> list[str]:
    """The six known implementations in ``IMPL_STYLES`` order, then the others by name."""
    names = {str(n) for n in names}
    return [n for n in IMPL_STYLES if n in names] + sorted(names - set(IMPL_STYLES))


def stage_color(stage: str, i: int = 0) -> str:
    return STAGE_COLORS.get(str(stage), STAGE_FALLBACK[i % len(STAGE_FALLBACK)])


def distribution_style(logits: str, i: int = 0) -> Style:
    name = str(logits)
    if name in DISTRIBUTION_COLORS:
        return Style(DISTRIBUTION_COLORS[name], DISTRIBUTION_MARKERS[name])
    return Style(FALLBACK_COLORS[(i + 4) % len(FALLBACK_COLORS)], FALLBACK_MARKERS[i % len(FALLBACK_MARKERS)])


def new_figure(w: float, h: float):
    """A figure on its own canvas (no pyplot), laid out by constrained layout, which keeps the
    legends placed outside the axes from overlapping them."""
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), layout="constrained")


def legend_below(fig, handles: dict, ncols: int | None = None, title: str | None = None) -> None:
    """One figure legend under every axis (``handles``: label -> artist)."""
    if not handles:
        return
    fig.legend(list(handles.values()), list(handles.keys()), loc="outside lower center", fontsize=8,
               ncols=ncols or min(6, len(handles)), title=title, title_fontsize=8, frameon=False)


def legend_right(ax, handles: dict, title: str | None = None) -> None:
    """A legend beside one axis, outside it (``handles``: label -> artist)."""
    if not handles:
        return
    ax.legend(list(handles.values()), list(handles.keys()), loc="upper left", bbox_to_anchor=(1.02, 1.0),
              borderaxespad=0.0, fontsize=7, title=title, title_fontsize=7, frameon=False)


def plain_log_ticks(axis) -> None:
    """Tick labels of a log axis (call it once the data are drawn) as plain numbers: 1, 2, 5,
    10, 20, ...; evenly spaced ones where the data span less than a decade; no minor labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    lo, hi = axis.get_data_interval()
    narrow = lo > 0 and hi / lo < 10
    axis.set_major_locator(MaxNLocator(nbins=5) if narrow else LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def mark_facet(ax, card: str, timing: str | None) -> None:
    """Tag an axis with the one card (and timing mode) its data come from (``gid``
    ``card|timing``, ``card|*`` for figures of the routing, which no timing changes); the
    tests read it back to check that no axis mixes either."""
    ax.set_gid(f"{card}|{timing if timing is not None else '*'}")
