"""Read one bench/gpu_run.sh run and print the decisions of bench/NOTES.md's decision table.

    python bench/decide.py RUN_DIR [--write run.json]   # RUN_DIR: gpu_run.sh's work folder (or gpu_run.tgz unpacked)
    python bench/decide.py run.json                     # a run already collected

Collecting (RUN_DIR): ``summary.tsv`` (a row per step), ``results/gate_tests.xml`` and ``results/full_tests.xml``
(pytest junit: passed / failed / skipped per op), ``results/attention_bwd.json`` and ``results/attention_fwd.json``
(the sweeps' rows) and the harness reports under ``results/`` (masked_patch_loss, masked_token_loss) become one
JSON: ``{"steps": [...], "tests": {group: {passed, failed, skipped}}, "metrics": {key: {median_ms, p20_ms, p80_ms,
timer}}, "device": ...}``. Metric keys: ``attention_bwd.<base|even|fused|flex>.<documents|mixed>.<fwd_bwd|bwd>``,
``attention_fwd.<base|ws|tma|flex>.<documents|mixed>.fwd``, ``masked_patch_loss.<cuda|triton>.<v1|v2|v2p>``,
``masked_token_loss.<v1|v2|v3|filtered|cce_filtered|cce_exact|liger>``,
``attention.<headline|7B-text|vision|smoke>.<documents|mixed>.<fwd|fwd_bwd>.<moca|flex|varlen>`` (bench_attention).

Deciding (``DECISIONS`` below, the same table as NOTES.md): a candidate flips its default when (1) the gate tests
of its op ran on the GPU, at least one passed and none failed; (2) on every metric of its row it is at least
``THRESHOLD`` (3%) faster than the default by median; (3) its 20th-80th percentile range lies wholly below the
default's (p80 of the candidate <= p20 of the default), so run-to-run noise cannot make the win; (4) both were timed
by the same timer (both CUDA graphs, or both events). Of several winning candidates for one default the fastest
(geometric mean over the row's metrics) is taken. Anything missing means "keep", with the reason. The targets
of issue 15 (ratios to the peer in the same run) are printed after, for the record; they flip nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional

THRESHOLD = 0.03

# Which gate-test file decides which group (a file's name is enough: junit classnames are module paths).
TEST_GROUPS = {
    "test_forward_variants": "attention_fwd",
    "test_backward_variants": "attention_bwd",
    "test_masked_patch_loss": "masked_patch_loss",
    "test_masked_token_loss_variants": "masked_token_loss",
}

ATTN_DEFAULTS = 'moca_kernels/attention/op.py, _OP: variant_backends("triton", ..., {"fwd": "base", "bwd": "base"}, ...)'
MPL_CUDA = 'moca_kernels/losses/masked_patch_loss.py, _OP: variant_backends("cuda", ..., {"fwd": "v1"}, ...)'
MPL_TRITON = 'moca_kernels/losses/masked_patch_loss.py, _OP: variant_backends("triton", ..., {"fwd": "v1"}, ...)'
MTL_DEFAULTS = ('moca_kernels/losses/masked_token_loss.py, _OP: variant_backends("triton", _PARTS, '
                '{"fwd": "v1", "grad": "v1"}, ...) and masked_token_loss_triton.py DEFAULT_VARIANT')

# default: (candidates, metric keys with {v} for the variant, base variant, test group, what flips, how)
DECISIONS = [
    dict(default="attention bwd", base="base", candidates=["even", "fused"], tests="attention_bwd",
         metrics=["attention_bwd.{v}.documents.fwd_bwd", "attention_bwd.{v}.mixed.fwd_bwd"],
         flips=ATTN_DEFAULTS, spelling='"bwd": "{v}"  (impl spelling triton:{v})'),
    dict(default="attention fwd", base="base", candidates=["ws", "tma"], tests="attention_fwd",
         metrics=["attention_fwd.{v}.documents.fwd", "attention_fwd.{v}.mixed.fwd"],
         flips=ATTN_DEFAULTS, spelling='"fwd": "{v}"  (impl spelling triton:{v})'),
    dict(default="masked_patch_loss cuda", base="v1", candidates=["v2", "v2p"], tests="masked_patch_loss",
         metrics=["masked_patch_loss.cuda.{v}"], flips=MPL_CUDA, spelling='{{"fwd": "{v}"}}  (cuda:{v})'),
    dict(default="masked_patch_loss triton", base="v1", candidates=["v2"], tests="masked_patch_loss",
         metrics=["masked_patch_loss.triton.{v}"], flips=MPL_TRITON, spelling='{{"fwd": "{v}"}}  (triton:{v})'),
    dict(default="masked_token_loss", base="v1", candidates=["v2", "v3"], tests="masked_token_loss",
         metrics=["masked_token_loss.{v}"], flips=MTL_DEFAULTS,
         spelling='{{"fwd": "{v}", "grad": "{v}"}}  (triton:{v})'),
]

# Issue 15's targets: (label, ours, peer or None, kind, target). kind "ratio": peer / ours >= target;
# "ms": ours <= target.
TARGETS = [
    ("attention documents fwd vs Flex", "attention_fwd.base.documents.fwd", "attention_fwd.flex.documents.fwd", "ratio", 1.15),
    ("attention documents fwd+bwd vs Flex", "attention_bwd.base.documents.fwd_bwd",
     "attention_bwd.flex.documents.fwd_bwd", "ratio", 1.10),
    ("attention mixed fwd+bwd vs Flex", "attention_bwd.base.mixed.fwd_bwd", "attention_bwd.flex.mixed.fwd_bwd",
     "ratio", 1.15),
    ("masked_patch_loss N=262144 P=1176 (cuda v1)", "masked_patch_loss.cuda.v1", None, "ms", 0.6),
    ("masked_token_loss exact vs CCE exact", "masked_token_loss.v1", "masked_token_loss.cce_exact", "ratio", 1.2),
    ("masked_token_loss filtered vs CCE filtered (default)", "masked_token_loss.filtered",
     "masked_token_loss.cce_filtered", "ratio", 1.1),
    ("attention 7B-text documents fwd+bwd vs the better of Flex and varlen", "attention.7B-text.documents.fwd_bwd.moca",
     ("attention.7B-text.documents.fwd_bwd.flex", "attention.7B-text.documents.fwd_bwd.varlen"), "ratio", 1.10),
    ("attention vision documents fwd+bwd vs the better of Flex and varlen", "attention.vision.documents.fwd_bwd.moca",
     ("attention.vision.documents.fwd_bwd.flex", "attention.vision.documents.fwd_bwd.varlen"), "ratio", 1.10),
]
ATTN_CASES = {"moca triton": "moca", "FlexAttention (compiled)": "flex", "torch varlen_attn": "varlen"}


# ------------------------------------------------------------------------------------------------------------
# Collecting a run folder
# ------------------------------------------------------------------------------------------------------------

def _metric(d: dict) -> dict:
    keep = ("median_ms", "p20_ms", "p80_ms", "timer", "samples", "calls")
    return {k: d[k] for k in keep if k in d and d[k] is not None}


def read_junit(path: Path) -> Dict[str, Dict[str, int]]:
    """{group: {passed, failed, skipped}} from a pytest junit XML (group: TEST_GROUPS of the test's module)."""
    out: Dict[str, Dict[str, int]] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        module = (case.get("classname") or "").split(".")
        group = next((TEST_GROUPS[m] for m in module if m in TEST_GROUPS), "other")
        tags = {child.tag for child in case}
        kind = "failed" if tags & {"failure", "error"} else "skipped" if "skipped" in tags else "passed"
        counts = out.setdefault(group, dict(passed=0, failed=0, skipped=0))
        counts[kind] += 1
    return out


def _report_metrics(rep: dict, metrics: dict) -> None:
    """Harness reports (bench/harness.py save()) -> metric keys."""
    title = rep.get("title", "")
    for r in rep.get("results", []):
        if r.get("median_ms") is None:
            continue
        name = r["name"]
        key = None
        if title == "masked_patch_loss fwd+bwd" and ":" not in name:
            parts = name.split()
            if len(parts) == 3 and parts[0] == "moca" and parts[1] in ("cuda", "triton"):
                key = f"masked_patch_loss.{parts[1]}.{parts[2]}"
        elif title.startswith("masked_attention ") and len(title.split()) == 4 and name in ATTN_CASES:
            _, label, kind, mode = title.split()
            key = f"attention.{label}.{kind}.{mode.replace('+', '_')}.{ATTN_CASES[name]}"
        elif title == "masked_token_loss fwd+bwd" and rep.get("shape", {}).get("counted", 1.0) == 1.0:
            if name == "moca triton":
                key = "masked_token_loss.v1"
            elif name.startswith("moca triton v") and len(name.split()) == 3:
                key = f"masked_token_loss.{name.split()[2]}"
            elif name.startswith("moca triton filtered"):
                key = "masked_token_loss.filtered"
            elif name.startswith("CCE filtered"):
                key = "masked_token_loss.cce_filtered"
            elif name.startswith("CCE exact"):
                key = "masked_token_loss.cce_exact"
            elif name.startswith("Liger"):
                key = "masked_token_loss.liger"
        if key:
            metrics[key] = _metric(r)


def collect(run_dir: Path) -> dict:
    run = dict(run_dir=str(run_dir), device=None, steps=[], tests={}, metrics={})
    summary = run_dir / "summary.tsv"
    if summary.exists():
        with summary.open() as f:
            run["steps"] = list(csv.DictReader(f, delimiter="\t"))
    res = run_dir / "results"
    for name in ("gate_tests.xml", "full_tests.xml"):
        if (res / name).exists():
            try:
                counts = read_junit(res / name)
            except ET.ParseError as exc:  # a run cut off while pytest wrote it
                print(f"(cannot read {name}: {exc})", file=sys.stderr)
                continue
            for group, c in counts.items():
                tot = run["tests"].setdefault(group, dict(passed=0, failed=0, skipped=0))
                for k in tot:
                    tot[k] += c[k]
    for bench in ("attention_bwd", "attention_fwd"):
        p = res / f"{bench}.json"
        if not p.exists():
            continue
        data = json.loads(p.read_text())
        run["device"] = run["device"] or data.get("device")
        for row in data.get("rows", []):
            for part, st in row.get("timings", {}).items():
                run["metrics"][f"{bench}.{row['variant']}.{part}"] = _metric(st)
    for p in sorted(res.rglob("*.json")) if res.exists() else []:
        if p.name in ("attention_bwd.json", "attention_fwd.json"):
            continue
        try:
            rep = json.loads(p.read_text())
        except ValueError:
            continue
        if isinstance(rep, dict) and "results" in rep:
            run["device"] = run["device"] or rep.get("device")
            _report_metrics(rep, run["metrics"])
    return run


# ------------------------------------------------------------------------------------------------------------
# Deciding
# ------------------------------------------------------------------------------------------------------------

def _timer_kind(m: dict) -> str:
    return (m.get("timer") or "?").split(" ")[0]


def judge(run: dict, row: dict, v: str) -> dict:
    """One candidate against its base: {"wins": bool, "why": str, "ratios": [...]}."""
    tests = run.get("tests", {}).get(row["tests"])
    ratios = []
    if not tests or tests["passed"] == 0:
        return dict(wins=False, why=f"gate tests ({row['tests']}) did not run on a GPU", ratios=ratios)
    if tests["failed"]:
        return dict(wins=False, why=f"gate tests ({row['tests']}): {tests['failed']} failed", ratios=ratios)
    metrics = run.get("metrics", {})
    reasons = []
    for pattern in row["metrics"]:
        base, cand = metrics.get(pattern.format(v=row["base"])), metrics.get(pattern.format(v=v))
        label = pattern.format(v=v)
        if not base or not cand or "median_ms" not in base or "median_ms" not in cand:
            return dict(wins=False, why=f"no timing for {label} or its base", ratios=ratios)
        ratio = base["median_ms"] / cand["median_ms"]
        ratios.append(ratio)
        if _timer_kind(base) != _timer_kind(cand):
            reasons.append(f"{label}: timers differ ({base.get('timer')} vs {cand.get('timer')})")
        elif ratio < 1 + THRESHOLD:
            reasons.append(f"{label}: {ratio:.3f}x (< {1 + THRESHOLD:.2f}x)")
        elif cand.get("p80_ms", cand["median_ms"]) > base.get("p20_ms", base["median_ms"]):
            reasons.append(f"{label}: {ratio:.3f}x but p80 {cand['p80_ms']:.4f} > base p20 {base['p20_ms']:.4f} ms")
    if reasons:
        return dict(wins=False, why="; ".join(reasons), ratios=ratios)
    return dict(wins=True, why="", ratios=ratios)


def decide(run: dict) -> List[dict]:
    out = []
    for row in DECISIONS:
        verdicts = {v: judge(run, row, v) for v in row["candidates"]}
        winners = [v for v, j in verdicts.items() if j["wins"]]
        best = max(winners, key=lambda v: math.exp(sum(map(math.log, verdicts[v]["ratios"])) / len(verdicts[v]["ratios"])),
                   default=None)
        out.append(dict(default=row["default"], base=row["base"], verdicts=verdicts, flip_to=best,
                        flips=row["flips"], spelling=row["spelling"].format(v=best) if best else None))
    return out


def targets(run: dict) -> List[str]:
    lines, metrics = [], run.get("metrics", {})
    for label, ours, peer, kind, target in TARGETS:
        peers = [metrics[k] for k in ((peer,) if isinstance(peer, str) else peer or ()) if k in metrics]
        o, p = metrics.get(ours), min(peers, key=lambda m: m["median_ms"]) if peers else None
        if not o or (peer and not p):
            lines.append(f"  {label}: not measured")
        elif kind == "ratio":
            r = p["median_ms"] / o["median_ms"]
            lines.append(f"  {label}: {r:.2f}x ({o['median_ms']:.3f} vs {p['median_ms']:.3f} ms), target >= {target}x: "
                         f"{'met' if r >= target else 'missed'}")
        else:
            lines.append(f"  {label}: {o['median_ms']:.3f} ms, target <= {target} ms: "
                         f"{'met' if o['median_ms'] <= target else 'missed'}")
    return lines


def report(run: dict) -> str:
    lines = [f"decisions (bench/NOTES.md decision table; threshold {THRESHOLD:.0%} by median, p80 <= base p20, "
             f"same timer, gate tests passed) on {run.get('device') or 'unknown device'}"]
    if run.get("steps"):
        bad = [s["step"] for s in run["steps"] if s.get("status") not in ("ok", "SKIPPED")]
        lines.append(f"steps: {len(run['steps'])} run, not ok: {', '.join(bad) if bad else 'none'}")
    tests = run.get("tests", {})
    lines.append("tests: " + (", ".join(f"{g} {c['passed']} passed / {c['failed']} failed / {c['skipped']} skipped"
                                        for g, c in sorted(tests.items())) or "none read"))
    for d in decide(run):
        lines.append(f"\n{d['default']} (default {d['base']}):")
        for v, j in d["verdicts"].items():
            r = " / ".join(f"{x:.3f}x" for x in j["ratios"]) or "-"
            lines.append(f"  {v:<6} {r:<20} {'WINS' if j['wins'] else 'keep: ' + j['why']}")
        if d["flip_to"]:
            lines.append(f"  -> FLIP the default to {d['flip_to']}: in {d['flips']} write {d['spelling']}")
        else:
            lines.append(f"  -> keep {d['base']}")
    lines.append("\ntargets of issue 15 (for the record; they flip nothing):")
    lines += targets(run)
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="gpu_run.sh's work folder, or a run.json")
    ap.add_argument("--write", type=Path, default=None, help="write the collected run JSON here")
    args = ap.parse_args(argv)
    if args.run.is_dir():
        run = collect(args.run)
    elif args.run.exists():
        run = json.loads(args.run.read_text())
    else:
        print(f"decide.py: {args.run} is neither a run folder nor a run JSON", file=sys.stderr)
        return 2
    run["decisions"] = [dict(default=d["default"], flip_to=d["flip_to"], spelling=d["spelling"],
                             verdicts={v: dict(wins=j["wins"], why=j["why"], ratios=j["ratios"])
                                       for v, j in d["verdicts"].items()})
                        for d in decide(run)]
    if args.write:
        args.write.write_text(json.dumps(run, indent=1))
    print(report(run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
