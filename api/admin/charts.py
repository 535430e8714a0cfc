"""Charts as inline SVG, drawn on the server: no JavaScript library, no CDN, nothing to vendor.

Only presentation attributes are used (no ``style``), so the dashboard's Content-Security-Policy
can forbid inline styles. Every label is escaped; every bar has a ``<title>`` (the hover text).
"""

from __future__ import annotations

from collections.abc import Sequence

from markupsafe import Markup, escape

from api.stats import ThroughputBucket

COLORS = {"succeeded": "#2da44e", "failed": "#cf222e", "canceled": "#8c959f", "bar": "#0969da"}
AXIS = "#57606a"


def _nice_max(value: float) -> float:
    """A round axis maximum at or above ``value`` (1, 2, 5 × 10ⁿ)."""
    if value <= 0:
        return 1.0
    magnitude = 10 ** (len(str(int(value))) - 1)
    for step in (1, 2, 5, 10):
        if step * magnitude >= value:
            return float(step * magnitude)
    return float(10 * magnitude)


def horizontal_bars(items: Sequence[tuple[str, float]], unit: str = "", width: int = 560) -> Markup:
    """One labelled bar per item (e.g. messages waiting per queue)."""
    row, label_width, pad = 26, 120, 8
    height = max(1, len(items)) * row + pad
    top = _nice_max(max((value for _, value in items), default=0))
    plot = width - label_width - 70
    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{escape(unit)} per item">'
    ]
    if not items:
        parts.append(f'<text x="0" y="18" fill="{AXIS}">nothing to show</text>')
    for index, (label, value) in enumerate(items):
        y = pad / 2 + index * row
        length = plot * (value / top) if top else 0
        parts.append(
            f"<g><title>{escape(label)}: {value:g} {escape(unit)}</title>"
            f'<text x="{label_width - 8}" y="{y + 16}" text-anchor="end" fill="#1f2328">{escape(label)}</text>'
            f'<rect x="{label_width}" y="{y + 4}" width="{max(length, 1 if value else 0):.1f}" height="16" '
            f'fill="{COLORS["bar"]}" rx="2"></rect>'
            f'<text x="{label_width + length + 6:.1f}" y="{y + 16}" fill="{AXIS}">{value:g}</text></g>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))


def stacked_columns(
    buckets: Sequence[ThroughputBucket], statuses: Sequence[str], bucket_seconds: int, width: int = 720
) -> Markup:
    """Jobs finished per time bucket, stacked by final status, with a time axis and a legend."""
    height, left, bottom, top_pad = 200, 40, 36, 22
    plot_w, plot_h = width - left - 10, height - bottom - top_pad
    top = _nice_max(max((b.total for b in buckets), default=0))
    slot = plot_w / max(1, len(buckets))
    per = f"{bucket_seconds // 60} min" if bucket_seconds < 3600 else f"{bucket_seconds / 3600:g} h"
    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="jobs finished per {per}, by status">'
    ]
    for fraction in (0.0, 0.5, 1.0):  # horizontal grid with its value
        y = top_pad + plot_h * (1 - fraction)
        parts.append(
            f'<line x1="{left}" x2="{width - 10}" y1="{y:.1f}" y2="{y:.1f}" stroke="#d0d7de" stroke-width="1"></line>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" fill="{AXIS}" font-size="11">'
            f"{top * fraction:g}</text>"
        )
    label_every = max(1, len(buckets) // 6)
    for index, bucket in enumerate(buckets):
        x = left + index * slot
        y = top_pad + plot_h
        title = ", ".join(f"{bucket.counts.get(s, 0)} {s}" for s in statuses)
        parts.append(f"<g><title>{bucket.start:%Y-%m-%d %H:%M} UTC (+{per}): {escape(title)}</title>")
        parts.append(f'<rect x="{x:.1f}" y="{top_pad}" width="{slot:.1f}" height="{plot_h}" fill="transparent"></rect>')
        for status in statuses:
            count = bucket.counts.get(status, 0)
            if not count:
                continue
            h = plot_h * count / top
            y -= h
            parts.append(
                f'<rect x="{x + 1:.1f}" y="{y:.1f}" width="{max(slot - 2, 1):.1f}" height="{h:.1f}" '
                f'fill="{COLORS.get(status, COLORS["bar"])}"></rect>'
            )
        parts.append("</g>")
        if index % label_every == 0:
            parts.append(
                f'<text x="{x:.1f}" y="{height - bottom + 16}" fill="{AXIS}" font-size="11">{bucket.start:%H:%M}</text>'
            )
    legend_x = left
    for status in statuses:
        parts.append(
            f'<rect x="{legend_x}" y="4" width="10" height="10" fill="{COLORS.get(status, COLORS["bar"])}"></rect>'
            f'<text x="{legend_x + 14}" y="13" font-size="11" fill="#1f2328">{escape(status)}</text>'
        )
        legend_x += 90
    parts.append(f'<text x="{width - 10}" y="13" text-anchor="end" font-size="11" fill="{AXIS}">per {per}, UTC</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
