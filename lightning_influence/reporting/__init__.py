"""Reporting layer: turn influence scores into tables, token heatmaps and plots.

Independent of how scores are computed: build an :class:`InfluenceReport` with
:func:`build_report` from a ``[num_queries, num_train]`` score matrix, then log it to W&B
with :func:`log_report` or write a standalone page with :func:`write_html_report`.
Sign convention: a positive score means training on the example made the query's
completion more likely.
"""

from lightning_influence.reporting.html_report import render_html_report, token_heatmap_html, write_html_report
from lightning_influence.reporting.report import (InfluenceReport, QueryInfluence, TrainInfluence,
                                                  build_report, layer_shares, magnitude_curve)
from lightning_influence.reporting.wandb_report import (TABLE_COLUMNS, log_factors_artifact, log_report,
                                                        report_table_rows)

__all__ = [
    "InfluenceReport",
    "QueryInfluence",
    "TrainInfluence",
    "build_report",
    "layer_shares",
    "magnitude_curve",
    "token_heatmap_html",
    "write_html_report",
    "render_html_report",
    "log_report",
    "log_factors_artifact",
    "report_table_rows",
    "TABLE_COLUMNS",
]
