"""Stage 2 trainer: heterogeneous contrastive fine-tuning (``moca train cl --config run.yaml``).

Starts from a local checkpoint (typically Stage 1's ``<output_dir>/final``), the tiny default model, or a plain
Qwen2-VL / Qwen2.5-VL directory, and trains the :class:`~moca.embedding.MocaEmbedder` with InfoNCE:

* data: subsets of pair records (query, positive, hard negatives; each side text, image or interleaved) with
  per-subset instruction templates and sampling weights (:mod:`moca.data.retrieval`); empty = the embedded
  retrieval data (:mod:`moca.data.embedded_retrieval`);
* task-aware batching enforced by :class:`~moca.data.sampler.TaskBatchSampler`: every global batch comes from
  one subset, identically on every rank;
* loss: ``mk.info_nce`` over cosine similarities (temperature 0.03, or learnable), hard negatives scored by
  their own query only (``hard_negative_scope: own``, MoCa's official code) or by every query (``batch``),
  documents gathered across ranks (``group=``);
* GradCache (``grad_cache.enabled``) with separate query / document chunk sizes, so the contrastive batch is not
  limited by activation memory; the step equals the plain step;
* full fine-tune, or LoRA on the language model through ``peft`` (``lora.enabled``);
* checkpoint/resume, progress, JSONL/TensorBoard logs, DDP under torchrun: the shared
  :class:`~moca.train.core.Trainer`.

The final model is exported to ``<output_dir>/final`` (LoRA merged), loadable by
``MocaEmbedder.from_pretrained``.
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

import moca_kernels as mk

from ..build import ModelConfig
from ..config import from_dict
from ..data.images import DEFAULT_MAX_IMAGE_PIXELS, check_image_settings
from ..data.retrieval import PairBatch, PairLoader, SubsetConfig
from ..embedding import POOLINGS
from ..stage2 import (LORA_TARGETS, ContrastiveModel, LoraConfig, apply_lora,  # noqa: F401 (re-exported)
                      build_contrastive_model, merge_lora)
from .core import DistEnv, TrainConfig, Trainer, init_distributed, run_stage

log = logging.getLogger("moca.train")

# ------------------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------------------


@dataclass
class ClModelConfig(ModelConfig):
    """The shared model settings (:class:`moca.build.ModelConfig`) plus the pooling (``path``: e.g. Stage 1's
    ``final``; None = tiny default).

    ``pooling`` None follows the attention as the official code does (mean if bidirectional, last if causal);
    ``append_eos`` ends every input with ``<|endoftext|>`` (the official inputs have none)."""

    pooling: Optional[str] = None
    append_eos: bool = False

    def __post_init__(self):
        super().__post_init__()   # the shared checks (model.dtype)
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise ValueError(f"model.pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.path is not None and not Path(self.path).is_dir():
            raise FileNotFoundError(f"model.path: {self.path} is not a checkpoint directory")


@dataclass
class ClDataConfig:
    """``subsets``: the training mixture; empty = the embedded retrieval subsets written to ``embedded_dir``."""

    subsets: List[SubsetConfig] = field(default_factory=list)
    embedded_dir: Optional[str] = None            # default <output_dir>/embedded_data
    embedded_pairs: int = 256                     # records per embedded subset
    embedded_seed: int = 0
    global_batch_size: int = 16                   # queries per contrastive batch over all ranks (a step takes
                                                  # train.grad_accum such batches, each its own InfoNCE)
    hard_negatives: int = 2                       # per query (official MoCa: 2)
    packed: bool = True
    shuffle: bool = True
    skip_bad: bool = False
    allow_outside_paths: bool = False             # allow image paths outside each subset's folder / image_root
    max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS   # width x height bound from the header; null = none
    pad_negatives: bool = True                    # fewer hard negatives than asked: repeat the last (official)
    max_length: Optional[int] = None              # truncate each input at this many tokens (official: 1280)
    stream: bool = False                          # read the subsets' shards as streams (moca.data.stream_pairs)

    def __post_init__(self):
        check_image_settings(None, self.max_image_pixels)
        self.subsets = [s if isinstance(s, SubsetConfig) else from_dict(SubsetConfig, s, f"data.subsets[{i}]")
                        for i, s in enumerate(self.subsets)]
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"data.max_length must be >= 2 or null, got {self.max_length}")
        capped = [f"data.subsets[{i}].max_records" for i, s in enumerate(self.subsets) if s.max_records is not None]
        if self.stream and capped:
            raise ValueError(f"data.stream: true cannot take {', '.join(capped[:3])}{' ...' if len(capped) > 3 else ''}"
                             ": the streaming loader has no 'first n records' of a subset; drop max_records or set "
                             "data.stream: false")
        if self.global_batch_size < 1 or self.hard_negatives < 0:
            raise ValueError(f"data.global_batch_size must be >= 1 and data.hard_negatives >= 0, got "
                             f"{self.global_batch_size}, {self.hard_negatives}")


@dataclass
class ClLossConfig:
    temperature: float = 0.03
    learnable_temperature: bool = False
    hard_negative_scope: str = "own"              # own (MoCa's code) | batch (every query scores every document)
    gather_across_ranks: bool = True              # in-batch documents of every rank
    impl: Optional[str] = None                    # force a moca_kernels backend for info_nce

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"loss.temperature must be > 0, got {self.temperature}")
        if self.hard_negative_scope not in ("own", "batch"):
            raise ValueError(f"loss.hard_negative_scope must be own or batch, got {self.hard_negative_scope!r}")


@dataclass
class GradCacheConfig:
    """Gradient caching: encode queries / documents in chunks of these many samples (0 = all at once)."""

    enabled: bool = False
    query_chunk_size: int = 8
    doc_chunk_size: int = 8

    def __post_init__(self):
        if self.query_chunk_size < 0 or self.doc_chunk_size < 0:
            raise ValueError(f"grad_cache.query_chunk_size and doc_chunk_size must be >= 0 (0 = all at once), got "
                             f"{self.query_chunk_size}, {self.doc_chunk_size}")


@dataclass
class ClTrainConfig(TrainConfig):
    """The shared optimisation settings with Stage 2's defaults (the paper: lr 2e-5, 5% warm-up)."""

    output_dir: str = "runs/cl"
    lr: float = 2e-5
    warmup_ratio: float = 0.05


