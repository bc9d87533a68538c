"""Log influence reports to Weights & Biases.

:func:`log_report` accepts a ``wandb`` run or a Lightning ``WandbLogger`` and, on global rank
zero only, logs in a single ``run.log`` call:

* ``{prefix}/top_influences`` -- a ``wandb.Table`` with one row per listed training example
  (top positive and top negative per query): numeric columns that sort and filter in the
  W&B UI (score, its per-query normalised views ``share`` and ``z_score``, and one
  ``layer:<name>`` column per layer or layer group, see :mod:`.layers`), the query text with
  its completion in ``⟦...⟧`` (plus separate ``prompt`` and ``completion`` columns), and
  ``heatmap_key``, the key of the row's token heatmap panel;
* ``{prefix}/layer_contributions`` -- the same per-layer numbers in long format, one row per
  (query, listed example, layer), for grouping and plotting by layer;
* ``{prefix}/queries`` -- one row per query: how many of its scores are positive and
  negative (a "most negative" list is shorter than k when fewer scores are negative) and how
  many examples each list shows;
* ``{prefix}/heatmaps/<query>/<direction>_<rank>_train<index>`` -- one ``wandb.Html`` token
  heatmap per listed training sequence that has token scores (W&B cannot show ``wandb.Html``
  inside a Table, so rows link to these by key);
* ``{prefix}/magnitude_distribution`` -- a ``wandb.plot.line`` of log10 sorted ``|score|`` vs
  log10 rank per query (the power-law view of Grosse et al.), when the report carries the
  full score matrix;
* ``{prefix}/layer_shares`` -- a ``wandb.plot.bar`` of each layer's share of ``|score|``
  (and ``{prefix}/layer_group_shares`` over the table's layer groups when layers are grouped).

The plots are W&B custom charts over Tables, so no plotting library is needed.
"""

from __future__ import annotations

import html
import logging
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

from lightning_influence.reporting.html_report import heatmap_document, token_heatmap_html
from lightning_influence.reporting.layers import DEFAULT_MAX_LAYER_COLUMNS, layer_columns, short_layer_names
from lightning_influence.reporting.report import InfluenceReport, QueryInfluence, layer_shares, magnitude_curve

log = logging.getLogger(__name__)

__all__ = [
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
    "DEFAULT_MAX_ROWS",
    "DEFAULT_MAX_HEATMAPS",
]

#: W&B refuses to log tables above ``wandb.Table.MAX_ROWS`` (10,000) rows.
DEFAULT_MAX_ROWS = 10_000
#: Each heatmap is its own media file and panel; more than this is unreadable anyway.
DEFAULT_MAX_HEATMAPS = 200
#: Points per query in the magnitude-distribution plot (log-spaced ranks).
DEFAULT_DIST_POINTS = 100
#: Queries drawn in the magnitude-distribution plot.
DEFAULT_MAX_DIST_QUERIES = 20

#: The fixed leading columns of ``top_influences``; ``layer:<name>`` columns follow (see
#: :func:`report_table_columns`).
TABLE_COLUMNS = [
    "query_id",
    "query_text",
    "prompt",
    "completion",
    "direction",
    "rank",
    "train_index",
    "score",
    "share",
    "z_score",
    "top_layer",
    "top_layer_share",
    "train_text",
    "heatmap_key",
]
#: Prefix of the per-layer (or per-group) contribution columns of ``top_influences``.
LAYER_COLUMN_PREFIX = "layer:"
#: Columns of the long-format ``layer_contributions`` table.
LAYER_TABLE_COLUMNS = ["query_id", "direction", "rank", "train_index", "layer", "group", "score", "share",
                       "module"]
#: Columns of the per-query ``queries`` table.
QUERY_TABLE_COLUMNS = ["query_id", "query_text", "prompt", "completion", "num_scored", "num_positive",
                       "num_negative", "listed_positive", "listed_negative", "sum_abs_score"]
#: Marks the completion inside ``query_text`` (rare characters, so they read as markup).
COMPLETION_MARKS = ("\u27e6", "\u27e7")


