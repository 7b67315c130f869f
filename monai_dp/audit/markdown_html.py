"""The markdown of the audit report as HTML: the small subset the report writes, no dependency.

Handled: ``#`` headings, pipe tables (a header row, a ``|---|`` row, body rows), paragraphs, ``**bold**``,
```code```, ``![alt](file)`` images on a line of their own. Every piece of text is HTML-escaped before the inline
markup is applied, so a patient id or a metadata value cannot inject markup.
"""

from __future__ import annotations

import html
import re

__all__ = ["markdown_to_html"]

_IMAGE = re.compile(r"^!\[([^\]]*)\]\(([^)]*)\)$")
_STYLE = ("body{font-family:sans-serif;max-width:60em;margin:1em auto;line-height:1.4}"
          "table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #bbb;padding:.2em .6em;"
          "text-align:left;vertical-align:top}th{background:#eee}img{max-width:100%;margin:.5em}")


def _inline(text: str) -> str:
    """Escape, then ``**bold**`` and ```code```."""
    out = html.escape(text, quote=True)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _is_rule(line: str) -> bool:
    return bool(line.strip()) and set(line.replace("|", "").strip()) <= set("-: ")


def _table(rows: list[str]) -> str:
    head = "".join(f"<th>{_inline(c)}</th>" for c in _cells(rows[0]))
    body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in _cells(r)) + "</tr>" for r in rows[2:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def markdown_to_html(markdown: str, title: str = "") -> str:
    """A complete HTML page of ``markdown`` (see the module docstring for the subset)."""
    lines, parts, i = markdown.splitlines(), [], 0
    paragraph: list[str] = []

    def flush() -> None:
        if paragraph:
            parts.append("<p>" + " ".join(_inline(p) for p in paragraph) + "</p>")
            paragraph.clear()

    while i < len(lines):
        line = lines[i]
        image = _IMAGE.match(line.strip())
        if line.startswith("|") and i + 1 < len(lines) and _is_rule(lines[i + 1]):
            flush()
            j = i + 2
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            parts.append(_table(lines[i:j]))
            i = j
            continue
        if line.startswith("#"):
            flush()
            level = min(len(line) - len(line.lstrip("#")), 6)
            parts.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif image:
            flush()
            alt, src = (html.escape(g, quote=True) for g in image.groups())
            parts.append(f"<img src=\"{src}\" alt=\"{alt}\">")
        elif not line.strip():
            flush()
        else:
            paragraph.append(line)
        i += 1
    flush()
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head>\n<body>\n" + "\n".join(parts) + "\n</body></html>\n")
