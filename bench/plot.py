"""Tables and PNG plots of a pytest-benchmark run of the bench suite (``pytest bench/ --benchmark-json=RUN.json``).

    python bench/plot.py RUN.json                 # a table per group (peers by median, ratio to the fastest)
    python bench/plot.py RUN.json --png DIR       # and a bar chart per group, DIR/<group>.png (needs matplotlib)
    python bench/plot.py NEW.json --against OLD.json   # the median of each case in NEW over its median in OLD

Skipped peers are not in pytest-benchmark's JSON; the run's own summary (``-ra``) lists them with the reason.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path


def load(path):
    """{group: [(peer name, median ms, IQR ms, rounds)]}, each group's peers fastest first."""
    data = json.loads(Path(path).read_text())
    groups = defaultdict(list)
    for b in data.get("benchmarks", []):
        st = b["stats"]
        peer = b.get("extra_info", {}).get("peer") or b["name"]
        groups[b.get("group") or b["name"]].append((peer, st["median"] * 1e3, st["iqr"] * 1e3, st["rounds"],
                                                    b["fullname"]))
    return {g: sorted(rows, key=lambda r: r[1]) for g, rows in groups.items()}, data.get("machine_info", {})


def table(group, rows, before=None):
    lines = [group, f"  {'peer':<46}{'median ms':>12}{'IQR ms':>10}{'x fastest':>11}"
             + (f"{'x before':>10}" if before is not None else "")]
    fastest = rows[0][1]
    for peer, med, iqr, _, full in rows:
        line = f"  {peer:<46}{med:>12.3f}{iqr:>10.3f}{med / fastest:>11.2f}"
        if before is not None:
            old = before.get(full)
            line += f"{med / old:>10.2f}" if old else f"{'--':>10}"
        lines.append(line)
    return "\n".join(lines)


def plot(group, rows, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.2))
    names = [r[0] for r in rows][::-1]
    ax.barh(names, [r[1] for r in rows][::-1], xerr=[r[2] / 2 for r in rows][::-1])
    ax.set_xlabel("median ms (lower is better)")
    ax.set_title(group, fontsize=9)
    fig.tight_layout()
    path = Path(out_dir) / (re.sub(r"[^A-Za-z0-9_.=-]+", "_", group).strip("_") + ".png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="pytest-benchmark JSON (--benchmark-json)")
    ap.add_argument("--png", metavar="DIR", help="write a bar chart per group into DIR")
    ap.add_argument("--against", metavar="OLD.json", help="an earlier run: add each case's ratio to it")
    args = ap.parse_args(argv)
    groups, machine = load(args.run)
    if not groups:
        print(f"{args.run}: no benchmarks (were they all skipped, or run without --benchmark-only?)")
        return 1
    before = None
    if args.against:
        old, _ = load(args.against)
        before = {full: med for rows in old.values() for _, med, _, _, full in rows}
    print(f"{machine.get('node', '?')}: {machine.get('cpu', {}).get('brand_raw', '')}\n")
    for group in sorted(groups):
        print(table(group, groups[group], before) + "\n")
    if args.png:
        Path(args.png).mkdir(parents=True, exist_ok=True)
        for group in sorted(groups):
            print("wrote", plot(group, groups[group], args.png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
