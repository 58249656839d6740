"""Line charts as inline SVG text, generated here (no plotting library, no external files),
and the colours and number format the report shares."""
from __future__ import annotations

import math
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b",
           "#e377c2", "#7f7f7f", "#bcbd22")
# (fill, outline) per resource class of a group; the page, its legend and DOT output share them
RESOURCE_COLOURS = {"compute": ("#cfe0f3", "#2f6db5"), "memory": ("#fbdcc0", "#d0700e"),
                    "stateful": ("#e3d3ee", "#7d3fa8")}
OTHER_COLOURS = ("#e6e6e6", "#777777")
Series = dict[str, list[tuple[float, float]]]
# plot area margins (px): room for tick labels left and below, the title above
_LEFT, _RIGHT, _TOP, _BOTTOM = 56, 10, 22, 36
_MAX_MARKERS = 40  # beyond this many points a line reads better without dots


def si(value: float, unit: str = "") -> str:
    """A number with an SI prefix and three significant digits (1.23 G, 45.6 m)."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g} {unit}".strip()
    exponent = max(-4, min(5, math.floor(math.log10(abs(value)) / 3)))
    prefix = "pnum kMGTP"[exponent + 4].strip()
    return f"{value / 1000 ** exponent:.3g} {prefix}{unit}".strip()


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round tick values covering [low, high]."""
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    return [first + i * step for i in range(int(math.ceil((high - first) / step)) + 1)]


def line_chart(series: Series, title: str, x_label: str, y_label: str, *, log_x: bool = False,
               step: bool = False, width: int = 380, height: int = 210) -> str:
    """An SVG chart of named (x, y) series: axes, ticks, a legend; log2 x axis if `log_x`;
    `step` draws each value held until the next point (replica counts)."""
    series = {name: sorted(pts) for name, pts in series.items() if pts}
    xs = sorted({x for pts in series.values() for x, _ in pts})
    ys = [y for pts in series.values() for _, y in pts]
    if not xs:
        return f'<p class="empty">{escape(title)}: no data</p>'
    legend_w = 0 if len(series) < 2 else min(230, 14 + 6 * max(len(n) for n in series))
    plot_w, plot_h = width - _LEFT - _RIGHT, height - _TOP - _BOTTOM
    fx = (lambda x: math.log2(x)) if log_x else (lambda x: x)
    x_ticks = _thin(xs, 8) if log_x else nice_ticks(xs[0], xs[-1])
    x0, x1 = fx(x_ticks[0]), fx(x_ticks[-1])
    y_ticks = nice_ticks(min(0.0, min(ys)), max(ys))
    y0, y1 = y_ticks[0], y_ticks[-1]

    def px(x: float) -> float:
        return _LEFT + (fx(x) - x0) / ((x1 - x0) or 1) * plot_w

    def py(y: float) -> float:
        return _TOP + plot_h - (y - y0) / ((y1 - y0) or 1) * plot_h

    parts = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width + legend_w}" '
             f'height="{height}" viewBox="0 0 {width + legend_w} {height}" role="img">',
             f'<text x="{_LEFT}" y="14" class="ct">{escape(title)}</text>',
             f'<rect x="{_LEFT}" y="{_TOP}" width="{plot_w}" height="{plot_h}" class="frame"/>']
    for t in x_ticks:
        parts.append(f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{_TOP}" y2="{_TOP + plot_h}" '
                     f'class="grid"/><text x="{px(t):.1f}" y="{_TOP + plot_h + 13}" '
                     f'class="tx">{_tick(t)}</text>')
    for t in y_ticks:
        parts.append(f'<line x1="{_LEFT}" x2="{_LEFT + plot_w}" y1="{py(t):.1f}" y2="{py(t):.1f}" '
                     f'class="grid"/><text x="{_LEFT - 4}" y="{py(t) + 3:.1f}" '
                     f'class="ty">{_tick(t)}</text>')
    parts.append(f'<text x="{_LEFT + plot_w / 2}" y="{height - 4}" class="tx">'
                 f'{escape(x_label)}</text>'
                 f'<text x="12" y="{_TOP + plot_h / 2}" class="tx" transform="rotate(-90 12 '
                 f'{_TOP + plot_h / 2})">{escape(y_label)}</text>')
    for i, (name, pts) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        path = _steps(pts, xs[-1]) if step else pts
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.6" points="'
                     + " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in path) + '"/>')
        if len(pts) <= _MAX_MARKERS:
            parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{colour}">'
                      f'<title>{escape(name)}: ({x:g}, {y:.4g})</title></circle>' for x, y in pts]
        if legend_w:
            ly = _TOP + 6 + 14 * i
            parts.append(f'<line x1="{width + 2}" x2="{width + 14}" y1="{ly}" y2="{ly}" '
                         f'stroke="{colour}" stroke-width="2"/><text x="{width + 18}" '
                         f'y="{ly + 4}" class="lg">{escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _steps(pts: list[tuple[float, float]], end: float) -> list[tuple[float, float]]:
    """Points of a step line: each value held until the next x (and until `end`)."""
    out = []
    for (x, y), (nx, _) in zip(pts, pts[1:] + [(end, None)]):
        out += [(x, y), (nx, y)]
    return out


def _thin(values: list[float], most: int) -> list[float]:
    """At most `most` of the values, evenly picked, keeping the first and the last."""
    if len(values) <= most:
        return values
    stride = math.ceil((len(values) - 1) / (most - 1))
    return values[::stride] + ([values[-1]] if (len(values) - 1) % stride else [])


def _tick(value: float) -> str:
    """A tick label: plain from 0.01 to 10,000, SI-prefixed beyond."""
    if value == 0 or 0.01 <= abs(value) < 10000:
        return f"{value:.4g}"
    return escape(si(value))
