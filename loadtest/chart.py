#!/usr/bin/env python3
"""Draws the SVG chart of one bench run from its JSON (loadtest/results/<date>.json).

    python3 loadtest/chart.py loadtest/results/<date>.json out.svg

Two panels of horizontal bars, one bar per contender: the median requests per second (with a
tick for each run), then the p99 latency. The p99 is the open-loop one from oha (at the fixed
rate and at half of each contender's own maximum) when the run had a latency pass, and
otherwise wrk's closed-loop p99 at full load, labelled as such. Standard library only.
"""

import json
import math
import sys
from xml.sax.saxutils import escape

WIDTH = 960
LABEL_WIDTH = 330
VALUE_WIDTH = 110
LEFT = 20
PLOT_WIDTH = WIDTH - LEFT - LABEL_WIDTH - VALUE_WIDTH
BAR = 18
GAP = 8
FONT = "font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\""

COLOURS = {
    "direct": "#9e9e9e",
    "other": "#607d8b",
    "gatehouse": "#1565c0",
    "gatehouse-variant": "#42a5f5",
    "baseline": "#9fa8da",
    "fixed": "#ef6c00",
    "half": "#8e24aa",
    "closed": "#c62828",
}


def colour(name):
    if name == "direct":
        return COLOURS["direct"]
    # An older binary's bars stand apart from the current ones they sit next to.
    if name.endswith("-baseline"):
        return COLOURS["baseline"]
    if name == "gatehouse":
        return COLOURS["gatehouse"]
    if name.startswith("gatehouse"):
        return COLOURS["gatehouse-variant"]
    return COLOURS["other"]


