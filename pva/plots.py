"""Small SVG charts for reports: identity against fine-tuning steps, and per-mask bars.

Plain SVG text (no plotting library): it opens in any browser and renders inline in Markdown.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from html import escape

WIDTH, HEIGHT = 760, 360
LEFT, RIGHT, TOP, BOTTOM = 64, 240, 40, 48
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf")


def _frame(title: str, y_label: str, x_label: str) -> list[str]:
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{WIDTH / 2}" y="22" text-anchor="middle" font-size="14">{escape(title)}</text>',
        f'<text x="16" y="{(TOP + HEIGHT - BOTTOM) / 2}" text-anchor="middle" '
        f'transform="rotate(-90 16 {(TOP + HEIGHT - BOTTOM) / 2})">{escape(y_label)}</text>',
        f'<text x="{(LEFT + WIDTH - RIGHT) / 2}" y="{HEIGHT - 10}" '
        f'text-anchor="middle">{escape(x_label)}</text>',
    ]


def _y_axis(lo: float, hi: float) -> tuple[list[str], Callable[[float], float]]:
    """Gridlines and labels for ``[lo, hi]``; returns them and the value -> pixel map."""
    span = hi - lo if hi > lo else 1.0
    bottom, top = HEIGHT - BOTTOM, TOP

    def y(v: float) -> float:
        return bottom - (v - lo) / span * (bottom - top)

    step = 10 ** math.floor(math.log10(span / 4)) if span > 0 else 0.1
    while span / step > 8:
        step *= 2
    parts = []
    v = math.ceil(lo / step) * step
    while v <= hi + 1e-12:
        parts.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
            f'stroke="#ddd"/><text x="{LEFT - 6}" y="{y(v) + 4:.1f}" '
            f'text-anchor="end">{v:.3g}</text>'
        )
        v += step
    parts.append(
        f'<line x1="{LEFT}" x2="{LEFT}" y1="{top}" y2="{bottom}" stroke="black"/>'
        f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{bottom}" y2="{bottom}" stroke="black"/>'
    )
    return parts, y


def _legend(names: Sequence[str], dashed: Sequence[bool]) -> list[str]:
    parts = []
    for i, (name, dash) in enumerate(zip(names, dashed)):
        y = TOP + 10 + 18 * i
        x = WIDTH - RIGHT + 12
        style = ' stroke-dasharray="5,3"' if dash else ""
        parts.append(
            f'<line x1="{x}" x2="{x + 22}" y1="{y}" y2="{y}" stroke="{COLOURS[i % 7]}" '
            f'stroke-width="2"{style}/><text x="{x + 28}" y="{y + 4}">{escape(name)}</text>'
        )
    return parts


def _limits(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    pad = 0.1 * (hi - lo) if hi > lo else 0.05
    return lo - pad, hi + pad


def steps_plot(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    levels: Mapping[str, float],
    title: str = "identity similarity against fine-tuning steps",
    y_label: str = "identity similarity",
) -> str:
    """A line chart on a log step axis: each curve's (steps, value) points, each level a line.

    Args:
        curves: Method -> its (steps > 0, value) points, e.g. Custom Diffusion after 40, 100,
            300 and 1000 steps, or PVA-FT after 40.
        levels: Method -> one value drawn across the chart (dashed): e.g. zero-shot PVA.
        title: The chart's title.
        y_label: The value axis' label.

    Returns:
        The SVG document.
    """
    xs = [x for pts in curves.values() for x, _ in pts if x > 0]
    ys = [v for pts in curves.values() for _, v in pts] + list(levels.values())
    x_lo, x_hi = (math.log10(min(xs)), math.log10(max(xs))) if xs else (0.0, 1.0)
    x_lo, x_hi = x_lo - 0.15, x_hi + 0.15
    parts = _frame(title, y_label, "fine-tuning steps (log scale)")
    grid, y = _y_axis(*_limits(ys))
    parts += grid

    def x(steps: float) -> float:
        return LEFT + (math.log10(steps) - x_lo) / (x_hi - x_lo) * (WIDTH - RIGHT - LEFT)

    for k in sorted({int(v) for v in xs}):
        parts.append(
            f'<text x="{x(k):.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle">{k}</text>'
        )
    names = [*levels, *curves]
    for i, (_, v) in enumerate(levels.items()):
        if math.isfinite(v):
            parts.append(
                f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
                f'stroke="{COLOURS[i % 7]}" stroke-width="2" stroke-dasharray="5,3"/>'
            )
    for j, (_, pts) in enumerate(curves.items()):
        colour = COLOURS[(len(levels) + j) % 7]
        pts = sorted((px, py) for px, py in pts if px > 0 and math.isfinite(py))
        if len(pts) > 1:
            path = " ".join(f"{x(px):.1f},{y(py):.1f}" for px, py in pts)
            parts.append(
                f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>'
            )
        parts += [
            f'<circle cx="{x(px):.1f}" cy="{y(py):.1f}" r="4" fill="{colour}"/>' for px, py in pts
        ]
    parts += _legend(names, [True] * len(levels) + [False] * len(curves))
    return "\n".join([*parts, "</svg>"]) + "\n"


def bars_plot(
    groups: Sequence[str],
    series: Mapping[str, Sequence[tuple[float, float]]],
    title: str = "identity similarity per mask",
    y_label: str = "identity similarity",
) -> str:
    """Grouped bars with error whiskers: one group per mask, one bar per method.

    Args:
        groups: The groups (masks), left to right.
        series: Method -> one (mean, std) per group (NaN: no bar).
        title: The chart's title.
        y_label: The value axis' label.

    Returns:
        The SVG document.
    """
    values = [m + s for pts in series.values() for m, s in pts] + [
        m - s for pts in series.values() for m, s in pts
    ]
    lo, hi = _limits(values)
    lo = min(lo, 0.0) if lo > 0 and lo < 0.2 * hi else lo
    parts = _frame(title, y_label, "mask")
    grid, y = _y_axis(lo, hi)
    parts += grid
    width = (WIDTH - RIGHT - LEFT) / max(1, len(groups))
    bar = 0.8 * width / max(1, len(series))
    for g, name in enumerate(groups):
        centre = LEFT + (g + 0.5) * width
        parts.append(
            f'<text x="{centre:.1f}" y="{HEIGHT - BOTTOM + 16}" '
            f'text-anchor="middle">{escape(name)}</text>'
        )
        for i, pts in enumerate(series.values()):
            mean, std = pts[g]
            if not math.isfinite(mean):
                continue
            x0 = centre - 0.4 * width + i * bar
            top = y(mean)
            parts.append(
                f'<rect x="{x0:.1f}" y="{min(top, y(lo)):.1f}" width="{bar * 0.9:.1f}" '
                f'height="{abs(y(lo) - top):.1f}" fill="{COLOURS[i % 7]}"/>'
            )
            if math.isfinite(std) and std > 0:
                cx = x0 + bar * 0.45
                parts.append(
                    f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{y(mean - std):.1f}" '
                    f'y2="{y(mean + std):.1f}" stroke="black"/>'
                )
    parts += _legend(list(series), [False] * len(series))
    return "\n".join([*parts, "</svg>"]) + "\n"
