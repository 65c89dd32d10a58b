"""`tokweight inspect --html FILE`: the rows as one self-contained page (no script, no external
file), its markup well-formed XML so any parser reads it. Colours and titles come from
`cli.row_style`, so the page and the terminal agree."""
import html
import os

from megatron_tokweight.cli.row_style import (
    HEAT_STOPS,
    PROMPT_COLOR,
    heat_rgb,
    ink_rgb,
    padding_title,
    row_title,
    segment_title,
    shown,
    top_weight,
)
from megatron_tokweight.common.files import atomic_file

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #1d1d1f; background: #fff; }
h1 { font-size: 20px; margin: 0 0 4px; }
h2 { font-size: 16px; margin: 28px 0 8px; padding-top: 8px; border-top: 2px solid #2b6cb0; }
.settings { color: #444; margin: 0 0 12px; }
.legend { display: flex; align-items: center; gap: 10px; flex-wrap: wrap; margin-bottom: 8px; }
.scale { display: inline-flex; border: 1px solid #999; }
.scale span { padding: 1px 8px; font: 12px ui-monospace, monospace; }
table.samples { border-collapse: collapse; font-size: 13px; margin-bottom: 10px; }
table.samples th, table.samples td { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
table.samples th { background: #f0f3f8; }
table.samples td.task { text-align: left; }
.sample { border-left: 4px solid #2b6cb0; margin: 8px 0; padding: 2px 0 2px 10px; }
.head { font-size: 13px; font-weight: 600; color: #2b6cb0; margin-bottom: 3px; }
.tokens { font: 13px/1.9 ui-monospace, SFMono-Regular, Menlo, monospace; white-space: pre-wrap;
          overflow-wrap: anywhere; }
.tokens span:hover { outline: 2px solid #1a4f8b; }
.pad { color: #777; font-style: italic; font-size: 13px; margin: 8px 0; }
"""


def _hex(rgb) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _esc(text) -> str:
    return html.escape(str(text), quote=True)


def _legend(top: float) -> str:
    steps = []
    for k in range(len(HEAT_STOPS) * 2 - 1):
        weight = top * k / (len(HEAT_STOPS) * 2 - 2)
        back = heat_rgb(weight, top)
        steps.append(f'<span style="background:{_hex(back)};color:{_hex(ink_rgb(back))}">{weight:.3g}</span>')
    return (f'<div class="legend"><span style="color:{_hex(PROMPT_COLOR)}">prompt (not trained)</span>'
            f'<span>trained target, colour = its loss weight (0 to the largest shown):</span><span class="scale">{"".join(steps)}</span></div>')


def _sample_table(view) -> str:
    rows = [("<tr><th>positions</th><th>sample</th><th>task</th><th>n</th><th>weight</th>"
             "<th>targets here</th><th>weight here</th></tr>")]
    for s in view.samples:
        stop = s.start + s.real
        here = int(view.target[s.start:stop].sum())
        weight_here = float(view.target_weight[s.start:stop].sum())
        rows.append(f"<tr><td>{s.start}-{stop - 1}</td><td>{s.sample}</td><td class=\"task\">{_esc(s.task)}</td>"
                    f"<td>{s.n:,}</td><td>{s.weight:.4g}</td><td>{here:,}</td><td>{weight_here:.4g}</td></tr>")
    return f'<table class="samples">{"".join(rows)}</table>'


def _tokens(view, segment, top: float) -> str:
    tokens, spans = view.arrays["tokens"], []
    for p in range(segment.start, segment.start + segment.real):
        text = _esc(shown(view.texts[p]))
        if view.target[p]:
            weight = float(view.target_weight[p])
            back = heat_rgb(weight, top)
            spans.append(f'<span style="background:{_hex(back)};color:{_hex(ink_rgb(back))}" '
                         f'title="position {p}, token {int(tokens[p])}, target weight {weight:.4g}">{text}</span>')
        else:
            spans.append(f'<span class="p" style="color:{_hex(PROMPT_COLOR)}" '
                         f'title="position {p}, token {int(tokens[p])}, not trained">{text}</span>')
    return f'<div class="tokens">{"".join(spans)}</div>'


def render_html(views, settings: str) -> str:
    top = top_weight(views)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8"/>',
             f"<title>tokweight inspect: {_esc(settings.split(': ')[0])}</title><style>{STYLE}</style></head><body>",
             "<h1>tokweight inspect</h1>", f'<p class="settings">{_esc(settings)}</p>', _legend(top)]
    for view in views:
        parts.append(f'<section class="row" id="row-{view.index}"><h2>{_esc(row_title(view))}</h2>')
        parts.append(_sample_table(view))
        for segment in view.segments:
            if segment.is_padding:
                parts.append(f'<div class="pad">{_esc(padding_title(segment))}</div>')
                continue
            parts.append(f'<div class="sample" data-sample="{segment.sample}">'
                         f'<div class="head">{_esc(segment_title(segment))}</div>{_tokens(view, segment, top)}</div>')
        parts.append("</section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_html(path, views, settings: str) -> str:
    """Write the page (atomically) and return its path."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with atomic_file(path, "w", encoding="utf-8") as f:
        f.write(render_html(views, settings))
    return path
