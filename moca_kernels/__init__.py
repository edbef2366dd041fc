"""moca_kernels: fused GPU ops for bidirectional multimodal embedding models (MoCa).

Public API (see each function's docstring for shapes and dtypes):

    AttentionMask      packed-sequence mask description (documents, image blocks, causal or not)
    masked_attention   attention over a packed sequence under an AttentionMask
    masked_patch_loss  masked MSE reconstruction loss of image patches (MAE)
    masked_token_loss  fused LM head + cross-entropy at masked text positions (MLM)
    info_nce           tiled InfoNCE contrastive loss
    GradCache          gradient caching for contrastive batches larger than memory

Every op picks a backend (cuda > triton > torch) by what its inputs support; ``impl=`` or the environment
variable ``MOCA_KERNELS_IMPL`` forces one (see ``moca_kernels.dispatch``).
"""

__version__ = "0.1.0"

from .attention import AttentionMask, masked_attention
from .grad_cache import GradCache
from .losses import info_nce, masked_patch_loss, masked_token_loss

__all__ = ["AttentionMask", "masked_attention", "masked_patch_loss", "masked_token_loss", "info_nce", "GradCache"]
