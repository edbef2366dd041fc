"""``moca demo``: the whole MoCa pipeline on an embedded world, no downloads, minutes on a CPU.

1. Data (:mod:`moca.data.embedded_world`): a world of drawn scenes and the words for them. Stage 1 gets
   unlabeled interleaved documents (scenes next to their captions) from the whole world; Stage 2 gets a small
   set of labeled retrieval pairs that use only half of the world's colour-shape compositions; the held-out
   tasks query the other half.
2. For each attention (bidirectional = MoCa, causal = the original VLM) and each of ``seeds`` seeds (the
   initial weights, the batch order and the masks):
   (a) no training: evaluate the initial model;
   (b) Stage 2 only: contrastive fine-tuning from the initial model, then evaluate;
   (c) for each amount of unlabeled data (``unlabeled`` x ``corpus_docs`` documents): Stage 1
       (modality-aware continual pre-training, ``stage1_steps`` steps per ``corpus_docs`` documents), the
       same Stage 2, then evaluate.
   Within a seed every arm starts from the same initial weights, sees the same Stage 2 batches in the same
   order with the same steps and learning-rate schedule; (c) gets Stage 1 on top, which is what is measured.
3. A table of the held-out metrics (mean +- standard error over seeds, with the chance level), a ``summary``
   list in ``results.json`` (one row per arm, attention and amount), ``scores.png`` (score against the amount
   of unlabeled data) and ``loss_curves.png``.

The default model is a tiny Qwen2.5-VL (random init, the shipped tokenizer). ``--model PATH`` runs the same
pipeline from a local Qwen2-VL / Qwen2.5-VL checkpoint (learning rates and temperature of the paper).
With the tiny model the (attention, seed) runs are spread over two processes (one per core on a CPU).
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

log = logging.getLogger("moca.demo")

ARMS = ("no training", "Stage 2 only", "Stage 1 + Stage 2")
ATTENTIONS = ("bidirectional", "causal")


@dataclass
class DemoSettings:
    """Everything the demo does; :func:`settings_for` fills the defaults for the tiny model or a checkpoint."""

    out: str = "runs/demo"
    model: Optional[str] = None                  # None = the tiny default model
    quick: bool = False
    seed: int = 0                                # the data's seed and the first model/batch seed
    seeds: int = 3                               # model/batch seeds: seed, seed + 1, ...
    device: Optional[str] = None
    workers: int = 1                             # processes over the (attention, seed) runs
    attentions: List[str] = field(default_factory=lambda: list(ATTENTIONS))
    # data
    image_size: int = 56
    corpus_docs: int = 160                       # unlabeled documents at 1x
    unlabeled: List[int] = field(default_factory=lambda: [1, 4])   # amounts of the Stage 1 arms, x corpus_docs
    pairs: int = 96                              # labeled pairs per Stage 2 subset (2 subsets)
    eval_queries: int = 100
    eval_candidates: int = 8
    eval_corpus: int = 120
    # tiny model
    tiny: Dict[str, int] = field(default_factory=lambda: dict(tiny_hidden=64, tiny_layers=2, tiny_heads=4,
                                                              tiny_kv_heads=2, tiny_vision_hidden=32,
                                                              tiny_vision_depth=2))
    # Stage 1: stage1_steps per corpus_docs documents (a x the data gets a x the steps)
    stage1_steps: int = 150
    stage1_lr: float = 3e-4
    stage1_token_budget: int = 512
    # Stage 2
    stage2_steps: int = 300
    stage2_lr: float = 3e-4
    batch_size: int = 16
    hard_negatives: int = 1
    temperature: float = 0.05
    grad_cache: bool = False
    eval_batch_size: int = 64

    def seed_list(self) -> List[int]:
        return [self.seed + i for i in range(self.seeds)]

    def stage1_steps_for(self, amount: int) -> int:
        return self.stage1_steps * amount


def settings_for(quick: bool = False, model: Optional[str] = None, **over) -> DemoSettings:
    """Defaults: the tiny model's recipe, a real checkpoint's (paper learning rates, temperature 0.03), or the
    reduced ``--quick`` run (seconds; for tests)."""
    s = DemoSettings(quick=quick, model=model)
    if model is not None:
        s.image_size, s.stage1_lr, s.stage2_lr, s.temperature = 112, 1e-5, 2e-5, 0.03
        s.stage1_token_budget = 2048
    if quick:
        s.corpus_docs, s.pairs, s.seeds, s.unlabeled = 6, 8, 2, [1, 2]
        s.eval_queries, s.eval_candidates, s.eval_corpus = 5, 4, 10
        s.stage1_steps, s.stage2_steps, s.batch_size, s.stage1_token_budget = 1, 2, 4, 256
        s.tiny = dict(tiny_hidden=32, tiny_layers=1, tiny_heads=2, tiny_kv_heads=1, tiny_vision_hidden=16,
                      tiny_vision_depth=1)
    for k, v in over.items():
        if v is not None:
            if not hasattr(s, k):
                raise ValueError(f"unknown demo setting {k!r}")
            setattr(s, k, v)
    for a in s.attentions:
        if a not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {a!r}")
    small = {k: getattr(s, k) for k in ("stage1_steps", "stage2_steps", "batch_size", "workers", "eval_batch_size",
                                        "seeds", "corpus_docs", "pairs") if getattr(s, k) < 1}
    if small:
        raise ValueError(f"demo settings must be >= 1: {small}")
    if not s.unlabeled or min(s.unlabeled) < 1 or len(set(s.unlabeled)) != len(s.unlabeled):
        raise ValueError(f"unlabeled must be distinct amounts >= 1 (multiples of corpus_docs), got {s.unlabeled}")
    s.unlabeled = sorted(s.unlabeled)
    if s.model is not None and not Path(s.model).is_dir():
        raise FileNotFoundError(f"--model {s.model} is not a checkpoint directory")
    if s.device is not None:
        from .embedding import resolve_device

        resolve_device(s.device, "--device")
    return s


# ------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------


def prepare_data(s: DemoSettings) -> dict:
    """Write the embedded world under ``<out>/data`` (once per settings); returns the paths and configs:
    ``{"corpus": {docs: jsonl}, "subsets": [...], "tasks": [...]}``."""
    from .data.embedded_world import write_world_corpus, write_world_pairs, write_world_tasks
    from .fsutil import files_named_by_jsonl, load_index, save_index

    root = Path(s.out) / "data"
    docs = [a * s.corpus_docs for a in s.unlabeled]
    key = dict(world=2, seed=s.seed, image_size=s.image_size, docs=docs, pairs=s.pairs, k=s.hard_negatives,
               eval=[s.eval_queries, s.eval_candidates, s.eval_corpus])
    index = root / "index.json"
    data = load_index(index, lambda d: d.get("key") == key)   # same settings and every listed file intact
    if data is not None:
        return data
    t0 = time.perf_counter()
    corpus = write_world_corpus(root / "stage1", docs, seed=s.seed, image_size=s.image_size)
    subsets = write_world_pairs(root / "stage2", n_pairs=s.pairs, hard_negatives=max(s.hard_negatives, 1),
                                seed=s.seed, image_size=s.image_size)
    tasks = write_world_tasks(root / "eval", n_queries=s.eval_queries, n_candidates=s.eval_candidates,
                              corpus_size=s.eval_corpus, seed=s.seed, image_size=s.image_size)
    jsonl = list(corpus.values()) + [f for c in subsets for f in c["files"]] + \
        [t[k] for t in tasks for k in ("file", "queries", "corpus") if t.get(k)]
    data = save_index(index, {"key": key, "corpus": {str(n): str(p) for n, p in corpus.items()},
                              "subsets": subsets, "tasks": tasks},
                      files_named_by_jsonl(jsonl))   # written last: commits the data
    log.info("wrote the embedded data in %.1f s", time.perf_counter() - t0)
    return data


# ------------------------------------------------------------------------------------------------------------
# One attention variant and seed: arms (a), (b), (c) at every amount
# ------------------------------------------------------------------------------------------------------------


def _model_section(s: DemoSettings, causal: bool, path: Optional[str] = None, seed: Optional[int] = None) -> dict:
    m = {"path": path if path is not None else s.model, "causal": causal,
         "tiny_seed": s.seed if seed is None else seed, "tiny_image_size": s.image_size}
    if s.model is None:
        m.update(s.tiny)
    return m


def _train_section(s: DemoSettings, out: Path, steps: int, lr: float, warmup: float, progress: bool,
                   seed: int) -> dict:
    return {"output_dir": str(out), "max_steps": steps, "lr": lr, "warmup_ratio": warmup, "weight_decay": 0.01,
            "seed": seed, "log_every": 1, "save_every": 0, "keep_checkpoints": 1, "resume": None,
            "tensorboard": False, "progress": progress}


def stage1_config(s: DemoSettings, data: dict, causal: bool, out: Path, progress: bool, amount: int = 1,
                  seed: Optional[int] = None):
    """Stage 1 on ``amount`` x ``corpus_docs`` unlabeled documents for ``amount`` x ``stage1_steps`` steps."""
    from .config import from_dict
    from .train.cpt import CptConfig

    seed = s.seed if seed is None else seed
    return from_dict(CptConfig, {
        "model": _model_section(s, causal, seed=seed),
        "data": {"train": [data["corpus"][str(amount * s.corpus_docs)]], "token_budget": s.stage1_token_budget},
        # the settings the README's demo table was measured with (the library defaults follow the official
        # code: Bernoulli image masking, no norm in the MAE head)
        "masking": {"image_mask_mode": "exact"}, "loss": {"mae_head_norm": True},
        "train": _train_section(s, out, s.stage1_steps_for(amount), s.stage1_lr, 0.1, progress, seed)})


def stage2_config(s: DemoSettings, data: dict, causal: bool, out: Path, start: Optional[str], progress: bool,
                  seed: Optional[int] = None):
    from .config import from_dict
    from .train.contrastive import ClConfig

    seed = s.seed if seed is None else seed
    return from_dict(ClConfig, {
        # the demo keeps the settings its README table was measured with (mean pooling for both attentions,
        # <|endoftext|> appended); the library's defaults follow the official code (moca/configs/*_moca_*.yaml)
        "model": dict(_model_section(s, causal, start, seed=seed), pooling="mean", append_eos=True),
        "data": {"subsets": data["subsets"], "global_batch_size": s.batch_size, "hard_negatives": s.hard_negatives},
        "loss": {"temperature": s.temperature},
        "grad_cache": {"enabled": s.grad_cache, "query_chunk_size": max(s.batch_size // 2, 1),
                       "doc_chunk_size": max(s.batch_size // 2, 1)},
        "train": _train_section(s, out, s.stage2_steps, s.stage2_lr, 0.1, progress, seed)})


def initial_embedder(s: DemoSettings, causal: bool, seed: Optional[int] = None):
    """The model every arm of a seed starts from (the tiny default from the seed, or the checkpoint)."""
    from .config import from_dict
    from .embedding import MocaEmbedder
    from .train.contrastive import ClModelConfig
    from .train.cpt import build_model_and_processor

    mc = from_dict(ClModelConfig, _model_section(s, causal, seed=seed))
    bb, proc = build_model_and_processor(mc, None)
    return MocaEmbedder(bb, proc, pooling="mean", append_eos=True)    # as in stage2_config


def _evaluate(embedder, data: dict, s: DemoSettings, device, progress: bool = False) -> dict:
    from .config import from_dict
    from .eval import EvalConfig, EvalTask, evaluate

    tasks = [from_dict(EvalTask, t, f"tasks[{i}]") for i, t in enumerate(data["tasks"])]
    cfg = EvalConfig(batch_size=s.eval_batch_size, show_progress=progress)
    return evaluate(embedder.to(device), tasks, cfg)


def run_dirs(s: DemoSettings, attention: str, seed: int) -> List[Path]:
    """The training runs of one (attention, seed), in order: Stage 2 only, then Stage 1 and its Stage 2 for
    every amount."""
    root = Path(s.out) / attention / f"seed{seed}"
    return [root / "stage2_only"] + [root / f"stage1_x{a}{tail}" for a in s.unlabeled for tail in ("", "_stage2")]


def steps_per_seed(s: DemoSettings) -> int:
    return s.stage2_steps * (1 + len(s.unlabeled)) + sum(s.stage1_steps_for(a) for a in s.unlabeled)


def _clear_logs(s: DemoSettings, attention: str, seed: int) -> None:
    """Remove the JSONL logs of an earlier demo in the same folder (the trainer appends to them; the histories,
    the plot and the progress bars read them)."""
    for d in run_dirs(s, attention, seed):
        (d / "logs" / "train.jsonl").unlink(missing_ok=True)


def _history(run_dir: Path) -> List[dict]:
    f = run_dir / "logs" / "train.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def run_seed(s: DemoSettings, data: dict, attention: str, seed: int, status=None, progress: bool = True) -> dict:
    """Every arm of one (attention, seed); returns ``{"attention", "seed", "runs": [...], "seconds"}``, a run
    being ``{"arm", "unlabeled" (documents), "eval", "stage1_history"?, "stage2_history"?}``."""
    import torch

    from .embedding import MocaEmbedder
    from .train.contrastive import run_cl
    from .train.core import DistEnv
    from .train.cpt import run_cpt

    causal = attention == "causal"
    device = torch.device(s.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dist = DistEnv(device=device)
    root = Path(s.out) / attention / f"seed{seed}"
    _clear_logs(s, attention, seed)
    tag = f"{attention}, seed {seed}"
    say = ((lambda msg: status.put((attention, msg))) if status is not None
           else (lambda msg: log.info("%s: %s", tag, msg)))
    runs: List[dict] = []
    t0 = time.perf_counter()

    say(f"seed {seed}: (a) evaluating the initial model")
    runs.append({"arm": ARMS[0], "unlabeled": 0, "eval": _evaluate(initial_embedder(s, causal, seed), data, s,
                                                                      device, progress)})
    say(f"seed {seed}: (b) Stage 2 only")
    run_cl(stage2_config(s, data, causal, root / "stage2_only", None, progress, seed), dist)
    emb = MocaEmbedder.from_pretrained(root / "stage2_only" / "final")
    runs.append({"arm": ARMS[1], "unlabeled": 0, "eval": _evaluate(emb, data, s, device, progress),
                 "stage2_history": _history(root / "stage2_only")})
    for a in s.unlabeled:
        d1, d2 = root / f"stage1_x{a}", root / f"stage1_x{a}_stage2"
        say(f"seed {seed}: (c) Stage 1 on {a * s.corpus_docs} documents")
        run_cpt(stage1_config(s, data, causal, d1, progress, a, seed), dist)
        say(f"seed {seed}: (c) Stage 2 after Stage 1 x{a}")
        run_cl(stage2_config(s, data, causal, d2, str(d1 / "final"), progress, seed), dist)
        emb = MocaEmbedder.from_pretrained(d2 / "final")
        runs.append({"arm": ARMS[2], "unlabeled": a * s.corpus_docs, "eval": _evaluate(emb, data, s, device, progress),
                     "stage1_history": _history(d1), "stage2_history": _history(d2)})
    say(f"seed {seed}: done")
    return {"attention": attention, "seed": seed, "runs": runs, "seconds": time.perf_counter() - t0}


def _worker(s_dict: dict, data: dict, attention: str, seed: int, status, threads: int) -> dict:
    """Entry point of a worker process (spawned): one (attention, seed) with ``threads`` torch threads."""
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    try:
        return run_seed(DemoSettings(**s_dict), data, attention, seed, status=status, progress=False)
    except BaseException as exc:   # the parent prints it; a traceback object does not cross processes
        import traceback

        return {"attention": attention, "seed": seed,
                "error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"}


# ------------------------------------------------------------------------------------------------------------
# The whole demo
# ------------------------------------------------------------------------------------------------------------


def _run_parallel(s: DemoSettings, data: dict, workers: int, threads: int) -> List[dict]:
    """The (attention, seed) runs in ``workers`` processes, with one progress bar per attention variant fed
    from the runs' JSONL logs."""
    import multiprocessing as mp

    from tqdm.auto import tqdm

    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    status = manager.Queue()
    jobs = [(a, seed) for seed in s.seed_list() for a in s.attentions]
    dirs = {a: [d for seed in s.seed_list() for d in run_dirs(s, a, seed)] for a in s.attentions}
    for a, seed in jobs:
        _clear_logs(s, a, seed)
    bars = {a: tqdm(total=steps_per_seed(s) * s.seeds, desc=f"{a:13s}", unit="step", position=i,
                    dynamic_ncols=True) for i, a in enumerate(s.attentions)}
    with ctx.Pool(workers) as pool:
        pending = [pool.apply_async(_worker, (asdict(s), data, a, seed, status, threads)) for a, seed in jobs]
        while any(not p.ready() for p in pending):
            time.sleep(0.5)
            try:
                while True:
                    a, msg = status.get_nowait()
                    bars[a].set_postfix_str(msg, refresh=False)
            except queue.Empty:
                pass
            for a, ds in dirs.items():
                bars[a].update(sum(_count_lines(d / "logs" / "train.jsonl") for d in ds) - bars[a].n)
        results = [p.get() for p in pending]
    for a, ds in dirs.items():
        bars[a].update(sum(_count_lines(d / "logs" / "train.jsonl") for d in ds) - bars[a].n)
        bars[a].close()
    manager.shutdown()
    return results


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def chance_levels(data: dict, draws: int = 20, seed: int = 0) -> dict:
    """Expected metrics of random scores (candidates: 1 / number of candidates; retrieval: Monte-Carlo)."""
    import torch

    from .config import from_dict
    from .eval import EvalConfig, EvalTask, evaluate

    class RandomScores:
        def __init__(self, g):
            self.g = g

        def encode_items(self, items, **_):
            return torch.nn.functional.normalize(torch.randn(len(items), 64, generator=self.g), dim=-1)

    tasks = [from_dict(EvalTask, t, f"tasks[{i}]") for i, t in enumerate(data["tasks"])]
    g = torch.Generator().manual_seed(seed)
    runs = [evaluate(RandomScores(g), tasks, EvalConfig(show_progress=False)) for _ in range(draws)]
    out = {"tasks": {}, "overall": sum(r["overall"] for r in runs) / draws}
    for name, first in runs[0]["tasks"].items():
        metrics = {k: sum(r["tasks"][name]["metrics"][k] for r in runs) / draws for k in first["metrics"]}
        if first["type"] == "candidates":   # exact: 1 / candidates per query
            cands = [len(json.loads(line)["candidates"]) for line in
                     Path(next(t for t in tasks if t.name == name).file).read_text().splitlines() if line.strip()]
            metrics["precision@1"] = sum(1 / c for c in cands) / len(cands)
        out["tasks"][name] = dict(first, metrics=metrics)
    out["overall"] = sum(r["metrics"][r["headline"]] for r in out["tasks"].values()) / len(out["tasks"])
    return out


