"""The three losses of MoCa: masked-patch (MAE), masked-token (MLM) and InfoNCE (contrastive)."""

from .info_nce import info_nce
from .masked_patch_loss import masked_patch_loss
from .masked_token_loss import MaskedTokenLoss, masked_token_loss

__all__ = ["info_nce", "masked_patch_loss", "masked_token_loss", "MaskedTokenLoss"]
