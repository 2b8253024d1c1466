#!/usr/bin/env python3
"""Summarises the samples scripts/bench.sh collected (standard library only).

    bench_report.py SAMPLES.csv OUTDIR [--peers "kernel um-root ..."] [--sizes TEXT]

Prints one table of medians with ratios to kernel overlayfs (peer / kernel), and writes
OUTDIR/results.csv (medians, ratios) and OUTDIR/ratios.svg (a bar chart of each peer's
performance relative to kernel overlayfs, oriented so that longer to the right is better).
"""

import argparse
import csv
import math
import os
import statistics
from collections import defaultdict

# metric, label, unit, higher is better
METRICS = [
    ("seqread_cold_mibs", "seq read cold", "MiB/s", True),
    ("seqread_warm_mibs", "seq read warm", "MiB/s", True),
    ("randread_1j_iops", "4k randread 1 job", "IOPS", True),
    ("randread_4j_iops", "4k randread 4 jobs", "IOPS", True),
    ("seqwrite_mibs", "seq write", "MiB/s", True),
    ("randwrite_iops", "4k randwrite", "IOPS", True),
    ("walk_lstat_cold_s", "lstat walk cold", "s", False),
    ("find_cold_s", "find cold", "s", False),
    ("create_s", "create N files", "s", False),
    ("unlink_s", "unlink N files", "s", False),
    ("untar_s", "untar small files", "s", False),
    ("git_status_cold_s", "git status cold", "s", False),
    ("ls_l_cold_s", "ls -l merged dir", "s", False),
    ("copyup_s", "copy-up (1-byte append)", "s", False),
    ("sparse_copy_kib", "sparse copy-up du", "KiB", False),
    ("shared_cached_mib", "page cache, N mounts", "MiB", False),
    ("rss_idle_kib", "daemon RSS idle", "KiB", False),
    ("rss_walk_kib", "daemon RSS after walk", "KiB", False),
    ("host_steal_pct", "CPU stolen by host", "%", False),
]

# Shown without a ratio: context for reading the other rows, not a result.
NO_RATIO = {"host_steal_pct"}

PEER_NAMES = {
    "kernel": "kernel ovl",
    "um-root": "unionmount root",
    "um-rootless": "unionmount rootless",
    "um-rdplus": "um readdirplus",
    "fo2": "fuse-ovl 2.x",
    "fo1": "fuse-ovl 1.x",
    "plain": "plain fs",
}

COLOURS = ["#1f77b4", "#2ca02c", "#ff7f0e", "#d62728", "#9467bd", "#8c564b", "#17becf"]


def fmt(v):
    if v is None:
        return "n/a"
    a = abs(v)
    if a >= 1000:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def load(path):
    samples = defaultdict(list)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                v = float(row["value"])
            except ValueError:
                continue
            samples[(row["peer"], row["metric"])].append(v)
    return samples


