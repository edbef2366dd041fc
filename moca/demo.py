"""``moca demo``: the whole MoCa pipeline on embedded data, no downloads, minutes on a CPU.

1. Data: the Stage 1 interleaved corpus, Stage 2 retrieval pairs with hard negatives and held-out evaluation
   tasks, all generated (:mod:`moca.data.embedded`, :mod:`moca.data.embedded_retrieval`).
2. For each attention (bidirectional = MoCa, causal = the original VLM):
   (a) no training: evaluate the initial model;
   (b) Stage 2 only: contrastive fine-tuning from the initial model, then evaluate;
   (c) Stage 1 then Stage 2: modality-aware continual pre-training, the same Stage 2, then evaluate.
   Every arm starts from the same initial weights (same seed), sees the same Stage 2 batches in the same order
   and gets the same number of Stage 2 steps; (c) gets Stage 1 on top, which is the thing being measured.
3. A table of the held-out metrics (with the chance level), ``results.json`` and ``loss_curves.png``.

The default model is a tiny Qwen2.5-VL (random init, the shipped tokenizer). ``--model PATH`` runs the same
pipeline from a local Qwen2-VL / Qwen2.5-VL checkpoint (learning rates and temperature of the paper).
With the tiny model the two attention variants run side by side in two processes (one per core on a CPU).
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

log = logging.getLogger("moca.demo")

ARMS = ("no training", "Stage 2 only", "Stage 1 + Stage 2")
ATTENTIONS = ("bidirectional", "causal")


@dataclass
class DemoSettings:
    """Everything the demo does; :func:`settings_for` fills the defaults for the tiny model or a checkpoint."""

    out: str = "runs/demo"
    model: Optional[str] = None                  # None = the tiny default model
    quick: bool = False
    seed: int = 0
    device: Optional[str] = None
    workers: int = 1                             # processes (one per attention variant at most)
    attentions: List[str] = field(default_factory=lambda: list(ATTENTIONS))
    # data
    image_size: int = 56
    cpt_docs: int = 400
    pairs_per_subset: int = 512
    eval_queries: int = 160
    eval_candidates: int = 8
    eval_corpus: int = 200
    # tiny model
    tiny: Dict[str, int] = field(default_factory=lambda: dict(tiny_hidden=64, tiny_layers=2, tiny_heads=4,
                                                              tiny_kv_heads=2, tiny_vision_hidden=32,
                                                              tiny_vision_depth=2))
    # Stage 1
    stage1_steps: int = 200
    stage1_lr: float = 3e-4
    stage1_token_budget: int = 512
    # Stage 2
    stage2_steps: int = 500
    stage2_lr: float = 3e-4
    batch_size: int = 16
    hard_negatives: int = 1
    temperature: float = 0.05
    grad_cache: bool = False
    eval_batch_size: int = 64


def settings_for(quick: bool = False, model: Optional[str] = None, **over) -> DemoSettings:
    """Defaults: the tiny model's recipe, a real checkpoint's (paper learning rates, temperature 0.03), or the
    reduced ``--quick`` run (seconds; for tests)."""
    s = DemoSettings(quick=quick, model=model)
    if model is not None:
        s.image_size, s.stage1_lr, s.stage2_lr, s.temperature = 112, 1e-5, 2e-5, 0.03
        s.stage1_token_budget = 2048
    if quick:
        s.cpt_docs, s.pairs_per_subset = 24, 16
        s.eval_queries, s.eval_candidates, s.eval_corpus = 6, 4, 12
        s.stage1_steps, s.stage2_steps, s.batch_size, s.stage1_token_budget = 2, 3, 4, 256
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
    small = {k: getattr(s, k) for k in ("stage1_steps", "stage2_steps", "batch_size", "workers", "eval_batch_size")
             if getattr(s, k) < 1}
    if small:
        raise ValueError(f"demo settings must be >= 1: {small}")
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
    """Write the three embedded data sets under ``<out>/data`` (once per settings); returns their paths/configs."""
    from .data.embedded import write_cpt_corpus
    from .data.embedded_retrieval import write_eval_tasks, write_train_subsets

    root = Path(s.out) / "data"
    key = dict(seed=s.seed, image_size=s.image_size, cpt_docs=s.cpt_docs, pairs=s.pairs_per_subset,
               k=s.hard_negatives, eval=[s.eval_queries, s.eval_candidates, s.eval_corpus])
    index = root / "index.json"
    from .fsutil import files_named_by_jsonl, load_index, save_index

    data = load_index(index, lambda d: d.get("key") == key)   # same settings and every listed file intact
    if data is not None:
        return data
    t0 = time.perf_counter()
    cpt = write_cpt_corpus(root / "stage1", n_docs=s.cpt_docs, seed=s.seed, image_size=s.image_size)
    subsets = write_train_subsets(root / "stage2", n_per_subset=s.pairs_per_subset,
                                  hard_negatives=max(s.hard_negatives, 1), seed=s.seed, image_size=s.image_size)
    tasks = write_eval_tasks(root / "eval", n_queries=s.eval_queries, n_candidates=s.eval_candidates,
                             corpus_size=s.eval_corpus, seed=s.seed, image_size=s.image_size)
    jsonl = [cpt] + [f for c in subsets for f in c["files"]] + \
        [t[k] for t in tasks for k in ("file", "queries", "corpus") if t.get(k)]
    data = save_index(index, {"key": key, "cpt": str(cpt), "subsets": subsets, "tasks": tasks},
                      files_named_by_jsonl(jsonl))   # written last: commits the data
    log.info("wrote the embedded data in %.1f s", time.perf_counter() - t0)
    return data


# ------------------------------------------------------------------------------------------------------------
# One attention variant: arms (a), (b), (c)
# ------------------------------------------------------------------------------------------------------------


def _model_section(s: DemoSettings, causal: bool, path: Optional[str] = None) -> dict:
    m = {"path": path if path is not None else s.model, "causal": causal, "tiny_seed": s.seed,
         "tiny_image_size": s.image_size}
    if s.model is None:
        m.update(s.tiny)
    return m


def _train_section(s: DemoSettings, out: Path, steps: int, lr: float, warmup: float, progress: bool) -> dict:
    return {"output_dir": str(out), "max_steps": steps, "lr": lr, "warmup_ratio": warmup, "weight_decay": 0.01,
            "seed": s.seed, "log_every": 1, "save_every": 0, "keep_checkpoints": 1, "resume": None,
            "tensorboard": False, "progress": progress}


def stage1_config(s: DemoSettings, data: dict, causal: bool, out: Path, progress: bool):
    from .config import from_dict
    from .train.cpt import CptConfig

    return from_dict(CptConfig, {
        "model": _model_section(s, causal),
        "data": {"train": [data["cpt"]], "token_budget": s.stage1_token_budget},
        # the settings the README's demo table was measured with (the library defaults follow the official
        # code: Bernoulli image masking, no norm in the MAE head)
        "masking": {"image_mask_mode": "exact"}, "loss": {"mae_head_norm": True},
        "train": _train_section(s, out, s.stage1_steps, s.stage1_lr, 0.1, progress)})


def stage2_config(s: DemoSettings, data: dict, causal: bool, out: Path, start: Optional[str], progress: bool):
    from .config import from_dict
    from .train.contrastive import ClConfig

    return from_dict(ClConfig, {
        # the demo keeps the settings its README table was measured with (mean pooling for both attentions,
        # <|endoftext|> appended); the library's defaults follow the official code (moca/configs/*_paper.yaml)
        "model": dict(_model_section(s, causal, start), pooling="mean", append_eos=True),
        "data": {"subsets": data["subsets"], "global_batch_size": s.batch_size, "hard_negatives": s.hard_negatives},
        "loss": {"temperature": s.temperature},
        "grad_cache": {"enabled": s.grad_cache, "query_chunk_size": max(s.batch_size // 2, 1),
                       "doc_chunk_size": max(s.batch_size // 2, 1)},
        "train": _train_section(s, out, s.stage2_steps, s.stage2_lr, 0.1, progress)})


def initial_embedder(s: DemoSettings, causal: bool):
    """The model every arm starts from (the tiny default from the seed, or the checkpoint)."""
    from .embedding import MocaEmbedder
    from .train.contrastive import ClModelConfig
    from .train.cpt import build_model_and_processor

    from .config import from_dict

    mc = from_dict(ClModelConfig, _model_section(s, causal))
    bb, proc = build_model_and_processor(mc, None)
    return MocaEmbedder(bb, proc, pooling="mean", append_eos=True)    # as in stage2_config


def _evaluate(embedder, data: dict, s: DemoSettings, device, progress: bool = False) -> dict:
    from .config import from_dict
    from .eval import EvalConfig, EvalTask, evaluate

    tasks = [from_dict(EvalTask, t, f"tasks[{i}]") for i, t in enumerate(data["tasks"])]
    cfg = EvalConfig(batch_size=s.eval_batch_size, show_progress=progress)
    return evaluate(embedder.to(device), tasks, cfg)


RUNS = ("stage2_only", "stage1", "stage1_stage2")   # the training runs of one attention variant, in order


def _clear_logs(s: DemoSettings, attention: str) -> None:
    """Remove the JSONL logs of an earlier demo in the same folder (the trainer appends to them; the histories,
    the plot and the progress bars read them)."""
    for d in RUNS:
        (Path(s.out) / attention / d / "logs" / "train.jsonl").unlink(missing_ok=True)


def _history(run_dir: Path) -> List[dict]:
    f = run_dir / "logs" / "train.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def run_attention(s: DemoSettings, data: dict, attention: str, status=None, progress: bool = True) -> dict:
    """Arms (a), (b), (c) for one attention variant; returns their metrics and loss histories."""
    import torch

    from .embedding import MocaEmbedder
    from .train.contrastive import run_cl
    from .train.core import DistEnv
    from .train.cpt import run_cpt

    causal = attention == "causal"
    device = torch.device(s.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dist = DistEnv(device=device)
    root = Path(s.out) / attention
    _clear_logs(s, attention)
    say = (lambda msg: status.put((attention, msg))) if status is not None else (lambda msg: log.info("%s: %s", attention, msg))
    out: dict = {"attention": attention, "arms": {}}
    t0 = time.perf_counter()

    say("(a) evaluating the initial model")
    out["arms"]["no training"] = {"eval": _evaluate(initial_embedder(s, causal), data, s, device, progress)}

    say("(b) Stage 2 from the initial model")
    run_cl(stage2_config(s, data, causal, root / "stage2_only", None, progress), dist)
    say("(b) evaluating")
    emb = MocaEmbedder.from_pretrained(root / "stage2_only" / "final")
    out["arms"]["Stage 2 only"] = {"eval": _evaluate(emb, data, s, device, progress),
                                   "stage2_history": _history(root / "stage2_only")}

    say("(c) Stage 1")
    run_cpt(stage1_config(s, data, causal, root / "stage1", progress), dist)
    say("(c) Stage 2 from the Stage 1 model")
    run_cl(stage2_config(s, data, causal, root / "stage1_stage2", str(root / "stage1" / "final"), progress), dist)
    say("(c) evaluating")
    emb = MocaEmbedder.from_pretrained(root / "stage1_stage2" / "final")
    out["arms"]["Stage 1 + Stage 2"] = {"eval": _evaluate(emb, data, s, device, progress),
                                        "stage1_history": _history(root / "stage1"),
                                        "stage2_history": _history(root / "stage1_stage2")}
    out["seconds"] = time.perf_counter() - t0
    say("done")
    return out


def _worker(s_dict: dict, data: dict, attention: str, status, threads: int) -> dict:
    """Entry point of a worker process (spawned): one attention variant with ``threads`` torch threads."""
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    try:
        return run_attention(DemoSettings(**s_dict), data, attention, status=status, progress=False)
    except BaseException as exc:   # the parent prints it; a traceback object does not cross processes
        import traceback

        return {"attention": attention, "error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"}


# ------------------------------------------------------------------------------------------------------------
# The whole demo
# ------------------------------------------------------------------------------------------------------------


def _run_parallel(s: DemoSettings, data: dict, threads: int) -> List[dict]:
    """The attention variants in separate processes, with one progress bar per variant fed from their logs."""
    import multiprocessing as mp

    from tqdm.auto import tqdm

    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    status = manager.Queue()
    # steps of each variant: Stage 2 (b), Stage 1, Stage 2 (c), read from the runs' JSONL logs
    runs = {a: [Path(s.out) / a / d for d in RUNS] for a in s.attentions}
    for a in s.attentions:
        _clear_logs(s, a)
    total = s.stage2_steps * 2 + s.stage1_steps
    bars = {a: tqdm(total=total, desc=f"{a:13s}", unit="step", position=i, dynamic_ncols=True)
            for i, a in enumerate(s.attentions)}
    results = []
    with ctx.Pool(len(s.attentions)) as pool:
        pending = [pool.apply_async(_worker, (asdict(s), data, a, status, threads)) for a in s.attentions]
        while any(not p.ready() for p in pending):
            time.sleep(0.5)
            try:
                while True:
                    a, msg = status.get_nowait()
                    bars[a].set_postfix_str(msg, refresh=False)
            except queue.Empty:
                pass
            for a, dirs in runs.items():
                done = sum(_count_lines(d / "logs" / "train.jsonl") for d in dirs)
                bars[a].update(done - bars[a].n)
        results = [p.get() for p in pending]
    for a, dirs in runs.items():
        bars[a].update(sum(_count_lines(d / "logs" / "train.jsonl") for d in dirs) - bars[a].n)
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


def comparison_table(results: dict) -> str:
    """Rows: chance, then every (arm, attention); columns: each task's headline metric and the overall mean."""
    from .eval import format_table

    chance = results["chance"]
    names = list(chance["tasks"])
    header = ["model", "attention"] + [f"{n} ({chance['tasks'][n]['headline']})" for n in names] + ["overall"]
    rows = [["chance (random scores)", "-"] + [chance["tasks"][n]["metrics"][chance["tasks"][n]["headline"]]
                                                for n in names] + [chance["overall"]]]
    for arm in ARMS:
        for attention, res in results["attention"].items():
            ev = res["arms"][arm]["eval"]
            rows.append([arm, attention] + [ev["tasks"][n]["metrics"][ev["tasks"][n]["headline"]] for n in names]
                        + [ev["overall"]])
    return format_table(header, rows)


