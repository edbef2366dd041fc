"""Tables of eval results: one row per task, and the MoCa paper's MMEB / ViDoRe layouts."""

from __future__ import annotations

from typing import Sequence

from .mmeb_tasks import CATEGORIES, CATEGORY_TITLES
from .tasks import summarize


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (numbers as percentages with one decimal when they are fractions)."""
    def cell(v):
        if isinstance(v, float):
            return f"{100 * v:.1f}"
        return str(v)

    cells = [[cell(v) for v in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    line = lambda vals: "| " + " | ".join(str(v).ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "| " + " | ".join("-" * w for w in widths) + " |"] + [line(r) for r in cells])


def results_table(results: dict) -> str:
    """One row per task: its headline metric as the score, every metric (in %), and the overall score."""
    keys = []
    for r in results["tasks"].values():
        keys += [k for k in r["metrics"] if k not in keys]
    rows = [[name, r["type"], r["n_queries"], r["headline"], r["metrics"][r["headline"]]] +
            [r["metrics"].get(k, "") for k in keys] for name, r in results["tasks"].items()]
    rows.append(["overall (mean of the scores)", "", "", "", results["overall"]] + [""] * len(keys))
    return format_table(["task", "type", "queries", "headline", "score"] + keys, rows)


def paper_tables(results: dict, model_name: str = "model") -> str:
    """The aggregates laid out as the MoCa paper's tables: MMEB (per category, IND, OOD, overall; task counts in
    the headers, as many as were run) and ViDoRe (nDCG@k per task and their average). Empty when neither ran."""
    summ = results.get("summary") or summarize(results["tasks"])
    parts = []
    mm = summ.get("mmeb")
    if mm:
        cols = [(CATEGORY_TITLES[c], mm["categories"][c]) for c in CATEGORIES] + \
               [("IND", mm["IND"]), ("OOD", mm["OOD"]), ("Overall", mm["overall"])]
        header = ["Model"] + [f"{t} ({v['n_tasks'] if v else 0})" for t, v in cols]
        parts.append("MMEB (precision@1, %)\n" + format_table(header, [[model_name] + [v["score"] if v else "-"
                                                                                     for _, v in cols]]))
    vd = summ.get("vidore")
    if vd:
        names = list(vd["tasks"])
        heads = {results["tasks"][n]["headline"] for n in names}
        header = ["Model"] + names + ["Avg"]
        parts.append(f"Retrieval, ViDoRe layout ({'/'.join(sorted(heads))}, %)\n" +
                     format_table(header, [[model_name] + [vd["tasks"][n] for n in names] + [vd["average"]["score"]]]))
    return "\n\n".join(parts)
