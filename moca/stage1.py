"""MoCa Stage 1 model: the bidirectional backbone, the MLM loss through the LM head and the MAE decoder.

``loss = mlm_weight * masked_token_loss(hidden at masked text tokens, lm_head.weight, labels)
       + mae_weight * masked_patch_loss(decoder prediction at masked image tokens, original pixel rows)``

with ``mlm_weight = 1`` and ``mae_weight = 0.1`` by default. Both corruptions happen in one forward pass.

The Stage 1 trainer (:mod:`moca.train.cpt`) builds the backbone with :func:`moca.build.build_model_and_processor`;
:mod:`moca.stage2` (the Stage 2 model) is its sibling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import nn

import moca_kernels as mk

from .modeling import PIXEL_ROW, MaeDecoder, MocaBackbone, fsdp_sharded


@dataclass
class LossConfig:
    mlm_weight: float = 1.0
    mae_weight: float = 0.1
    norm_pix: bool = False
    mae_head_norm: bool = False         # an RMSNorm before the MAE projection (the official head has none)
    impl: Optional[str] = None          # force a moca_kernels backend for both losses (None = automatic)

    def __post_init__(self):
        if self.impl not in (None, "cuda", "triton", "torch"):
            raise ValueError(f"loss.impl must be cuda, triton, torch or null (automatic), got {self.impl!r}")
        if not (self.mlm_weight >= 0 and self.mae_weight >= 0) or self.mlm_weight + self.mae_weight == 0:
            raise ValueError(f"loss weights must be >= 0 and not both 0, got mlm_weight={self.mlm_weight}, "
                             f"mae_weight={self.mae_weight}")


def _compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """Under autocast, the autocast dtype (the final RMSNorm returns float32 even under bf16 autocast)."""
    if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        get = getattr(torch, "get_autocast_dtype", None)
        dt = get(x.device.type) if get is not None else torch.get_autocast_gpu_dtype()
        return x.to(dt)
    return x


class CptModel(nn.Module):
    """Backbone + MAE decoder; ``forward(batch)`` returns the Stage 1 losses.

    Attributes:
        backbone: :class:`MocaBackbone` (shared with Stage 2).
        mae_decoder: :class:`MaeDecoder`.
    """

    def __init__(self, backbone: MocaBackbone, loss: Optional[LossConfig] = None,
                 mae_decoder: Optional[MaeDecoder] = None):
        super().__init__()
        self.backbone = backbone
        self.loss_config = loss or LossConfig()
        self.mae_decoder = mae_decoder if mae_decoder is not None else \
            MaeDecoder(backbone, norm=self.loss_config.mae_head_norm)

    def forward(self, batch) -> Dict[str, torch.Tensor]:
        """Losses of one collated Stage 1 batch.

        Returns a dict of float32 scalars: ``loss`` (weighted sum, differentiable), ``mlm_loss``, ``mae_loss``
        (each 0 when the batch has nothing of that kind), and ``mlm_count`` / ``mae_count`` (masked text tokens,
        masked image tokens).
        """
        cfg = self.loss_config
        bb = self.backbone
        docs = bb.documents(batch, causal=False)                                # decoder: always bidirectional
        hidden = bb(batch, docs=docs if not bb.causal else None)                # [B, S, H]
        B, S, H = hidden.shape
        flat = hidden.reshape(B * S, H)
        zero = flat.sum() * 0.0
        n_mlm = batch.mlm_positions.numel() if batch.mlm_positions is not None else 0
        if n_mlm:
            h = _compute_dtype(flat.index_select(0, batch.mlm_positions))
            w = bb.lm_head_weight
            mlm = mk.masked_token_loss(h, w.to(h.dtype), batch.mlm_labels, impl=cfg.impl)
        else:
            mlm = zero.float()
        n_mae = batch.mae_positions.numel() if batch.mae_positions is not None else 0
        if n_mae:
            rope = bb.rotary(hidden, batch.position_ids)
            pred = self.mae_decoder(hidden, rope, batch.mae_positions, padding=batch.attention_mask, docs=docs)
            target = batch.mae_target.to(pred.dtype if pred.dtype != torch.float64 else torch.float64)
            # mae_weight folded into the kernel's pass (no extra pass over the gradient); 0 still logs the loss
            mae_w = cfg.mae_weight if cfg.mae_weight > 0 else 1.0
            weighted_mae = mk.masked_patch_loss(pred.reshape(-1, PIXEL_ROW), target.reshape(-1, PIXEL_ROW),
                                                norm_pix=cfg.norm_pix, impl=cfg.impl, weight=mae_w)
            mae = weighted_mae.detach() / mae_w                                 # logged unweighted
            if cfg.mae_weight == 0:
                weighted_mae = weighted_mae * 0.0
        else:
            mae = weighted_mae = zero.float()
        loss = cfg.mlm_weight * mlm + weighted_mae
        if (n_mlm == 0 or n_mae == 0) and fsdp_sharded(self.mae_decoder):
            # FSDP2: every rank runs every sharded module and gives every parameter a gradient in every step
            if n_mae == 0:
                rope = bb.rotary(hidden, batch.position_ids)
                idle = self.mae_decoder(hidden, rope, torch.zeros(1, dtype=torch.long, device=hidden.device),
                                        padding=batch.attention_mask, docs=docs)
                loss = loss + idle.float().sum() * 0
            if n_mlm == 0:
                loss = loss + bb.lm_head_weight.float().sum() * 0
        return {"loss": loss, "mlm_loss": mlm.detach(), "mae_loss": mae.detach(),
                "mlm_count": torch.tensor(n_mlm), "mae_count": torch.tensor(n_mae)}
