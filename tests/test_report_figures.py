"""Every figure rendered from a synthetic sweep over two cards and two timing modes
(tests/report_sweep.py), and what code can check of it: every implementation keeps one colour
(no two share one), no axis holds rows of two cards or two timing modes, every facet gets its
own axes, and no legend covers an axis."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest

from moebench import results
from moebench.report import FACETS, FIGURES, IMPL_STYLES, impl_styles, png_bytes
from moebench.report.styles import FALLBACK_COLORS, FALLBACK_MARKERS

pytest.importorskip("matplotlib")
from matplotlib.container import BarContainer  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402
from report_sweep import CARDS, IMPLS, MODES, write_sweep  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: the columns whose values the figures draw (bar lengths, line points, marks)
DRAWN = ("time_us_median", "pct_of_copy", "tflops", "avg_drop_rate", "padding_waste")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return results.load(write_sweep(tmp_path_factory.mktemp("synthetic") / "sweep"))


@pytest.fixture(scope="module")
def figures(sweep):
    out = {name: fn(sweep) for name, fn in FIGURES.items()}
    for fig in out.values():
        if fig is not None:
            FigureCanvasAgg(fig).draw()
    return out


def _key(v: float) -> float:
    return float(f"{v:.9g}")


def facet_values(df, card: str, timing: str | None) -> set[float]:
    """Every value a figure may draw from the rows of one card (and timing mode): the drawn
    columns, and each routing's per-expert load over its mean."""
    d = df[df["gpu_name"] == card]
    if timing is not None:
        d = d[d["timing_mode"] == timing]
    vals = {_key(v) for c in DRAWN for v in d[c].dropna() if np.isfinite(v)}
    for counts in d["expert_counts"].dropna():
        c = np.asarray(list(counts), dtype=float)
        vals |= {_key(v) for v in c / c.mean()}
    return vals


def drawn_values(ax) -> list[float]:
    """What an axis draws as data: bar lengths (the stacked segments each), line points and
    scatter marks; limit lines (gid "limit") are not data."""
    out = []
    for cont in ax.containers:
        if isinstance(cont, BarContainer):
            horizontal = getattr(cont, "orientation", "vertical") == "horizontal"
            out += [p.get_width() if horizontal else p.get_height() for p in cont.patches]
    for line in ax.get_lines():
        if line.get_gid() != "limit":
            out += [float(v) for v in np.asarray(line.get_ydata(), dtype=float)]
    for coll in ax.collections:
        if coll.get_gid() != "limit" and hasattr(coll, "get_offsets") and len(coll.get_offsets()):
            out += [float(x) for x, _ in np.asarray(coll.get_offsets())]
    return [v for v in out if np.isfinite(v)]


def data_axes(fig):
    return [ax for ax in fig.axes if ax.get_visible() and ax.get_gid()]


def test_the_sweep_spans_two_cards_and_two_timing_modes(sweep):
    assert set(sweep["gpu_name"]) == set(CARDS) and set(sweep["timing_mode"]) == set(MODES)
    # the fixture is a test only if no timed value of one (card, mode) occurs in another, and no
    # routing value (drop rate, padding, load) of one card on another
    timed = sweep.assign(avg_drop_rate=None, padding_waste=None, expert_counts=None)
    routing = sweep.assign(time_us_median=None, pct_of_copy=None, tflops=None)
    facets = [(c, t) for c in CARDS for t in MODES]
    for i, a in enumerate(facets):
        for b in facets[i + 1:]:
            assert not facet_values(timed, *a) & facet_values(timed, *b), (a, b)
    cards = list(CARDS)
    assert not facet_values(routing, cards[0], None) & facet_values(routing, cards[1], None)


@pytest.mark.parametrize("name", list(FIGURES))
def test_every_figure_renders_the_synthetic_sweep(figures, name):
    fig = figures[name]
    assert fig is not None and data_axes(fig), name
    assert png_bytes(fig, dpi=50).startswith(PNG_MAGIC)


@pytest.mark.parametrize("name", list(FIGURES))
def test_no_axis_mixes_cards_or_timing_modes(sweep, figures, name):
    fig = figures[name]
    by_timing = "timing" in FACETS[name]
    seen = set()
    for ax in data_axes(fig):
        card, timing = ax.get_gid().split("|")
        assert card in CARDS, ax.get_gid()
        assert (timing in MODES) if by_timing else timing == "*", ax.get_gid()
        own = facet_values(sweep, card, timing if by_timing else None)
        drawn = drawn_values(ax)
        assert drawn, f"{name}: {ax.get_title()} draws nothing"
        foreign = [v for v in drawn if _key(v) not in own]
        assert not foreign, f"{name}: {ax.get_title()!r} draws values of another facet: {foreign[:5]}"
        assert card in ax.get_title() and (not by_timing or timing in ax.get_title()), ax.get_title()
        seen.add((card, timing))
    expected = {(c, t) for c in CARDS for t in MODES} if by_timing else {(c, "*") for c in CARDS}
    assert seen == expected, name


