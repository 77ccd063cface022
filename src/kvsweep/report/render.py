"""A report document (sections of paragraphs, tables and images) rendered as Markdown and as one HTML file.

The HTML is self-contained: figures are embedded as base64 ``data:`` URIs, the styles are inline,
there are no scripts, fonts or links to other files, and a Content-Security-Policy meta tag
(``default-src 'none'; img-src data:; style-src 'unsafe-inline'``) keeps a browser from loading anything
else even if something slipped in.
"""

from __future__ import annotations

import base64
import html
import re
import struct
from dataclasses import dataclass
from typing import Union

from .tables import Table

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


@dataclass(frozen=True)
class Image:
    file: str  # the PNG's name in the report folder
    alt: str
    caption: str = ""


Block = Union[str, Table, Image]  # a str is a paragraph; `backticks` mark code


def slug(title: str) -> str:
    """GitHub's anchor of a Markdown heading, so the same ``#anchor`` works in report.md and report.html."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


@dataclass(frozen=True)
class Section:
    title: str
    blocks: tuple[Block, ...]

    @property
    def anchor(self) -> str:
        return slug(self.title)


@dataclass(frozen=True)
class Document:
    title: str
    byline: str
    notices: tuple[str, ...]  # shown first: what is partial, missing or left out
    notice_kind: str  # "complete" or "partial"
    sections: tuple[Section, ...]


# --- Markdown ---------------------------------------------------------------------------------------

def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def markdown_table(t: Table) -> str:
    cells = [[_md_cell(c) for c in t.columns]] + [[_md_cell(c) for c in r] for r in t.rows]
    widths = [max(3, *(len(row[k]) for row in cells)) for k in range(len(t.columns))]

    def line(row: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, t.numeric)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, t.numeric)) + "|"
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def markdown(doc: Document) -> str:
    out = [f"# {doc.title}", "", doc.byline, ""]
    if doc.notice_kind == "complete":
        out += [f"> **Complete.** {' '.join(doc.notices)}"]
    else:
        out += ["> **Partial results:**", ">"] + [f"> - {n}" for n in doc.notices]
    out += ["", "Contents: " + " · ".join(f"[{s.title}](#{s.anchor})" for s in doc.sections), ""]
    for s in doc.sections:
        out += [f"## {s.title}", ""]
        for b in s.blocks:
            if isinstance(b, Table):
                out += [markdown_table(b) if b.rows else "_(none)_", ""]
            elif isinstance(b, Image):
                out += [f"![{b.alt}]({b.file})", ""] + ([f"*{b.caption}*", ""] if b.caption else [])
            else:
                out += [b, ""]
    return "\n".join(out).rstrip() + "\n"


# --- HTML -------------------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; margin: 2rem auto;
       max-width: 1280px; padding: 0 1.5rem; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.7rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.3rem; margin-top: 2.2rem; border-bottom: 1px solid #ddd; padding-bottom: 0.25rem; }
.byline { color: #666; margin-top: 0; }
.notice { border-left: 5px solid; padding: 0.6rem 1rem; margin: 1rem 0; border-radius: 3px; }
.notice.partial { border-color: #d97706; background: #fff7e6; }
.notice.complete { border-color: #15803d; background: #effaf1; }
.notice ul { margin: 0.3rem 0 0 0; padding-left: 1.3rem; }
nav { font-size: 0.95rem; margin: 1rem 0; }
nav a { margin-right: 0.9rem; }
.scroll { overflow-x: auto; margin: 0.8rem 0 1.2rem 0; }
table { border-collapse: collapse; font-size: 0.86rem; font-variant-numeric: tabular-nums; }
th, td { padding: 0.26rem 0.5rem; border-bottom: 1px solid #e5e5e5; white-space: nowrap; }
th { background: #f3f4f6; text-align: left; position: sticky; top: 0; }
td.num, th.num { text-align: right; }
tbody tr:nth-child(even) { background: #fafafa; }
figure { margin: 1rem 0 1.6rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9rem; }
code { background: #f3f4f6; padding: 0 0.25rem; border-radius: 3px; font-size: 0.92em; }
"""


def _inline(s: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(s))


def html_table(t: Table) -> str:
    def cls(num: bool) -> str:
        return ' class="num"' if num else ""

    head = "".join(f"<th{cls(n)}>{html.escape(c)}</th>" for c, n in zip(t.columns, t.numeric))
    body = "\n".join("<tr>" + "".join(f"<td{cls(n)}>{html.escape(c)}</td>" for c, n in zip(r, t.numeric)) + "</tr>" for r in t.rows)
    return f'<div class="scroll"><table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table></div>'


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    return struct.unpack(">II", data[16:24])


def html_image(img: Image, data: bytes) -> str:
    w, h = png_size(data)
    src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    cap = f"<figcaption>{_inline(img.caption)}</figcaption>" if img.caption else ""
    return f'<figure><img src="{src}" alt="{html.escape(img.alt)}" width="{w}" height="{h}" data-file="{html.escape(img.file)}">{cap}</figure>'


def html_document(doc: Document, images: dict[str, bytes]) -> str:
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(doc.title)}</title>", f"<style>{STYLE}</style>", "</head>", "<body>",
        f"<h1>{html.escape(doc.title)}</h1>", f'<p class="byline">{_inline(doc.byline)}</p>',
    ]
    if doc.notice_kind == "complete":
        body = "<strong>Complete.</strong> " + " ".join(_inline(n) for n in doc.notices)
    else:
        body = "<strong>Partial results:</strong><ul>" + "".join(f"<li>{_inline(n)}</li>" for n in doc.notices) + "</ul>"
    parts.append(f'<div class="notice {doc.notice_kind}" id="status">{body}</div>')
    parts.append("<nav>" + "".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in doc.sections) + "</nav>")
    for s in doc.sections:
        parts.append(f'<section id="{s.anchor}"><h2>{html.escape(s.title)}</h2>')
        for b in s.blocks:
            if isinstance(b, Table):
                parts.append(html_table(b) if b.rows else "<p><em>(none)</em></p>")
            elif isinstance(b, Image):
                parts.append(html_image(b, images[b.file]))
            else:
                parts.append(f"<p>{_inline(b)}</p>")
        parts.append("</section>")
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"