def _is_rank_zero() -> bool:
    # Imported lazily: importing lightning.pytorch costs seconds and isn't needed otherwise.
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def _resolve_run(run_or_logger: Any) -> Any:
    """Return the ``wandb`` run behind a run or a Lightning ``WandbLogger``."""
    if run_or_logger is None:
        raise ValueError("expected a wandb Run or a Lightning WandbLogger, got None")
    from wandb.sdk.wandb_run import Run

    if isinstance(run_or_logger, Run):
        return run_or_logger
    experiment = getattr(run_or_logger, "experiment", None)
    if experiment is not None:
        return experiment  # WandbLogger: creates the run on first access
    if callable(getattr(run_or_logger, "log", None)):
        return run_or_logger  # something run-like (e.g. a wrapper or a test double)
    raise TypeError(f"expected a wandb Run or a Lightning WandbLogger, got {type(run_or_logger).__name__}")


def active_run(run_or_logger: Any = None) -> Any:
    """The W&B run a report goes to: ``run_or_logger`` if given, else the active ``wandb.init`` run.

    ``None`` means "the run that is active, if any": ``wandb.run`` when ``wandb`` has been
    imported and a run is open (a plain ``wandb.init``), else ``None`` (nothing is logged).
    ``False`` means no run. A Lightning ``WandbLogger`` or a run is returned as given
    (:func:`log_report` takes either).
    """
    if run_or_logger is False:
        return None
    if run_or_logger is not None:
        return run_or_logger
    wandb = sys.modules.get("wandb")  # never imported here: without an import there is no active run
    return getattr(wandb, "run", None) if wandb is not None else None


def _safe_key(s: str, max_len: int = 64) -> str:
    # Keys become media file paths and panel names; keep them portable.
    out = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(s)).strip("._") or "q"
    return out[:max_len]


def _shares(layer_scores: dict[str, float] | None) -> dict[str, float] | None:
    if not layer_scores:
        return None
    total = sum(abs(v) for v in layer_scores.values() if math.isfinite(v))
    return {k: (abs(v) / total if total > 0 and math.isfinite(v) else 0.0) for k, v in layer_scores.items()}


def marked_query_text(query: QueryInfluence) -> str:
    """The query's text with its completion inside ``⟦...⟧`` (unchanged when the prompt length
    is unknown), so the measured part is visible in a table cell."""
    if query.prompt_length is None:
        return query.query_text
    return f"{query.prompt}{COMPLETION_MARKS[0]}{query.completion}{COMPLETION_MARKS[1]}"


def _report_layer_names(report: InfluenceReport) -> list[str]:
    names = list(report.layer_names)
    for *_, e in report.iter_entries():
        names += [n for n in (e.layer_scores or {}) if n not in names]
    return names


def report_table_columns(report: InfluenceReport, max_layer_columns: int = DEFAULT_MAX_LAYER_COLUMNS) -> list[str]:
    """Columns of the ``top_influences`` table: :data:`TABLE_COLUMNS`, then one numeric
    ``layer:<name>`` column per layer (short names) or per layer group when there are more
    than ``max_layer_columns`` layers."""
    groups = layer_columns(_report_layer_names(report), max_layer_columns)
    return list(TABLE_COLUMNS) + [LAYER_COLUMN_PREFIX + g for g in groups]


def _cap_fairly(items: list[tuple], cap: int) -> list[tuple]:
    """Keep at most ``cap`` items, taking rank 1 of every query and direction before any
    rank 2, so that capping drops the tail of every list rather than whole queries.
    Items are ``(query_index, direction, rank, ...)``; the original order is restored."""
    if len(items) <= cap:
        return items
    order = sorted(range(len(items)), key=lambda i: (items[i][2], items[i][0], items[i][1] != "positive"))
    keep = sorted(order[:cap])
    return [items[i] for i in keep]


def _heatmap_keys(report: InfluenceReport, key_prefix: str) -> dict[tuple[int, str, int], str]:
    keys: dict[tuple[int, str, int], str] = {}
    used: set[str] = set()
    qkeys: dict[int, str] = {}
    for qi, q in enumerate(report.queries):
        k = _safe_key(q.query_id)
        if k in used:  # distinct ids can sanitise to the same string
            k = f"{k}_{qi}"
        used.add(k)
        qkeys[qi] = k
    for qi, _q, direction, e in report.iter_entries():
        if e.tokens is not None and e.token_scores is not None:
            keys[(qi, direction, e.rank)] = (
                f"{key_prefix}/heatmaps/{qkeys[qi]}/{direction}_{e.rank:03d}_train{e.train_index}"
            )
    return keys


