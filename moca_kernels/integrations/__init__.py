"""Adapters that put moca_kernels' ops behind the conventions of other libraries.

One module per framework, each imported only on demand (``import moca_kernels`` imports none of them):

- ``moca_kernels.integrations.transformers``: the ``"moca"`` attention implementation and ``apply_moca_kernels``.
- ``moca_kernels.integrations.sentence_transformers``: ``InfoNCELoss`` and ``CachedInfoNCELoss``.
- ``moca_kernels.integrations.flash_attn``: ``flash_attn_varlen_func`` with flash-attn's signature.
- ``moca_kernels.integrations.xformers``: xformers' block-diagonal attention biases as masks.
"""
