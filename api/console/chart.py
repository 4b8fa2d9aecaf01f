"""The analytics chart, drawn on the server as SVG (no charting script, nothing from a CDN).

Per month: bars for credits issued, used and expired, and a line for what was outstanding at
the month's end. Colours only in attributes (no style), text escaped.
"""

from __future__ import annotations

from collections.abc import Sequence

from markupsafe import Markup, escape

from service_layer.analytics import Month

WIDTH, HEIGHT = 960, 340
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 16, 44
BARS = (("issued", "#2f6fdb"), ("used", "#30a46c"), ("expired", "#e5484d"))
LINE = "#1d2433"


def every_month(months: Sequence[Month]) -> list[Month]:
    """The months from the first to the last, a month with no entries drawn as nothing moved."""
    filled: list[Month] = []
    for month in months:
        while filled and _next(filled[-1].month) < month.month:
            filled.append(Month(_next(filled[-1].month), 0, 0, 0, 0, 0, filled[-1].outstanding, None))
        filled.append(month)
    return filled


def _next(month: str) -> str:
    year, number = int(month[:4]), int(month[5:7])
    return f"{year + number // 12}-{number % 12 + 1:02d}"


def monthly_chart(months: Sequence[Month]) -> Markup:
    months = every_month(months)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    top = _nice(max([1] + [max(m.issued, m.used, m.expired, m.outstanding) for m in months]))

    def y(value: int) -> float:
        return TOP + plot_h - plot_h * max(value, 0) / top

    parts = [_grid(top, y, plot_w)]
    slot = plot_w / max(len(months), 1)
    bar = min(slot * 0.8 / len(BARS), 28)
    points = []
    for index, month in enumerate(months):
        left = LEFT + index * slot + (slot - bar * len(BARS)) / 2
        for n, (name, colour) in enumerate(BARS):
            value = getattr(month, name)
            parts.append(
                f'<rect x="{left + n * bar:.1f}" y="{y(value):.1f}" width="{bar - 1:.1f}" height="{TOP + plot_h - y(value):.1f}" fill="{colour}">'
                f"<title>{escape(month.month)} {name}: {value}</title></rect>"
            )
        centre = LEFT + index * slot + slot / 2
        points.append((centre, y(month.outstanding), month))
        if len(months) <= 18 or index % 2 == 0:
            parts.append(
                f'<text x="{centre:.1f}" y="{HEIGHT - BOTTOM + 18}" text-anchor="middle" font-size="12" fill="#3d4352">{escape(month.month)}</text>'
            )
    if points:
        path = " ".join(f"{'M' if i == 0 else 'L'}{x:.1f},{py:.1f}" for i, (x, py, _) in enumerate(points))
        parts.append(f'<path d="{path}" fill="none" stroke="{LINE}" stroke-width="2"/>')
        parts += [
            f'<circle cx="{x:.1f}" cy="{py:.1f}" r="3.5" fill="{LINE}"><title>{escape(m.month)} outstanding: {m.outstanding}</title></circle>'
            for x, py, m in points
        ]
    else:
        parts.append(
            f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" fill="#5b6478">No credits moved in this window.</text>'
        )
    return Markup(
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-labelledby="chart-title chart-desc">'
        '<title id="chart-title">Credits by month</title>'
        '<desc id="chart-desc">Bars: credits issued, used and expired each month; line: credits outstanding at the month\'s end. The table below has the figures.</desc>'
        + "".join(parts)
        + "</svg>"
    )


def _grid(top: int, y, plot_w: float) -> str:
    lines = []
    for step in range(5):
        value = top * step // 4
        lines.append(
            f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y(value):.1f}" y2="{y(value):.1f}" stroke="#dfe3ea"/>'
        )
        lines.append(
            f'<text x="{LEFT - 8}" y="{y(value) + 4:.1f}" text-anchor="end" font-size="12" fill="#3d4352">{value:,}</text>'
        )
    return "".join(lines)


def _nice(value: int) -> int:
    """A round top for the axis, at or above ``value`` (1, 2, 2.5 or 5 times a power of ten)."""
    scale = 1
    while scale * 10 <= value:
        scale *= 10
    for step in (1, 2, 2.5, 5, 10):
        if step * scale >= value:
            return int(step * scale) if step * scale >= 4 else 4
    return value
