"""Self-contained HTML rendering of influence reports.

:func:`token_heatmap_html` renders one training sequence with its tokens coloured by
token-wise influence (used both in the report's rows and for the W&B ``wandb.Html``
panels); :func:`write_html_report` writes a whole :class:`~.report.InfluenceReport` as a
single HTML file with inline CSS and no scripts or external assets, so it can be opened
offline or attached to a ticket. Every piece of user text is HTML-escaped; numbers show on
hover through ``title`` attributes (no JavaScript needed).

The page reads at a glance: one legend at the top (what the colours, bars and numbers
mean), then per query its text with the completion marked, and one table row per listed
training example with its score, the score's share of the query's total ``|influence|``,
a compact stacked bar of the per-layer contributions and the training text as a token
heatmap.
"""

from __future__ import annotations

import colorsys
import html
import math
import os
from collections.abc import Sequence
from pathlib import Path

from lightning_influence.reporting.layers import block_and_kind, layer_columns, short_layer_names
from lightning_influence.reporting.report import (TOKEN_ALIGNMENTS, InfluenceReport, QueryInfluence, TrainInfluence,
                                                  atomic_write_text, magnitude_curve)
from lightning_influence.errors import ReportError

__all__ = ["token_heatmap_html", "write_html_report", "render_html_report", "heatmap_document", "READING_GUIDE"]

#: The page that explains how to read a score, relative to the repository root.
READING_GUIDE = "docs/reading-scores.md"

# Red for positive (helped the completion), blue for negative (hurt it).
_POS_RGB = (220, 38, 38)
_NEG_RGB = (37, 99, 235)
_MAX_ALPHA = 0.85  # keep black text readable on the strongest colour
# Layer colours avoid red and blue, which mean the sign of a score on this page.
_LAYER_HUES = (170, 35, 280, 95, 320, 55)


def _esc(x: object) -> str:
    return html.escape(str(x), quote=True)


def _fmt(x: float | None) -> str:
    if x is None:
        return ""
    if not math.isfinite(x):
        return str(x)
    return f"{x:.4g}"


def _signed(x: float | None) -> str:
    if x is None:
        return ""
    return f"+{_fmt(x)}" if math.isfinite(x) and x > 0 else _fmt(x)