def nice_ceiling(value):
    """The smallest 1, 2, 2.5 or 5 times a power of ten at or above value."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if step * power >= value:
            return step * power
    return 10 * power


def number(value, digits=0):
    return f"{value:,.{digits}f}"


def text(x, y, content, size=12, anchor="start", weight="normal", fill="#212121"):
    return (f'<text x="{x:.1f}" y="{y:.1f}" {FONT} font-size="{size}" text-anchor="{anchor}" '
            f'font-weight="{weight}" fill="{fill}">{escape(str(content))}</text>')


def panel(title, subtitle, rows, y, unit, digits, legend=None):
    """rows: [(label, [(value or None, colour, series name, note)], ticks)]; returns (svg parts, new y)."""
    parts = [text(LEFT, y + 16, title, size=15, weight="bold")]
    y += 22
    if subtitle:
        parts.append(text(LEFT, y + 12, subtitle, size=11, fill="#616161"))
        y += 18
    if legend:
        x = LEFT
        for name, fill in legend:
            parts.append(f'<rect x="{x}" y="{y + 3}" width="12" height="12" fill="{fill}"/>')
            parts.append(text(x + 17, y + 13, name, size=11))
            x += 24 + 7 * len(name)
        y += 20
    values = [value for _, bars, ticks in rows for value, _, _, _ in bars if value is not None]
    values += [tick for _, _, ticks in rows for tick in ticks if tick is not None]
    maximum = nice_ceiling(max(values) if values else 1.0)
    top = y + 6
    height = sum(len(bars) * BAR + GAP for _, bars, _ in rows) + GAP
    plot_left = LEFT + LABEL_WIDTH
    # Grid and axis.
    for index in range(5):
        fraction = index / 4
        x = plot_left + fraction * PLOT_WIDTH
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + height}" '
                     f'stroke="#e0e0e0" stroke-width="1"/>')
        tick_label = number(maximum * fraction, 3).rstrip("0").rstrip(".")
        parts.append(text(x, top + height + 14, tick_label,
                          size=10, anchor="middle", fill="#757575"))
    parts.append(text(plot_left + PLOT_WIDTH, top + height + 28, unit, size=10, anchor="end", fill="#757575"))
    y = top + GAP
    for label, bars, ticks in rows:
        group_height = len(bars) * BAR
        parts.append(text(plot_left - 8, y + group_height / 2 + 4, label, size=12, anchor="end"))
        for index, (value, fill, series, note) in enumerate(bars):
            bar_y = y + index * BAR
            if value is None:
                parts.append(text(plot_left + 4, bar_y + BAR - 5, f"{series}: n/a", size=11, fill="#9e9e9e"))
                continue
            width = max(1.0, value / maximum * PLOT_WIDTH)
            parts.append(f'<rect x="{plot_left}" y="{bar_y + 1}" width="{width:.1f}" height="{BAR - 3}" '
                         f'fill="{fill}"><title>{escape(f"{label}, {series}: {number(value, digits)} {unit}")}</title></rect>')
            # The value goes right of the bar and of the per-run ticks, which may pass its end.
            end = max([width] + [tick / maximum * PLOT_WIDTH for tick in ticks if tick is not None])
            parts.append(text(plot_left + end + 5, bar_y + BAR - 5, number(value, digits), size=11))
            if note:
                parts.append(text(plot_left + end + 12 + 7 * len(number(value, digits)), bar_y + BAR - 5, note,
                                  size=11, weight="bold", fill=COLOURS["closed"]))
        for tick in ticks:
            if tick is None:
                continue
            x = plot_left + tick / maximum * PLOT_WIDTH
            parts.append(f'<line x1="{x:.1f}" y1="{y}" x2="{x:.1f}" y2="{y + group_height - 2}" '
                         f'stroke="#212121" stroke-width="1.5" opacity="0.55"/>')
        y += group_height + GAP
    return parts, top + height + 40


def main(argv):
    if len(argv) != 3:
        print("usage: chart.py RESULTS.json OUT.svg", file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8") as handle:
        document = json.load(handle)
    contenders = document.get("contenders", {})
    if not contenders:
        print(f"chart.py: {argv[1]} has no contenders", file=sys.stderr)
        return 1
    method = document.get("method", {})
    environment = document.get("environment", {})

    parts = []
    y = 10
    parts.append(text(LEFT, y + 18, f"Gatehouse side-by-side load run, {document.get('date', '?')}", size=18, weight="bold"))
    y += 26
    details = (f"wrk -t{method.get('threads', 1)} -c{method.get('connections', '?')} -d{method.get('seconds', '?')}s, "
               f"median of {method.get('reps', '?')}; proxy on core {method.get('proxy_cpu', '?')}, "
               f"load and upstream on core {method.get('load_cpu', '?')}; {environment.get('cpu', '')}; "
               f"gatehouse {environment.get('gatehouse_commit', '?')}")
    parts.append(text(LEFT, y + 14, details, size=11, fill="#616161"))
    y += 30

    rows = []
    for name, row in contenders.items():
        ticks = [run.get("rps") for run in row.get("runs", [])]
        requests, errors = row.get("requests"), row.get("errors", 0)
        # Errors answered fast make an rps figure look better than the service it gave.
        note = f"{errors / requests:.0%} errors" if requests and errors / requests > 0.01 else ""
        rows.append((row.get("label", name), [(row.get("rps_median"), colour(name), "median rps", note)], ticks))
    drawn, y = panel("Throughput", "median requests per second, closed loop; ticks: each run; "
                     "red: share of non-2xx answers and socket errors above 1 %", rows, y,
                     "requests per second", 0)
    parts += drawn

    latency_rows = []
    has_open_loop = any("open_loop_latency" in row for row in contenders.values())
    if has_open_loop:
        fixed_rate = method.get("latency", {}).get("fixed_rps")
        for name, row in contenders.items():
            measured = row.get("open_loop_latency", {})
            fixed = measured.get("fixed", {})
            half = measured.get("half", {})
            latency_rows.append((row.get("label", name), [
                (fixed.get("p99_ms"), COLOURS["fixed"], f"at {fixed.get('rate', fixed_rate)} rps", ""),
                (half.get("p99_ms"), COLOURS["half"], f"at {half.get('rate', '?')} rps", ""),
            ], []))
        legend = [(f"at {fixed_rate} rps" if fixed_rate else "fixed rate", COLOURS["fixed"]),
                  ("at 50% of the contender's own max", COLOURS["half"])]
        drawn, y = panel("p99 latency, open loop",
                         "oha --latency-correction: latency from each request's scheduled start", latency_rows, y,
                         "milliseconds", 2, legend)
    else:
        for name, row in contenders.items():
            latency_rows.append((row.get("label", name), [(row.get("p99_ms_median"), COLOURS["closed"], "p99", "")], []))
        drawn, y = panel("p99 latency at full load, closed loop",
                         "wrk's p99 while saturating the proxy (queueing included); run with BENCH_LATENCY=1 "
                         "for open-loop figures", latency_rows, y, "milliseconds", 2)
    parts += drawn

    skipped = document.get("skipped", {})
    if skipped:
        parts.append(text(LEFT, y, "Skipped: " + "; ".join(f"{name} ({reason})" for name, reason in skipped.items()),
                          size=10, fill="#757575"))
        y += 16
    height = int(y + 10)
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
           f'viewBox="0 0 {WIDTH} {height}">',
           f'<rect width="{WIDTH}" height="{height}" fill="#ffffff"/>']
    svg += parts
    svg.append("</svg>")
    with open(argv[2], "w", encoding="utf-8") as handle:
        handle.write("\n".join(svg) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
