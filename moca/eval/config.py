"""``moca eval``'s config: the tasks (:class:`EvalTask`) and the run (:class:`EvalConfig`); the ``model``
section is :class:`moca.build.EvalModelConfig`. Task types and keys: see :mod:`moca.eval`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from ..build import EvalModelConfig
from ..config import from_dict
from ..data.images import DEFAULT_MAX_IMAGE_PIXELS
from .metrics import P1_RULES, TIE_RULES
from .mmeb_tasks import CATEGORIES, mmeb_task_info


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
