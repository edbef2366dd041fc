"""info_nce: InfoNCE over cosine similarities for contrastive training.

The torch backend is ``reference.info_nce``. Fast backends and options: see its issue.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .. import reference
from .._checks import check_float, check_int, check_ndim, check_same_device
from ..dispatch import Backend, Op

_NAME = "info_nce"


def info_nce(query: torch.Tensor, doc: torch.Tensor, temperature: Union[float, torch.Tensor] = 0.03,
             positive_index: Optional[torch.Tensor] = None, impl: Optional[str] = None) -> torch.Tensor:
    """InfoNCE: mean_i( logsumexp_j(q_i . d_j / t) - q_i . d_pos(i) / t ).

    Args:
        query: [B, D] float32 / float16 / bfloat16 (usually L2-normalised embeddings).
        doc: [M, D], same dtype.
        temperature: float > 0, or a scalar tensor (it then receives a gradient).
        positive_index: [B] integer indices into doc (default arange(B), requiring M >= B).
        impl: "cuda", "triton", "torch" or None (automatic).

    Returns:
        float32 scalar.
    """
    check_float("query", query, _NAME)
    check_float("doc", doc, _NAME)
    check_ndim("query", query, 2, _NAME, "[B, D]")
    check_ndim("doc", doc, 2, _NAME, "[M, D]")
    if query.shape[1] != doc.shape[1]:
        raise ValueError(f"{_NAME}: query dim {query.shape[1]} != doc dim {doc.shape[1]}")
    if query.shape[0] == 0 or doc.shape[0] == 0:
        raise ValueError(f"{_NAME}: empty batch (query {tuple(query.shape)}, doc {tuple(doc.shape)})")
    B, M = query.shape[0], doc.shape[0]
    if positive_index is None:
        if M < B:
            raise ValueError(f"{_NAME}: without positive_index, doc must hold at least B = {B} rows, got {M}")
    else:
        check_int("positive_index", positive_index, _NAME)
        if positive_index.shape != (B,):
            raise ValueError(f"{_NAME}: positive_index must have shape [{B}], got {tuple(positive_index.shape)}")
        if bool(((positive_index < 0) | (positive_index >= M)).any()):
            raise ValueError(f"{_NAME}: positive_index out of range [0, {M})")
    t = temperature.detach() if torch.is_tensor(temperature) else torch.tensor(float(temperature))
    if not bool((t > 0).all()):
        raise ValueError(f"{_NAME}: temperature must be > 0, got {temperature}")
    check_same_device(_NAME, query=query, doc=doc, positive_index=positive_index)
    return _OP(impl, query=query, doc=doc, temperature=temperature, positive_index=positive_index)


_OP = Op(_NAME, [
    Backend("torch", lambda **_: [], reference.info_nce),
])