def mean_stderr(values: Sequence[float]):
    """(mean, standard error of the mean) of per-seed values; the error is the sample standard deviation
    (n - 1) over sqrt(n), None for a single value."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_stderr of no values")
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def summarize(runs: Sequence[dict], attentions: Sequence[str]) -> List[dict]:
    """One row per (arm, attention, unlabeled documents) cell, in table order:
    ``{arm, attention, unlabeled, overall_mean, overall_stderr, seeds, overall (per seed, in seed order), tasks:
    {name: {mean, stderr}}}``; ``runs`` are the per-seed records of :func:`run_seed` flattened with their
    attention and seed."""
    cells: Dict[tuple, List[dict]] = {}
    for r in runs:
        cells.setdefault((r["arm"], r["attention"], r["unlabeled"]), []).append(r)
    order = {arm: i for i, arm in enumerate(ARMS)}
    keys = sorted(cells, key=lambda k: (order[k[0]], k[2], list(attentions).index(k[1])))
    rows = []
    for arm, attention, unlabeled in keys:
        rs = sorted(cells[(arm, attention, unlabeled)], key=lambda r: r["seed"])
        overall = [r["eval"]["overall"] for r in rs]
        m, se = mean_stderr(overall)
        tasks = {}
        for name, t in rs[0]["eval"]["tasks"].items():
            tm, tse = mean_stderr([r["eval"]["tasks"][name]["metrics"][t["headline"]] for r in rs])
            tasks[name] = {"headline": t["headline"], "mean": tm, "stderr": tse}
        rows.append({"arm": arm, "attention": attention, "unlabeled": unlabeled, "overall_mean": m,
                     "overall_stderr": se, "seeds": len(rs), "seed_values": [r["seed"] for r in rs],
                     "overall": overall, "tasks": tasks})
    return rows


def comparisons(summary: Sequence[dict]) -> List[dict]:
    """Stage 1 + Stage 2 minus Stage 2 only, per attention and amount: the mean and standard error of the
    per-seed differences (paired: a seed's arms share initial weights and Stage 2 batches)."""
    base = {r["attention"]: r for r in summary if r["arm"] == "Stage 2 only"}
    out = []
    for r in summary:
        b = base.get(r["attention"])
        if r["arm"] != "Stage 1 + Stage 2" or b is None or b["seed_values"] != r["seed_values"]:
            continue
        m, se = mean_stderr([x - y for x, y in zip(r["overall"], b["overall"])])
        out.append({"attention": r["attention"], "unlabeled": r["unlabeled"], "diff_mean": m, "diff_stderr": se})
    return out


def _pm(mean: float, se: Optional[float]) -> str:
    return f"{100 * mean:.1f}" + ("" if se is None else f" ± {100 * se:.1f}")


def comparison_table(results: dict) -> str:
    """Rows: chance, then every summary cell; columns: each task's headline metric and the overall mean
    (mean ± standard error over seeds)."""
    from .eval import format_table

    chance = results["chance"]
    names = list(chance["tasks"])
    header = ["model", "attention", "unlabeled docs"] + \
        [f"{n} ({chance['tasks'][n]['headline']})" for n in names] + ["overall"]
    rows = [["chance (random scores)", "-", "-"] + [_pm(chance["tasks"][n]["metrics"][chance["tasks"][n]["headline"]],
                                                         None) for n in names] + [_pm(chance["overall"], None)]]
    for r in results["summary"]:
        rows.append([r["arm"], r["attention"], r["unlabeled"]]
                    + [_pm(r["tasks"][n]["mean"], r["tasks"][n]["stderr"]) for n in names]
                    + [_pm(r["overall_mean"], r["overall_stderr"])])
    return format_table(header, rows)


def plot_scores(results: dict, path: Path) -> Optional[Path]:
    """PNG of the overall held-out score (mean ± standard error over seeds) against the amount of unlabeled
    data (0: Stage 2 only), one line per attention, with the untrained model and chance; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no score plot (pip install matplotlib)")
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, attention in enumerate(results["settings"]["attentions"]):
        rows = [r for r in results["summary"] if r["attention"] == attention and r["arm"] != "no training"]
        color = f"C{i}"
        ax.errorbar([r["unlabeled"] for r in rows], [100 * r["overall_mean"] for r in rows],
                    yerr=[100 * (r["overall_stderr"] or 0) for r in rows], marker="o", capsize=4, color=color,
                    label=f"Stage 2 (after Stage 1 on x docs), {attention}")
        for r in results["summary"]:
            if r["attention"] == attention and r["arm"] == "no training":
                ax.axhline(100 * r["overall_mean"], color=color, ls=":", label=f"no training, {attention}")
    ax.axhline(100 * results["chance"]["overall"], color="gray", ls="--", label="chance")
    ax.set_xlabel("unlabeled interleaved documents in Stage 1 (0 = Stage 2 only)")
    ax.set_ylabel("held-out overall score (%)")
    ax.set_title(f"moca demo: held-out compositions, mean ± s.e. over {results['settings']['seeds']} seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_losses(results: dict, path: Path) -> Optional[Path]:
    """PNG of the Stage 1 and Stage 2 loss curves of the first seed (moving average over 10 steps); None
    without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no loss-curve PNG (pip install matplotlib)")
        return None

    def smooth(values, w=10):
        out, acc = [], []
        for v in values:
            acc.append(v)
            acc = acc[-w:]
            out.append(sum(acc) / len(acc))
        return out

    first = results["settings"]["seed"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for r in results["runs"]:
        if r["seed"] != first or r["arm"] == "no training":
            continue
        style = "-" if r["attention"] == "bidirectional" else "--"
        label = f"{r['unlabeled']} docs, {r['attention']}"
        if "stage1_history" in r:
            h1 = r["stage1_history"]
            axes[0].plot([h["step"] for h in h1], smooth([h["mlm_loss"] for h in h1]), style, label=label)
            axes[1].plot([h["step"] for h in h1], smooth([h["mae_loss"] for h in h1]), style, label=label)
        h2 = r["stage2_history"]
        axes[2].plot([h["step"] for h in h2], smooth([h["loss"] for h in h2]), style,
                     label=f"{r['arm']}, " + label)
    axes[0].set_title("Stage 1: masked-token loss")
    axes[1].set_title("Stage 1: masked-patch loss")
    axes[2].set_title("Stage 2: InfoNCE (mean of 10 steps)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"moca demo (seed {first}): " + (results["settings"]["model"] or "tiny Qwen2.5-VL (random init)"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_demo(s: DemoSettings) -> dict:
    """Run the demo; returns the results (also written to ``<out>/results.json``)."""
    import torch

    t0, c0 = time.perf_counter(), _cpu_seconds()
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"moca demo: {'tiny Qwen2.5-VL (random init)' if s.model is None else s.model}; output in {out}", flush=True)
    print("[1/3] writing the embedded world (unlabeled interleaved corpus, labeled pairs, held-out tasks)",
          flush=True)
    data = prepare_data(s)
    cpu = not (s.device or "").startswith("cuda") and not torch.cuda.is_available()
    jobs = len(s.attentions) * s.seeds
    workers = max(1, min(s.workers, jobs))
    print(f"[2/3] {len(s.attentions)} attention variant(s) x {s.seeds} seed(s): no training, Stage 2 only "
          f"({s.stage2_steps} steps of {s.batch_size} queries + {s.hard_negatives} hard negative(s)), Stage 1 "
          f"({s.stage1_steps} steps per {s.corpus_docs} documents) + Stage 2 on "
          f"{', '.join(str(a * s.corpus_docs) for a in s.unlabeled)} unlabeled documents"
          f"{' in ' + str(workers) + ' processes' if workers > 1 else ''}", flush=True)
    if workers > 1:
        threads = max(1, (os.cpu_count() or 2) // workers) if cpu else 1
        per = _run_parallel(s, data, workers, threads)
    else:
        per = [run_seed(s, data, a, seed) for seed in s.seed_list() for a in s.attentions]
    errors = [r["error"] for r in per if "error" in r]
    if errors:
        raise RuntimeError("a demo worker failed:\n" + "\n".join(errors))
    print("[3/3] tables and plots", flush=True)
    runs = [dict(r, attention=p["attention"], seed=p["seed"]) for p in per for r in p["runs"]]
    results = {"settings": asdict(s), "runs": runs, "chance": chance_levels(data)}
    results["summary"] = summarize(runs, s.attentions)
    results["comparisons"] = comparisons(results["summary"])
    results["table"] = comparison_table(results)
    png = plot_scores(results, out / "scores.png")
    results["scores_png"] = str(png) if png else None
    png2 = plot_losses(results, out / "loss_curves.png")
    results["loss_curves_png"] = str(png2) if png2 else None
    results["wall_time_s"] = time.perf_counter() - t0
    results["cpu_time_s"] = _cpu_seconds() - c0
    results["load_average"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print()
    print(f"Held-out compositions (%, mean ± standard error over {s.seeds} seeds): precision@1 for candidate "
          "lists, nDCG@5 for search")
    print(results["table"])
    for c in results["comparisons"]:
        print(f"Stage 1 + Stage 2 minus Stage 2 only, {c['attention']}, {c['unlabeled']} unlabeled docs: "
              f"{_pm(c['diff_mean'], c['diff_stderr'])} points (paired over seeds)")
    print(f"\nwall time {results['wall_time_s']:.0f} s, CPU time {results['cpu_time_s']:.0f} s; results in "
          f"{out / 'results.json'}" + (f", plots {png}" if png else "") + (f", {png2}" if png2 else ""))
    return results


def _demo_command(args) -> int:
    import torch

    s = settings_for(quick=args.quick, model=args.model, out=args.out, seed=args.seed, device=args.device,
                     stage1_steps=args.stage1_steps, stage2_steps=args.stage2_steps, seeds=args.seeds,
                     unlabeled=args.unlabeled, attentions=args.attention and [args.attention])
    cpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu"
    if args.workers is not None:
        s.workers = args.workers
    elif s.model is None and not s.quick and (not cpu or (os.cpu_count() or 1) >= 2):
        s.workers = 2   # the tiny model is bound by per-op overhead: one process per core
    if cpu and s.workers == 1 and s.model is None:
        torch.set_num_threads(1)   # the tiny model's ops are too small for threads to pay off
    run_demo(s)
    return 0


def _positive_int(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _amounts(text: str) -> List[int]:
    import argparse

    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}") from None
    if min(values) < 1 or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct integers >= 1, got {text!r}")
    return values


def add_cli(sub, train_sub) -> None:
    """Register ``moca demo``."""
    p = sub.add_parser("demo", help="the whole MoCa pipeline on embedded data: Stage 1, Stage 2, evaluation, "
                                    "a comparison table (no downloads)")
    p.add_argument("--output-dir", "--output", "--out", dest="out", default="runs/demo", metavar="DIR",
                   help="output folder (default runs/demo; --output / --out: aliases)")
    p.add_argument("--model", default=None, help="a local Qwen2-VL / Qwen2.5-VL checkpoint instead of the tiny model")
    p.add_argument("--quick", action="store_true", help="a reduced run of a few seconds (smoke test)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--workers", type=_positive_int, default=None,
                   help="processes over the (attention, seed) runs (default with the tiny model: 2; 1 with "
                        "--model, --quick or a 1-core CPU)")
    p.add_argument("--attention", choices=ATTENTIONS, default=None, help="run only one attention variant")
    p.add_argument("--stage1-steps", type=_positive_int, default=None,
                   help="Stage 1 steps per 1x of unlabeled data (default 150; 1 with --quick)")
    p.add_argument("--stage2-steps", type=_positive_int, default=None,
                   help="Stage 2 steps of every Stage 2 run (default 300; 2 with --quick)")
    p.add_argument("--unlabeled", type=_amounts, default=None, metavar="A,B",
                   help="amounts of unlabeled data of the Stage 1 + Stage 2 arms, in multiples of the 1x corpus "
                        "(default 1,4; 1,2 with --quick)")
    p.add_argument("--seeds", type=_positive_int, default=None,
                   help="seeds of the initial weights, batches and masks per arm (default 3; 2 with --quick)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the first model/batch seed")
    p.set_defaults(func=_demo_command)
