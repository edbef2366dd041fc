"""Running eval tasks: embed each task's distinct inputs once, score candidate lists (precision@1) and
retrieval (Recall@k, nDCG@k, a TREC run file), and summarise the MMEB / ViDoRe aggregates."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from ..data.images import ImageRoot
from ..data.processor import BadRecord
from ..data.retrieval import check_side, read_jsonl, side_segments
from .config import EvalConfig, EvalTask
from .metrics import ndcg_per_query, precision_at_1, rank_documents, recall_per_query, write_trec_run
from .mmeb_tasks import CATEGORIES

log = logging.getLogger("moca.eval")


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