def _pct(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return ""
    return f"{x:+.1%}" if abs(x) >= 0.001 else f"{x:+.2g}"


def _token_background(score: float | None, scale: float) -> str:
    if score is None or scale <= 0 or not math.isfinite(score) or score == 0:
        return "transparent"
    alpha = min(abs(score) / scale, 1.0) * _MAX_ALPHA
    r, g, b = _POS_RGB if score > 0 else _NEG_RGB
    return f"rgba({r},{g},{b},{alpha:.3f})"


def _display_token(tok: str) -> str:
    # Make invisible tokens visible; pre-wrap keeps ordinary spaces as they are.
    if tok == "":
        return "\u2205"
    return tok.replace("\n", "\u21b5\n").replace("\t", "\u2192\t")


def _shown_scores(token_scores: list[float], alignment: str) -> tuple[list[float | None], float | None]:
    """The score to show on each token, and a leftover score with no token to show it on.

    With ``"next"`` alignment the score at input position ``t`` is the influence of
    learning to predict token ``t + 1`` (position t's output predicts the next token), so we
    show it ON that predicted token: a reader looks for the answer word, and the colour is
    there rather than on the word before it. Nothing predicts the first token (it shows no
    score); the last position predicts nothing in a causal LM (its score is 0), and if it is
    not 0 it is returned as the leftover so that no influence disappears from the display.
    """
    if alignment == "input" or not token_scores:
        return list(token_scores), None
    shown: list[float | None] = [None] + list(token_scores[:-1])
    last = token_scores[-1]
    return shown, (last if math.isfinite(last) and last != 0 else None)


def _token_title(shown: float | None, alignment: str, share: float | None) -> str:
    if shown is None:
        return "no score: nothing predicts the first token"
    text = _signed(shown)
    if share is not None:
        text += f" ({share:.0%} of the sequence's |token scores|)"
    if alignment == "next":
        text += ": influence of learning to predict this token"
    return text


def _gradient_css() -> str:
    pos = "rgba({},{},{},{})".format(*_POS_RGB, _MAX_ALPHA)
    neg = "rgba({},{},{},{})".format(*_NEG_RGB, _MAX_ALPHA)
    return f"linear-gradient(to right,{neg},rgba(255,255,255,0),{pos})"


def _heatmap_legend(alignment: str, guide: str) -> str:
    where = (
        "each token shows the influence of learning to predict it (the score sits on the position before it, "
        "whose output predicts it)"
        if alignment == "next"
        else "each token shows its own score"
    )
    return (
        '<div class="li-legend" style="font-size:0.85em;color:#333;margin:0.3em 0;display:flex;'
        'align-items:center;gap:0.5em;flex-wrap:wrap;">'
        "<span>less likely</span>"
        f'<span style="display:inline-block;width:120px;height:0.9em;border:1px solid #999;'
        f'background:{_gradient_css()};"></span>'
        "<span>more likely</span>"
        f"<span>(red: training on this token made the query&#x27;s completion more likely; blue: less likely; "
        f"{_esc(where)}; intensity relative to this sequence&#x27;s strongest token; hover a token for its score. "
        f"How to read a score: {guide})</span></div>"
    )


def token_heatmap_html(
    tokens: Sequence[str],
    token_scores: Sequence[float],
    score: float | None = None,
    title: str | None = None,
    alignment: str = "input",
    legend: bool = True,
) -> str:
    """Render a token-wise influence heatmap as a self-contained HTML fragment.

    Each token's background is red for positive and blue for negative influence, with
    opacity proportional to ``|shown score| / max |shown score|`` over this sequence (so
    each sequence uses its full colour range). Hovering a token shows its score (``title``;
    also in ``data-score``). All styling is inline so the fragment renders identically inside
    a W&B panel and in the standalone report; tokens and title are HTML-escaped.

    Args:
        tokens: decoded tokens of the training sequence.
        token_scores: token-wise influence, same length as ``tokens``; ``token_scores[t]`` is
            the score at input position ``t``.
        score: total influence score of the sequence (default: sum of ``token_scores``).
        title: optional heading.
        alignment: ``"input"`` (a score is about its own token) or ``"next"`` (causal LM: the
            score at position t is about token t+1, and is shown there).
        legend: include the colour legend (the standalone report has one per page instead).

    Returns:
        An HTML string (a ``<div>``).
    """
    tokens = [str(t) for t in tokens]
    token_scores = [float(s) for s in token_scores]
    if len(tokens) != len(token_scores):
        raise ReportError(f"got {len(tokens)} tokens and {len(token_scores)} token scores")
    if alignment not in TOKEN_ALIGNMENTS:
        raise ReportError(f"alignment must be one of {TOKEN_ALIGNMENTS}, got {alignment!r}")
    token_sum = math.fsum(s for s in token_scores if math.isfinite(s))
    if score is None:
        score = token_sum
    shown, leftover = _shown_scores(token_scores, alignment)
    finite = [abs(s) for s in shown + [leftover] if s is not None and math.isfinite(s)]
    scale = max(finite, default=0.0)
    abs_total = math.fsum(finite)

    parts = ['<div class="li-heatmap" style="font-family:sans-serif;">']
    if title:
        parts.append(
            f'<div style="font-weight:bold;margin-bottom:0.2em;">{_esc(title)}</div>'
            f'<div style="font-size:0.85em;color:#333;">score <b>{_esc(_signed(score))}</b> '
            f"(sum of token scores {_esc(_signed(token_sum))}; strongest token &plusmn;{_esc(_fmt(scale))})</div>"
        )
    if legend:
        parts.append(_heatmap_legend(alignment, _esc(READING_GUIDE)))
    parts.append(
        '<div class="li-tokens" style="font-family:monospace;white-space:pre-wrap;'
        'word-break:break-word;line-height:1.6;">'
    )
    for tok, s in zip(tokens, shown):
        share = abs(s) / abs_total if s is not None and abs_total > 0 and math.isfinite(s) else None
        data = "" if s is None else f' data-score="{s!r}"'
        parts.append(
            f'<span class="li-tok" title="{_esc(_token_title(s, alignment, share))}"{data} '
            f'style="background:{_token_background(s, scale)};border-radius:2px;">{_esc(_display_token(tok))}</span>'
        )
    if leftover is not None:
        parts.append(
            f'<span class="li-tok li-end" title="{_esc(_signed(leftover))}: score at the last position, '
            f'which predicts no token" data-score="{leftover!r}" '
            f'style="background:{_token_background(leftover, scale)};border-radius:2px;">\u220e</span>'
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
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 1.5em auto;
       max-width: 1200px; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { margin-bottom: 0.2em; font-size: 1.6em; }
h2 { font-size: 1.25em; margin: 1.2em 0 0.4em 0; }
h3 { font-size: 1em; margin: 0.9em 0 0.2em 0; }
.meta, .count { color: #555; font-size: 0.9em; }
.legend { background: #f8fafc; border: 1px solid #e2e8f0; border-radius: 6px; padding: 0.6em 1em;
          font-size: 0.9em; }
.legend ul { margin: 0.3em 0; padding-left: 1.2em; }
.legend li { margin: 0.2em 0; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; vertical-align: middle; border-radius: 2px; }
.gradient { display: inline-block; width: 110px; height: 0.9em; vertical-align: middle; border: 1px solid #999; }
.overview { display: flex; flex-wrap: wrap; gap: 2.5em; align-items: flex-start; }
.distribution { max-width: 720px; }
section.query { border-top: 2px solid #cbd5e1; margin-top: 1.8em; padding-top: 0.3em; }
.query-text { white-space: pre-wrap; word-break: break-word; font-family: monospace; font-size: 1.05em;
              background: #f6f6f6; padding: 0.5em; border-radius: 4px; }
.query-text .prompt { color: #444; }
.query-text .completion { font-weight: bold; background: #fef3c7; border-bottom: 2px solid #d97706;
                          border-left: 3px solid #d97706; padding: 0 0.15em; }
table { border-collapse: collapse; width: 100%; margin: 0.3em 0 0.6em 0; font-size: 0.9em; }
th, td { border-bottom: 1px solid #e5e7eb; padding: 0.25em 0.5em; vertical-align: top; text-align: left; }
th { background: #f1f5f9; font-weight: 600; white-space: nowrap; }
td.num { text-align: right; font-family: monospace; white-space: nowrap; }
td.pos { color: #b91c1c; } td.neg { color: #1d4ed8; }
td.text { width: 100%; }
.li-tokens, .plain-text { max-height: 7.5em; overflow: auto; }
.plain-text { font-family: monospace; white-space: pre-wrap; word-break: break-word; }
.lbar { display: inline-flex; width: 140px; height: 0.95em; border: 1px solid #94a3b8; vertical-align: middle;
        background: #fff; }
.lbar span { display: block; height: 100%; }
.ltop { font-size: 0.8em; color: #555; white-space: nowrap; }
.share-bar { display: inline-block; height: 0.9em; vertical-align: middle; }
nav ol { columns: 3; font-size: 0.9em; }
.layer-shares td { vertical-align: middle; }
svg text { font-size: 11px; font-family: sans-serif; fill: #333; }
"""


def _layer_colours(names: Sequence[str]) -> dict[str, str]:
    """One colour per layer: a hue per kind (attn, mlp, ...), darker for earlier blocks, so
    a bar reads as "mostly MLP, late blocks" before anyone hovers it."""
    short = short_layer_names(names)
    kinds: dict[str, list[int]] = {}
    for i, s in enumerate(short):
        kinds.setdefault(block_and_kind(s)[1], []).append(i)
    colours: dict[str, str] = {}
    for ki, idx in enumerate(kinds.values()):
        hue = _LAYER_HUES[ki % len(_LAYER_HUES)] / 360.0
        for j, i in enumerate(idx):
            light = 0.32 + 0.4 * (j / max(len(idx) - 1, 1))
            r, g, b = colorsys.hls_to_rgb(hue, light, 0.6)
            colours[names[i]] = f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"
    return colours


def _segment_style(colour: str, negative: bool) -> str:
    if not negative:
        return f"background:{colour}"
    # A negative contribution: same colour, hatched, so sign is readable without hovering.
    return f"background:repeating-linear-gradient(135deg,{colour} 0 3px,#fff 3px 5px)"


def _layer_bar(entry: TrainInfluence, colours: dict[str, str], short: dict[str, str]) -> str:
    ls = entry.layer_scores or {}
    total = math.fsum(abs(v) for v in ls.values() if math.isfinite(v))
    if not ls or total <= 0:
        return ""
    segs, best = [], None
    for name, v in ls.items():
        if not math.isfinite(v) or v == 0:
            continue
        share = abs(v) / total
        if best is None or share > best[1]:
            best = (name, share, v)
        segs.append(
            f'<span class="lseg" title="{_esc(short.get(name, name))}: {_esc(_signed(v))} ({share:.0%} of |score|)" '
            f'style="width:{100 * share:.2f}%;{_segment_style(colours.get(name, "#888"), v < 0)}"></span>'
        )
    top = ""
    if best is not None:
        top = f'<div class="ltop">{_esc(short.get(best[0], best[0]))} {best[1]:.0%}</div>'
    return f'<span class="lbar">{"".join(segs)}</span>{top}'


def _entries_table(
    qi: int, direction: str, entries: list[TrainInfluence], colours: dict[str, str], short: dict[str, str],
    alignment: str,
) -> str:
    if not entries:
        return '<p class="count"><i>none</i></p>'
    has_layers = any(e.layer_scores for e in entries)
    has_norm = any(e.share is not None for e in entries)
    head = "<tr><th>rank</th><th>train index</th><th>score</th>"
    if has_norm:
        head += '<th title="score / sum |score| over all scored training examples of this query">share</th>'
        head += '<th title="(score - mean) / std over this query\'s scores">z</th>'
    head += "<th>layers</th>" if has_layers else ""
    head += "<th>training text</th></tr>"
    rows = [f'<table class="entries {direction}">{head}']
    for e in entries:
        sign = "pos" if e.score > 0 else "neg" if e.score < 0 else ""
        if e.tokens is not None and e.token_scores is not None:
            text = token_heatmap_html(e.tokens, e.token_scores, e.score, alignment=alignment, legend=False)
        elif e.text is not None:
            text = f'<div class="plain-text">{_esc(e.text)}</div>'
        else:
            text = ""
        cells = [
            f'<td class="num">{e.rank}</td>',
            f'<td class="num">{e.train_index}</td>',
            f'<td class="num {sign}">{_esc(_signed(e.score))}</td>',
        ]
        if has_norm:
            cells.append(f'<td class="num {sign}">{_esc(_pct(e.share))}</td>')
            cells.append(f'<td class="num">{"" if e.z_score is None else f"{e.z_score:+.1f}"}</td>')
        if has_layers:
            cells.append(f"<td>{_layer_bar(e, colours, short)}</td>")
        cells.append(f'<td class="text">{text}</td>')
        rows.append(f'<tr class="entry" id="q{qi}-{direction}-{e.rank}">{"".join(cells)}</tr>')
    rows.append("</table>")
    return "".join(rows)


def _query_text_html(q: QueryInfluence) -> str:
    if q.prompt_length is None:
        return f'<div class="query-text">{_esc(q.query_text)}</div>'
    return (
        f'<div class="query-text"><span class="prompt" title="prompt">{_esc(q.prompt)}</span>'
        f'<span class="completion" title="completion: the measured part (its log-probability)">'
        f"{_esc(q.completion)}</span></div>"
    )


def _count_line(q: QueryInfluence, direction: str) -> str:
    listed = len(q.top_positive if direction == "positive" else q.top_negative)
    n = q.num_positive if direction == "positive" else q.num_negative
    if n is None or q.num_scored is None:
        return ""
    word = "positive" if direction == "positive" else "negative"
    return (
        f'<p class="count">{n} of {q.num_scored} scored training examples have a {word} score; '
        f"showing {listed}.</p>"
    )


def _query_section(qi: int, q: QueryInfluence, colours: dict[str, str], short: dict[str, str], alignment: str) -> str:
    stats = ""
    if q.num_scored is not None and q.sum_abs is not None:
        stats = (
            f'<p class="meta">{q.num_scored} training examples scored; sum of |score| '
            f"{_esc(_fmt(q.sum_abs))} (the denominator of &ldquo;share&rdquo;).</p>"
        )
    return "".join(
        [
            f'<section class="query" id="query-{qi}">',
            f"<h2>Query {_esc(q.query_id)}</h2>",
            _query_text_html(q),
            stats,
            "<h3>Most positive influence</h3>",
            _count_line(q, "positive"),
            _entries_table(qi, "positive", q.top_positive, colours, short, alignment),
            "<h3>Most negative influence</h3>",
            _count_line(q, "negative"),
            _entries_table(qi, "negative", q.top_negative, colours, short, alignment),
            "</section>",
        ]
    )


def _layer_share_table(layer_totals: dict[str, float], colours: dict[str, str]) -> str:
    names = list(layer_totals)
    short = short_layer_names(names)
    groups = layer_columns(names)
    rows_src = [(s, [n], colours.get(n, "#888")) for s, n in zip(short, names)]
    if len(groups) < len(names):  # many layers: one row per group, every layer on hover
        rows_src = [(g, [names[i] for i in idx], colours.get(names[idx[-1]], "#888")) for g, idx in groups.items()]
    shares = [(label, math.fsum(layer_totals[n] for n in members), colour, members)
              for label, members, colour in rows_src]
    peak = max((s for _, s, _, _ in shares), default=0.0) or 1.0
    rows = ['<div class="layer-shares"><h2>Share of |influence| per layer</h2><table style="width:auto">'
            "<tr><th>layer</th><th>share</th><th></th></tr>"]
    for label, share, colour, members in shares:
        title = ", ".join(members)
        rows.append(
            f'<tr title="{_esc(title)}"><td><span class="swatch" style="background:{colour}"></span> {_esc(label)}</td>'
            f'<td class="num">{share:.1%}</td>'
            f'<td><span class="share-bar" style="width:{200.0 * share / peak:.0f}px;background:{colour}"></span></td>'
            "</tr>"
        )
    rows.append("</table></div>")
    return "".join(rows)


_SUPERSCRIPT = str.maketrans("-0123456789", "\u207b\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079")


def _decade_label(exponent: int) -> str:
    if exponent == 0:
        return "1"
    if exponent == 1:
        return "10"
    return "10" + str(exponent).translate(_SUPERSCRIPT)


_PALETTE = ["#dc2626", "#2563eb", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563", "#ca8a04", "#db2777",
            "#65a30d"]


def _distribution_svg(report: InfluenceReport, max_queries: int = 20) -> str:
    """Inline SVG of sorted |score| vs rank on log-log axes, one line per query, with a tick
    and grid line at every decade and margins wide enough for every label."""
    if report.scores is None or report.scores.numel() == 0:
        return ""
    curves = []
    ids = [q.query_id for q in report.queries]
    for qi in range(min(report.scores.shape[0], max_queries)):
        pts = magnitude_curve(report.scores[qi], max_points=200)
        if pts:
            curves.append((ids[qi] if qi < len(ids) else str(qi), pts))
    if not curves:
        return ""
    lx = [math.log10(r) for _, c in curves for r, _ in c]
    ly = [math.log10(m) for _, c in curves for _, m in c]
    # Whole decades: the axes always carry at least two labelled ticks (issue: only min/max).
    x0, x1 = 0, max(1, math.ceil(max(lx) - 1e-9))
    y0, y1 = math.floor(min(ly) + 1e-9), math.ceil(max(ly) - 1e-9)
    if y1 <= y0:
        y1 = y0 + 1
    left, right, top, bottom = 64, 16, 12, 44
    pw, ph = 420, 240
    legend_w = 190
    w, h = left + pw + right + legend_w, top + ph + bottom

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top + ph - (y - y0) / (y1 - y0) * ph

    parts = [
        '<div class="distribution"><h2>Distribution of influence magnitudes</h2>',
        f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" '
        'aria-label="sorted absolute influence against rank, log-log axes">',
    ]
    ystep = max(1, math.ceil((y1 - y0) / 8))  # at most ~8 labels, never overlapping
    for e in range(y0, y1 + 1):
        y = py(e)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#e5e7eb"/>')
        if (e - y0) % ystep == 0:
            parts.append(f'<text class="ytick" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_decade_label(e)}</text>')
    xstep = max(1, math.ceil((x1 - x0) / 8))
    for e in range(x0, x1 + 1):
        x = px(e)
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + ph}" stroke="#e5e7eb"/>')
        if (e - x0) % xstep == 0:
            parts.append(f'<text class="xtick" x="{x:.1f}" y="{top + ph + 16}" text-anchor="middle">{_decade_label(e)}</text>')
    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#94a3b8"/>')
    for i, (_qid, c) in enumerate(curves):
        pts = " ".join(f"{px(math.log10(r)):.1f},{py(math.log10(m)):.1f}" for r, m in c)
        parts.append(
            f'<polyline points="{pts}" fill="none" stroke="{_PALETTE[i % len(_PALETTE)]}" stroke-width="1.4"/>'
        )
    parts += [
        f'<text x="{left + pw / 2}" y="{h - 8}" text-anchor="middle">rank (log scale)</text>',
        f'<text x="14" y="{top + ph / 2}" transform="rotate(-90 14 {top + ph / 2})" '
        'text-anchor="middle">|score| (log scale)</text>',
    ]
    lx0 = left + pw + right + 8
    for i, (qid, _c) in enumerate(curves):
        y = top + 8 + i * 15
        if y > top + ph + 20:
            break
        label = qid if len(qid) <= 24 else qid[:23] + "\u2026"
        parts.append(
            f'<line x1="{lx0}" y1="{y}" x2="{lx0 + 16}" y2="{y}" stroke="{_PALETTE[i % len(_PALETTE)]}" '
            f'stroke-width="2"/><text x="{lx0 + 21}" y="{y + 4}"><title>{_esc(qid)}</title>{_esc(label)}</text>'
        )
    parts += [
        "</svg>",
        '<p class="meta">Sorted |score| vs rank, one line per query'
        + (f" (first {max_queries} queries)" if report.scores.shape[0] > max_queries else "")
        + ". A straight line on these axes indicates a power law (Grosse et al., 2023): a few training "
        "examples carry most of the influence.</p></div>",
    ]
    return "".join(parts)


def _page_legend(report: InfluenceReport, guide: str) -> str:
    token_where = (
        "each token is coloured by the influence of learning to <i>predict it</i>: a causal LM&#x27;s score "
        "sits on the position before the token, whose output predicts it, and is shown on the predicted token "
        "so that the answer word carries its own colour"
        if report.token_alignment == "next"
        else "each token is coloured by its own score"
    )
    pos = "rgba({},{},{},{})".format(*_POS_RGB, _MAX_ALPHA)
    neg = "rgba({},{},{},{})".format(*_NEG_RGB, _MAX_ALPHA)
    return (
        '<div class="legend"><b>How to read this report</b><ul>'
        f'<li><b>score</b>: <span style="color:{pos}">positive</span> means training on the example made the '
        "query&#x27;s completion more likely, "
        f'<span style="color:{neg}">negative</span> less likely. Its size is an unnormalised inner product '
        "(gradients through an inverse curvature with small damping), so 1e6 is not alarming: compare scores "
        "within a query. <b>share</b> = score / sum of |score| over every scored training example of the query; "
        "<b>z</b> = standard deviations from the query&#x27;s mean score.</li>"
        '<li><b>query</b>: the <span class="completion" style="font-weight:bold;background:#fef3c7;'
        'border-bottom:2px solid #d97706">completion</span> is the measured part (its log-probability given '
        "the prompt).</li>"
        "<li><b>layers</b>: one bar segment per tracked layer, width = its share of the example&#x27;s |score| "
        "(colour key: the per-layer table below); a hatched segment pulls the other way. Hover for numbers.</li>"
        f'<li><b>training text</b>: <span class="gradient" style="background:{_gradient_css()}"></span> '
        f"{token_where}; intensity is relative to the strongest token of that sequence. Hover a token for its "
        "score.</li>"
        f"<li>More: {guide}.</li></ul></div>"
    )


def _guide_html(guide_href: str | None) -> str:
    if guide_href:
        return f'<a href="{_esc(guide_href)}">how to read a score ({_esc(READING_GUIDE)})</a>'
    return f"how to read a score: {_esc(READING_GUIDE)} in the lightning-influence repository"


def render_html_report(report: InfluenceReport, title: str = "Influence report", guide_href: str | None = None) -> str:
    """Render ``report`` as one self-contained HTML document (inline CSS, no scripts, no
    external assets) and return it as a string. ``guide_href`` links the legend to the
    reading guide (docs/reading-scores.md); see :func:`write_html_report`."""
    n_listed = sum(1 for _ in report.iter_entries())
    names = list(report.layer_names)
    for *_, e in report.iter_entries():
        names += [n for n in (e.layer_scores or {}) if n not in names]
    colours = _layer_colours(names)
    short = dict(zip(names, short_layer_names(names)))
    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
        f'<p class="meta">strategy: <b>{_esc(report.strategy)}</b> &middot; {len(report.queries)} queries '
        f"&middot; {n_listed} listed training examples"
        + (f" &middot; {len(names)} tracked layers" if names else "")
        + "</p>",
        _page_legend(report, _guide_html(guide_href)),
        '<div class="overview">',
        _layer_share_table(report.layer_totals, colours) if report.layer_totals else "",
        _distribution_svg(report),
        "</div>",
    ]
    if len(report.queries) > 1:
        parts.append("<nav><h2>Queries</h2><ol>")
        parts += [f'<li><a href="#query-{i}">{_esc(q.query_id)}</a></li>' for i, q in enumerate(report.queries)]
        parts.append("</ol></nav>")
    parts += [_query_section(i, q, colours, short, report.token_alignment) for i, q in enumerate(report.queries)]
    parts.append("</body></html>\n")
    return "".join(parts)


def _default_guide_href(path: Path) -> str | None:
    # In a source checkout (e.g. `make demo` writing demo_output/), link the guide relative to
    # the report so it opens offline; an installed package has no docs/ and gets the name only.
    guide = Path(__file__).resolve().parents[2] / READING_GUIDE
    if not guide.is_file():
        return None
    try:
        return Path(os.path.relpath(guide, path.resolve().parent)).as_posix()
    except ValueError:  # another drive on Windows
        return None


def write_html_report(
    report: InfluenceReport, path: str | os.PathLike, title: str = "Influence report", guide_href: str | None = None
) -> Path:
    """Write ``report`` as ONE self-contained HTML file.

    The page has one legend, a per-layer share chart and a log-log magnitude plot (when the
    report carries that data), then a section per query: its text with the completion
    marked, how many scores are positive and negative, and a row per listed training
    example with score, share of the query's |influence|, z-score, a stacked bar of the
    per-layer contributions and the training text as a token heatmap. CSS is inline, there
    is no JavaScript and nothing is fetched from elsewhere; all text is HTML-escaped. The
    file is written to a temp file and moved into place with ``os.replace``.

    Args:
        report: the report.
        path: the file to write.
        title: the page title.
        guide_href: link target of the reading guide in the legend; default: the guide in
            this source checkout, relative to ``path``, when there is one.

    Returns:
        The path written.
    """
    path = Path(path)
    href = guide_href if guide_href is not None else _default_guide_href(path)
    return atomic_write_text(path, render_html_report(report, title, guide_href=href))
