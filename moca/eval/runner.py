"""``moca eval``: load the model, run the tasks (the embedded held-out ones when none are given), write the
results JSON and print the tables."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

from ..build import load_embedder
from ..config import from_dict
from .config import EvalConfig, EvalTask
from .report import paper_tables, results_table
from .tasks import evaluate


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
