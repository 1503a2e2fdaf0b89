"""The report's one HTML page: plain HTML and inline CSS, relative links, no external resources.

The only script is inline and optional: once the page has loaded it counts the images that
rendered and frames any broken one in red (``<body data-images="12/12 loaded">``), which is
what a person scrolling the page and the browser test both look at.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Sequence
from typing import Any

from vbatch.operators.redact import redact_uri

STYLE = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1d1d1f;background:#fafafa}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:16px 0 6px}
table{border-collapse:collapse;margin:6px 0;background:#fff} td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f0f0f3} td.n{text-align:right;font-variant-numeric:tabular-nums}
.status-ok{color:#1a7f37;font-weight:600} .status-bad{color:#c62828;font-weight:600}
.card{display:inline-block;vertical-align:top;width:min-content;min-width:240px;background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px;margin:4px;max-width:100%}
.card .pics{display:flex;gap:4px;align-items:flex-start} .card figure{margin:0;text-align:center}
.card figcaption{font-size:11px;color:#555} .card .meta{font-size:12px;overflow-wrap:anywhere}
.note{color:#8a5a00;font-size:12px} .muted{color:#777} code{font-size:12px}
.plots img{margin:4px;border:1px solid #ddd;background:#fff}
img.broken{outline:3px solid #c62828}
pre{background:#fff;border:1px solid #ddd;padding:8px;overflow:auto;max-height:320px}
"""

SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) {
    if (imgs[i].complete && imgs[i].naturalWidth > 0) { ok++; } else { imgs[i].className += ' broken'; }
  }
  document.body.setAttribute('data-images', ok + '/' + imgs.length + ' loaded');
});
"""


#: the smallest height a thumbnail is displayed at, px
MIN_SHOWN = 110


def esc(value: Any) -> str:
    """``value`` as HTML text. Every text of the report passes here, so this is where the
    credentials of signed URLs (in input URIs, error texts, run.json's facts) are redacted: a
    report is shared more widely than the manifest it describes."""
    return html.escape("" if value is None else redact_uri(str(value)))


def fmt(value: Any) -> str:
    """Numbers for people: thousands separators, 4 significant decimals."""
    if isinstance(value, bool) or value is None:
        return esc(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e6 else f"{value:,.0f}"
    return esc(value)


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
    """An HTML table; cells are escaped unless they are :class:`Raw`."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            text = cell.html if isinstance(cell, Raw) else fmt(cell)
            cells.append(f'<td class="n">{text}</td>' if i in numeric else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


class Raw:
    """Already-escaped HTML for :func:`table`."""

    def __init__(self, html_text: str) -> None:
        self.html = html_text


def kv_table(pairs: Iterable[tuple[str, Any]]) -> str:
    return table(("", ""), [(k, v) for k, v in pairs])


def card(pictures: Sequence[tuple[str, str, int, int]], meta: str) -> str:
    """One row's pictures side by side: ``(src, caption, width, height)``, and its facts."""
    figs: list[str] = []
    for src, cap, w, h in pictures:
        # tiny images are shown at least MIN_SHOWN px tall (the browser scales; the file stays small)
        scale = max(1.0, MIN_SHOWN / max(1, h))
        figs.append(
            f'<figure><img src="{esc(src)}" width="{round(w * scale)}" height="{round(h * scale)}" '
            f'alt="{esc(cap)}"><figcaption>{esc(cap)}</figcaption></figure>'
        )
    return f'<div class="card"><div class="pics">{"".join(figs)}</div><div class="meta">{meta}</div></div>'


def document(title: str, sections: Sequence[str]) -> str:
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width"><title>{esc(title)}</title>'
        f"<style>{STYLE}</style></head><body>{''.join(sections)}"
        f"<script>{SCRIPT}</script></body></html>\n"
    )


def config_block(config: dict[str, Any]) -> str:
    return f"<pre>{esc(json.dumps(config, indent=2, default=str))}</pre>"
