#!/usr/bin/env python3
"""Collects the kernel's `# bench` KTAP lines into CSV and JSON and draws SVG plots.

Input: serial logs named `<arch>_smp<n>.log` (tools/bench.sh writes them). Each
benchmark line reads
    # bench <name> cpus=<n> sites=<k> median_ns=<x> p99_ns=<y> iters=<i>
Every figure is also given relative to `ipi_roundtrip` measured in the same boot
(the physical limit: one NMI-priority broadcast and its acknowledgements), which is
what the plots show: latencies on a shared emulator vary from run to run, ratios
within one run much less.

The guest also profiles single calls, one line each:
    # profile <name> cpus=<n> sites=<k> total_ns=.. outside_ns=.. setup_ns=..
      arrive_ns=.. run_ns=.. exit_ns=.. iters=<i>
(medians of where the initiator's time went: setup, the gather of the other CPUs'
arrivals, the function, leaving; outside = the caller's own work around the call).

The longest time any other CPU spent masked in the window of each profiled call comes
as a benchmark of its own, `# bench <name>_masked_max cpus=.. sites=.. median_ns=..
p99_ns=.. iters=..` (the kernel also prints `# masked_max <name> ... ratio=..`); a
`masked_max_ns=<z>` field on any line is picked up too.

The scaling table (scaling.csv/json, printed) has one row per architecture and CPU
count: ipi_roundtrip, stop_machine, patch_machine x1 and x1000 as medians and p99s,
each also as a ratio to ipi_roundtrip of the same boot (median to median, p99 to
p99), and for each of them masked_max (median and p99, each over the round trip's
median, as the kernel's own `# masked_max` line has them). CPU counts the
sweep skipped for an architecture (`--skipped ARCH:N,N`, above its limit) get a row
that says so.

Output, in --out: bench.csv, bench.json, profile.csv, profile.json, scaling.csv,
scaling.json, latency_vs_cpus_<arch>.svg (ratios; both axes log),
latency_ns_vs_cpus_<arch>.svg (nanoseconds; both axes log),
latency_vs_batch_<arch>.svg. Standard library only, so it runs on any CI machine.
"""

import argparse
import csv
import json
import math
import os
import re
import sys

LINE = re.compile(
    r"^# bench (?P<name>\w+) cpus=(?P<cpus>\d+) sites=(?P<sites>\d+) "
    r"median_ns=(?P<median_ns>\d+) p99_ns=(?P<p99_ns>\d+) iters=(?P<iters>\d+)"
    r"(?P<extra>(?: \w+=\S+)*)\s*$"
)
MASKED = re.compile(r"\bmasked_max_ns=(?P<ns>\d+)\b")
# The figures of the scaling table: (label, bench name, sites).
SCALING = [("stop_machine", "stop_machine", 0), ("patch_x1", "patch_machine", 1),
           ("patch_x1000", "patch_machine", 1000)]
PROFILE_FIELDS = ["total_ns", "outside_ns", "setup_ns", "arrive_ns", "run_ns", "exit_ns"]
PROFILE = re.compile(
    r"^# profile (?P<name>\w+) cpus=(?P<cpus>\d+) sites=(?P<sites>\d+) "
    + " ".join(f"{f}=(?P<{f}>\\d+)" for f in PROFILE_FIELDS)
    + r" iters=(?P<iters>\d+)(?: \w+=\S+)*\s*$"
)
RATIO = re.compile(
    r"^# ratio (?P<name>\w+)/ipi_roundtrip cpus=(?P<cpus>\d+) sites=(?P<sites>\d+) "
    r"ratio=(?P<ratio>[\d.]+) median_ns=(?P<median_ns>\d+) roundtrip_median_ns=(?P<rt_ns>\d+) "
    r"p99_ns=(?P<p99_ns>\d+) roundtrip_p99_ns=(?P<rt_p99_ns>\d+) pairs=(?P<pairs>\d+)"
    r"(?: \w+=\S+)*\s*$"
)
LOG_NAME = re.compile(r"^(?P<arch>[a-z0-9_]+?)_smp(?P<smp>\d+)\.log$")
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf"]


