"""The report and the W&B heatmap files, rendered in a real (headless) Chromium.

Checks what a reader sees, not the HTML source: no console errors, the rows, layer bars and
token heatmaps are visible, a token shows its score on hover, the completion is marked, and
no label of the magnitude plot is clipped. Skipped, with the reason, where Chromium cannot
be found or installed (see tests/browser.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from lightning_influence.reporting import log_report, write_html_report

from .browser import chromium_or_reason, console_errors, start_chromium
from .test_reporting import _SCORES, PROMPT_LENGTHS, QUERY_TEXTS, _report


@pytest.fixture(scope="module")
def browser():
    found = chromium_or_reason()
    if isinstance(found, str):
        pytest.skip(f"headless Chromium unavailable: {found}")
    driver = start_chromium(*found)
    try:
        yield driver
    finally:
        driver.quit()


def _rect(driver, element) -> dict:
    return driver.execute_script("const r = arguments[0].getBoundingClientRect();"
                                 "return {left: r.left, right: r.right, top: r.top, bottom: r.bottom,"
                                 " width: r.width, height: r.height};", element)


def _background(driver, element) -> str:
    return driver.execute_script("return getComputedStyle(arguments[0]).backgroundColor;", element)


def test_report_renders_in_chromium(browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    report = _report(token_alignment="next")
    path = write_html_report(report, tmp_path / "report.html")
    console_errors(browser)  # drop anything from before this page
    browser.get(path.resolve().as_uri())
    assert console_errors(browser) == []

    # one legend, visible
    legends = browser.find_elements(By.CSS_SELECTOR, ".legend")
    assert len(legends) == 1 and legends[0].is_displayed()
    assert browser.find_elements(By.CSS_SELECTOR, ".li-legend") == []

    # a visible row per listed example
    entries = list(report.iter_entries())
    rows = browser.find_elements(By.CSS_SELECTOR, "tr.entry")
    assert len(rows) == len(entries)
    assert all(r.is_displayed() and r.size["height"] > 0 for r in rows)

    # per-layer bars: compact (one line), segments filling the bar in proportion to |layer score|
    bars = browser.find_elements(By.CSS_SELECTOR, ".lbar")
    assert len(bars) == len(entries)
    for (_qi, _q, _d, e), bar in zip(entries, bars):
        assert bar.is_displayed() and bar.size["height"] < 24
        segs = bar.find_elements(By.CSS_SELECTOR, ".lseg")
        widths = [_rect(browser, s)["width"] for s in segs]
        total = sum(abs(v) for v in e.layer_scores.values())
        inner = _rect(browser, bar)["width"] - 2  # 1px border each side
        expected = [inner * abs(v) / total for v in e.layer_scores.values()]
        assert widths == pytest.approx(expected, abs=1.0)

    # heatmap tokens: visible, score on hover, strongest colour on the predicted token
    qi, _q, direction, e = next(t for t in entries if t[3].tokens is not None)
    row = browser.find_element(By.ID, f"q{qi}-{direction}-{e.rank}")
    tokens = row.find_elements(By.CSS_SELECTOR, ".li-tok:not(.li-end)")
    assert [t.text for t in tokens] == e.tokens  # white-space: pre-wrap keeps spaces
    assert all(t.is_displayed() for t in tokens)
    target = tokens[2]
    ActionChains(browser).move_to_element(target).perform()
    shown = e.token_scores[1]  # "next" alignment: position 1's score is shown on token 2
    title = target.get_attribute("title")
    assert title.startswith(f"{shown:+.4g}" if shown < 0 else f"+{shown:.4g}")
    assert "predict this token" in title
    assert _background(browser, target) != "rgba(0, 0, 0, 0)"

    # the completion is marked, and looks different from the prompt
    texts = browser.find_elements(By.CSS_SELECTOR, ".query-text")
    assert len(texts) == len(QUERY_TEXTS)
    for box, text, n in zip(texts, QUERY_TEXTS, PROMPT_LENGTHS):
        assert box.is_displayed()
        if n is None:
            continue
        completion = box.find_element(By.CSS_SELECTOR, ".completion")
        prompt = box.find_element(By.CSS_SELECTOR, ".prompt")
        assert completion.is_displayed() and completion.text == text[n:]
        assert _background(browser, completion) != _background(browser, prompt)

    # the magnitude plot: decade ticks, and no label outside the drawing (the old y label was clipped)
    svg = browser.find_element(By.CSS_SELECTOR, ".distribution svg")
    box = _rect(browser, svg)
    labels = svg.find_elements(By.TAG_NAME, "text")
    assert len(svg.find_elements(By.CSS_SELECTOR, "text.ytick")) >= 2
    for label in labels:
        r = _rect(browser, label)
        assert box["left"] <= r["left"] and r["right"] <= box["right"] + 0.5, label.text
        assert box["top"] <= r["top"] and r["bottom"] <= box["bottom"] + 0.5, label.text
    assert any(lb.text == "|score| (log scale)" for lb in labels)

    # nothing wider than the window
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1;")
    png = tmp_path / "report.png"
    assert browser.save_screenshot(str(png)) and png.stat().st_size > 10_000
    assert console_errors(browser) == []


def test_wandb_heatmap_file_renders_in_chromium(browser, tmp_path, monkeypatch):
    from lightning.pytorch.utilities import rank_zero_only
    from selenium.webdriver.common.by import By

    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setattr(rank_zero_only, "rank", 0, raising=False)
    report = _report(token_alignment="next")
    run = wandb.init(mode="offline", dir=str(tmp_path), project="test")
    try:
        log_report(report, run, log_plots=False)
    finally:
        run.finish()
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    files = sorted((run_dir / "files" / "media" / "html").rglob("*.html"))
    with_tokens = [(qi, d, e) for qi, _q, d, e in report.iter_entries() if e.tokens is not None]
    assert len(files) == len(with_tokens)
    qi, direction, e = with_tokens[0]
    (path,) = [p for p in files if f"/{direction}_{e.rank:03d}_train{e.train_index}_" in p.as_posix()
               and f"/{report.queries[qi].query_id}/" in p.as_posix()]
    console_errors(browser)
    browser.get(Path(path).resolve().as_uri())
    assert console_errors(browser) == []
    legend = browser.find_element(By.CSS_SELECTOR, ".li-legend")  # a W&B panel stands alone: its own legend
    assert legend.is_displayed() and "predict" in legend.text
    tokens = browser.find_elements(By.CSS_SELECTOR, ".li-tok")
    # the last position's score (non-zero in this synthetic data) shows on an end marker
    assert len(tokens) == len(e.tokens) + 1 and all(t.is_displayed() for t in tokens)
    scores = [t.get_attribute("data-score") for t in tokens]
    assert scores[0] is None  # nothing predicts the first token
    assert [float(s) for s in scores[1:]] == pytest.approx(e.token_scores)
    for t in tokens[1:]:
        assert t.get_attribute("title").split(" ")[0].rstrip(":").lstrip("+") == f"{float(t.get_attribute('data-score')):.4g}"
    assert math.isclose(sum(e.token_scores), _SCORES[qi, e.train_index].item(), rel_tol=1e-6)
