"""MoCa Stage 2 model: the embedder (:class:`~moca.embedding.MocaEmbedder`, the bidirectional backbone with its
pooling) plus the InfoNCE temperature, fixed or learnable; LoRA adapters on the language model (``peft``).

The Stage 2 trainer (:mod:`moca.train.contrastive`) builds it with :func:`build_contrastive_model` from the same
model builder as Stage 1 (:func:`moca.build.build_model_and_processor`); :mod:`moca.stage1` is its sibling.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import List

import torch
from torch import nn

from .build import build_model_and_processor
from .embedding import MocaEmbedder

log = logging.getLogger("moca.train")

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraConfig:
    """LoRA on the language model's linear layers (needs ``peft``); everything else is frozen."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: list(LORA_TARGETS))


class ContrastiveModel(nn.Module):
    """The embedder plus the (optionally learnable) temperature; ``forward(batch)`` = embeddings [n, H] float32.

    A learnable temperature is stored as ``log_temperature`` (kept at >= 1e-3 by a clamp of the exponent).
    """

    def __init__(self, embedder: MocaEmbedder, temperature: float = 0.03, learnable: bool = False):
        super().__init__()
        self.embedder = embedder
        self.fixed_temperature = float(temperature)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature))) if learnable else None

    def forward(self, batch) -> torch.Tensor:
        return self.embedder(batch)

    def temperature(self):
        """The temperature: a float, or a one-element float32 tensor with a gradient when learnable."""
        if self.log_temperature is None:
            return self.fixed_temperature
        return self.log_temperature.float().clamp(min=math.log(1e-3)).exp()


def apply_lora(embedder: MocaEmbedder, cfg: LoraConfig) -> None:
    """Add LoRA adapters to the language model's linear layers (``peft``) and freeze every other parameter."""
    try:
        import peft
    except ImportError as exc:
        raise ImportError("lora.enabled: true needs the peft package (pip install peft); set lora.enabled: false "
                          "for a full fine-tune") from exc
    config = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                             target_modules=list(cfg.target_modules), bias="none")
    peft.inject_adapter_in_model(config, embedder.backbone.language_model)
    n_train = 0
    for name, p in embedder.named_parameters():
        p.requires_grad_("lora_" in name)
        n_train += p.numel() if p.requires_grad else 0
    if n_train == 0:
        raise ValueError(f"lora: no layer matched target_modules {cfg.target_modules}")
    log.info("LoRA r=%d on %s: %d trainable parameters", cfg.r, cfg.target_modules, n_train)


def merge_lora(module: nn.Module) -> int:
    """Merge every LoRA adapter into its base layer and put the plain layer back; returns how many."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return 0
    merged = 0
    for name, m in list(module.named_modules()):
        if isinstance(m, LoraLayer):
            m.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, child, m.get_base_layer())
            merged += 1
    return merged


def build_contrastive_model(cfg) -> ContrastiveModel:
    """The model named by ``cfg.model`` with pooling, LoRA and temperature applied (``cfg``: a
    :class:`~moca.train.contrastive.ClConfig`; its ``model``, ``lora`` and ``loss`` sections)."""
    backbone, proc = build_model_and_processor(cfg.model, None)
    embedder = MocaEmbedder(backbone, proc, pooling=cfg.model.pooling, append_eos=cfg.model.append_eos)
    if cfg.lora.enabled:
        apply_lora(embedder, cfg.lora)
    return ContrastiveModel(embedder, cfg.loss.temperature, cfg.loss.learnable_temperature)
