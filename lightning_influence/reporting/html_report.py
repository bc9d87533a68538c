"""Self-contained HTML rendering of influence reports.

:func:`token_heatmap_html` renders one training sequence with its tokens coloured by
token-wise influence (used both here and for the W&B ``wandb.Html`` panels);
:func:`write_html_report` writes a whole :class:`~.report.InfluenceReport` as a single
HTML file with inline CSS and no scripts or external assets, so it can be opened offline
or attached to a ticket. Every piece of user text is HTML-escaped.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Sequence
from pathlib import Path

from lightning_influence.reporting.report import (InfluenceReport, QueryInfluence, TrainInfluence,
                                                  atomic_write_text, magnitude_curve)

__all__ = ["token_heatmap_html", "write_html_report", "render_html_report"]

# Red for positive (helped the completion), blue for negative (hurt it).
_POS_RGB = (220, 38, 38)
_NEG_RGB = (37, 99, 235)
_MAX_ALPHA = 0.85  # keep black text readable on the strongest colour


def _esc(x: object) -> str:
    return html.escape(str(x), quote=True)


def _fmt(x: float) -> str:
    if x is None:
        return ""
    if not math.isfinite(x):
        return str(x)
    return f"{x:.4g}"


def _token_background(score: float, scale: float) -> str:
    if scale <= 0 or not math.isfinite(score) or score == 0:
        return "transparent"
    alpha = min(abs(score) / scale, 1.0) * _MAX_ALPHA
    r, g, b = _POS_RGB if score > 0 else _NEG_RGB
    return f"rgba({r},{g},{b},{alpha:.3f})"


def _display_token(tok: str) -> str:
    # Make invisible tokens visible; pre-wrap keeps ordinary spaces as they are.
    if tok == "":
        return "\u2205"
    return tok.replace("\n", "\u21b5\n").replace("\t", "\u2192\t")


def token_heatmap_html(
    tokens: Sequence[str],
    token_scores: Sequence[float],
    score: float | None = None,
    title: str | None = None,
) -> str:
    """Render a token-wise influence heatmap as a self-contained HTML fragment.

    Each token's background is red for positive and blue for negative influence, with
    opacity proportional to ``|token_score| / max |token_score|`` over this sequence (so
    each sequence uses its full colour range). Hovering a token shows its score. A legend
    gives the colour scale, the sequence's total ``score`` and the sum of token scores.
    All styling is inline so the fragment renders identically inside a W&B panel and in
    the standalone report; tokens and title are HTML-escaped.

    Args:
        tokens: decoded tokens of the training sequence.
        token_scores: token-wise influence, same length as ``tokens``.
        score: total influence score of the sequence (default: sum of ``token_scores``).
        title: optional heading.

    Returns:
        An HTML string (a ``<div>``).
    """
    tokens = [str(t) for t in tokens]
    token_scores = [float(s) for s in token_scores]
    if len(tokens) != len(token_scores):
        raise ValueError(f"got {len(tokens)} tokens and {len(token_scores)} token scores")
    token_sum = math.fsum(s for s in token_scores if math.isfinite(s))
    if score is None:
        score = token_sum
    finite = [abs(s) for s in token_scores if math.isfinite(s)]
    scale = max(finite, default=0.0)

    pos = "rgba({},{},{},{})".format(*_POS_RGB, _MAX_ALPHA)
    neg = "rgba({},{},{},{})".format(*_NEG_RGB, _MAX_ALPHA)
    parts = ['<div class="li-heatmap" style="font-family:sans-serif;margin:0.5em 0 1em 0;">']
    if title:
        parts.append(f'<div style="font-weight:bold;margin-bottom:0.3em;">{_esc(title)}</div>')
    parts.append(
        '<div class="li-legend" style="font-size:0.85em;color:#333;margin-bottom:0.4em;'
        'display:flex;align-items:center;gap:0.5em;flex-wrap:wrap;">'
        f"<span>score <b>{_esc(_fmt(score))}</b> (sum of token scores {_esc(_fmt(token_sum))})</span>"
        f"<span>&minus;{_esc(_fmt(scale))}</span>"
        f'<span style="display:inline-block;width:120px;height:0.9em;border:1px solid #999;'
        f'background:linear-gradient(to right,{neg},rgba(255,255,255,0),{pos});"></span>'
        f"<span>+{_esc(_fmt(scale))}</span>"
        "<span>(red: made the completion more likely; blue: less likely; "
        "intensity relative to this sequence&#x27;s largest token)</span>"
        "</div>"
    )
    parts.append(
        '<div class="li-tokens" style="font-family:monospace;white-space:pre-wrap;'
        'word-break:break-word;line-height:1.7;border:1px solid #ddd;padding:0.4em;">'
    )
    for tok, s in zip(tokens, token_scores):
        parts.append(
            f'<span title="{_esc(_fmt(s))}" style="background:{_token_background(s, scale)};'
            f'border-radius:2px;">{_esc(_display_token(tok))}</span>'
        )
    parts.append("</div></div>")
    return "".join(parts)


def heatmap_document(fragment: str, title: str = "Token-wise influence") -> str:
    """Wrap an HTML fragment in a minimal standalone document (UTF-8, no external assets)."""
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{_esc(title)}</title></head><body>{fragment}</body></html>"
    )


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; }
.meta { color: #555; font-size: 0.9em; }
section.query { border-top: 2px solid #ccc; margin-top: 2em; padding-top: 0.5em; }
pre.query-text, div.train-text { white-space: pre-wrap; word-break: break-word; font-family: monospace;
       background: #f6f6f6; padding: 0.5em; border-radius: 4px; }
div.train-text { max-height: 10em; overflow: auto; margin: 0; background: transparent; padding: 0; }
table { border-collapse: collapse; width: 100%; margin: 0.5em 0 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.5em; vertical-align: top; text-align: left; }
th { background: #f0f0f0; }
td.num { text-align: right; font-family: monospace; white-space: nowrap; }
td.pos { color: #b91c1c; } td.neg { color: #1d4ed8; }
.layers { font-size: 0.85em; color: #444; white-space: nowrap; }
.bar { display: inline-block; height: 0.9em; background: #6b7280; vertical-align: middle; }
nav ol { columns: 3; font-size: 0.9em; }
svg text { font-size: 10px; font-family: sans-serif; }
"""


