"""Reporting layer: turn influence scores into tables, token heatmaps and plots.

Independent of how scores are computed: build an :class:`InfluenceReport` with
:func:`build_report` from a ``[num_queries, num_train]`` score matrix, then log it to W&B
with :func:`log_report` (a ``wandb.init`` run or a Lightning ``WandbLogger``) or write a
standalone page with :func:`write_html_report`. Sign convention: a positive score means
training on the example made the query's completion more likely (docs/reading-scores.md
explains how to read a score).
"""

from lightning_influence.reporting.html_report import render_html_report, token_heatmap_html, write_html_report
from lightning_influence.reporting.layers import layer_columns, short_layer_names
from lightning_influence.reporting.report import (TOKEN_ALIGNMENTS, InfluenceReport, QueryInfluence, TrainInfluence,
                                                  build_report, layer_shares, magnitude_curve)
from lightning_influence.reporting.wandb_report import (LAYER_TABLE_COLUMNS, QUERY_TABLE_COLUMNS, TABLE_COLUMNS, active_run,
                                                        layer_contribution_rows, log_factors_artifact, log_report,
                                                        marked_query_text, query_summary_rows, report_table_columns,
                                                        report_table_rows)

__all__ = [
    "InfluenceReport",
    "QueryInfluence",
    "TrainInfluence",
    "TOKEN_ALIGNMENTS",
    "build_report",
    "layer_shares",
    "magnitude_curve",
    "short_layer_names",
    "layer_columns",
    "token_heatmap_html",
    "write_html_report",
    "render_html_report",
    "log_report",
    "active_run",
    "log_factors_artifact",
    "report_table_rows",
    "report_table_columns",
    "layer_contribution_rows",
    "query_summary_rows",
    "marked_query_text",
    "TABLE_COLUMNS",
    "LAYER_TABLE_COLUMNS",
    "QUERY_TABLE_COLUMNS",
]
