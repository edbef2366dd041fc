"""``mk.info_nce`` as sentence-transformers losses: drop-in for (Cached)MultipleNegativesRankingLoss.

    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from moca_kernels.integrations.sentence_transformers import CachedInfoNCELoss, InfoNCELoss

    loss = InfoNCELoss(model)                                   # = MultipleNegativesRankingLoss(model)
    loss = CachedInfoNCELoss(model, mini_batch_size=32)         # = CachedMultipleNegativesRankingLoss(...)
    loss = InfoNCELoss(model, temperature=0.03, hard_negative_scope="own", symmetric=True)   # MoCa's options
    trainer = SentenceTransformerTrainer(model=model, train_dataset=dataset, loss=loss)

Inputs are what sentence-transformers passes a loss: ``forward(sentence_features, labels)`` with one tokenised
feature dict per dataset column, ``(anchor, positive)``, ``(anchor, positive, negative)`` or
``(anchor, positive, negative_1, ..., negative_k)`` (labels unused). The documents are
``[positives | every first negative | every second negative | ...]`` (sentence-transformers' column order),
passed to ``info_nce`` with ``hard_negative_layout="columns"``, so ``hard_negative_scope="own"`` pairs each
query with its own negatives. With the defaults (``scale=20.0``, cosine, ``hard_negative_scope="batch"``) the
loss and its gradients are those of ``MultipleNegativesRankingLoss`` at the same scale; ``symmetric=True`` is
``MultipleNegativesRankingLoss(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction")``.

Needs sentence-transformers (``pip install sentence-transformers``); ``import moca_kernels`` does not import
this module.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    from sentence_transformers import util as _st_util
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("moca_kernels.integrations.sentence_transformers needs sentence-transformers: "
                      "pip install sentence-transformers") from exc

from ..grad_cache import GradCache, split_batch
from ..losses.info_nce import SCOPES, info_nce

_SIMILARITIES = {"cosine": ("cos_sim", "cosine", "cos"), "dot": ("dot_score", "dot", "dot_product")}


def _similarity_kind(similarity_fct) -> str:
    """"cosine" or "dot" for the similarity functions info_nce can compute (it takes embeddings, not scores)."""
    if similarity_fct is None:
        return "cosine"
    if isinstance(similarity_fct, str):
        name = similarity_fct
    elif similarity_fct is getattr(_st_util, "cos_sim", None):
        name = "cos_sim"
    elif similarity_fct is getattr(_st_util, "dot_score", None):
        name = "dot_score"
    else:
        name = getattr(similarity_fct, "__name__", type(similarity_fct).__name__)
    for kind, names in _SIMILARITIES.items():
        if name in names:
            return kind
    raise ValueError(f"similarity_fct: info_nce scores dot products of embeddings, so it takes "
                     f"sentence_transformers.util.cos_sim (default) or util.dot_score (or 'cosine' / 'dot'), "
                     f"got {name!r}")


class InfoNCELoss(nn.Module):
    """InfoNCE through ``mk.info_nce``, with ``MultipleNegativesRankingLoss``'s constructor and inputs.

    Args:
        model: the SentenceTransformer being trained.
        scale: 1 / temperature (sentence-transformers' convention; default 20.0, i.e. temperature 0.05).
        similarity_fct: ``util.cos_sim`` (default: embeddings are L2-normalised first) or ``util.dot_score``.
        temperature: instead of ``scale`` (give one of the two).
        symmetric: also the document -> query direction, the two averaged (``info_nce(symmetric=True)``).
        hard_negative_scope: "batch" (default; every query scores every document, as MNRL does) or "own"
            (each query scores the positives and only its own negatives, as MoCa's code does).
        gather_across_devices: under torch.distributed, score each rank's queries against the documents of
            every rank (``info_nce(group=WORLD)``; gradients return to the owning rank). No-op in one process.
        learnable_temperature: learn the temperature (stored as ``log_temperature``, a parameter of this loss,
            which SentenceTransformerTrainer optimises with the model; the temperature is kept >= 1e-3).
        impl: ``info_nce``'s backend ("triton", "torch" or None: automatic).

    ``forward(sentence_features, labels)``: one feature dict per column (anchor, positive, negative_1, ...);
    embeddings [B, D] each; returns the float32 scalar loss (float64 for a float64 model).
    """

    def __init__(self, model: nn.Module, scale: Optional[float] = None,
                 similarity_fct: Union[Callable[[Tensor, Tensor], Tensor], str, None] = None, *,
                 temperature: Optional[float] = None, symmetric: bool = False, hard_negative_scope: str = "batch",
                 gather_across_devices: bool = False, learnable_temperature: bool = False,
                 impl: Optional[str] = None) -> None:
        super().__init__()
        if scale is not None and temperature is not None:
            raise ValueError(f"give scale (= 1 / temperature) or temperature, not both (scale={scale}, "
                             f"temperature={temperature})")
        if temperature is None:
            scale = 20.0 if scale is None else scale
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0 \
                    or not math.isfinite(scale):
                raise ValueError(f"scale must be a finite number > 0 (1 / temperature), got {scale!r}")
            temperature = 1.0 / float(scale)
        elif isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0 \
                or not math.isfinite(temperature):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        if hard_negative_scope not in SCOPES:
            raise ValueError(f"hard_negative_scope must be one of {SCOPES}, got {hard_negative_scope!r}")
        for name, value in (("symmetric", symmetric), ("gather_across_devices", gather_across_devices),
                            ("learnable_temperature", learnable_temperature)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        self.model = model
        self.similarity = _similarity_kind(similarity_fct)
        self.similarity_fct = _st_util.cos_sim if self.similarity == "cosine" else _st_util.dot_score
        self.symmetric = symmetric
        self.hard_negative_scope = hard_negative_scope
        self.gather_across_devices = gather_across_devices
        self.impl = impl
        self._temperature = float(temperature)
        self.log_temperature = (nn.Parameter(torch.tensor(math.log(temperature))) if learnable_temperature
                                else None)

    # -- sentence-transformers' attributes -------------------------------------------------------------------

    @property
    def temperature(self) -> float:
        """The temperature now (a float; the learnt value when learnable)."""
        t = self.current_temperature()
        return float(t.detach()) if torch.is_tensor(t) else t

    @property
    def scale(self) -> float:
        """1 / temperature, as sentence-transformers reports it."""
        return 1.0 / self.temperature

    def current_temperature(self) -> Union[float, Tensor]:
        """A float, or a one-element float32 tensor with a gradient when learnable."""
        if self.log_temperature is None:
            return self._temperature
        return self.log_temperature.float().clamp(min=math.log(1e-3)).exp()

    def get_config_dict(self) -> Dict[str, Any]:
        return {"scale": self.scale, "similarity_fct": _st_util.similarity_fct_name(self.similarity_fct)
                if hasattr(_st_util, "similarity_fct_name") else self.similarity,
                "symmetric": self.symmetric, "hard_negative_scope": self.hard_negative_scope,
                "gather_across_devices": self.gather_across_devices,
                "learnable_temperature": self.log_temperature is not None}

    @property
    def citation(self) -> str:
        return """
@misc{oord2019representationlearningcontrastivepredictive,
      title={Representation Learning with Contrastive Predictive Coding},
      author={Aaron van den Oord and Yazhe Li and Oriol Vinyals},
      year={2019},
      eprint={1807.03748},
      archivePrefix={arXiv},
      primaryClass={cs.LG},
}
"""

    # -- the loss ------------------------------------------------------------------------------------------

    def forward(self, sentence_features: Iterable[Dict[str, Tensor]], labels: Optional[Tensor] = None) -> Tensor:
        features = list(sentence_features)
        _check_columns(features)
        return self.compute_loss_from_embeddings(_embed_columns(self.model, features), labels)

    def compute_loss_from_embeddings(self, embeddings: List[Tensor], labels: Optional[Tensor] = None) -> Tensor:
        """The loss of embeddings [B, D] per column: anchors, positives, then each negative column."""
        if len(embeddings) < 2:
            raise ValueError(f"InfoNCELoss needs at least 2 columns (anchor, positive), got {len(embeddings)}")
        B = embeddings[0].shape[0]
        for i, e in enumerate(embeddings):
            if e.dim() != 2 or e.shape[0] != B:
                raise ValueError(f"InfoNCELoss: column {i} has embeddings of shape {tuple(e.shape)}, expected "
                                 f"[{B}, D] like the anchors")
        dtype = embeddings[0].dtype
        for e in embeddings[1:]:
            dtype = torch.promote_types(dtype, e.dtype)
        if dtype not in (torch.float32, torch.float64):
            dtype = torch.float32   # info_nce accumulates in float32 anyway; mixed AMP outputs meet here
        embeddings = [e.to(dtype) for e in embeddings]
        if self.similarity == "cosine":
            embeddings = [F.normalize(e, p=2, dim=1) for e in embeddings]
        query, docs = embeddings[0], embeddings[1:]
        group = None
        if self.gather_across_devices:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                group = dist.group.WORLD
        return info_nce(query, torch.cat(docs), self.current_temperature(), impl=self.impl,
                        hard_negatives=len(docs) - 1, hard_negative_scope=self.hard_negative_scope,
                        hard_negative_layout="columns", symmetric=self.symmetric, group=group)


class CachedInfoNCELoss(InfoNCELoss):
    """:class:`InfoNCELoss` through gradient caching (``mk.GradCache``): drop-in for
    ``CachedMultipleNegativesRankingLoss``.

    Every column is embedded in chunks of ``mini_batch_size`` rows without grad, the loss is computed on the
    whole batch, and the returned loss's backward re-embeds each chunk (same RNG state, so the same dropout)
    and back-propagates the embedding gradients scaled by whatever multiplied the loss (the trainer's
    gradient-accumulation divisor, an AMP GradScaler): the gradients equal :class:`InfoNCELoss`'s on the
    same batch, with the activation memory of one chunk. Under ``torch.no_grad()`` (evaluation) only the
    first pass runs.

    Args: those of :class:`InfoNCELoss`, plus ``mini_batch_size`` (rows per chunk, default 32, as
    sentence-transformers), the third positional argument as there.
    """

    def __init__(self, model: nn.Module, scale: Optional[float] = None,
                 similarity_fct: Union[Callable[[Tensor, Tensor], Tensor], str, None] = None,
                 mini_batch_size: int = 32, *, temperature: Optional[float] = None, symmetric: bool = False,
                 hard_negative_scope: str = "batch", gather_across_devices: bool = False,
                 learnable_temperature: bool = False, impl: Optional[str] = None) -> None:
        super().__init__(model, scale, similarity_fct, temperature=temperature, symmetric=symmetric,
                         hard_negative_scope=hard_negative_scope, gather_across_devices=gather_across_devices,
                         learnable_temperature=learnable_temperature, impl=impl)
        if isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int) or mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be an int >= 1, got {mini_batch_size!r}")
        self.mini_batch_size = mini_batch_size

    def get_config_dict(self) -> Dict[str, Any]:
        return {**super().get_config_dict(), "mini_batch_size": self.mini_batch_size}

    def forward(self, sentence_features: Iterable[Dict[str, Tensor]], labels: Optional[Tensor] = None) -> Tensor:
        features = list(sentence_features)
        _check_columns(features)
        model = self.model
        from torch.nn.parallel import DistributedDataParallel as DDP

        def encode(chunk):
            return model(chunk)["sentence_embedding"]

        def loss_fn(*embeddings):
            return self.compute_loss_from_embeddings(list(embeddings), labels)

        cache = GradCache(encode, loss_fn, chunk_sizes=self.mini_batch_size, split_fn=_split_features,
                          sync_modules=[model] if isinstance(model, DDP) else ())
        # a dict chunk would be passed as encoder(**chunk): wrap each column so the encoder gets the dict
        return cache.loss(*[_Features(f) for f in features])


class _Features:
    """One column's feature dict, passed whole to the encoder (GradCache unpacks dicts into keywords)."""

    def __init__(self, features: Dict[str, Any]):
        self.features = features


def _split_features(column: _Features, size: int) -> list:
    """Chunks of ``size`` rows of one column, sliced as sentence-transformers' cached losses slice them
    (flattened and VLM inputs included) where it offers that, else every tensor along dim 0."""
    features = column.features
    try:
        from sentence_transformers.base.losses.gradcache import _create_minibatch, _minibatch_ranges
    except ImportError:   # older sentence-transformers: padded text batches, rows along dim 0
        return [(chunk,) for chunk in split_batch(dict(features), size)]
    return [(_create_minibatch(features, begin, end),) for begin, end in _minibatch_ranges(features, size)]


def _check_columns(features: list) -> None:
    if len(features) < 2:
        raise ValueError(f"InfoNCELoss needs at least 2 input columns (anchor, positive[, negative_1, ...]), "
                         f"got {len(features)}")


def _embed_columns(model, features: list) -> List[Tensor]:
    """Embeddings of every column, the way MultipleNegativesRankingLoss computes them (one merged forward
    where sentence-transformers does that), so both draw the same dropout masks."""
    try:
        from sentence_transformers.base.losses.merged_forward import embed_columns
    except ImportError:
        return [model(f)["sentence_embedding"] for f in features]
    return embed_columns(model, features)


__all__ = ["InfoNCELoss", "CachedInfoNCELoss"]