def ratio(v, k):
    if v is None or k is None or k == 0:
        return None
    return v / k


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("samples")
    ap.add_argument("outdir")
    ap.add_argument("--peers", default="kernel um-root um-rootless fo2 fo1 plain")
    ap.add_argument("--sizes", default="")
    ap.add_argument("--machine", default="", help="one line describing the machine")
    args = ap.parse_args()
    peers = args.peers.split()
    samples = load(args.samples)

    med = {}
    for (peer, metric), vs in samples.items():
        med[(peer, metric)] = statistics.median(vs)

    rows = []
    for metric, label, unit, higher in METRICS:
        k = med.get(("kernel", metric))
        cells = []
        for p in peers:
            v = med.get((p, metric))
            r = None if metric in NO_RATIO else ratio(v, k)
            cells.append((v, r, len(samples.get((p, metric), []))))
        rows.append((metric, label, unit, higher, cells))

    # Table.
    head = ["workload", "unit", "better"] + [PEER_NAMES.get(p, p) for p in peers]
    lines = []
    for metric, label, unit, higher, cells in rows:
        line = [label, unit, "higher" if higher else "lower"]
        for p, (v, r, _) in zip(peers, cells):
            if v is None:
                line.append("n/a")
            elif r is None or p == "kernel":
                line.append(fmt(v))
            else:
                line.append(f"{fmt(v)} ({r:.2f}x)")
        lines.append(line)
    widths = [max(len(x[i]) for x in [head] + lines) for i in range(len(head))]

    def show(cols):
        return "  ".join(
            c.ljust(widths[i]) if i < 3 else c.rjust(widths[i]) for i, c in enumerate(cols)
        )

    print("medians; (ratio) = peer / kernel overlayfs" + (f"; sizes: {args.sizes}" if args.sizes else ""))
    if args.machine:
        print(f"machine: {args.machine}")
    print(show(head))
    print(show(["-" * w for w in widths]))
    for line in lines:
        print(show(line))

    os.makedirs(args.outdir, exist_ok=True)
    with open(os.path.join(args.outdir, "results.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["metric", "unit", "better", "peer", "median", "ratio_to_kernel", "samples"])
        for metric, label, unit, higher, cells in rows:
            for p, (v, r, n) in zip(peers, cells):
                w.writerow([
                    metric, unit, "higher" if higher else "lower", p,
                    "n/a" if v is None else f"{v:g}",
                    "n/a" if r is None else f"{r:.4f}",
                    n,
                ])

    with open(os.path.join(args.outdir, "ratios.svg"), "w") as f:
        f.write(svg(rows, peers, args.sizes, args.machine))


def svg(rows, peers, sizes, machine=""):
    """Horizontal bars on a log scale around 1 (kernel overlayfs): right is better."""
    shown = [p for p in peers if p != "kernel"]
    rows = [r for r in rows if any(c[1] is not None for c in r[4])]
    lo, hi = -5.0, 3.0  # log2 of the axis ends: 1/32x .. 8x
    left, plot_w, bar_h, gap = 230, 560, 11, 10
    group_h = bar_h * len(shown) + gap
    top = 82
    height = top + group_h * len(rows) + 40 + 16 * len(shown)
    width = left + plot_w + 90

    def x_of(v):
        lv = max(lo, min(hi, math.log2(v)))
        return left + (lv - lo) / (hi - lo) * plot_w

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">'
        "Performance relative to kernel overlayfs (log scale; right of 1x is better)</text>",
    ]
    if sizes:
        out.append(f'<text x="{width / 2}" y="36" text-anchor="middle" fill="#555">{esc(sizes)}</text>')
    if machine:
        out.append(f'<text x="{width / 2}" y="50" text-anchor="middle" fill="#555">{esc(machine)}</text>')
    axis_bottom = top + group_h * len(rows)
    for e in range(int(lo), int(hi) + 1):
        x = x_of(2.0**e)
        label = f"{2 ** e:g}x" if e >= 0 else f"1/{2 ** -e}x"
        colour = "#000" if e == 0 else "#ddd"
        out.append(f'<line x1="{x:.1f}" y1="{top - 8}" x2="{x:.1f}" y2="{axis_bottom}" stroke="{colour}"/>')
        out.append(f'<text x="{x:.1f}" y="{top - 12}" text-anchor="middle" fill="#555">{label}</text>')
    for gi, (metric, label, unit, higher, cells) in enumerate(rows):
        y0 = top + gi * group_h
        out.append(
            f'<text x="{left - 8}" y="{y0 + group_h / 2}" text-anchor="end" '
            f'dominant-baseline="middle">{esc(label)}</text>'
        )
        by_peer = dict(zip(peers, cells))
        for bi, p in enumerate(shown):
            v, r, _ = by_peer[p]
            y = y0 + bi * bar_h
            colour = COLOURS[peers.index(p) % len(COLOURS)]
            if r is None or r <= 0:
                out.append(f'<text x="{x_of(1.0) + 4:.1f}" y="{y + bar_h - 2}" fill="#999" font-size="9">n/a</text>')
                continue
            rel = r if higher else 1.0 / r
            x1, x0 = x_of(rel), x_of(1.0)
            xa, xb = min(x0, x1), max(x0, x1)
            out.append(
                f'<rect x="{xa:.1f}" y="{y}" width="{max(xb - xa, 1):.1f}" height="{bar_h - 2}" '
                f'fill="{colour}"><title>{esc(PEER_NAMES.get(p, p))}: {fmt(v)} {esc(unit)} '
                f"({rel:.2f}x kernel)</title></rect>"
            )
            out.append(
                f'<text x="{xb + 3:.1f}" y="{y + bar_h - 3}" font-size="9" fill="#333">{rel:.2f}x</text>'
            )
    for i, p in enumerate(shown):
        y = axis_bottom + 20 + 16 * i
        colour = COLOURS[peers.index(p) % len(COLOURS)]
        out.append(f'<rect x="{left}" y="{y - 9}" width="12" height="10" fill="{colour}"/>')
        out.append(f'<text x="{left + 18}" y="{y}">{esc(PEER_NAMES.get(p, p))}</text>')
    out.append("</svg>\n")
    return "\n".join(out)


def esc(s):
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


if __name__ == "__main__":
    main()