def _layer_cell(entry: TrainInfluence) -> str:
    if not entry.layer_scores:
        return ""
    total = sum(abs(v) for v in entry.layer_scores.values() if math.isfinite(v))
    rows = []
    for name, v in entry.layer_scores.items():
        share = abs(v) / total if total > 0 and math.isfinite(v) else 0.0
        rows.append(f"{_esc(name)}: {_esc(_fmt(v))} ({share:.0%})")
    return '<div class="layers">' + "<br>".join(rows) + "</div>"


def _entries_table(entries: list[TrainInfluence], has_layers: bool) -> str:
    if not entries:
        return "<p><i>none</i></p>"
    head = "<tr><th>rank</th><th>train index</th><th>score</th>"
    head += "<th>per-layer score (share of |score|)</th>" if has_layers else ""
    head += "<th>training text</th></tr>"
    rows = [f"<table>{head}"]
    for e in entries:
        sign = "pos" if e.score > 0 else "neg" if e.score < 0 else ""
        text = "" if e.text is None else f'<div class="train-text">{_esc(e.text)}</div>'
        rows.append(
            f'<tr><td class="num">{e.rank}</td><td class="num">{e.train_index}</td>'
            f'<td class="num {sign}">{_esc(_fmt(e.score))}</td>'
            + (f"<td>{_layer_cell(e)}</td>" if has_layers else "")
            + f"<td>{text}</td></tr>"
        )
    rows.append("</table>")
    return "".join(rows)


def _query_section(qi: int, q: QueryInfluence) -> str:
    has_layers = any(e.layer_scores for e in q.top_positive + q.top_negative)
    parts = [
        f'<section class="query" id="query-{qi}">',
        f"<h2>Query {_esc(q.query_id)}</h2>",
        f'<pre class="query-text">{_esc(q.query_text)}</pre>',
        "<h3>Most positive influence</h3>",
        _entries_table(q.top_positive, has_layers),
        "<h3>Most negative influence</h3>",
        _entries_table(q.top_negative, has_layers),
    ]
    heatmaps = []
    for direction, entries in (("positive", q.top_positive), ("negative", q.top_negative)):
        for e in entries:
            if e.tokens is not None and e.token_scores is not None:
                heatmaps.append(
                    token_heatmap_html(
                        e.tokens, e.token_scores, e.score, f"{direction} #{e.rank}: training example {e.train_index}"
                    )
                )
    if heatmaps:
        parts.append("<h3>Token-wise influence</h3>")
        parts.extend(heatmaps)
    parts.append("</section>")
    return "".join(parts)


def _layer_bars(layer_totals: dict[str, float]) -> str:
    if not layer_totals:
        return ""
    peak = max(layer_totals.values(), default=0.0) or 1.0
    rows = ["<h2>Share of |influence| per layer</h2><table><tr><th>layer</th><th>share</th><th></th></tr>"]
    for name, share in layer_totals.items():
        width = max(0.0, 300.0 * share / peak)
        rows.append(
            f'<tr><td>{_esc(name)}</td><td class="num">{share:.1%}</td>'
            f'<td><span class="bar" style="width:{width:.0f}px"></span></td></tr>'
        )
    rows.append("</table>")
    return "".join(rows)


