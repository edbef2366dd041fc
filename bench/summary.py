"""Print one short table from every benchmark JSON under a directory (the end of the GPU check's output)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv=None):
    argv = argv if argv is not None else sys.argv[1:]
    root = Path(argv[0]) if argv else Path(__file__).resolve().parent / "results"
    files = sorted(root.rglob("*.json"))
    if not files:
        print(f"no benchmark results under {root}")
        return 1
    print(f"\n{'benchmark':<52} {'case':<40} {'ms':>9} {'GiB':>6} {'x base':>7}")
    for f in files:
        rep = json.loads(f.read_text())
        base = next((r["median_ms"] for r in rep["results"] if r["name"] == rep.get("baseline") and r["median_ms"]), None)
        title = f.stem[:52]
        for r in rep["results"]:
            if r["median_ms"] is None:
                print(f"{title:<52} {r['name'][:40]:<40} {'--':>9} {'':>6} {'':>7}  {(r['error'] or '')[:60]}")
            else:
                mem = f"{r['peak_extra_gib']:.2f}" if r.get("peak_extra_gib") is not None else ""
                ratio = f"{base / r['median_ms']:.2f}" if base else ""
                print(f"{title:<52} {r['name'][:40]:<40} {r['median_ms']:9.3f} {mem:>6} {ratio:>7}")
            title = ""
    return 0


if __name__ == "__main__":
    sys.exit(main())
