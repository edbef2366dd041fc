"""Stage 1 trainer: modality-aware continual pre-training (``moca train cpt --config run.yaml``).

Builds the model (a local checkpoint or the tiny default), the streaming loader over JSONL/parquet shards
(:mod:`moca.data.stream`; or the embedded corpus), the masking collator and the :class:`~moca.stage1.CptModel`,
then runs the shared :class:`~moca.train.core.Trainer`. The final model is exported to ``<output_dir>/final``
(a transformers checkpoint with moca's flags, the tokenizer, the image settings and ``mae_decoder.safetensors``), which
Stage 2 loads with ``MocaBackbone.from_pretrained``.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional


from ..config import from_dict
from ..data.batch import VisionSpec
from ..data.images import DEFAULT_MAX_IMAGE_PIXELS, check_image_settings  # noqa: F401 (re-exported)
from ..data.masking import CptCollator, MaskingConfig, ModalityMasker
from ..data.prefetch import Prefetcher
from ..data.processor import MocaProcessor
from ..data.stream import FORMATS, SourceConfig, StreamLoader
from ..build import LOAD_DTYPES, ModelConfig, build_model_and_processor, load_dtype  # noqa: F401 (re-exported)
from ..stage1 import CptModel, LossConfig
from .core import DistEnv, TrainConfig, Trainer, init_distributed, run_stage

log = logging.getLogger("moca.train")

# keys of the earlier Stage 1 source schema -> the streaming one (moca.data.stream.SourceConfig)
_OLD_SOURCE_KEYS = {"files": "path", "max_records": "max_samples"}


@dataclass
class DataConfig:
    """``train``: JSONL/parquet files, folders or globs (one source); ``sources``: a weighted mixture
    (:class:`~moca.data.stream.SourceConfig`: name, path, format, weight, max_samples: records per epoch, a
    seeded draw, as the official recipe caps each of its ten sources at 500,000 samples); both empty = the embedded
    corpus written to ``embedded_dir``. Records stream (:mod:`moca.data.stream`); ``num_workers`` DataLoader
    processes read them (a run resumes only with the same number). ``format`` is the format of ``train`` and of
    every source that names none."""

    train: List[str] = field(default_factory=list)
    sources: List[SourceConfig] = field(default_factory=list)
    num_workers: int = 0
    chunk_bytes: int = 4 << 20                   # largest JSONL byte range read at once per source and reader
    embedded_dir: Optional[str] = None           # default <output_dir>/embedded_data
    embedded_docs: int = 400
    embedded_seed: int = 0
    token_budget: int = 1024
    packed: bool = True
    max_samples: Optional[int] = None
    skip_bad: bool = False
    shuffle: bool = True
    pad_to_multiple: int = 1
    prefetch: int = 2                            # micro-batches prepared ahead in a background thread (0 = off)
    image_root: Optional[str] = None             # relative image paths resolve here (default: each file's folder)
    allow_outside_paths: bool = False            # allow image paths outside that folder (../, absolute, symlinks)
    max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS   # width x height bound from the header; null = none
    format: str = "moca"                         # moca | moca_pretrain (MoCa's published pre-training rows)
    max_length: Optional[int] = None             # truncate each sample at this many tokens (official: 1280)

    def __post_init__(self):
        for i, s in enumerate(self.sources):
            old = [k for k in _OLD_SOURCE_KEYS if isinstance(s, dict) and k in s]
            if old:
                raise ValueError(f"data.sources[{i}]: {', '.join(repr(k) for k in old)} is now "
                                 f"{', '.join(repr(_OLD_SOURCE_KEYS[k]) for k in old)} (a source is "
                                 "{name, path, format, weight, max_samples})")
        self.sources = [s if isinstance(s, SourceConfig) else from_dict(SourceConfig, s, f"data.sources[{i}]")
                        for i, s in enumerate(self.sources)]
        if self.sources and self.train:
            raise ValueError("data.train and data.sources are both set: list the train files as one source instead")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0 (0 = read in the training process), got {self.num_workers}")
        if self.chunk_bytes < 1:
            raise ValueError(f"data.chunk_bytes must be >= 1, got {self.chunk_bytes}")
        if self.token_budget < 2:
            raise ValueError(f"data.token_budget must be >= 2, got {self.token_budget}")
        if self.pad_to_multiple < 1:
            raise ValueError(f"data.pad_to_multiple must be >= 1, got {self.pad_to_multiple}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"data.max_samples must be >= 1 or null, got {self.max_samples}")
        if self.prefetch < 0:
            raise ValueError(f"data.prefetch must be >= 0 (0 = off), got {self.prefetch}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"data.max_length must be >= 2 or null, got {self.max_length}")
        if self.format not in FORMATS:
            raise ValueError(f"data.format must be one of {sorted(FORMATS)} (moca.data.stream.FORMATS), got "
                             f"{self.format!r}")
        check_image_settings(self.image_root, self.max_image_pixels)


@dataclass
class CptConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/cpt"))


def build_loader(data: DataConfig, files: List[str], processor: MocaProcessor, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> StreamLoader:
    """Stage 1's :class:`~moca.data.stream.StreamLoader`: ``data.sources`` (each with its weight and per-epoch
    cap), or ``files`` as one source named ``train``; the image settings, ``format`` and ``max_length`` of
    ``data``."""
    sources = data.sources or [SourceConfig(name="train", path=list(files))]
    return StreamLoader(sources, processor, data.token_budget, seed=seed, rank=rank, world_size=world_size,
                        num_workers=data.num_workers, skip_bad=data.skip_bad, shuffle=data.shuffle,
                        max_samples=data.max_samples, chunk_bytes=data.chunk_bytes, max_length=data.max_length,
                        image_root=data.image_root, allow_outside_paths=data.allow_outside_paths,
                        max_image_pixels=data.max_image_pixels, format=data.format)


def micro_batch_seed(seed: int, rank: int, index: int) -> int:
    """Seed of one micro-batch's masks: a function of (run seed, rank, micro-batch index) only."""
    return zlib.crc32(f"{seed}/{rank}/{index}".encode()) & 0x7FFFFFFF


