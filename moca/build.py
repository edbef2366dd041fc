"""Model building, one place for both stages and evaluation.

* :class:`ModelConfig` (config section ``model`` of Stage 1; Stage 2's ``ClModelConfig`` extends it) and
  :func:`build_model_and_processor`: a :class:`~moca.modeling.MocaBackbone` and its
  :class:`~moca.data.processor.MocaProcessor` from a local checkpoint or the tiny default;
* :class:`EvalModelConfig` (``moca eval``'s ``model`` section) and :func:`load_embedder`: a
  :class:`~moca.embedding.MocaEmbedder` for evaluation;
* :data:`LOAD_DTYPES` / :func:`load_dtype`: the one table of ``model.dtype`` names every config takes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from .data.processor import MocaProcessor
from .modeling import MocaBackbone

log = logging.getLogger("moca.train")

LOAD_DTYPES = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    """``model.dtype`` as a torch dtype (None = as saved); one clear error for anything else."""
    if name not in LOAD_DTYPES:
        raise ValueError(f"model.dtype must be float32, bfloat16 or float16, got {name!r} (null = as saved)")
    return LOAD_DTYPES[name]


@dataclass
class ModelConfig:
    """``path``: a local Qwen2-VL / Qwen2.5-VL checkpoint (or a moca save); None = the tiny default."""

    path: Optional[str] = None
    causal: bool = False
    dtype: Optional[str] = None                  # load dtype of a checkpoint (float32 | bfloat16); None = as saved
    tiny_kind: str = "qwen2_5_vl"
    tiny_hidden: int = 64
    tiny_layers: int = 4
    tiny_heads: int = 4
    tiny_kv_heads: int = 2
    tiny_vision_hidden: int = 32
    tiny_vision_depth: int = 2
    tiny_seed: int = 0
    tiny_image_size: int = 112                  # images are resized to about this many pixels squared
    min_pixels: Optional[int] = None             # override the image pixel bounds (official: 256 .. 1024 merged
    max_pixels: Optional[int] = None             # tokens = 256*28*28 .. 1024*28*28 pixels)

    def __post_init__(self):
        load_dtype(self.dtype)


def build_model_and_processor(mc: ModelConfig, corruption: Optional[str]):
    """(MocaBackbone, MocaProcessor) from the model config; ``corruption``: the backbone's image corruption
    (``masking.image_corruption`` in Stage 1, None in Stage 2)."""
    bb, proc = _build(mc, corruption)
    if mc.min_pixels is not None:
        proc.image_spec.min_pixels = int(mc.min_pixels)
    if mc.max_pixels is not None:
        proc.image_spec.max_pixels = int(mc.max_pixels)
    return bb, proc


def _build(mc: ModelConfig, corruption: Optional[str]):
    if mc.path is None:
        proc = MocaProcessor.tiny(image_size=mc.tiny_image_size)
        bb = MocaBackbone.tiny(proc.vocab_size, proc.ids, causal=mc.causal, image_corruption=corruption,
                               seed=mc.tiny_seed, kind=mc.tiny_kind, hidden=mc.tiny_hidden, layers=mc.tiny_layers,
                               heads=mc.tiny_heads, kv_heads=mc.tiny_kv_heads, vision_hidden=mc.tiny_vision_hidden,
                               vision_depth=mc.tiny_vision_depth)
        return bb, proc
    dtype = load_dtype(mc.dtype)
    proc = MocaProcessor.from_pretrained(mc.path)
    bb = MocaBackbone.from_pretrained(mc.path, causal=mc.causal, image_corruption=corruption, dtype=dtype)
    emb = bb.language_model.embed_tokens.weight.shape[0]
    if proc.ids["mask"] >= emb:
        bb.vlm.resize_token_embeddings(proc.vocab_size)
        log.info("resized the embeddings to %d rows for <|mask|>", proc.vocab_size)
    return bb, proc


@dataclass
class EvalModelConfig:
    """``moca eval``'s ``model`` section. ``path``: a local checkpoint directory (moca save or plain Qwen2-VL /
    Qwen2.5-VL); None = the tiny default model, untrained (a baseline). ``pooling`` / ``causal`` / ``append_eos``
    None = as saved. ``dtype``: float32, bfloat16 or float16 (None = as saved; :data:`LOAD_DTYPES`);
    ``device``: cpu, cuda or cuda:N (None = cuda when available)."""

    path: Optional[str] = None
    pooling: Optional[str] = None
    causal: Optional[bool] = None
    append_eos: Optional[bool] = None    # end inputs with <|endoftext|> (None = as saved; no for the tiny default)
    dtype: Optional[str] = None
    device: Optional[str] = None
    tiny_seed: int = 0


def load_embedder(mc: EvalModelConfig):
    """The embedder named by the model config (the untrained tiny default when ``path`` is None)."""
    from .embedding import MocaEmbedder, resolve_device

    dtype = load_dtype(mc.dtype)
    device = resolve_device(mc.device or ("cuda" if torch.cuda.is_available() else "cpu"), "model.device")
    if mc.path is None:
        model = MocaEmbedder.tiny(seed=mc.tiny_seed, causal=bool(mc.causal), pooling=mc.pooling,
                                  append_eos=bool(mc.append_eos))
        model = model.to(dtype) if dtype is not None else model
    else:
        model = MocaEmbedder.from_pretrained(mc.path, pooling=mc.pooling, causal=mc.causal, dtype=dtype,
                                             append_eos=mc.append_eos)
    return model.to(device)


__all__ = ["LOAD_DTYPES", "load_dtype", "ModelConfig", "build_model_and_processor", "EvalModelConfig",
           "load_embedder"]
