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

Modules: :mod:`~moca.eval.config` (EvalTask, EvalConfig; the ``model`` section is
:class:`moca.build.EvalModelConfig`), :mod:`~moca.eval.tasks` (running and scoring tasks),
:mod:`~moca.eval.metrics`, :mod:`~moca.eval.report` (tables), :mod:`~moca.eval.runner` (``moca eval``).
"""

from ..build import EvalModelConfig, load_embedder
from .config import TASK_TYPES, EvalConfig, EvalTask
from .metrics import ndcg_at_k, precision_at_1, rank_documents, recall_at_k
from .report import format_table, paper_tables, results_table
from .runner import add_cli, embedded_tasks, run_eval, set_image_bounds
from .tasks import evaluate, run_candidates, run_retrieval, summarize

__all__ = ["EvalTask", "EvalConfig", "EvalModelConfig", "evaluate", "run_eval", "results_table", "format_table",
           "paper_tables", "summarize", "set_image_bounds", "precision_at_1", "recall_at_k", "ndcg_at_k",
           "rank_documents", "add_cli", "load_embedder", "embedded_tasks", "run_candidates", "run_retrieval",
           "TASK_TYPES"]