@dataclass
class ClConfig:
    model: ClModelConfig = field(default_factory=ClModelConfig)
    data: ClDataConfig = field(default_factory=ClDataConfig)
    loss: ClLossConfig = field(default_factory=ClLossConfig)
    grad_cache: GradCacheConfig = field(default_factory=GradCacheConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: ClTrainConfig = field(default_factory=ClTrainConfig)


# ------------------------------------------------------------------------------------------------------------
# Trainer
# ------------------------------------------------------------------------------------------------------------


def in_batch_accuracy(q: torch.Tensor, d: torch.Tensor, k: int, scope: str) -> float:
    """Fraction of local queries whose positive scores highest among the documents they are scored against."""
    B = q.shape[0]
    s = q.float() @ d.float().T
    if k and scope == "own":
        cols = torch.arange(d.shape[0], device=s.device)[None, :]
        own = (cols >= B) & (torch.div(cols - B, k, rounding_mode="floor") == torch.arange(B, device=s.device)[:, None])
        s = s.masked_fill(~((cols < B) | own), float("-inf"))
    return float((s.argmax(1) == torch.arange(B, device=s.device)).float().mean())


class ContrastiveTrainer(Trainer):
    """The shared trainer with the contrastive step (plain, or through ``mk.GradCache``)."""

    def __init__(self, cfg: ClConfig, model: ContrastiveModel, data: PairLoader, dist: Optional[DistEnv] = None,
                 save_extra=None):
        self.cl = cfg
        super().__init__(cfg.train, model, data, next_micro_batch=lambda i: data.next_micro_batch(),
                         loss_fn=None, dist=dist, tokens_of=lambda b: b.num_tokens, save_extra=save_extra)
        gather = self.dist.distributed and cfg.loss.gather_across_ranks
        self.group = torch.distributed.group.WORLD if gather else None

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.dist.distributed and getattr(model, "log_temperature", None) is not None:
            if self.cfg.parallel == "fsdp":
                raise ValueError("loss.learnable_temperature is not supported with train.parallel: fsdp")
            from torch.nn.parallel import DistributedDataParallel as DDP

            # used by the loss, outside forward: DDP must not wait for it; its gradient is averaged by hand
            DDP._set_params_and_buffers_to_ignore_for_model(model, ["log_temperature"])
        return super()._wrap(model)

    def _collate(self, samples):
        return self.module.embedder.collate(samples, packed=self.cl.data.packed).to(self.dist.device)

    def _split(self, samples, size: int):
        return [self._collate(samples[i:i + size]) for i in range(0, len(samples), size)]

    def contrastive_step(self, pb: PairBatch, scale: float = 1.0) -> Dict[str, float]:
        """Forward and backward of one contrastive batch (loss multiplied by ``scale``); returns metrics."""
        B, k = len(pb.queries), pb.hard_negatives
        lc = self.cl.loss
        stats: Dict[str, float] = {}

        # Embedding products in the training precision: bf16 tensor cores under bf16 autocast on a GPU (fp32
        # operands would take info_nce's exact-fp32 CUDA-core path, several times slower); fp32 otherwise.
        # Softmax and log-sum-exp stay fp32 inside info_nce either way.
        emb_dtype = torch.bfloat16 if (self.autocast_dtype == torch.bfloat16 and self.dist.device.type == "cuda") \
            else torch.float32

        def loss_fn(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
            with torch.autocast(self.dist.device.type, enabled=False):
                loss = mk.info_nce(q.to(emb_dtype), d.to(emb_dtype), temperature=self.module.temperature(),
                                   impl=lc.impl,
                                   hard_negatives=k, hard_negative_scope=lc.hard_negative_scope, group=self.group)
            stats["loss"] = float(loss.detach())
            stats["accuracy"] = in_batch_accuracy(q.detach(), d.detach(), k, lc.hard_negative_scope)  # local docs
            return loss * scale

        gc = self.cl.grad_cache
        if gc.enabled:
            sizes = (gc.query_chunk_size or len(pb.queries), gc.doc_chunk_size or len(pb.docs))
            mk.GradCache(self.model, loss_fn, chunk_sizes=sizes, split_fn=self._split).step(pb.queries, pb.docs)
        else:
            emb = self.model(self._collate(pb.queries + pb.docs))
            loss_fn(emb[:B], emb[B:]).backward()
        return stats

    def compute_step(self) -> Dict[str, float]:
        n = self.cfg.grad_accum
        sums: Dict[str, float] = {}
        tokens = 0
        for i in range(n):
            pb = self.next_micro_batch(self.micro_index)
            self.micro_index += 1
            tokens += pb.num_tokens
            sync = nullcontext()
            if i < n - 1 and self.dist.distributed and hasattr(self.model, "no_sync"):
                sync = self.model.no_sync()
            with sync, self._autocast():
                stats = self.contrastive_step(pb, 1.0 / n)
            for key, v in stats.items():
                sums[key] = sums.get(key, 0.0) + v
        lt = self.module.log_temperature
        if lt is not None and self.dist.distributed and lt.grad is not None:
            torch.distributed.all_reduce(lt.grad)
            lt.grad /= self.dist.world_size
        metrics = {key: v / n for key, v in sums.items()}
        t = self.module.temperature()
        metrics["temperature"] = float(t.detach()) if torch.is_tensor(t) else t
        metrics["tokens"] = tokens
        return metrics


# ------------------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------------------


def embedded_subsets(out_dir, n_pairs: int, hard_negatives: int, seed: int) -> List[SubsetConfig]:
    """Write (once per settings) the embedded training subsets and return their configs."""
    from ..data.embedded_retrieval import write_train_subsets

    from ..fsutil import files_named_by_jsonl, load_index, save_index

    out = Path(out_dir)
    index = out / "subsets.json"
    key = {"pairs": n_pairs, "hard_negatives": max(hard_negatives, 2), "seed": seed}
    # reused only when written for these settings and every file it lists is intact (else written again)
    data = load_index(index, lambda d: d.get("key") == key)
    if data is None:
        subsets = write_train_subsets(out, n_per_subset=n_pairs, hard_negatives=key["hard_negatives"], seed=seed)
        files = files_named_by_jsonl(f for c in subsets for f in c["files"])
        data = save_index(index, {"key": key, "subsets": subsets}, files)   # last: commits the data
    return [from_dict(SubsetConfig, c, f"subsets[{i}]") for i, c in enumerate(data["subsets"])]


def run_cl(cfg: ClConfig, dist: Optional[DistEnv] = None) -> List[dict]:
    """Run Stage 2 with ``cfg``; returns the logged metrics (rank 0's view)."""
    return run_stage(cfg, dist, _run_cl)


def _run_cl(cfg: ClConfig, dist: DistEnv, out: Path) -> List[dict]:
    subsets = list(cfg.data.subsets)
    if not subsets:
        edir = Path(cfg.data.embedded_dir or out / "embedded_data")
        if dist.is_main:
            embedded_subsets(edir, cfg.data.embedded_pairs, cfg.data.hard_negatives, cfg.data.embedded_seed)
        dist.barrier()
        subsets = embedded_subsets(edir, cfg.data.embedded_pairs, cfg.data.hard_negatives, cfg.data.embedded_seed)

    model = build_contrastive_model(cfg)
    embedder = model.embedder
    loader_cls = PairLoader
    if cfg.data.stream:
        from ..data.stream_pairs import StreamPairLoader as loader_cls
    loader = loader_cls(subsets, embedder.processor, cfg.data.global_batch_size, cfg.data.hard_negatives,
                        seed=cfg.train.seed, rank=dist.rank, world_size=dist.world_size, shuffle=cfg.data.shuffle,
                        skip_bad=cfg.data.skip_bad, add_eos=embedder.add_eos,
                        allow_outside_paths=cfg.data.allow_outside_paths, max_image_pixels=cfg.data.max_image_pixels,
                        pad_negatives=cfg.data.pad_negatives, max_length=cfg.data.max_length)

    def export(final: Path, full_state=None):
        m = model
        if full_state is not None:   # FSDP: the gathered weights go into an unsharded copy on the CPU
            m = build_contrastive_model(cfg)
            missing, unexpected = m.load_state_dict(full_state, strict=False)
            if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
                raise RuntimeError(f"export: state does not match the model (missing {missing[:5]}, "
                                   f"unexpected {unexpected[:5]})")
        n = merge_lora(m.embedder)
        m.embedder.save_pretrained(final, extra_meta={
            "stage": "contrastive", "steps": cfg.train.max_steps, "lora_merged": n,
            "temperature": float(torch.as_tensor(m.temperature()).detach())})

    trainer = ContrastiveTrainer(cfg, model, loader, dist=dist, save_extra=export)
    return trainer.fit()


def _train_cl(args) -> int:
    from ..config import load_config

    cfg = load_config(ClConfig, args.config, args.set)
    history = run_cl(cfg)
    if history and os.environ.get("RANK", "0") == "0":
        last = history[-1]
        done = last["step"] >= cfg.train.max_steps
        where = (f"model in {cfg.train.output_dir}/final" if done
                 else f"stopped at step {last['step']} of {cfg.train.max_steps}; run again to resume")
        print(f"stage 2 {'done' if done else 'stopped'}: step {last['step']}, loss "
              f"{last.get('loss', float('nan')):.4f}, in-batch accuracy {last.get('accuracy', float('nan')):.3f}, "
              f"temperature {last.get('temperature', float('nan')):.4f}; {where}")
    return 0


def add_cli(sub, train_sub) -> None:
    """Register ``moca train cl``."""
    p = train_sub.add_parser("cl", help="Stage 2: heterogeneous contrastive fine-tuning (InfoNCE)")
    p.add_argument("--config", default=None,
                   help="YAML config (default: none, i.e. the built-in defaults: the tiny model on the embedded "
                        "pairs with the paper's lr 2e-5 and temperature 0.03, 100 steps into runs/cl; "
                        "moca/configs/cl_tiny.yaml is the CPU recipe)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.max_steps=20 (repeatable)")
    from ..cli import add_output_dir_override

    add_output_dir_override(p, "train.output_dir")
    p.set_defaults(func=_train_cl)