def report_table_rows(
    report: InfluenceReport,
    heatmap_keys: dict[tuple[int, str, int], str] | None = None,
    max_layer_columns: int = DEFAULT_MAX_LAYER_COLUMNS,
) -> list[list]:
    """Rows of the top-influences table, in :func:`report_table_columns` order: every listed
    example of every query, positive list first. Numbers stay numbers (``None`` where
    unknown) so that W&B can sort and filter them; a ``layer:<name>`` cell is that layer's
    (or group's) contribution to the score."""
    heatmap_keys = heatmap_keys or {}
    names = _report_layer_names(report)
    short = short_layer_names(names)
    groups = layer_columns(names, max_layer_columns)
    rows = []
    for qi, q, direction, e in report.iter_entries():
        ls = e.layer_scores or {}
        shares = _shares(ls) or {}
        top_layer, top_share = None, None
        if shares:
            top = max(shares, key=lambda n: shares[n])
            top_layer, top_share = short[names.index(top)], float(shares[top])
        group_cells = [
            float(math.fsum(ls[names[i]] for i in idx if names[i] in ls)) if ls else None for idx in groups.values()
        ]
        rows.append(
            [
                q.query_id,
                marked_query_text(q),
                q.prompt,
                q.completion,
                direction,
                int(e.rank),
                int(e.train_index),
                float(e.score),
                e.share,
                e.z_score,
                top_layer,
                top_share,
                e.text if e.text is not None else "",
                heatmap_keys.get((qi, direction, e.rank), ""),
            ]
            + group_cells
        )
    return rows


def layer_contribution_rows(report: InfluenceReport, max_layer_columns: int = DEFAULT_MAX_LAYER_COLUMNS) -> list[list]:
    """Rows of the long-format ``layer_contributions`` table (:data:`LAYER_TABLE_COLUMNS`): one
    per (query, listed example, layer), with the layer's short name, the group it is summed
    into in ``top_influences``, its contribution and its share of the example's ``|score|``."""
    names = _report_layer_names(report)
    short = short_layer_names(names)
    group_of = {names[i]: g for g, idx in layer_columns(names, max_layer_columns).items() for i in idx}
    rows = []
    for _qi, q, direction, e in report.iter_entries():
        shares = _shares(e.layer_scores) or {}
        for name, value in (e.layer_scores or {}).items():
            li = names.index(name)
            rows.append([q.query_id, direction, int(e.rank), int(e.train_index), short[li], group_of[name],
                         float(value), float(shares[name]), name])
    return rows


def query_summary_rows(report: InfluenceReport) -> list[list]:
    """Rows of the per-query ``queries`` table (:data:`QUERY_TABLE_COLUMNS`): how many scores
    are positive and negative, and how many examples each list shows."""
    return [
        [q.query_id, marked_query_text(q), q.prompt, q.completion, q.num_scored, q.num_positive, q.num_negative,
         len(q.top_positive), len(q.top_negative), q.sum_abs]
        for q in report.queries
    ]


