"""moca's attention switch for transformers models: re-exports ``moca_kernels.integrations.transformers``.

The ``"moca"`` attention implementation (attention function and mask hook, registered when moca or the
integration module is imported), :func:`use_moca_attention` (moca's Qwen2-VL / Qwen2.5-VL switch, also to
``"eager"`` / ``"sdpa"`` references) and :func:`apply_moca_kernels` (any supported model, one call) live in
``moca_kernels.integrations.transformers``; this module keeps the names moca's code and users import.
"""

from moca_kernels.integrations.transformers import (  # noqa: F401
    ATTN_NAME,
    MocaMask,
    _attention_dtype,
    _configs,
    _patch_vision_attention,
    _vision_attention_forward,
    apply_moca_kernels,
    moca_attention_forward,
    moca_mask_interface,
    register,
    use_moca_attention,
)

__all__ = ["ATTN_NAME", "MocaMask", "moca_mask_interface", "moca_attention_forward", "register",
           "use_moca_attention", "apply_moca_kernels"]
