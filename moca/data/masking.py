"""Modality-aware masking of MoCa's Stage 1 (the collator's job).

Text: every eligible token (not special, not a vision token) is replaced by ``<|mask|>`` with probability
``text_ratio`` (0.4), no 80/10/10 split; its label is the original token at the same position.
Images: the unit is one merged LLM image token (``merge_size ** 2`` = 4 patch rows); each unit is masked
independently with probability ``image_ratio`` (0.5; ``image_mask_mode: bernoulli``, the official rule), or
(``image_mask_mode: exact``) in each image exactly ``round(image_ratio * n_units)`` units are chosen uniformly
without replacement. How the chosen units
reach the vision tower (noise / a learned mask token / dropped) is applied by :func:`moca.data.batch.collate`;
the MAE targets are always the original rows.

All randomness comes from a ``torch.Generator`` passed per call, so a micro-batch's masks depend only on its
seed (resuming a run reproduces them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from .batch import IGNORE, Batch, Sample, VisionSpec, collate

CORRUPTIONS = ("noise", "mask_token", "drop")


@dataclass
class MaskingConfig:
    """Stage 1 masking settings (official values as defaults)."""

    text_ratio: float = 0.4
    image_ratio: float = 0.5
    image_corruption: str = "noise"
    image_mask_mode: str = "bernoulli"      # bernoulli (official: each merged token with p = image_ratio) | exact

    def __post_init__(self):
        if not 0.0 <= self.text_ratio <= 1.0:
            raise ValueError(f"text_ratio must be in [0, 1], got {self.text_ratio}")
        if not 0.0 <= self.image_ratio < 1.0:
            raise ValueError(f"image_ratio must be in [0, 1), got {self.image_ratio}")
        if self.image_mask_mode not in ("bernoulli", "exact"):
            raise ValueError(f"image_mask_mode must be 'bernoulli' or 'exact', got {self.image_mask_mode!r}")
        if self.image_corruption not in CORRUPTIONS:
            raise ValueError(f"image_corruption must be one of {CORRUPTIONS}, got {self.image_corruption!r}")


class ModalityMasker:
    """Applies :class:`MaskingConfig` to samples.

    Args:
        config: the ratios and corruption.
        mask_token_id: id of ``<|mask|>``.
        never_masked: ids never replaced (special and vision tokens).
        merge_size: spatial merge of the vision tower (2).
    """

    def __init__(self, config: MaskingConfig, mask_token_id: int, never_masked: Sequence[int], merge_size: int = 2):
        self.config = config
        self.mask_token_id = int(mask_token_id)
        self.never_masked = torch.tensor(sorted(set(int(i) for i in never_masked) | {int(mask_token_id)}),
                                         dtype=torch.long)
        self.m2 = merge_size ** 2

    def mask_sample(self, sample: Sample, generator: torch.Generator) -> Sample:
        """A copy of ``sample`` with masked text (``mlm_labels``) and chosen image units (``unit_masked``)."""
        ids = sample.input_ids
        eligible = ~torch.isin(ids, self.never_masked)
        chosen = (torch.rand(ids.shape, generator=generator) < self.config.text_ratio) & eligible
        labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
        new_ids = torch.where(chosen, torch.full_like(ids, self.mask_token_id), ids)
        unit_masked = None
        if sample.image_grid_thw is not None and len(sample.image_grid_thw):
            parts = []
            for n in (sample.image_grid_thw.prod(-1) // self.m2).tolist():
                if self.config.image_mask_mode == "bernoulli":
                    parts.append(torch.rand(n, generator=generator) < self.config.image_ratio)
                    continue
                k = int(math.floor(self.config.image_ratio * n + 0.5))
                m = torch.zeros(n, dtype=torch.bool)
                m[torch.randperm(n, generator=generator)[:k]] = True
                parts.append(m)
            unit_masked = torch.cat(parts)
        return Sample(new_ids, sample.pixel_values, sample.image_grid_thw, sample.record_id, labels, unit_masked)


class CptCollator:
    """Stage 1 collator: mask every sample, then pack (or pad) and corrupt the masked image units.

    ``collator(samples, seed)`` -> :class:`Batch` with ``mlm_positions/mlm_labels`` and
    ``mae_positions/mae_target``. The seed fixes every random choice of the micro-batch.
    """

    def __init__(self, masker: ModalityMasker, spec: VisionSpec, pad_token_id: int, packed: bool = True,
                 pad_to_multiple: int = 1):
        self.masker, self.spec = masker, spec
        self.pad_token_id, self.packed, self.pad_to_multiple = pad_token_id, packed, pad_to_multiple

    def __call__(self, samples: List[Sample], seed: int) -> Batch:
        g = torch.Generator().manual_seed(int(seed))
        masked = [self.masker.mask_sample(s, g) for s in samples]
        return collate(masked, self.spec, packed=self.packed, pad_token_id=self.pad_token_id,
                       corruption=self.masker.config.image_corruption, generator=g,
                       pad_to_multiple=self.pad_to_multiple)