def log_report(
    report: InfluenceReport,
    run_or_logger: Any,
    key_prefix: str = "influence",
    max_rows: int = DEFAULT_MAX_ROWS,
    log_heatmaps: bool = True,
    max_heatmaps: int = DEFAULT_MAX_HEATMAPS,
    log_plots: bool = True,
    dist_points: int = DEFAULT_DIST_POINTS,
    max_dist_queries: int = DEFAULT_MAX_DIST_QUERIES,
    max_layer_columns: int = DEFAULT_MAX_LAYER_COLUMNS,
) -> dict[str, Any] | None:
    """Log an :class:`~.report.InfluenceReport` to W&B (on global rank zero only).

    Args:
        report: the report.
        run_or_logger: a ``wandb`` run (``wandb.init(...)``) or a Lightning ``WandbLogger``
            (its ``experiment`` is used).
        key_prefix: prefix of every logged key (the W&B panel section).
        max_rows: cap on table rows (W&B tables hold at most ``wandb.Table.MAX_ROWS``,
            10,000); the top ranks of every query are kept first and a warning states the
            cap when it applies.
        log_heatmaps: log one ``wandb.Html`` token heatmap per listed sequence with token scores.
        max_heatmaps: cap on the number of heatmaps (warned about when it applies).
        log_plots: log the magnitude-distribution line plot (needs ``report.scores``) and
            the per-layer bar charts (need layer data).
        dist_points: log-spaced points per query in the distribution plot.
        max_dist_queries: queries drawn in the distribution plot.
        max_layer_columns: with more layers than this, ``top_influences`` sums them into
            groups (per block and kind, then per kind); ``layer_contributions`` keeps every layer.

    Returns:
        The dict passed to ``run.log`` (key -> W&B object), or ``None`` on other ranks.
    """
    if not _is_rank_zero():
        return None
    import wandb

    run = _resolve_run(run_or_logger)
    payload: dict[str, Any] = {}

    heatmap_keys: dict[tuple[int, str, int], str] = {}
    if log_heatmaps:
        heatmap_keys = _heatmap_keys(report, key_prefix)
        if len(heatmap_keys) > max_heatmaps:
            log.warning(
                "influence report has %d token heatmaps; logging only %d (max_heatmaps=%d), "
                "keeping the top ranks of every query",
                len(heatmap_keys),
                max(max_heatmaps, 0),
                max_heatmaps,
            )
            kept = _cap_fairly([(qi, d, r) for (qi, d, r) in heatmap_keys], max(max_heatmaps, 0))
            heatmap_keys = {t: heatmap_keys[t] for t in kept}
        for qi, _q, direction, e in report.iter_entries():
            key = heatmap_keys.get((qi, direction, e.rank))
            if key is None:
                continue
            title = f"{report.queries[qi].query_id}: {direction} #{e.rank}, training example {e.train_index}"
            frag = token_heatmap_html(e.tokens, e.token_scores, e.score, title, alignment=report.token_alignment)
            # A panel is seen alone in W&B: say which query it is about, completion marked.
            query = html.escape(marked_query_text(report.queries[qi]))
            frag = f'<div style="font-family:sans-serif;font-size:0.9em;color:#333;">query: {query}</div>{frag}'
            payload[key] = _html(wandb, heatmap_document(frag, title))

    cap = min(int(max_rows), int(getattr(wandb.Table, "MAX_ROWS", max_rows)))
    qindex = {q.query_id: i for i, q in enumerate(report.queries)}
    rows = report_table_rows(report, heatmap_keys, max_layer_columns)
    if len(rows) > cap:
        log.warning(
            "influence table has %d rows; logging only %d (W&B table row cap %d), keeping the top ranks of every query",
            len(rows),
            max(cap, 0),
            cap,
        )
        keyed = [(qindex[r[0]], r[4], r[5], r) for r in rows]
        rows = [t[3] for t in _cap_fairly(keyed, max(cap, 0))]
    payload[f"{key_prefix}/top_influences"] = wandb.Table(
        columns=report_table_columns(report, max_layer_columns), data=rows
    )
    payload[f"{key_prefix}/queries"] = wandb.Table(columns=list(QUERY_TABLE_COLUMNS), data=query_summary_rows(report))
    long_rows = layer_contribution_rows(report, max_layer_columns)
    if long_rows:
        if len(long_rows) > cap:
            log.warning("layer_contributions table has %d rows; logging only %d (W&B table row cap %d)",
                        len(long_rows), max(cap, 0), cap)
            keyed = [(qindex[r[0]], r[1], r[2], r) for r in long_rows]
            long_rows = [t[3] for t in _cap_fairly(keyed, max(cap, 0))]
        payload[f"{key_prefix}/layer_contributions"] = wandb.Table(columns=list(LAYER_TABLE_COLUMNS), data=long_rows)

    if log_plots:
        dist = _distribution_table(report, dist_points, max_dist_queries, cap)
        if dist is not None:
            payload[f"{key_prefix}/magnitude_distribution"] = wandb.plot.line(
                dist,
                "log10_rank",
                "log10_abs_score",
                stroke="query_id",
                title="Influence magnitude vs rank (log10 |score| vs log10 rank)",
            )
        totals = _layer_totals(report)
        if totals:
            names = list(totals)
            short = short_layer_names(names)
            bar = wandb.Table(columns=["layer", "share"], data=[[s, float(totals[n])] for s, n in zip(short, names)])
            payload[f"{key_prefix}/layer_shares"] = wandb.plot.bar(
                bar, "layer", "share", title="Share of |influence| per layer"
            )
            groups = layer_columns(names, max_layer_columns)
            if len(groups) < len(names):
                data = [[g, float(math.fsum(totals[names[i]] for i in idx))] for g, idx in groups.items()]
                payload[f"{key_prefix}/layer_group_shares"] = wandb.plot.bar(
                    wandb.Table(columns=["layer_group", "share"], data=data),
                    "layer_group",
                    "share",
                    title="Share of |influence| per layer group",
                )

    run.log(payload)
    return payload


