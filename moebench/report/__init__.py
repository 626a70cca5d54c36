"""The leaderboard, figures and a Markdown summary of result tables, shared by
``notebooks/analysis.ipynb`` and the command line (``python -m moebench.report``): ``tables``
(selections and tables), ``cases`` (what a row measured: card, timing mode, stage kind, case),
``leaderboard`` (the fastest implementation per case), ``styles`` (one colour and marker per
implementation), ``timed_figures`` and ``routing_figures`` (one question per figure),
``figures`` (their registry), ``cli`` (the report files and the command)."""

from moebench.report.cases import STAGE_KINDS, cpu_rows_left_out, stage_kind
from moebench.report.cli import default_out, main, render_markdown, write_report
from moebench.report.figures import FACETS, FIGURES, TITLES, WHAT, png_bytes, show
from moebench.report.leaderboard import leaderboard, leaderboard_markdown, leaderboard_text
from moebench.report.routing_figures import fig_capacity, fig_expert_load
from moebench.report.styles import IMPL_STYLES, impl_styles
from moebench.report.tables import FAIL_STATUSES, NOT_STACKED, STAGE_ORDER, failures, markdown_table, ok_rows, ok_table
from moebench.report.timed_figures import fig_bandwidth, fig_latency, fig_moe_layer

__all__ = ["FACETS", "FAIL_STATUSES", "FIGURES", "IMPL_STYLES", "NOT_STACKED", "STAGE_KINDS", "STAGE_ORDER", "TITLES", "WHAT",
           "cpu_rows_left_out", "default_out", "failures", "fig_bandwidth", "fig_capacity", "fig_expert_load", "fig_latency",
           "fig_moe_layer", "impl_styles", "leaderboard", "leaderboard_markdown", "leaderboard_text", "main",
           "markdown_table", "ok_rows", "ok_table", "png_bytes", "render_markdown", "show", "stage_kind",
           "write_report"]