def log_lines(paths):
    """(name match, line) for every line of the logs named <arch>_smp<n>.log; others are
    skipped."""
    for path in paths:
        match = LOG_NAME.match(os.path.basename(path))
        if not match:
            continue
        with open(path, encoding="utf-8", errors="replace") as log:
            for line in log:
                yield match, line.rstrip("\r\n")


def parse_profiles(paths):
    rows = []
    for match, line in log_lines(paths):
        m = PROFILE.match(line)
        if m:
            row = {"arch": match["arch"], "name": m["name"]}
            for key in ["cpus", "sites", *PROFILE_FIELDS, "iters"]:
                row[key] = int(m[key])
            rows.append(row)
    return rows


def parse_ratios(paths):
    """The `# ratio` lines: a figure and the round trip measured alternately."""
    rows = []
    for match, line in log_lines(paths):
        m = RATIO.match(line)
        if m:
            rows.append({"arch": match["arch"], "name": m["name"], "ratio": m["ratio"],
                         **{k: int(m[k]) for k in ("cpus", "sites", "median_ns", "rt_ns",
                                                   "p99_ns", "rt_p99_ns", "pairs")}})
    return rows


def parse(paths, cpu_model):
    rows = []
    for path in paths:
        match = LOG_NAME.match(os.path.basename(path))
        if not match:
            sys.exit(f"bench_report: {path}: name is not <arch>_smp<n>.log")
        arch = match["arch"]
        found = []
        with open(path, encoding="utf-8", errors="replace") as log:
            for line in log:
                m = LINE.match(line.rstrip("\r\n"))
                if m:
                    row = {"arch": arch, "cpu_model": cpu_model, "name": m["name"]}
                    for key in ("cpus", "sites", "median_ns", "p99_ns", "iters"):
                        row[key] = int(m[key])
                    masked = MASKED.search(m["extra"] or "")
                    row["masked_max_ns"] = int(masked["ns"]) if masked else None
                    found.append(row)
        limit = [r for r in found if r["name"] == "ipi_roundtrip"]
        if not limit:
            print(f"bench_report: {path}: no ipi_roundtrip line; skipped", file=sys.stderr)
            continue
        base, base_p99 = limit[0]["median_ns"], limit[0]["p99_ns"]
        for row in found:
            row["ratio_to_ipi"] = round(row["median_ns"] / base, 3) if base else None
            row["p99_ratio_to_ipi"] = round(row["p99_ns"] / base_p99, 3) if base_p99 else None
        rows.extend(found)
    rows.sort(key=lambda r: (r["arch"], r["cpus"]))
    return rows


def parse_masked(paths):
    """The largest masked_max_ns of any line of each boot: {(arch, cpus): ns}."""
    seen = {}
    for match, line in log_lines(paths):
        if not line.startswith("#"):
            continue
        key = (match["arch"], int(match["smp"]))
        for m in MASKED.finditer(line):
            seen[key] = max(seen.get(key, 0), int(m["ns"]))
    return seen


def ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def scaling_rows(rows, masked, skipped):
    """One row per (arch, cpus): see the module docs."""
    out = []
    for arch, cpus in sorted({(r["arch"], r["cpus"]) for r in rows}):
        mine = {(r["name"], r["sites"]): r for r in rows if r["arch"] == arch and r["cpus"] == cpus}
        rt = mine.get(("ipi_roundtrip", 0))
        row = {"arch": arch, "cpus": cpus, "status": "measured",
               "ipi_roundtrip_median_ns": rt and rt["median_ns"],
               "ipi_roundtrip_p99_ns": rt and rt["p99_ns"]}
        for label, name, sites in SCALING:
            r = mine.get((name, sites))
            row[f"{label}_median_ns"] = r and r["median_ns"]
            row[f"{label}_p99_ns"] = r and r["p99_ns"]
            row[f"{label}_ratio"] = ratio(r and r["median_ns"], rt and rt["median_ns"])
            row[f"{label}_p99_ratio"] = ratio(r and r["p99_ns"], rt and rt["p99_ns"])
            row[f"{label}_p99_over_median"] = ratio(r and r["p99_ns"], r and r["median_ns"])
            m = mine.get((f"{name}_masked_max", sites))
            row[f"{label}_masked_max_median_ns"] = m and m["median_ns"]
            row[f"{label}_masked_max_p99_ns"] = m and m["p99_ns"]
            row[f"{label}_masked_max_ratio"] = ratio(m and m["median_ns"], rt and rt["median_ns"])
            row[f"{label}_masked_max_p99_ratio"] = ratio(m and m["p99_ns"], rt and rt["median_ns"])
        row["masked_max_ns"] = masked.get((arch, cpus))
        row["masked_max_ratio"] = ratio(row["masked_max_ns"], rt and rt["median_ns"])
        out.append(row)
    for arch, counts in skipped.items():
        for cpus in counts:
            out.append({"arch": arch, "cpus": cpus, "status": "skipped: above the arch's limit"})
    out.sort(key=lambda r: (r["arch"], r["cpus"]))
    return out