def _legend_colors(fig) -> dict[str, str]:
    out = {}
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    for leg in legends:
        for h, text in zip(leg.legend_handles, leg.get_texts()):
            color = h.get_color() if hasattr(h, "get_color") and not hasattr(h, "get_facecolor") \
                else h.get_facecolor()
            if isinstance(color, np.ndarray) and color.ndim == 2:
                color = color[0]
            out[text.get_text()] = to_hex(color)
    return out


def test_every_implementation_keeps_one_colour_in_every_figure(figures):
    seen = defaultdict(set)
    for name, fig in figures.items():
        for label, color in _legend_colors(fig).items():
            if label in IMPLS:
                seen[label].add(color)
    assert set(seen) == set(IMPLS), "every implementation is in a legend"
    for impl, colors in seen.items():
        assert len(colors) == 1, (impl, colors)
        if impl in IMPL_STYLES:
            assert colors == {to_hex(IMPL_STYLES[impl][0])}, impl
    owners = defaultdict(set)
    for impl, colors in seen.items():
        owners[next(iter(colors))].add(impl)
    assert all(len(v) == 1 for v in owners.values()), dict(owners)


def test_no_two_implementations_share_a_colour_or_a_marker():
    known = list(IMPL_STYLES.values())
    assert len({to_hex(c) for c, _ in known}) == len(known)
    assert len({m for _, m in known}) == len(known)
    assert not {to_hex(c) for c in FALLBACK_COLORS} & {to_hex(c) for c, _ in known}
    assert not set(FALLBACK_MARKERS) & {m for _, m in known}
    others = ["triton_x", "grouped_mm", "quack_varlen", "cute (metadata=torch)", "fused", "liger"]
    styles = impl_styles([*IMPL_STYLES, *others])
    assert len({s.color for s in styles.values()}) == len(styles)
    # stable: the same names in another order (or among other names) keep their styles
    assert impl_styles(list(reversed(others)) + list(IMPL_STYLES)) == styles
    assert impl_styles(["cute", "triton_x"])["cute"] == styles["cute"]
    many = impl_styles([f"impl{i}" for i in range(len(FALLBACK_COLORS) + 3)])
    assert len({(s.color, s.marker) for s in many.values()}) == len(many)


@pytest.mark.parametrize("name", list(FIGURES))
def test_legends_never_cover_an_axis(figures, name):
    fig = figures[name]
    renderer = fig.canvas.get_renderer()
    axes = [ax for ax in fig.axes if ax.get_visible()]
    legends = list(fig.legends) + [ax.get_legend() for ax in axes if ax.get_legend()]
    assert legends, name
    for leg in legends:
        box = leg.get_window_extent(renderer)
        for ax in axes:
            area = ax.get_window_extent(renderer)
            overlap = min(box.x1, area.x1) - max(box.x0, area.x0), min(box.y1, area.y1) - max(box.y0, area.y0)
            assert not (overlap[0] > 1 and overlap[1] > 1), f"{name}: a legend covers {ax.get_title()!r}"


def test_latency_axes_are_log_and_bandwidth_axes_carry_the_copy_line(figures):
    for ax in data_axes(figures["latency"]):
        assert ax.get_yscale() == "log"
    for ax in data_axes(figures["bandwidth"]):
        limits = [ln for ln in ax.get_lines() if ln.get_gid() == "limit"]
        assert any(list(ln.get_xdata()) == [100.0, 100.0] for ln in limits), ax.get_title()


def test_capacity_draws_a_curve_per_distribution(figures):
    axs = data_axes(figures["capacity"])
    assert len(axs) == 2 * len(CARDS)  # drop rate and padding waste per card
    for ax in axs:
        lines = [ln for ln in ax.get_lines() if ln.get_gid() != "limit"]
        assert len(lines) == 3 and all(len(ln.get_xdata()) == 6 for ln in lines), ax.get_title()
        assert len({ln.get_color() for ln in lines}) == 3
        assert not math.isnan(float(np.nanmax([np.nanmax(ln.get_ydata()) for ln in lines])))