def _html(wandb: Any, doc: str) -> Any:
    # inject=False: W&B would otherwise add a stylesheet link fetched from wandb.ai.
    try:
        return wandb.Html(doc, inject=False, data_is_not_path=True)
    except TypeError:  # older wandb without data_is_not_path
        return wandb.Html(doc, inject=False)


def _distribution_table(report: InfluenceReport, points: int, max_queries: int, cap: int):
    import wandb

    if report.scores is None or report.scores.numel() == 0:
        return None
    n_q = report.scores.shape[0]
    if n_q > max_queries:
        log.warning("magnitude distribution plot shows the first %d of %d queries", max_queries, n_q)
    ids = [q.query_id for q in report.queries]
    data = []
    for qi in range(min(n_q, max_queries)):
        qid = ids[qi] if qi < len(ids) else str(qi)
        for rank, mag in magnitude_curve(report.scores[qi], max_points=points):
            data.append([qid, rank, mag, math.log10(rank), math.log10(mag)])
    if not data:
        return None
    return wandb.Table(
        columns=["query_id", "rank", "abs_score", "log10_rank", "log10_abs_score"], data=data[: max(cap, 0)]
    )


def _layer_totals(report: InfluenceReport) -> dict[str, float] | None:
    if report.layer_totals:
        return report.layer_totals
    # Fall back to the listed examples only (the full per-layer matrix was not kept).
    names = list(report.layer_names)
    listed = [e.layer_scores for *_, e in report.iter_entries() if e.layer_scores]
    if not listed:
        return None
    for ls in listed:
        names += [n for n in ls if n not in names]
    import torch

    mat = torch.tensor([[ls.get(n, 0.0) for ls in listed] for n in names], dtype=torch.float64)
    return layer_shares(mat, names)


def log_factors_artifact(
    run_or_logger: Any,
    factors_dir: str | os.PathLike,
    name: str = "influence-factors",
    aliases: list[str] | None = None,
    metadata: dict[str, Any] | None = None,
):
    """Log a directory of fitted factors (covariances, eigenbases, Lambda) as a W&B artifact
    of type ``"influence-factors"``, on global rank zero only.

    Args:
        run_or_logger: a ``wandb`` run or a Lightning ``WandbLogger``.
        factors_dir: directory to upload (all files, recursively).
        name: artifact name (sanitised to W&B's allowed characters).
        aliases: optional aliases, e.g. ``["latest", "step-1000"]``.
        metadata: optional JSON-serialisable metadata (strategy, damping, layers...).

    Returns:
        The logged ``wandb.Artifact``, or ``None`` on other ranks.
    """
    if not _is_rank_zero():
        return None
    import wandb

    factors_dir = Path(factors_dir)
    if not factors_dir.is_dir():
        raise FileNotFoundError(f"factors directory not found: {factors_dir}")
    run = _resolve_run(run_or_logger)
    safe_name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "influence-factors"
    artifact = wandb.Artifact(safe_name, type="influence-factors", metadata=metadata or {})
    artifact.add_dir(str(factors_dir))
    run.log_artifact(artifact, aliases=aliases)
    return artifact
