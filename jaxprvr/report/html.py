"""``index.html``: one self-contained page (inline CSS, no script, no network) showing the PNGs beside it."""

from __future__ import annotations

import html
from pathlib import Path

from jaxprvr.report.figures import Shown
from jaxprvr.report.runs import Row

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1280px; padding: 0 16px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; border-bottom: 1px solid #ccc; margin-top: 32px; }
h3 { font-size: 15px; margin-top: 22px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; } th { background: #f3f3f3; }
td.l, th.l { text-align: left; } .note { color: #8a4b00; } .muted { color: #777; font-size: 12px; }
figure { margin: 12px 0 20px; } figcaption { color: #555; font-size: 12px; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
code { background: #f5f5f5; padding: 0 3px; }
"""


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def fmt(v) -> str:
    if v is None:
        return "&ndash;"
    return f"{v:.2f}" if isinstance(v, float) else esc(v)


def figure(s: Shown) -> str:
    src = esc(s.file)
    cap = esc(s.title) + (f" &mdash; {esc(s.caption)}" if s.caption else "")
    return (f'<figure><a href="{src}"><img src="{src}" width="{s.width}" height="{s.height}" alt="{esc(s.title)}">'
            f"</a><figcaption>{cap} ({s.width} &times; {s.height} px)</figcaption></figure>")


_LEFT = ' class="l"'


def table(head: list[str], rows: list[list[str]], left: int = 1) -> str:
    """Cells are HTML already (escape before); the first ``left`` columns are left-aligned."""
    th = "".join(f'<th{_LEFT if i < left else ""}>{h}</th>' for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(f'<td{_LEFT if i < left else ""}>{c}</td>' for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def metrics_table(rows: list[Row], with_official: bool) -> str:
    head = ["metric", "value"] + (["official"] if with_official else []) + ["chance"]
    out = []
    for r in rows:
        chance = fmt(r.chance) + ("*" if r.chance_computed else "")
        out.append([esc(r.metric), fmt(r.value)] + ([fmt(r.official)] if with_official else []) + [chance])
    return table(head, out)


def notes(items: list[str]) -> str:
    return "".join(f'<p class="note">{esc(n)}</p>' for n in items if n)


def page(title: str, header: str, sections: list[tuple[str, str]]) -> str:
    body = "".join(f"<h2>{esc(h)}</h2>\n{b}\n" for h, b in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{CSS}</style></head>\n<body><h1>{esc(title)}</h1>\n{header}\n{body}</body></html>\n")


def write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
