"""Figures and a Markdown summary of result tables, shared by ``notebooks/analysis.ipynb`` and
the command line (``python -m moebench.report``): ``tables`` (selections and tables),
``figures`` (one figure per question), ``cli`` (the report files and the command)."""

from moebench.report.cli import default_out, main, render_markdown, write_report
from moebench.report.figures import FIGURES, WHAT, fig_drop_rate, fig_expert_load, fig_moe_layer, fig_roofline
from moebench.report.figures import fig_routing_stages, fig_stage_breakdown, fig_topk, png_bytes, show
from moebench.report.tables import (FAIL_STATUSES, NOT_STACKED, STAGE_ORDER, failures, markdown_table, ok_rows,
                                    ok_table, roofline_table)

__all__ = ["FAIL_STATUSES", "FIGURES", "NOT_STACKED", "STAGE_ORDER", "WHAT", "default_out", "failures",
           "fig_drop_rate", "fig_expert_load", "fig_moe_layer", "fig_roofline", "fig_routing_stages",
           "fig_stage_breakdown", "fig_topk", "main", "markdown_table", "ok_rows", "ok_table", "png_bytes",
           "render_markdown", "roofline_table", "show", "write_report"]