def cpt_loss(model, batch):
    return model(batch)


def run_cpt(cfg: CptConfig, dist: Optional[DistEnv] = None) -> List[dict]:
    """Run Stage 1 with ``cfg``; returns the logged metrics (rank 0's view)."""
    return run_stage(cfg, dist, _run_cpt)


def _run_cpt(cfg: CptConfig, dist: DistEnv, out: Path) -> List[dict]:
    files = list(cfg.data.train)
    if not files and not cfg.data.sources:
        from ..data.embedded import ensure_cpt_corpus

        edir = Path(cfg.data.embedded_dir or out / "embedded_data")
        if dist.is_main:
            ensure_cpt_corpus(edir, n_docs=cfg.data.embedded_docs, seed=cfg.data.embedded_seed)
        dist.barrier()
        files = [str(edir / "cpt.jsonl")]

    backbone, proc = build_model_and_processor(cfg.model, cfg.masking.image_corruption)
    model = CptModel(backbone, cfg.loss)
    loader = build_loader(cfg.data, files, proc, seed=cfg.train.seed, rank=dist.rank, world_size=dist.world_size)
    masker = ModalityMasker(cfg.masking, proc.ids["mask"], proc.never_masked,
                            merge_size=proc.image_spec.merge_size)
    collator = CptCollator(masker, VisionSpec.from_config(backbone.vlm.config), proc.ids["endoftext"],
                           packed=cfg.data.packed, pad_to_multiple=cfg.data.pad_to_multiple)

    def make_micro_batch(index: int):
        return collator(loader.next_micro_batch(), micro_batch_seed(cfg.train.seed, dist.rank, index))

    data, next_micro_batch = loader, make_micro_batch
    if cfg.data.prefetch > 0:
        data = next_micro_batch = Prefetcher(make_micro_batch, loader, cfg.data.prefetch)

    def export(final: Path, full_state=None):
        from safetensors.torch import save_model

        m = model
        if full_state is not None:   # FSDP: load the gathered weights into an unsharded copy on the CPU
            m = CptModel(build_model_and_processor(cfg.model, cfg.masking.image_corruption)[0], cfg.loss)
            missing, unexpected = m.load_state_dict(full_state, strict=False)
            if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
                raise RuntimeError(f"export: state does not match the model (missing {missing[:5]}, "
                                   f"unexpected {unexpected[:5]})")
        m.backbone.save_pretrained(final, extra_meta={"stage": "cpt", "steps": cfg.train.max_steps})
        proc.save_pretrained(final)
        save_model(m.mae_decoder, str(final / "mae_decoder.safetensors"))

    trainer = Trainer(cfg.train, model, data, next_micro_batch, cpt_loss, dist=dist, save_extra=export)
    try:
        return trainer.fit()
    finally:
        if data is not loader:
            data.close()
        if len(loader.names) > 1:
            log.info("data source shares (rank %d, records read incl. read-ahead): %s", dist.rank,
                     ", ".join(f"{n} {v:.3f}" for n, v in loader.shares().items()))
        loader.close()