def noise_note(results: dict) -> str:
    """How large a difference the evaluation can resolve (binomial standard error of precision@1)."""
    chance = results["chance"]["tasks"]
    n = min(t["n_queries"] for t in chance.values() if t["type"] == "candidates")
    p = 0.2
    se = 100 * math.sqrt(p * (1 - p) / n)
    return (f"Each candidate task has >= {n} queries: the standard error of a precision@1 near {100 * p:.0f}% is "
            f"{se:.1f} points, so differences below ~{2 * se:.0f} points on one task are within noise.")


def plot_losses(results: dict, path: Path) -> Optional[Path]:
    """PNG of the Stage 1 and Stage 2 loss curves (moving average over 10 steps); None without matplotlib."""
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

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for attention, res in results["attention"].items():
        style = "-" if attention == "bidirectional" else "--"
        h1 = res["arms"]["Stage 1 + Stage 2"]["stage1_history"]
        axes[0].plot([h["step"] for h in h1], smooth([h["mlm_loss"] for h in h1]), style, label=f"MLM, {attention}")
        axes[1].plot([h["step"] for h in h1], smooth([h["mae_loss"] for h in h1]), style, label=f"MAE, {attention}")
        for arm, color in (("Stage 2 only", "tab:orange"), ("Stage 1 + Stage 2", "tab:green")):
            h2 = res["arms"][arm]["stage2_history"]
            axes[2].plot([h["step"] for h in h2], smooth([h["loss"] for h in h2]), style, color=color,
                         label=f"{arm}, {attention}")
    axes[0].set_title("Stage 1: masked-token loss")
    axes[1].set_title("Stage 1: masked-patch loss")
    axes[2].set_title("Stage 2: InfoNCE (mean of 10 steps, mixed tasks)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("moca demo: " + (results["settings"]["model"] or "tiny Qwen2.5-VL (random init)"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_demo(s: DemoSettings) -> dict:
    """Run the demo; returns the results (also written to ``<out>/results.json``)."""
    import torch

    t0 = time.perf_counter()
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"moca demo: {'tiny Qwen2.5-VL (random init)' if s.model is None else s.model}; output in {out}", flush=True)
    print("[1/3] writing the embedded data (Stage 1 corpus, Stage 2 pairs, held-out tasks)", flush=True)
    data = prepare_data(s)
    cpu = not (s.device or "").startswith("cuda") and not torch.cuda.is_available()
    workers = max(1, min(s.workers, len(s.attentions)))
    print(f"[2/3] training and evaluating {len(ARMS)} arms x {len(s.attentions)} attention variants "
          f"(Stage 1: {s.stage1_steps} steps, Stage 2: {s.stage2_steps} steps of {s.batch_size} queries + "
          f"{s.hard_negatives} hard negative(s) each){' in ' + str(workers) + ' processes' if workers > 1 else ''}",
          flush=True)
    if workers > 1:
        threads = max(1, (os.cpu_count() or 2) // workers) if cpu else 1
        per = _run_parallel(s, data, threads)
    else:
        per = [run_attention(s, data, a) for a in s.attentions]
    errors = [r["error"] for r in per if "error" in r]
    if errors:
        raise RuntimeError("a demo worker failed:\n" + "\n".join(errors))
    print("[3/3] tables and plots", flush=True)
    results = {"settings": asdict(s), "attention": {r["attention"]: r for r in per}, "chance": chance_levels(data)}
    results["table"] = comparison_table(results)
    results["wall_time_s"] = time.perf_counter() - t0
    png = plot_losses(results, out / "loss_curves.png")
    results["loss_curves_png"] = str(png) if png else None
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print()
    print("Held-out tasks (%): precision@1 for candidate lists, nDCG@5 for corpus search")
    print(results["table"])
    print(noise_note(results))
    print(f"\nwall time {results['wall_time_s']:.0f} s; results in {out / 'results.json'}"
          + (f", loss curves in {png}" if png else ""))
    return results


def _demo_command(args) -> int:
    import torch

    s = settings_for(quick=args.quick, model=args.model, out=args.out, seed=args.seed, device=args.device,
                     stage1_steps=args.stage1_steps, stage2_steps=args.stage2_steps,
                     attentions=args.attention and [args.attention])
    cpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu"
    if args.workers is not None:
        s.workers = args.workers
    elif s.model is None and not s.quick and (not cpu or (os.cpu_count() or 1) >= 2):
        s.workers = 2   # the tiny model is bound by per-op overhead: one process per attention variant
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
                   help="processes (default with the tiny model: 2, one per attention variant; 1 with --model, "
                        "--quick or a 1-core CPU)")
    p.add_argument("--attention", choices=ATTENTIONS, default=None, help="run only one attention variant")
    p.add_argument("--stage1-steps", type=_positive_int, default=None,
                   help="Stage 1 steps (default 200; 2 with --quick)")
    p.add_argument("--stage2-steps", type=_positive_int, default=None,
                   help="Stage 2 steps of every Stage 2 run (default 500; 3 with --quick)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the initial weights and the batches")
    p.set_defaults(func=_demo_command)
