"""Evaluation of embedding models on local JSONL tasks: MMEB-style candidate lists and ViDoRe-style retrieval.

    moca eval --config eval.yaml [--model runs/cl/final] [--set batch_size=64 ...]

prints a table and writes JSON. Two task types (sides: see :mod:`moca.data.retrieval`; relative image paths
resolve against the task file's folder, and paths leading out of it are refused unless ``allow_outside_paths``):

* ``candidates`` (MMEB): one file, each line ``{"id", "query": SIDE, "candidates": [SIDE, ...], "answer": i}``;
  metric precision@1 (the gold candidate must score strictly highest).
* ``retrieval`` (ViDoRe / BEIR): ``queries`` lines ``{"id", "query": SIDE, "relevant": {doc_id: grade}}``
  (or a list of doc ids, grade 1) and ``corpus`` lines ``{"id", "doc": SIDE}``; metrics Recall@k and nDCG@5.

Each task has a headline metric (precision@1, nDCG@5); ``overall`` is their mean over tasks, as MMEB's overall
score averages its tasks. Identical inputs are embedded once per task.
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
from ..data.retrieval import check_side, read_jsonl
from .metrics import ndcg_at_k, precision_at_1, rank_documents, recall_at_k

log = logging.getLogger("moca.eval")

TASK_TYPES = ("candidates", "retrieval")


@dataclass
class EvalTask:
    """One task: ``type`` candidates (``file``) or retrieval (``queries`` + ``corpus``), with instructions."""

    name: str = ""
    type: str = "candidates"
    file: Optional[str] = None
    queries: Optional[str] = None
    corpus: Optional[str] = None
    query_instruction: str = ""
    doc_instruction: str = ""

    def __post_init__(self):
        if not self.name:
            raise ValueError("an eval task needs a name")
        if self.type not in TASK_TYPES:
            raise ValueError(f"eval task {self.name}: type must be one of {TASK_TYPES}, got {self.type!r}")
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
    default model, untrained (a baseline). ``pooling`` / ``causal`` None = as saved. ``dtype``: float32, bfloat16
    or float16 (None = as saved); ``device``: cpu, cuda or cuda:N (None = cuda when available)."""

    path: Optional[str] = None
    pooling: Optional[str] = None
    causal: Optional[bool] = None
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

    def add(self, side, name: str, instruction: str) -> int:
        key = json.dumps([side, instruction], sort_keys=True)
        if key not in self.keys:
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


def _record_name(rec: dict, path: Path, n: int) -> str:
    return f"{rec.get('id')} ({path.name}:{n})" if rec.get("id") is not None else f"{path.name}:{n}"


def run_candidates(model, task: EvalTask, cfg: EvalConfig) -> dict:
    path = Path(task.file)
    records = read_jsonl(path)
    if not records:
        raise ValueError(f"eval task {task.name}: {path} has no records")
    cache = _SideCache(model, path.parent, cfg, task.name)
    q_rows, c_rows, gold = [], [], []
    for n, rec in enumerate(records, 1):
        name = _record_name(rec, path, n)
        cands = rec.get("candidates")
        if "query" not in rec or not isinstance(cands, list) or not cands or "answer" not in rec:
            raise ValueError(f"eval task {task.name}: record {name} needs 'query', a non-empty 'candidates' list "
                             "and 'answer'")
        if not isinstance(rec["answer"], int) or not 0 <= rec["answer"] < len(cands):
            raise ValueError(f"eval task {task.name}: record {name}: answer {rec['answer']!r} is not an index into "
                             f"its {len(cands)} candidates")
        q_rows.append(cache.add(rec["query"], f"{name} query", task.query_instruction))
        c_rows.append([cache.add(c, f"{name} candidates[{j}]", task.doc_instruction) for j, c in enumerate(cands)])
        gold.append(rec["answer"])
    emb = cache.embed()
    scores = [emb[c] @ emb[q] for q, c in zip(q_rows, c_rows)]
    return {"type": "candidates", "n_queries": len(records), "headline": "precision@1",
            "metrics": {"precision@1": precision_at_1(scores, gold)}}


def run_retrieval(model, task: EvalTask, cfg: EvalConfig) -> dict:
    qpath, cpath = Path(task.queries), Path(task.corpus)
    queries, corpus = read_jsonl(qpath), read_jsonl(cpath)
    if not queries or not corpus:
        raise ValueError(f"eval task {task.name}: empty queries ({qpath}) or corpus ({cpath})")
    doc_ids = []
    docs = _SideCache(model, cpath.parent, cfg, task.name)
    for n, rec in enumerate(corpus, 1):
        name = _record_name(rec, cpath, n)
        if "id" not in rec or "doc" not in rec:
            raise ValueError(f"eval task {task.name}: corpus record {name} needs 'id' and 'doc'")
        doc_ids.append(str(rec["id"]))
        docs.add(rec["doc"], name, task.doc_instruction)
    if len(set(doc_ids)) != len(doc_ids):
        raise ValueError(f"eval task {task.name}: duplicate document ids in {cpath}")
    known = set(doc_ids)
    qs = _SideCache(model, qpath.parent, cfg, task.name)
    q_rows, relevant = [], []
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
        q_rows.append(qs.add(rec["query"], name, task.query_instruction))
        relevant.append(rel)
    d_emb = docs.embed()
    d_emb = d_emb[[docs.keys[json.dumps([rec["doc"], task.doc_instruction], sort_keys=True)] for rec in corpus]]
    q_emb = qs.embed()[q_rows]
    scores = q_emb @ d_emb.T
    k_max = max(cfg.recall_k + [cfg.ndcg_k])
    ranked = rank_documents(scores, doc_ids, relevant, k_max)
    metrics = {f"recall@{k}": recall_at_k(ranked, relevant, k) for k in cfg.recall_k}
    metrics[f"ndcg@{cfg.ndcg_k}"] = ndcg_at_k(ranked, relevant, cfg.ndcg_k)
    return {"type": "retrieval", "n_queries": len(queries), "n_docs": len(corpus), "headline": f"ndcg@{cfg.ndcg_k}",
            "metrics": metrics}


def evaluate(model, tasks: Sequence[EvalTask], cfg: Optional[EvalConfig] = None) -> dict:
    """Run every task with an embedder (:class:`~moca.embedding.MocaEmbedder`); returns the results dict
    ``{"tasks": {name: {type, n_queries, headline, metrics}}, "overall": mean headline}``."""
    cfg = cfg or EvalConfig()
    results = {}
    for task in tasks:
        run = run_candidates if task.type == "candidates" else run_retrieval
        results[task.name] = run(model, task, cfg)
    overall = sum(r["metrics"][r["headline"]] for r in results.values()) / max(len(results), 1)
    return {"tasks": results, "overall": overall}


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
        model = MocaEmbedder.tiny(seed=mc.tiny_seed, causal=bool(mc.causal), pooling=mc.pooling or "mean")
        model = model.to(dtype[mc.dtype]) if mc.dtype else model
    else:
        model = MocaEmbedder.from_pretrained(mc.path, pooling=mc.pooling, causal=mc.causal, dtype=dtype[mc.dtype])
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


def run_eval(cfg: EvalConfig) -> dict:
    """Load the model, run the tasks, write ``cfg.results_path`` (JSON); returns the results."""
    out = cfg.results_path
    tasks = cfg.tasks or embedded_tasks(cfg.embedded_dir or out.parent / "eval_data", cfg.embedded_seed)
    model = load_embedder(cfg.model)
    results = evaluate(model, tasks, cfg)
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
           "precision_at_1", "recall_at_k", "ndcg_at_k", "rank_documents", "add_cli"]
