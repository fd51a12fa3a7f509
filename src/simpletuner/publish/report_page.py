"""The run page's HTML: one self-contained file (inline SVG charts, inline CSS, no scripts); images are
referenced by paths relative to output_dir, where the page lives."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class DatasetSummary:
    name: str
    images: int
    buckets: tuple[tuple[str, int], ...]  # ("WxH", images)
    skipped: tuple[str, ...]  # "3 too small (e.g. a.png: ...)"


@dataclass(frozen=True)
class SkippedFile:
    """One image the run left out (a line of output_dir/skipped.jsonl); `path` relative to its dataset."""

    dataset: str
    path: str
    stage: str
    reason: str


SKIPPED_SHOWN = 200  # rows of the skipped-files table; the rest are counted


@dataclass
class PageData:
    title: str
    status: str  # "training", "finished", "failed: ..."
    step: int
    total_steps: int
    facts: list[tuple[str, str]] = field(default_factory=list)  # (label, value)
    loss: list[tuple[int, float]] = field(default_factory=list)
    lr: list[tuple[int, float]] = field(default_factory=list)
    throughput: list[tuple[str, str]] = field(default_factory=list)
    images: dict[int, dict[str, str]] = field(default_factory=dict)  # step -> column -> relative file
    prompts: dict[str, str] = field(default_factory=dict)  # column -> prompt
    datasets: list[DatasetSummary] = field(default_factory=list)
    scan_report: str = ""  # the scan's printed report (files skipped when reading, with reasons)
    skipped: list[SkippedFile] = field(default_factory=list)  # every image left out of the run so far


CSS = """
body{font-family:system-ui,sans-serif;margin:24px;background:#fafafa;color:#222}
h1{margin:0 0 4px}h2{margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
.status{color:#555}.charts{display:flex;gap:24px;flex-wrap:wrap}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
.grid img{width:192px;height:auto;image-rendering:pixelated;display:block}
.grid th{font-weight:normal;font-size:12px;max-width:192px}
svg{background:#fff;border:1px solid #ddd}
"""


def render_page(data: PageData) -> str:
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(data.title)}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>{_e(data.title)}</h1><p class=\"status\">{_e(data.status)}: step {data.step} of "
             f"{data.total_steps}</p>", _table(data.facts), "<h2>Curves</h2><div class=\"charts\">",
             line_chart(data.loss, "loss"), line_chart(data.lr, "learning rate"), "</div>",
             "<h2>Throughput</h2>", _table(data.throughput) or "<p>No logging step yet.</p>",
             "<h2>Validation images</h2>", _grid(data), "<h2>Datasets</h2>", _datasets(data.datasets),
             "<h2>Skipped files</h2>", _skipped(data.skipped), _scan(data.scan_report), "</body></html>"]
    return "\n".join(part for part in parts if part)


def line_chart(points: Sequence[tuple[int, float]], title: str, width: int = 480, height: int = 240) -> str:
    """An SVG line chart of (x, y) points with its axis ranges written at the corners."""
    finite = [(x, y) for x, y in points if math.isfinite(y)]
    head = f"<figure><figcaption>{_e(title)}</figcaption><svg role=\"img\" aria-label=\"{_e(title)}\" " \
           f"width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\">"
    if not finite:
        return head + f"<text x=\"20\" y=\"{height // 2}\">no data yet</text></svg></figure>"
    left, right, top, bottom = 60, width - 10, 10, height - 30
    xs, ys = [x for x, _ in finite], [y for _, y in finite]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys)
    if y1 == y0:  # a flat line sits in the middle
        margin = abs(y0) * 0.5 or 1.0
        y0, y1 = y0 - margin, y1 + margin
    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (right - left)
    def sy(y: float) -> float:
        return bottom - (y - y0) / (y1 - y0) * (bottom - top)
    line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in finite)
    return (head + f"<rect x=\"{left}\" y=\"{top}\" width=\"{right - left}\" height=\"{bottom - top}\" fill=\"none\" "
            f"stroke=\"#ccc\"/><polyline fill=\"none\" stroke=\"#1f6fd1\" stroke-width=\"2\" points=\"{line}\"/>"
            f"<text x=\"4\" y=\"{top + 10}\" font-size=\"11\">{y1:.3g}</text>"
            f"<text x=\"4\" y=\"{bottom}\" font-size=\"11\">{y0:.3g}</text>"
            f"<text x=\"{left}\" y=\"{height - 10}\" font-size=\"11\">step {x0:g}</text>"
            f"<text x=\"{right - 60}\" y=\"{height - 10}\" font-size=\"11\">step {x1:g}</text></svg></figure>")


def _grid(data: PageData) -> str:
    if not data.images:
        return "<p>No validation images yet.</p>"
    columns = sorted({column for row in data.images.values() for column in row})
    head = "".join(f"<th title=\"{_e(data.prompts.get(c, ''))}\">{_e(c)}<br>{_e(data.prompts.get(c, ''))}</th>"
                   for c in columns)
    rows = []
    for step in sorted(data.images):
        cells = "".join(f"<td><img src=\"{_e(data.images[step][c])}\" alt=\"step {step} {_e(c)}\"></td>"
                        if c in data.images[step] else "<td></td>" for c in columns)
        rows.append(f"<tr><th>step {step}{' (base model)' if step == 0 else ''}</th>{cells}</tr>")
    return f"<table class=\"grid\"><tr><th></th>{head}</tr>{''.join(rows)}</table>"


def _datasets(datasets: list[DatasetSummary]) -> str:
    out = []
    for dataset in datasets:
        buckets = "".join(f"<tr><td>{_e(size)}</td><td>{count}</td></tr>" for size, count in dataset.buckets)
        skipped = ("<ul>" + "".join(f"<li>{_e(line)}</li>" for line in dataset.skipped) + "</ul>"
                   if dataset.skipped else "<p>None.</p>")
        out.append(f"<h3>{_e(dataset.name)}: {dataset.images} images</h3><table><tr><th>bucket</th><th>images</th>"
                   f"</tr>{buckets}</table><p>Left out when bucketing:</p>{skipped}")
    return "".join(out) or "<p>No dataset.</p>"


def _skipped(files: list[SkippedFile]) -> str:
    if not files:
        return "<p>None: every image found was used.</p>"
    rows = "".join(f"<tr><td>{_e(f.dataset)}</td><td>{_e(f.path)}</td><td>{_e(f.stage)}</td><td>{_e(f.reason)}</td>"
                   "</tr>" for f in files[:SKIPPED_SHOWN])
    more = (f"<p>and {len(files) - SKIPPED_SHOWN} more, {len(files)} in all (every one in skipped.jsonl).</p>"
            if len(files) > SKIPPED_SHOWN else "")
    return (f"<p>{len(files)} image(s) left out of training, with the reason:</p><table class=\"skipped\">"
            f"<tr><th>dataset</th><th>file</th><th>stage</th><th>reason</th></tr>{rows}</table>{more}")


def _scan(report: str) -> str:
    if not report:
        return ""
    return ("<h2>The scan</h2><details open><summary>Every dataset as the scan read it: files skipped when "
            f"reading, with reasons</summary><pre>{_e(report)}</pre></details>")


def _table(rows: list[tuple[str, str]]) -> str:
    if not rows:
        return ""
    return "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows) + "</table>"


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)
