#!/usr/bin/env python3
"""Assembles one benchmark run (scripts/bench.sh) into OUT.md and OUT.png.

RUN_DIR holds each bench's markdown (<bench>.md, its stdout) and the load
generator's CSVs: <scenario>.latency.csv (latency by percentile, CO-corrected
for fixed-rate runs) and <name>.timeline.csv (the steady/soak sampler: RSS,
open files and PostgreSQL connections per second). The plot needs matplotlib
(the bench virtualenv, .cache/st-venv); without it the report says so.
"""

import argparse
import csv
import glob
import os
import platform
import subprocess
import sys


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = ""
    try:
        with open("/proc/meminfo") as f:
            kib = int(f.readline().split()[1])
            memory = f", {kib / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return f"{os.cpu_count()} x {model}{memory}, {platform.system()} {platform.release()}"


def commit(root: str) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", root, "describe", "--always", "--dirty"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def plot(run_dir: str, png: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FixedLocator, FixedFormatter
    except ImportError:
        return "No plot: matplotlib is not installed (make bench installs it in .cache/st-venv)."
    latency = sorted(glob.glob(os.path.join(run_dir, "*.latency.csv")))
    timelines = sorted(glob.glob(os.path.join(run_dir, "*.timeline.csv")))
    if not latency and not timelines:
        return "No plot: the run wrote no latency or timeline CSV."
    rows = 1 + (1 if timelines else 0)
    fig, axes = plt.subplots(rows, 1, figsize=(10, 5 * rows), squeeze=False)
    ax = axes[0][0]
    for path in latency:
        with open(path) as f:
            points = [(float(r["percentile"]), float(r["ms"]), r["scenario"]) for r in csv.DictReader(f)]
        # Percentiles on a "nines" axis: x = 1 / (1 - p), as HdrHistogram plots do.
        xs = [1.0 / max(1e-6, 1.0 - p / 100.0) for p, _, _ in points]
        ax.plot(xs, [ms for _, ms, _ in points], marker=".", label=points[0][2] if points else path)
    ticks = [1, 2, 10, 100, 1000, 10000]
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FixedFormatter(["0%", "50%", "90%", "99%", "99.9%", "99.99%"]))
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency, ms (log)")
    ax.set_title("Latency by percentile (fixed-rate runs: coordinated omission corrected)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if timelines:
        ax = axes[1][0]
        for path in timelines:
            name = os.path.basename(path).removesuffix(".timeline.csv")
            with open(path) as f:
                rows_ = list(csv.DictReader(f))
            ax.plot([float(r["second"]) for r in rows_], [float(r["rss_mib"]) for r in rows_], label=f"{name}: RSS MiB")
            ax.plot([float(r["second"]) for r in rows_], [float(r["fds"]) for r in rows_], label=f"{name}: open fds")
        ax.set_xlabel("seconds into the run")
        ax.set_title("Server process over time")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    return f"![latency and resources]({os.path.basename(png)})"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("out", help="output path without extension")
    parser.add_argument("--mode", default="full")
    parser.add_argument("--elapsed", type=int, default=0)
    parser.add_argument("--benches", default="")
    args = parser.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sections = []
    durations = []
    for bench in args.benches.split():
        path = os.path.join(args.run_dir, f"{bench}.md")
        if os.path.exists(path):
            with open(path) as f:
                sections.append(f"# Bench: {bench}\n\n{f.read().strip()}\n")
        seconds = os.path.join(args.run_dir, f"{bench}.seconds")
        if os.path.exists(seconds):
            with open(seconds) as f:
                durations.append(f"{bench} {f.read().strip()} s")
    per_bench = f" ({', '.join(durations)})" if durations else ""
    # Before the plot: rewriting a committed PNG would mark the tree dirty.
    revision = commit(root)
    figure = plot(args.run_dir, args.out + ".png")
    header = (
        f"# Benchmark results: {os.path.basename(args.out)}\n\n"
        f"- mode: `{args.mode}` (`scripts/bench.sh {args.mode}`), {args.elapsed // 60} min {args.elapsed % 60} s{per_bench}\n"
        f"- commit: `{revision}`\n"
        f"- machine: {machine()}\n"
        "- every ratio compares figures measured side by side in this run; this machine is noisy, "
        "so compare ratios, not absolute numbers, between runs\n\n"
        f"{figure}\n"
    )
    with open(args.out + ".md", "w") as f:
        f.write(header + "\n" + "\n".join(sections))
    print(f"wrote {args.out}.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