SCALING_FIELDS = (["arch", "cpus", "status", "ipi_roundtrip_median_ns", "ipi_roundtrip_p99_ns"]
                  + [f"{label}_{k}" for label, _, _ in SCALING
                     for k in ("median_ns", "p99_ns", "ratio", "p99_ratio", "p99_over_median",
                               "masked_max_median_ns", "masked_max_p99_ns", "masked_max_ratio",
                               "masked_max_p99_ratio")]
                  + ["masked_max_ns", "masked_max_ratio"])


def parse_skipped(values):
    """--skipped ARCH:N,N,... -> {arch: [n, ...]}."""
    skipped = {}
    for value in values:
        arch, _, counts = value.partition(":")
        if not arch or not re.fullmatch(r"\d+(,\d+)*", counts):
            sys.exit(f"bench_report: --skipped takes ARCH:N[,N...], got '{value}'")
        skipped.setdefault(arch, []).extend(int(n) for n in counts.split(","))
    return skipped


def fmt(value, unit=""):
    return "-" if value is None else f"{value}{unit}"


def svg_plot(path, title, x_label, y_label, series, x_log, y_log):
    """series: [(label, [(x, y), ...])]; draws a line chart with axes and legend. A
    label ending in "p99" is drawn dashed. A log x axis is ticked at the x values
    given (CPU counts), a log y axis at powers of ten."""
    width, height = 720, 440
    left, right, top, bottom = 70, 200, 40, 50
    xs = [x for _, pts in series for x, _ in pts]
    ys = [y for _, pts in series for _, y in pts if y > 0]
    if not xs or not ys:
        return False

    def scale(values, log):
        lo, hi = min(values), max(values)
        if log and x_log and values is xs:
            # CPU counts: from the first to the last, a little margin either side.
            return lo / 1.2, hi * 1.2
        if log:
            lo, hi = 10 ** math.floor(math.log10(lo)), 10 ** math.ceil(math.log10(hi))
        elif lo == hi:
            lo, hi = lo - 1, hi + 1
        else:
            lo = min(lo, 0)
        return lo, hi

    (x0, x1), (y0, y1) = scale(xs, x_log), scale(ys, y_log)

    def px(x):
        f = (math.log10(x) - math.log10(x0)) / (math.log10(x1) - math.log10(x0)) if x_log \
            else (x - x0) / (x1 - x0)
        return left + f * (width - left - right)

    def py(y):
        f = (math.log10(y) - math.log10(y0)) / (math.log10(y1) - math.log10(y0)) if y_log \
            else (y - y0) / (y1 - y0)
        return height - bottom - f * (height - top - bottom)

    def ticks(lo, hi, log, given):
        if log and given:
            return sorted(set(given))
        if log:
            return [10 ** e for e in range(round(math.log10(lo)), round(math.log10(hi)) + 1)]
        return sorted(set(given)) if given else [lo + (hi - lo) * i / 5 for i in range(6)]

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2 - right / 2}" y="22" text-anchor="middle" font-size="14">{title}</text>',
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="black"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="black"/>',
        f'<text x="{(left + width - right) / 2}" y="{height - 12}" text-anchor="middle">{x_label}</text>',
        f'<text transform="translate(16,{(top + height - bottom) / 2}) rotate(-90)" '
        f'text-anchor="middle">{y_label}</text>',
    ]
    for x in ticks(x0, x1, x_log, xs):
        out.append(f'<line x1="{px(x):.1f}" y1="{height - bottom}" x2="{px(x):.1f}" '
                   f'y2="{height - bottom + 5}" stroke="black"/>')
        out.append(f'<text x="{px(x):.1f}" y="{height - bottom + 18}" text-anchor="middle">{x:g}</text>')
    for y in ticks(y0, y1, y_log, None):
        out.append(f'<line x1="{left}" y1="{py(y):.1f}" x2="{width - right}" y2="{py(y):.1f}" '
                   f'stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:g}</text>')
    for i, (label, pts) in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        pts = sorted(p for p in pts if p[1] > 0)
        path_d = " ".join(f"{'M' if j == 0 else 'L'}{px(x):.1f},{py(y):.1f}" for j, (x, y) in enumerate(pts))
        dash = ' stroke-dasharray="5,3"' if label.endswith("p99") else ""
        out.append(f'<path d="{path_d}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        for x, y in pts:
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{colour}"/>')
        ly = top + 16 * i
        out.append(f'<line x1="{width - right + 12}" y1="{ly}" x2="{width - right + 32}" y2="{ly}" '
                   f'stroke="{colour}" stroke-width="2"/>')
        out.append(f'<text x="{width - right + 38}" y="{ly + 4}">{label}</text>')
    out.append("</svg>")
    with open(path, "w", encoding="utf-8") as svg:
        svg.write("\n".join(out) + "\n")
    return True


def write_table(out, stem, rows, fields):
    """Writes rows as <out>/<stem>.csv (the given column order) and <out>/<stem>.json."""
    with open(os.path.join(out, f"{stem}.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(out, f"{stem}.json"), "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--cpu", default="max", help="QEMU CPU model the logs came from")
    parser.add_argument("--skipped", action="append", default=[],
                        help="ARCH:N,N CPU counts the sweep did not run for ARCH (its limit)")
    parser.add_argument("logs", nargs="+")
    args = parser.parse_args()
    skipped = parse_skipped(args.skipped)
    rows = parse(args.logs, args.cpu)
    if not rows:
        sys.exit("bench_report: no benchmark lines found")
    os.makedirs(args.out, exist_ok=True)
    write_table(args.out, "bench", rows,
                ["arch", "cpu_model", "name", "cpus", "sites", "median_ns", "p99_ns", "iters",
                 "masked_max_ns", "ratio_to_ipi", "p99_ratio_to_ipi"])
    scaling = scaling_rows(rows, parse_masked(args.logs), skipped)
    write_table(args.out, "scaling", scaling, SCALING_FIELDS)
    profiles = sorted(parse_profiles(args.logs), key=lambda r: (r["arch"], r["cpus"]))
    write_table(args.out, "profile", profiles,
                ["arch", "name", "cpus", "sites", *PROFILE_FIELDS, "iters"])

    for arch in sorted({r["arch"] for r in rows}):
        mine = [r for r in rows if r["arch"] == arch]
        lines = [("stop_machine", 0), ("stop_machine_nmi", 0), ("patch_machine", 1),
                 ("patch_machine", 10), ("patch_nosync", 1),
                 ("static_key_flip", 1), ("static_key_flip", 100)]
        series = []
        for name, sites in lines:
            pts = [(r["cpus"], r["ratio_to_ipi"]) for r in mine if r["name"] == name and r["sites"] == sites]
            if pts:
                batched = name in ("patch_machine", "static_key_flip")
                series.append((f"{name} x{sites}" if batched else name, pts))
        for label, name, sites in SCALING:
            pts = [(r["cpus"], r["p99_ratio_to_ipi"]) for r in mine
                   if r["name"] == name and r["sites"] == sites and r["p99_ratio_to_ipi"]]
            if pts:
                series.append((f"{label} p99", pts))
        for label, name, sites in SCALING[1:2]:
            pts = [(r["cpus"], r["ratio_to_ipi"]) for r in mine
                   if r["name"] == f"{name}_masked_max" and r["sites"] == sites]
            if pts:
                series.append((f"{label} masked_max", pts))
        svg_plot(os.path.join(args.out, f"latency_vs_cpus_{arch}.svg"),
                 f"{arch}: latency relative to ipi_roundtrip (median; p99 dashed)", "CPUs",
                 "x ipi_roundtrip (same boot)", series, x_log=True, y_log=True)
        series = []
        for label, name, sites in [("ipi_roundtrip", "ipi_roundtrip", 0), *SCALING]:
            for stat in ("median", "p99"):
                pts = [(r["cpus"], r[f"{stat}_ns"] / 1000) for r in mine
                       if r["name"] == name and r["sites"] == sites]
                if pts:
                    series.append((f"{label} {stat}" if stat == "p99" else label, pts))
        svg_plot(os.path.join(args.out, f"latency_ns_vs_cpus_{arch}.svg"),
                 f"{arch}: latency vs CPUs (median; p99 dashed)", "CPUs", "microseconds",
                 series, x_log=True, y_log=True)
        series = []
        for cpus in sorted({r["cpus"] for r in mine}):
            pts = [(r["sites"], r["ratio_to_ipi"]) for r in mine
                   if r["name"] == "patch_machine" and r["cpus"] == cpus]
            if pts:
                series.append((f"{cpus} CPUs", pts))
        svg_plot(os.path.join(args.out, f"latency_vs_batch_{arch}.svg"),
                 f"{arch}: patch_machine median vs batch size", "sites per batch",
                 "x ipi_roundtrip (same boot)", series, x_log=True, y_log=True)

    print("scaling: ratios to ipi_roundtrip of the same boot, median [p99/p99]; then masked_max"
          " median [p99] / round-trip median")
    print(f"  {'arch':8} {'cpus':>4} {'rt_us':>8} {'stop':>13} {'patch x1':>13} "
          f"{'patch x1000':>13} {'masked stop':>13} {'masked x1':>13} {'masked x1000':>13}")
    for r in scaling:
        if r["status"] != "measured":
            print(f"  {r['arch']:8} {r['cpus']:>4} {r['status']}")
            continue
        rt = r["ipi_roundtrip_median_ns"]
        cells = [f"{fmt(r[f'{label}_ratio'])} [{fmt(r[f'{label}_p99_ratio'])}]"
                 for label, _, _ in SCALING]
        cells += [f"{fmt(r[f'{label}_masked_max_ratio'])} [{fmt(r[f'{label}_masked_max_p99_ratio'])}]"
                  for label, _, _ in SCALING]
        print(f"  {r['arch']:8} {r['cpus']:>4} {fmt(rt and round(rt / 1000, 1)):>8} "
              + " ".join(f"{c:>13}" for c in cells))
    print("headline: patch_machine (1 site) / ipi_roundtrip, medians from the same boot")
    for r in rows:
        if r["name"] == "patch_machine" and r["sites"] == 1:
            limit = next(x for x in rows if x["arch"] == r["arch"] and x["cpus"] == r["cpus"]
                         and x["name"] == "ipi_roundtrip")
            print(f"  {r['arch']} cpus={r['cpus']}: {r['median_ns']} ns / {limit['median_ns']} ns"
                  f" = {r['ratio_to_ipi']}")
    ratios = sorted(parse_ratios(args.logs), key=lambda r: (r["arch"], r["cpus"]))
    if ratios:
        print("measured alternately with the round trip (medians, p99 in brackets)")
        for r in ratios:
            print(f"  {r['arch']} cpus={r['cpus']} {r['name']} x{r['sites']}: "
                  f"{r['median_ns']} ns ({r['p99_ns']}) / {r['rt_ns']} ns ({r['rt_p99_ns']})"
                  f" = {r['ratio']}")
    if profiles:
        print("where one call's time goes (medians, us): total = outside + setup + arrive + run + exit")
        for p in profiles:
            limit = next((x for x in rows if x["arch"] == p["arch"] and x["cpus"] == p["cpus"]
                          and x["name"] == "ipi_roundtrip"), None)
            ratio = f", total / ipi_roundtrip = {p['total_ns'] / limit['median_ns']:.2f}" if limit else ""
            us = " ".join(f"{f[:-3]}={p[f] / 1000:.1f}" for f in PROFILE_FIELDS)
            print(f"  {p['arch']} cpus={p['cpus']} {p['name']} x{p['sites']}: {us}{ratio}")
    print(f"wrote {args.out}/bench.csv, bench.json, profile.csv, profile.json, scaling.csv, "
          "scaling.json and the SVG plots")


if __name__ == "__main__":
    main()
