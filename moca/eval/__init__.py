"""Evaluation of embedding models: MMEB-style candidate lists and ViDoRe-style retrieval, from our JSONL or from
the published layouts, scored as the benchmarks score them (:mod:`moca.eval.metrics`).

    moca eval --config eval.yaml [--model runs/cl/final] [--set batch_size=64 ...]

prints a table (and the paper-style MMEB / ViDoRe tables when such tasks ran) and writes JSON. Task types
(sides: see :mod:`moca.data.retrieval`; relative image paths resolve against the task file's folder, or an
``mmeb`` task's ``image_root``, and paths leading out of it are refused unless ``allow_outside_paths``; every
image, a file or bytes of a ``beir`` corpus, is checked against ``max_image_pixels`` from its header):

* ``candidates`` (MMEB style, JSONL): one file, each line ``{"id", "query": SIDE, "candidates": [SIDE, ...],
  "answer": i}``; metric precision@1.
* ``mmeb``: a published MMEB-eval task folder (``path``, parquet; images under ``image_root``;
  :func:`moca.data.published.read_mmeb_task`); precision@1. The task's category and IND/OOD split come from
  :mod:`moca.eval.mmeb_tasks` by name (or the task's ``category`` / ``split`` keys).
* ``retrieval`` (ViDoRe / BEIR style, JSONL): ``queries`` lines ``{"id", "query": SIDE, "relevant": {doc_id:
  grade}}`` (or a list of doc ids, grade 1) and ``corpus`` lines ``{"id", "doc": SIDE}``; Recall@k and nDCG@k.
* ``beir``: a published BEIR-layout folder (``path`` holding corpus/ queries/ qrels/; ViDoRe v1/v2;
  :func:`moca.data.published.read_beir`), ``language`` to keep one language's queries; Recall@k and nDCG@k.

precision@1 uses MMEB's rule (a tie with the gold counts; ``precision_rule: strict`` for a strict win).
Retrieval ranks and scores as trec_eval does (``ties: trec``), and every retrieval task writes its run as
``<task>.run`` (``qid Q0 docid rank score tag``, top ``run_depth``) next to the results JSON, so outside tools
can re-score it. Each task has a headline metric (precision@1, nDCG@k); ``overall`` is their mean over tasks.
Identical inputs are embedded once per task. Instructions: ``query_instruction`` goes before each query,
``doc_instruction`` before each document, or after it with ``doc_instruction_position: after`` (the default
for ``beir`` tasks: ViDoRe's official evaluation puts the document prompt after the page image). MMEB-eval
texts already hold their instructions. ``min_pixels`` / ``max_pixels`` bound every image's resized area (the
MoCa paper: 256 to 1024 merged tokens, i.e. 256 * 28 * 28 to 1024 * 28 * 28 pixels for Qwen2.5-VL).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from ..config import from_dict
from ..data.images import DEFAULT_MAX_IMAGE_PIXELS, ImageRoot
from ..data.processor import BadRecord
from ..data.retrieval import check_side, read_jsonl, side_segments
from .metrics import (P1_RULES, TIE_RULES, ndcg_at_k, ndcg_per_query, precision_at_1, rank_documents,
                      recall_at_k, recall_per_query, write_trec_run)
from .mmeb_tasks import CATEGORIES, CATEGORY_TITLES, mmeb_task_info

log = logging.getLogger("moca.eval")

TASK_TYPES = ("candidates", "retrieval", "mmeb", "beir")


@dataclass
class EvalTask:
    """One task: ``type`` candidates (``file``), retrieval (``queries`` + ``corpus``), mmeb (``path`` = task
    folder, ``image_root``) or beir (``path`` = folder with corpus/ queries/ qrels/, ``language``), with
    instructions. ``category`` / ``split`` (IND / OOD) group the task in the MMEB table (mmeb tasks: from the
    published task list by name when not given). ``limit``: use only the first n queries (a quick look)."""

    name: str = ""
    type: str = "candidates"
    file: Optional[str] = None
    queries: Optional[str] = None
    corpus: Optional[str] = None
    path: Optional[str] = None
    image_root: Optional[str] = None
    language: Optional[List[str]] = None
    query_instruction: str = ""
    doc_instruction: str = ""
    doc_instruction_position: Optional[str] = None     # before | after (None: after for beir, before otherwise)
    category: Optional[str] = None
    split: Optional[str] = None
    limit: Optional[int] = None

    def __post_init__(self):
        if not self.name:
            raise ValueError("an eval task needs a name")
        if self.type not in TASK_TYPES:
            raise ValueError(f"eval task {self.name}: type must be one of {TASK_TYPES}, got {self.type!r}")
        if self.doc_instruction_position is None:
            self.doc_instruction_position = "after" if self.type == "beir" else "before"
        if self.doc_instruction_position not in ("before", "after"):
            raise ValueError(f"eval task {self.name}: doc_instruction_position must be 'before' or 'after', got "
                             f"{self.doc_instruction_position!r}")
        if isinstance(self.language, str):
            self.language = [self.language]
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise ValueError(f"eval task {self.name}: limit must be an integer >= 1, got {self.limit!r}")
        if self.type == "mmeb":
            info = mmeb_task_info(self.name) or {}
            self.category = self.category or info.get("category")
            self.split = self.split or info.get("split")
        if self.category is not None and self.category not in CATEGORIES:
            raise ValueError(f"eval task {self.name}: category must be one of {CATEGORIES}, got {self.category!r}")
        if self.split is not None and self.split not in ("IND", "OOD"):
            raise ValueError(f"eval task {self.name}: split must be IND or OOD, got {self.split!r}")
        if self.type in ("mmeb", "beir"):
            if not self.path:
                raise ValueError(f"eval task {self.name}: a {self.type} task needs 'path'")
            if not Path(self.path).exists():
                raise FileNotFoundError(f"eval task {self.name}: path: {self.path} does not exist")
            if self.image_root is not None and not Path(self.image_root).is_dir():
                raise FileNotFoundError(f"eval task {self.name}: image_root: {self.image_root} is not a folder")
            return
        need = ["file"] if self.type == "candidates" else ["queries", "corpus"]
        for key in need:
            if not getattr(self, key):
                raise ValueError(f"eval task {self.name}: a {self.type} task needs '{key}'")
            path = Path(getattr(self, key))
            if not path.is_file():
                raise FileNotFoundError(f"eval task {self.name}: {key}: {path} "
                                        + ("is not a file" if path.exists() else "does not exist"))


@dataclass
class EvalModelConfig:
    """``path``: a local checkpoint directory (moca save or plain Qwen2-VL / Qwen2.5-VL); None = the tiny
    default model, untrained (a baseline). ``pooling`` / ``causal`` / ``append_eos`` None = as saved. ``dtype``: float32, bfloat16
    or float16 (None = as saved); ``device``: cpu, cuda or cuda:N (None = cuda when available)."""

    path: Optional[str] = None
    pooling: Optional[str] = None
    causal: Optional[bool] = None
    append_eos: Optional[bool] = None    # end inputs with <|endoftext|> (None = as saved; no for the tiny default)
    dtype: Optional[str] = None
    device: Optional[str] = None
    tiny_seed: int = 0


@dataclass
class EvalConfig:
    model: EvalModelConfig = field(default_factory=EvalModelConfig)
    tasks: List[EvalTask] = field(default_factory=list)     # empty = the embedded held-out tasks
    embedded_dir: Optional[str] = None                      # where to write them (default: next to output)
    embedded_seed: int = 0
    batch_size: int = 32
    packed: bool = True
    recall_k: List[int] = field(default_factory=lambda: [1, 5, 10])
    ndcg_k: int = 5
    output_dir: Optional[str] = None                        # results.json goes here (default runs/eval)
    output: Optional[str] = None                            # alias: the results file itself (older configs)
    show_progress: bool = True
    allow_outside_paths: bool = False                       # image paths outside a task file's folder
    max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS   # width x height bound (header); null = none
    precision_rule: str = "official"    # MMEB precision@1: official (a tie with the gold counts) | strict
    ties: str = "trec"                  # retrieval tie order: trec (trec_eval's) | pessimistic
    run_depth: int = 100                # documents per query in each <task>.run file
    max_length: Optional[int] = None    # truncate each input at this many tokens (official eval: 1280)
    min_pixels: Optional[int] = None    # image area bounds in eval (None = the model's preprocessor config)
    max_pixels: Optional[int] = None

    def __post_init__(self):
        self.tasks = [t if isinstance(t, EvalTask) else from_dict(EvalTask, t, f"tasks[{i}]")
                      for i, t in enumerate(self.tasks)]
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"eval task names must be unique, got {names}")
        if not isinstance(self.recall_k, (list, tuple)) or not all(isinstance(k, int) for k in self.recall_k):
            raise ValueError(f"recall_k must be a list of integers, e.g. [1, 5, 10], got {self.recall_k!r}")
        self.recall_k = list(self.recall_k)
        if self.batch_size < 1 or self.ndcg_k < 1 or any(k < 1 for k in self.recall_k):
            raise ValueError("batch_size, ndcg_k and every recall_k must be >= 1")
        if self.output_dir is not None and self.output is not None:
            raise ValueError(f"give output_dir (a folder for results.json) or output (the results file), not both "
                             f"(output_dir={self.output_dir!r}, output={self.output!r})")
        if self.precision_rule not in P1_RULES:
            raise ValueError(f"precision_rule must be one of {P1_RULES}, got {self.precision_rule!r}")
        if self.ties not in TIE_RULES:
            raise ValueError(f"ties must be one of {TIE_RULES}, got {self.ties!r}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 or null, got {self.max_length}")
        if self.run_depth < 1:
            raise ValueError(f"run_depth must be >= 1, got {self.run_depth}")
        for key in ("min_pixels", "max_pixels"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{key} must be a positive integer (pixels), got {v!r}")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels {self.min_pixels} is above max_pixels {self.max_pixels}")

    @property
    def results_path(self) -> Path:
        """Where the results JSON goes: ``<output_dir>/results.json``, or ``output`` when that is given."""
        if self.output is not None:
            return Path(self.output)
        return Path(self.output_dir or "runs/eval") / "results.json"


# ------------------------------------------------------------------------------------------------------------
# Running tasks
# ------------------------------------------------------------------------------------------------------------


class _SideCache:
    """Embeds each distinct (side, instruction) once; sides are checked when added (a missing image or an empty
    text fails before any embedding work)."""

    def __init__(self, model, root: Path, cfg: EvalConfig, task: str):
        self.model, self.cfg, self.task = model, cfg, task
        self.root = ImageRoot(Path(root), cfg.allow_outside_paths, cfg.max_image_pixels)   # paths stay inside
        self.keys: Dict[str, int] = {}
        self.items: List[tuple] = []

    def add(self, side, name: str, instruction: str, after: bool = False) -> int:
        """Register a side (``instruction`` before it, or after it with ``after``); returns its row."""
        key = json.dumps([side, instruction, after], sort_keys=True, default=_json_key)
        if key not in self.keys:
            if after and instruction:
                try:
                    segs = side_segments(side, name)
                except BadRecord as exc:
                    raise ValueError(f"eval task {self.task}: {str(exc).removeprefix('record ')}") from exc
                side, instruction = {"content": segs + [{"text": instruction}]}, None
            try:
                check_side(side, name, self.root)
            except BadRecord as exc:   # "record r7 (t.jsonl:3) query: ..." -> "eval task t: r7 (t.jsonl:3) query: ..."
                raise ValueError(f"eval task {self.task}: {str(exc).removeprefix('record ')}") from exc
            self.keys[key] = len(self.items)
            self.items.append((side, f"{self.task}: {name}", instruction or None))
        return self.keys[key]

    def embed(self) -> torch.Tensor:
        return self.model.encode_items(self.items, root=self.root, batch_size=self.cfg.batch_size,
                                       show_progress=self.cfg.show_progress, packed=self.cfg.packed,
                                       desc=f"eval {self.task}")


def _json_key(obj):
    """JSON stand-in for in-memory images in cache keys (their stable key, else identity)."""
    return getattr(obj, "key", None) or f"<{type(obj).__name__} {id(obj)}>"


def _record_name(rec: dict, path: Path, n: int) -> str:
    return f"{rec.get('id')} ({path.name}:{n})" if rec.get("id") is not None else f"{path.name}:{n}"


def run_candidates(model, task: EvalTask, cfg: EvalConfig, run_dir: Optional[Path] = None) -> dict:
    if task.type == "mmeb":
        from ..data.published import mmeb_image_root, read_mmeb_task

        try:
            root = mmeb_image_root(task.path, task.image_root)
            recs = read_mmeb_task(task.path, root, limit=task.limit, allow_outside_paths=cfg.allow_outside_paths)
        except (ValueError, FileNotFoundError) as exc:
            raise type(exc)(f"eval task {task.name}: {exc}") from exc
        return _score_candidates(model, task, cfg, [(r.id, r.query, r.candidates, r.gold) for r in recs], root)
    path = Path(task.file)
    records = read_jsonl(path)[:task.limit]
    if not records:
        raise ValueError(f"eval task {task.name}: {path} has no records")
    items = []
    for n, rec in enumerate(records, 1):
        name = _record_name(rec, path, n)
        cands = rec.get("candidates")
        if "query" not in rec or not isinstance(cands, list) or not cands or "answer" not in rec:
            raise ValueError(f"eval task {task.name}: record {name} needs 'query', a non-empty 'candidates' list "
                             "and 'answer'")
        if not isinstance(rec["answer"], int) or not 0 <= rec["answer"] < len(cands):
            raise ValueError(f"eval task {task.name}: record {name}: answer {rec['answer']!r} is not an index into "
                             f"its {len(cands)} candidates")
        items.append((name, rec["query"], cands, rec["answer"]))
    return _score_candidates(model, task, cfg, items, path.parent)


def _score_candidates(model, task: EvalTask, cfg: EvalConfig, items, root: Optional[Path]) -> dict:
    """items: (name, query side, candidate sides, gold index) per query."""
    cache = _SideCache(model, root, cfg, task.name)
    after = task.doc_instruction_position == "after"
    q_rows, c_rows, gold = [], [], []
    for name, query, cands, g in items:
        q_rows.append(cache.add(query, f"{name} query", task.query_instruction))
        c_rows.append([cache.add(c, f"{name} candidates[{j}]", task.doc_instruction, after)
                       for j, c in enumerate(cands)])
        gold.append(g)
    emb = cache.embed()
    scores = [emb[c] @ emb[q] for q, c in zip(q_rows, c_rows)]
    return {"type": task.type, "n_queries": len(items), "headline": "precision@1",
            "category": task.category, "split": task.split,
            "metrics": {"precision@1": precision_at_1(scores, gold, rule=cfg.precision_rule)}}


def run_retrieval(model, task: EvalTask, cfg: EvalConfig, run_dir: Optional[Path] = None) -> dict:
    if task.type == "beir":
        from ..data.published import read_beir

        try:
            bt = read_beir(task.path, task.language, limit_queries=task.limit)
        except (ValueError, FileNotFoundError) as exc:
            raise type(exc)(f"eval task {task.name}: {exc}") from exc
        names = [f"corpus-id {d}" for d in bt.doc_ids]
        res = _score_retrieval(model, task, cfg, bt.query_ids, bt.queries, [f"query-id {q}" for q in bt.query_ids],
                               Path(task.path), bt.doc_ids, bt.docs, names, Path(task.path),
                               [bt.qrels[q] for q in bt.query_ids], run_dir)
        res["languages"] = bt.languages
        return res
    qpath, cpath = Path(task.queries), Path(task.corpus)
    queries, corpus = read_jsonl(qpath)[:task.limit], read_jsonl(cpath)
    if not queries or not corpus:
        raise ValueError(f"eval task {task.name}: empty queries ({qpath}) or corpus ({cpath})")
    doc_ids, doc_sides, doc_names = [], [], []
    for n, rec in enumerate(corpus, 1):
        name = _record_name(rec, cpath, n)
        if "id" not in rec or "doc" not in rec:
            raise ValueError(f"eval task {task.name}: corpus record {name} needs 'id' and 'doc'")
        doc_ids.append(str(rec["id"]))
        doc_sides.append(rec["doc"])
        doc_names.append(name)
    if len(set(doc_ids)) != len(doc_ids):
        raise ValueError(f"eval task {task.name}: duplicate document ids in {cpath}")
    known = set(doc_ids)
    qids, q_sides, q_names, relevant = [], [], [], []
    for n, rec in enumerate(queries, 1):
        name = _record_name(rec, qpath, n)
        rel = rec.get("relevant")
        if isinstance(rel, list):
            rel = {str(d): 1.0 for d in rel}
        if "query" not in rec or not isinstance(rel, dict) or not rel:
            raise ValueError(f"eval task {task.name}: query record {name} needs 'query' and a non-empty 'relevant'")
        rel = {str(d): float(g) for d, g in rel.items()}
        missing = set(rel) - known
        if missing:
            raise ValueError(f"eval task {task.name}: query {name} names documents not in the corpus: "
                             f"{sorted(missing)[:5]}")
        qids.append(str(rec.get("id", f"q{n}")).replace(" ", "_"))
        q_sides.append(rec["query"])
        q_names.append(name)
        relevant.append(rel)
    return _score_retrieval(model, task, cfg, qids, q_sides, q_names, qpath.parent, doc_ids, doc_sides, doc_names,
                            cpath.parent, relevant, run_dir)


def _score_retrieval(model, task: EvalTask, cfg: EvalConfig, qids, q_sides, q_names, q_root, doc_ids, doc_sides,
                     doc_names, d_root, relevant, run_dir: Optional[Path]) -> dict:
    """Embed, rank (``cfg.ties``), score Recall@k / nDCG@k as trec_eval, and write ``<run_dir>/<task>.run``."""
    docs = _SideCache(model, d_root, cfg, task.name)
    after = task.doc_instruction_position == "after"
    d_rows = [docs.add(side, name, task.doc_instruction, after) for side, name in zip(doc_sides, doc_names)]
    qs = _SideCache(model, q_root, cfg, task.name)
    q_rows = [qs.add(side, name, task.query_instruction) for side, name in zip(q_sides, q_names)]
    d_emb = docs.embed()[d_rows]
    q_emb = qs.embed()[q_rows]
    scores = q_emb @ d_emb.T                                              # float32 [Q, N]
    k_max = max(cfg.recall_k + [cfg.ndcg_k])
    ranked = rank_documents(scores, doc_ids, relevant, k_max, ties=cfg.ties)
    metrics, per_query = {}, {}
    for k in cfg.recall_k:
        per_query[f"recall@{k}"] = recall_per_query(ranked, relevant, k)
    per_query[f"ndcg@{cfg.ndcg_k}"] = ndcg_per_query(ranked, relevant, cfg.ndcg_k)
    for m, vals in per_query.items():
        vals = [v for v in vals if v is not None]
        metrics[m] = sum(vals) / len(vals)
    out = {"type": task.type, "n_queries": len(qids), "n_docs": len(doc_ids), "headline": f"ndcg@{cfg.ndcg_k}",
           "category": task.category, "split": task.split, "metrics": metrics}
    if run_dir is not None:
        run_path = Path(run_dir) / f"{task.name}.run"
        run_path.parent.mkdir(parents=True, exist_ok=True)
        write_trec_run(run_path, qids, doc_ids, scores, k=max(cfg.run_depth, k_max), tag="moca", ties=cfg.ties)
        out["run_file"] = str(run_path)
    return out


def evaluate(model, tasks: Sequence[EvalTask], cfg: Optional[EvalConfig] = None,
             run_dir: Optional[Path] = None) -> dict:
    """Run every task with an embedder (:class:`~moca.embedding.MocaEmbedder`); returns the results dict
    ``{"tasks": {name: {type, n_queries, headline, category, split, metrics}}, "overall": mean headline,
    "summary": {"mmeb": ..., "vidore": ...}}``. Retrieval tasks write ``<run_dir>/<task>.run`` when ``run_dir``
    is given."""
    cfg = cfg or EvalConfig()
    results = {}
    for task in tasks:
        run = run_candidates if task.type in ("candidates", "mmeb") else run_retrieval
        results[task.name] = run(model, task, cfg, run_dir)
    overall = sum(r["metrics"][r["headline"]] for r in results.values()) / max(len(results), 1)
    return {"tasks": results, "overall": overall, "summary": summarize(results)}


def summarize(task_results: dict) -> dict:
    """Paper-style aggregates: over tasks with an MMEB category, the mean precision@1 per category, per split
    (IND / OOD) and overall (with task counts); over retrieval tasks, the mean headline (nDCG@k)."""
    def mean(names):
        vals = [task_results[n]["metrics"][task_results[n]["headline"]] for n in names]
        return {"score": sum(vals) / len(vals), "n_tasks": len(vals)} if vals else None

    mm = [n for n, r in task_results.items() if r.get("category") and r["headline"] == "precision@1"]
    ret = [n for n, r in task_results.items() if r["type"] in ("retrieval", "beir")]
    out = {}
    if mm:
        out["mmeb"] = {"categories": {c: mean([n for n in mm if task_results[n]["category"] == c])
                                      for c in CATEGORIES},
                       "IND": mean([n for n in mm if task_results[n].get("split") == "IND"]),
                       "OOD": mean([n for n in mm if task_results[n].get("split") == "OOD"]),
                       "overall": mean(mm)}
    if ret:
        out["vidore"] = {"tasks": {n: task_results[n]["metrics"][task_results[n]["headline"]] for n in ret},
                         "average": mean(ret)}
    return out


# ------------------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------------------
# moca eval
# ------------------------------------------------------------------------------------------------------------


def load_embedder(mc: EvalModelConfig):
    """The embedder named by the model config (the untrained tiny default when ``path`` is None)."""
    from ..embedding import MocaEmbedder, resolve_device

    dtype = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if mc.dtype not in dtype:
        raise ValueError(f"model.dtype must be float32, bfloat16 or float16, got {mc.dtype!r}")
    device = resolve_device(mc.device or ("cuda" if torch.cuda.is_available() else "cpu"), "model.device")
    if mc.path is None:
        model = MocaEmbedder.tiny(seed=mc.tiny_seed, causal=bool(mc.causal), pooling=mc.pooling,
                                  append_eos=bool(mc.append_eos))
        model = model.to(dtype[mc.dtype]) if mc.dtype else model
    else:
        model = MocaEmbedder.from_pretrained(mc.path, pooling=mc.pooling, causal=mc.causal, dtype=dtype[mc.dtype],
                                             append_eos=mc.append_eos)
    return model.to(device)


def embedded_tasks(out_dir, seed: int = 0) -> List[EvalTask]:
    """Write (once per seed) and return the embedded held-out tasks."""
    from ..data.embedded_retrieval import write_eval_tasks

    from ..fsutil import files_named_by_jsonl, load_index, save_index

    out = Path(out_dir)
    index = out / "tasks.json"
    data = load_index(index, lambda d: d.get("seed") == seed)   # same seed and every listed file intact
    if data is None:
        tasks = write_eval_tasks(out, seed=seed)
        jsonl = [t[k] for t in tasks for k in ("file", "queries", "corpus") if t.get(k)]
        data = save_index(index, {"seed": seed, "tasks": tasks}, files_named_by_jsonl(jsonl))
    return [from_dict(EvalTask, t, f"tasks[{i}]") for i, t in enumerate(data["tasks"])]


def set_image_bounds(model, min_pixels: Optional[int], max_pixels: Optional[int]) -> None:
    """Bound the resized area of every image the model embeds (None keeps the model's own bound)."""
    spec = model.processor.image_spec
    lo = min_pixels if min_pixels is not None else spec.min_pixels
    hi = max_pixels if max_pixels is not None else spec.max_pixels
    if lo > hi:
        raise ValueError(f"min_pixels {lo} is above max_pixels {hi} (one of them is the model's own)")
    spec.min_pixels, spec.max_pixels = lo, hi


def run_eval(cfg: EvalConfig) -> dict:
    """Load the model, run the tasks, write ``cfg.results_path`` (JSON); returns the results."""
    out = cfg.results_path
    tasks = cfg.tasks or embedded_tasks(cfg.embedded_dir or out.parent / "eval_data", cfg.embedded_seed)
    model = load_embedder(cfg.model)
    set_image_bounds(model, cfg.min_pixels, cfg.max_pixels)
    model.max_length = cfg.max_length
    results = evaluate(model, tasks, cfg, run_dir=out.parent)
    results["model"] = cfg.model.path or "tiny default (untrained)"
    results["config"] = asdict(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    return results


def _eval_command(args) -> int:
    from ..config import load_config

    cfg = load_config(EvalConfig, args.config, args.set + ([f"model.path={args.model}"] if args.model else []))
    results = run_eval(cfg)
    print(f"model: {results['model']}")
    print(results_table(results))
    tables = paper_tables(results, Path(cfg.model.path).name if cfg.model.path else "tiny (untrained)")
    if tables:
        print()
        print(tables)
    print(f"results written to {cfg.results_path}")
    return 0


def add_cli(sub, train_sub) -> None:
    """Register ``moca eval``."""
    p = sub.add_parser("eval", help="evaluate an embedding model on local JSONL tasks (table + JSON)")
    p.add_argument("--config", default=None, help="YAML config (default: the embedded held-out tasks)")
    p.add_argument("--model", default=None, help="checkpoint directory (overrides model.path)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set batch_size=64 (repeatable)")
    from ..cli import add_output_dir_override

    add_output_dir_override(p, "output_dir")
    p.set_defaults(func=_eval_command)


__all__ = ["EvalTask", "EvalConfig", "EvalModelConfig", "evaluate", "run_eval", "results_table", "format_table",
           "paper_tables", "summarize", "set_image_bounds", "precision_at_1", "recall_at_k", "ndcg_at_k",
           "rank_documents", "add_cli"]