def _distribution_svg(report: InfluenceReport, max_queries: int = 20) -> str:
    """Inline SVG of sorted |score| vs rank on log-log axes, one line per query."""
    if report.scores is None or report.scores.numel() == 0:
        return ""
    curves = []
    for qi in range(min(report.scores.shape[0], max_queries)):
        pts = magnitude_curve(report.scores[qi], max_points=200)
        if pts:
            curves.append(pts)
    if not curves:
        return ""
    lx = [math.log10(r) for c in curves for r, _ in c]
    ly = [math.log10(m) for c in curves for _, m in c]
    x0, x1 = min(lx), max(max(lx), min(lx) + 1e-9)
    y0, y1 = min(ly), max(max(ly), min(ly) + 1e-9)
    w, h, pad = 480, 280, 40

    def px(x: float) -> float:
        return pad + (x - x0) / (x1 - x0) * (w - 2 * pad)

    def py(y: float) -> float:
        return h - pad - (y - y0) / (y1 - y0) * (h - 2 * pad)

    palette = ["#dc2626", "#2563eb", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563"]
    parts = [
        "<h2>Distribution of influence magnitudes</h2>",
        f'<svg width="{w}" height="{h}" role="img">',
        f'<rect x="{pad}" y="{pad}" width="{w - 2 * pad}" height="{h - 2 * pad}" fill="none" stroke="#999"/>',
    ]
    for i, c in enumerate(curves):
        pts = " ".join(f"{px(math.log10(r)):.1f},{py(math.log10(m)):.1f}" for r, m in c)
        parts.append(
            f'<polyline points="{pts}" fill="none" stroke="{palette[i % len(palette)]}" stroke-width="1.2"/>'
        )
    parts += [
        f'<text x="{pad}" y="{h - pad + 14}">1</text>',
        f'<text x="{w - pad}" y="{h - pad + 14}" text-anchor="end">{_esc(_fmt(10 ** x1))}</text>',
        f'<text x="{w / 2}" y="{h - 8}" text-anchor="middle">rank (log scale)</text>',
        f'<text x="{pad - 4}" y="{pad + 4}" text-anchor="end">{_esc(_fmt(10 ** y1))}</text>',
        f'<text x="{pad - 4}" y="{h - pad}" text-anchor="end">{_esc(_fmt(10 ** y0))}</text>',
        f'<text x="12" y="{h / 2}" transform="rotate(-90 12 {h / 2})" text-anchor="middle">|score| (log scale)</text>',
        "</svg>",
        '<p class="meta">Sorted absolute influence vs rank, one line per query'
        + (f" (first {max_queries} queries)" if report.scores.shape[0] > max_queries else "")
        + ". A straight line on these axes indicates a power law (Grosse et al., 2023).</p>",
    ]
    return "".join(parts)


def render_html_report(report: InfluenceReport, title: str = "Influence report") -> str:
    """Render ``report`` as one self-contained HTML document (inline CSS, no scripts, no
    external assets) and return it as a string. See :func:`write_html_report`."""
    n_listed = sum(1 for _ in report.iter_entries())
    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
        f'<p class="meta">strategy: <b>{_esc(report.strategy)}</b> &middot; {len(report.queries)} queries '
        f"&middot; {n_listed} listed training examples",
    ]
    if report.layer_names:
        parts.append(f" &middot; layers: {_esc(', '.join(report.layer_names))}")
    parts.append(
        "</p><p class=\"meta\">A positive score means training on the example made the query's "
        "completion more likely; a negative score, less likely.</p>"
    )
    parts.append(_layer_bars(report.layer_totals or {}))
    parts.append(_distribution_svg(report))
    if len(report.queries) > 1:
        parts.append("<nav><h2>Queries</h2><ol>")
        parts += [f'<li><a href="#query-{i}">{_esc(q.query_id)}</a></li>' for i, q in enumerate(report.queries)]
        parts.append("</ol></nav>")
    parts += [_query_section(i, q) for i, q in enumerate(report.queries)]
    parts.append("</body></html>\n")
    return "".join(parts)


def write_html_report(report: InfluenceReport, path: str | os.PathLike, title: str = "Influence report") -> Path:
    """Write ``report`` as ONE self-contained HTML file.

    The page has a section per query (query text, tables of the top positive and negative
    training examples with scores, per-layer scores and decoded text, and token heatmaps
    with a legend), plus a per-layer share chart and a log-log magnitude plot when the
    report carries that data. CSS is inline, there is no JavaScript and nothing is fetched
    from elsewhere; all text is HTML-escaped. The file is written to a temp file and moved
    into place with ``os.replace``.

    Returns:
        The path written.
    """
    return atomic_write_text(path, render_html_report(report, title))
