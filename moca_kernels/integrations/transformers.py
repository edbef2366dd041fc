"""moca_kernels inside Hugging Face transformers: the ``"moca"`` attention implementation and ``apply_moca_kernels``.

Importing this module registers ``"moca"`` in transformers' two registries (``import moca`` imports it too):

* ``AttentionInterface["moca"]`` = :func:`moca_attention_forward`, the attention function every layer calls;
* ``AttentionMaskInterface["moca"]`` = :func:`moca_mask_interface`, the hook ``create_causal_mask`` /
  ``create_bidirectional_mask`` call. It builds no [B, 1, S, S] tensor: it returns a :class:`MocaMask` that
  records whether the model asked for a causal or a bidirectional mask, the 2-D padding mask, and the packed
  documents transformers detected from restarting ``position_ids``. Anything else (sliding windows, mask
  overlays, a KV cache with offsets) raises instead of being dropped.

So after ``import moca_kernels.integrations.transformers``, ``AutoModel.from_pretrained(..., attn_implementation=
"moca")`` works for the supported models, and :func:`apply_moca_kernels` converts a model instance in one call
(optionally with the causal-LM loss through ``masked_token_loss``, ``lm_loss=True``).

Packed batches (several documents in one row, each attending only to itself) are accepted in every convention
transformers uses, in this order of precedence:

1. ``moca_docs=AttentionMask`` passed to the model's forward (one row, B = 1);
2. ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (int32 [n_docs + 1] cumulative lengths, equal) with ``max_length_q`` /
   ``max_length_k``, as flash-attention-2 users pass them (B = 1; the max lengths are not needed);
3. ``position_ids`` that restart per document (what ``DataCollatorWithFlattening`` produces; for Qwen2-VL the
   text row of 4-row position ids), when the batch has no padding: a new document starts wherever a position is
   not the previous one plus 1, and at every row start (transformers' own rule).

A padded batch (2-D ``attention_mask`` with zeros) runs as one packed sequence of its rows, padding removed; the
outputs at padding positions are 0.

Attention dropout: in training with dropout > 0 (BERT's default ``attention_probs_dropout_prob=0.1``), the layer
runs a dense PyTorch path (transformers' eager computation with the document mask materialised per row, O(S^2)
memory like eager) so dropout is applied exactly as eager applies it; it warns once. Set the dropout to 0
(``config.attention_probs_dropout_prob = 0`` for BERT, ``config.attention_dropout = 0`` for Qwen) or call
``model.eval()`` to run the fused kernels.
"""

from __future__ import annotations

import sys
import warnings
from typing import List, Optional

import torch
from torch import nn

import moca_kernels as mk
from moca_kernels.attention import pack, unpack

from ._hf_masks import (MocaMask, _docs_from_cu_seqlens, _docs_from_position_ids, _docs_from_sequence_ids,
                        moca_mask_interface)

ATTN_NAME = "moca"

__all__ = ["ATTN_NAME", "MocaMask", "moca_mask_interface", "moca_attention_forward", "register",
           "apply_moca_kernels", "use_moca_attention"]


# --------------------------------------------------------------------------------------------------------
# The attention function
# --------------------------------------------------------------------------------------------------------


def _causality(module: nn.Module, attention_mask, kwargs) -> bool:
    if isinstance(attention_mask, MocaMask):
        return attention_mask.causal
    if isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"moca attention: {type(module).__name__} received a dense {attention_mask.dim()}-D mask "
                        "tensor; under 'moca' masks come from the moca mask hook: pass the model a 2-D padding "
                        "attention_mask (or none), never a 4-D mask")
    if attention_mask is not None:
        raise TypeError(f"moca attention: {type(module).__name__} received an unexpected mask object "
                        f"{type(attention_mask).__name__}")
    # no mask: an encoder-style module (vision towers call attention per image / window with is_causal=False)
    causal = kwargs.get("is_causal", getattr(module, "is_causal", None))
    if causal is None or bool(causal):
        raise TypeError(
            f"moca attention: {type(module).__name__} is causal but received no mask. Under 'moca' a causal "
            "layer gets its mask from the moca mask hook, which transformers calls from the model's forward; "
            "register it first (import moca_kernels.integrations.transformers, or apply_moca_kernels(model)) and "
            "call the model, not the attention module")
    return False


def _documents(module: nn.Module, attention_mask, B: int, S: int, device, kwargs) -> mk.AttentionMask:
    """The AttentionMask over the B * S tokens (or, for a padded batch, over the real tokens, with
    ``padding_index``), from whichever convention the caller used (see the module docstring)."""
    causal = _causality(module, attention_mask, kwargs)
    moca_mask = attention_mask if isinstance(attention_mask, MocaMask) else None
    padded = moca_mask is not None and moca_mask.has_padding()

    docs = kwargs.get("moca_docs")
    if docs is not None:
        if not isinstance(docs, mk.AttentionMask):
            raise TypeError(f"moca attention: moca_docs must be an AttentionMask, got {type(docs).__name__}")
        if B != 1 or padded:
            raise ValueError("moca attention: moca_docs describes one packed row without padding; got batch "
                             f"{B} {'with' if padded else 'without'} padding")
        if docs.causal != causal:
            raise ValueError(f"moca attention: moca_docs is {'causal' if docs.causal else 'bidirectional'} but "
                             f"{type(module).__name__} asked for a {'causal' if causal else 'bidirectional'} mask")
        if docs.total_len != S:
            raise ValueError(f"moca attention: moca_docs covers {docs.total_len} tokens, the row has {S}")
        return docs.to(device)

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None or cu_k is not None:
        if cu_q is None or cu_k is None:
            raise ValueError("moca attention: give both cu_seq_lens_q and cu_seq_lens_k (equal: self-attention)")
        if cu_k is not cu_q and (cu_k.shape != cu_q.shape or not torch.equal(cu_k.to(cu_q.device), cu_q)):
            raise NotImplementedError("moca attention: cu_seq_lens_k differs from cu_seq_lens_q; moca attention "
                                      "is self-attention within each document (equal query and key lengths)")
        if B != 1 or padded:
            raise ValueError(f"moca attention: cu_seq_lens_q/k describe one packed row without padding; got batch "
                             f"{B} {'with' if padded else 'without'} padding")
        docs = _docs_from_cu_seqlens(cu_q, causal, device)
        if docs.total_len != S:
            raise ValueError(f"moca attention: cu_seq_lens_q covers {docs.total_len} tokens, the row has {S}")
        return docs

    if padded:
        return moca_mask.packed(device)
    if moca_mask is not None and moca_mask.sequence_ids is not None:
        ids = moca_mask.sequence_ids
        if tuple(ids.shape) == (1, S) and B > 1:
            ids = ids.expand(B, S)
        if tuple(ids.shape) != (B, S):
            raise ValueError(f"moca attention: packed sequence ids {tuple(ids.shape)} do not match the batch "
                             f"[{B}, {S}]")
        return _docs_from_sequence_ids(ids, causal, device)
    pos = kwargs.get("position_ids")
    if isinstance(pos, torch.Tensor) and pos.dim() == 2 and pos.shape[-1] == S and pos.shape[0] in (1, B) \
            and not pos.is_floating_point():
        docs = _docs_from_position_ids(pos, B, S, causal, device)
        if docs is not None:
            return docs
    if moca_mask is not None:
        return moca_mask.packed(device)
    return _cached_rows(B, S, causal, device)


_ROWS: dict = {}


def _cached_rows(B: int, S: int, causal: bool, device) -> mk.AttentionMask:
    """B documents of S tokens (vision towers' per-image calls), kept for reuse (one per shape)."""
    key = (B, S, causal, str(device))
    if key not in _ROWS:
        if len(_ROWS) > 64:
            _ROWS.clear()
        _ROWS[key] = mk.AttentionMask.from_seqlens([S] * B, causal=causal, device=device)
    return _ROWS[key]


def _precomputed(cu: torch.Tensor, masks: dict) -> Optional[mk.AttentionMask]:
    for m in masks.values():
        if m.cu_seqlens is cu or (m.cu_seqlens.shape == cu.shape and m.cu_seqlens.device == cu.device
                                  and m.cu_seqlens.data_ptr() == cu.data_ptr()):
            return m
    return None


_DROPOUT_WARNED = False


def moca_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask, scaling: Optional[float] = None, dropout: float = 0.0, **kwargs):
    """Attention function registered in ``transformers.AttentionInterface`` under ``"moca"``.

    Args:
        module: the calling attention module (its ``training`` flag decides whether ``dropout`` applies).
        query: [B, Hq, S, D]; key, value: [B, Hkv, S, D] (transformers' layout), Hq % Hkv == 0.
        attention_mask: a :class:`MocaMask` from the mask hook, or None (encoder-style modules such as vision
            towers, bidirectional).
        scaling: softmax scale (default D ** -0.5).
        dropout: attention-probability dropout (transformers passes 0 in eval mode); > 0 runs the dense path.
        kwargs: the packing conventions of the module docstring (``moca_docs``, ``cu_seq_lens_q/k``,
            ``max_length_q/k``, ``position_ids``); ``sliding_window`` must be None.

    Returns:
        (out [B, S, Hq, D] in the attention dtype, None).
    """
    if kwargs.get("sliding_window") is not None:
        raise NotImplementedError(f"moca attention: {type(module).__name__} is a sliding-window layer "
                                  f"(sliding_window={kwargs['sliding_window']}); moca attends to whole documents")
    B, Hq, S, D = query.shape
    if key.shape[2] != S:
        raise NotImplementedError(f"moca attention: keys of length {key.shape[2]} for {S} queries (a KV cache); "
                                  "call the model with use_cache=False")
    if _is_vision_attention(module):
        # a vision tower's own per-image / per-window call (not patched by apply_moca_kernels): each row is one
        # image or window; the language model's packing keywords, which transformers forwards here too, do not
        # describe it
        if attention_mask is not None:
            raise TypeError(f"moca attention: {type(module).__name__} received a mask; vision attention is "
                            "bidirectional within each image or window")
        docs = _cached_rows(B, S, False, query.device)
    else:
        docs = _documents(module, attention_mask, B, S, query.device, kwargs)
    return _attend(module, query, key, value, docs, scaling, dropout), None


def _attend(module: nn.Module, query, key, value, docs: mk.AttentionMask, scaling, dropout) -> torch.Tensor:
    """query [B, Hq, S, D], key/value [B, Hkv, S, D] under ``docs`` (over the B * S tokens, or the real tokens of a
    padded batch) -> [B, S, Hq, D]."""
    B, Hq, S, D = query.shape
    dt = _attention_dtype(query, key, value)
    if not (query.dtype == key.dtype == value.dtype == dt):
        query, key, value = query.to(dt), key.to(dt), value.to(dt)
    if dropout and module.training:
        global _DROPOUT_WARNED
        if not _DROPOUT_WARNED:
            _DROPOUT_WARNED = True
            warnings.warn(f"moca attention: attention dropout {dropout} in training runs a dense PyTorch path "
                          "(not the fused kernels); set the model's attention dropout to 0 (BERT: "
                          "config.attention_probs_dropout_prob = 0) to use the kernels", stacklevel=2)
        return _dense_attention(query, key, value, docs, scaling, float(dropout))
    if docs.padding_index is None:
        q = query.transpose(1, 2).reshape(B * S, Hq, D)
        k = key.transpose(1, 2).reshape(B * S, key.shape[1], D)
        v = value.transpose(1, 2).reshape(B * S, value.shape[1], D)
        return mk.masked_attention(q, k, v, docs, scale=scaling).view(B, S, Hq, D)
    # padded batch: drop the padding, attend over the packed rows, put the rows back (padding outputs are 0)
    qp, kp, vp = (pack(t.transpose(1, 2), docs) for t in (query, key, value))
    return unpack(mk.masked_attention(qp, kp, vp, docs, scale=scaling), docs)


def _dense_attention(query, key, value, docs: mk.AttentionMask, scaling, dropout: float) -> torch.Tensor:
    """transformers' eager attention with ``docs`` as a dense per-row mask and dropout on the probabilities
    (same shapes, so the same random numbers as eager for the same seed). query [B, Hq, S, D], key/value
    [B, Hkv, S, D] -> [B, S, Hq, D]; padding rows give 0."""
    B, Hq, S, D = query.shape
    dev = query.device
    doc = torch.full((B * S,), -1, dtype=torch.long, device=dev)
    blocks = torch.full((B * S,), -1, dtype=torch.long, device=dev)
    ids = docs.document_ids().to(dev, torch.long)
    index = docs.padding_index if docs.padding_index is not None else torch.arange(B * S, device=dev)
    doc[index] = ids
    if docs.block_ids is not None:
        blocks[index] = docs.block_ids.to(dev, torch.long)
    doc, blocks = doc.view(B, S), blocks.view(B, S)
    allowed = (doc[:, :, None] == doc[:, None, :]) & (doc[:, :, None] >= 0)
    if docs.causal:
        pos = torch.arange(S, device=dev)
        within = pos[None, :] <= pos[:, None]
        within = within | ((blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0))
        allowed = allowed & within
    pad_row = doc < 0
    allowed = allowed | (torch.eye(S, dtype=torch.bool, device=dev) & pad_row[:, :, None])
    group = Hq // key.shape[1]
    k = key.repeat_interleave(group, dim=1) if group > 1 else key
    v = value.repeat_interleave(group, dim=1) if group > 1 else value
    scale = D ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, k.transpose(2, 3)) * scale
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=True)
    out = torch.matmul(probs, v).transpose(1, 2)                         # [B, S, Hq, D]
    return out.masked_fill(pad_row[:, :, None, None], 0.0)


def _attention_dtype(*ts: torch.Tensor) -> torch.dtype:
    """The dtype attention runs in: the autocast dtype under autocast (transformers' rotary embedding returns
    float32 q/k next to a bf16 v there), else the promoted dtype of q, k, v."""
    dev = ts[0].device.type
    if torch.is_autocast_enabled(dev) and ts[0].is_floating_point():
        get = getattr(torch, "get_autocast_dtype", None)
        return get(dev) if get is not None else torch.get_autocast_gpu_dtype()
    dt = ts[0].dtype
    for t in ts[1:]:
        dt = torch.promote_types(dt, t.dtype)
    return dt


# --------------------------------------------------------------------------------------------------------
# The vision tower: one masked_attention call per block
# --------------------------------------------------------------------------------------------------------


def _vision_attention_forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor, position_embeddings=None,
                              **kwargs):
    """Forward of Qwen2-VL / Qwen2.5-VL vision attention under ``"moca"``: qkv, 2-D rotary, one packed call.

    hidden_states [N, C] (N patch rows of all images), cu_seqlens int32 [n_docs + 1] (images or windows).
    Other attention implementations run the original forward unchanged.
    """
    if self.config._attn_implementation != ATTN_NAME:
        kwargs.pop("moca_vision_masks", None)
        return super(type(self), self).forward(hidden_states, cu_seqlens, position_embeddings=position_embeddings,
                                               **kwargs)
    apply_rotary = self._moca_apply_rotary
    N = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(N, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    if position_embeddings is None:
        raise ValueError("moca vision attention: position_embeddings (cos, sin) are required")
    cos, sin = position_embeddings
    q, k = apply_rotary(q, k, cos, sin)                       # [N, H, Dh] each
    pre = kwargs.get("moca_vision_masks")
    docs = _precomputed(cu_seqlens, pre) if pre else None
    if docs is None:
        docs = _docs_from_cu_seqlens(cu_seqlens, False, q.device, name="cu_seqlens")
    if docs.total_len != N:
        raise ValueError(f"moca vision attention: cu_seqlens covers {docs.total_len} rows, hidden_states has {N}")
    out = _attend(self, q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], docs,
                  self.scaling, 0.0)
    return self.proj(out.reshape(N, -1))


_VISION_SUBCLASSES: dict = {}


def _is_vision_attention(m: nn.Module) -> bool:
    return type(m).__name__.endswith("VisionAttention") and hasattr(m, "qkv") and hasattr(m, "proj")


def _vision_rotary(cls):
    return getattr(sys.modules[cls.__module__], "apply_rotary_pos_emb_vision", None)


def _patch_vision_attention(module: nn.Module) -> None:
    """Give one vision attention module the packed forward (a thin subclass; other implementations unchanged)."""
    cls = type(module)
    if getattr(cls, "_moca_packed", False):
        return
    if cls not in _VISION_SUBCLASSES:
        rotary = _vision_rotary(cls)
        if rotary is None:
            raise RuntimeError(f"moca attention: {cls.__module__} has no apply_rotary_pos_emb_vision; "
                               "this transformers version's vision tower is not supported")
        _VISION_SUBCLASSES[cls] = type(f"Moca{cls.__name__}", (cls,), {
            "forward": _vision_attention_forward, "_moca_packed": True,
            "_moca_apply_rotary": staticmethod(rotary)})
    module.__class__ = _VISION_SUBCLASSES[cls]


# --------------------------------------------------------------------------------------------------------
# The LM-head loss through masked_token_loss (no [N, V] logits), as Liger patches it
# --------------------------------------------------------------------------------------------------------


def _fused_lm_forward(self, *args, labels: Optional[torch.Tensor] = None, shift_labels: Optional[torch.Tensor] = None,
                      num_items_in_batch=None, ignore_index: int = -100, **kwargs):
    """Forward of a ``...ForCausalLM`` / ``...ForConditionalGeneration`` after ``apply_moca_kernels(lm_loss=True)``.

    Without ``labels`` / ``shift_labels`` it is the model's own forward (logits). With them it runs the base model
    (``self.model``) and returns ``loss`` = transformers' causal-LM loss (labels shifted by one, ``ignore_index``
    rows skipped, mean over counted rows, or sum / ``num_items_in_batch`` when the Trainer passes it) computed by
    ``moca_kernels.masked_token_loss`` from the final hidden states [B, S, H] and ``lm_head.weight`` [V, H];
    ``logits`` is None. labels / shift_labels: int [B, S].
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    if labels is None and shift_labels is None:
        if num_items_in_batch is not None:
            kwargs["num_items_in_batch"] = num_items_in_batch
        return type(self).forward(self, *args, **kwargs)
    kwargs.pop("logits_to_keep", None)
    out = self.model(*args, **kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    if shift_labels is None:
        if labels.shape != hidden.shape[:-1]:
            raise ValueError(f"labels must be [B, S] = {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}")
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    elif shift_labels.shape != hidden.shape[:-1]:
        raise ValueError(f"shift_labels must be [B, S] = {tuple(hidden.shape[:-1])}, got {tuple(shift_labels.shape)}")
    H = hidden.shape[-1]
    head = self.get_output_embeddings()
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = mk.masked_token_loss(hidden.reshape(-1, H), head.weight, shift_labels.reshape(-1).to(hidden.device),
                                bias=getattr(head, "bias", None), ignore_index=ignore_index, reduction=reduction)
    if num_items_in_batch is not None:
        n = num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
        loss = loss / n
    return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=getattr(out, "hidden_states", None),
                                  attentions=getattr(out, "attentions", None))


def _lm_loss_problem(model: nn.Module) -> Optional[str]:
    name = type(model).__name__
    if getattr(model.config, "model_type", None) in _ENCODERS:
        return f"lm_loss=True: {name} is an encoder (no causal LM head)"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor) or not isinstance(
            getattr(model, "model", None), nn.Module):
        return f"lm_loss=True: {name} has no LM head (use a ...ForCausalLM / ...ForConditionalGeneration model)"
    if getattr(model.config, "final_logit_softcapping", None) or getattr(
            getattr(model.config, "text_config", None), "final_logit_softcapping", None):
        return f"lm_loss=True: {name} caps its logits (final_logit_softcapping), which masked_token_loss does not"
    return None


# --------------------------------------------------------------------------------------------------------
# Registration and conversion
# --------------------------------------------------------------------------------------------------------


def register() -> None:
    """Register ``"moca"`` in transformers' attention and mask registries (idempotent; done on import)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, moca_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, moca_mask_interface)


def _configs(model: nn.Module) -> list:
    cfg = model.config
    out = [cfg]
    for name in ("text_config", "vision_config"):
        sub = getattr(cfg, name, None)
        if sub is not None:
            out.append(sub)
    for m in model.modules():  # sub-models may hold their own config objects
        c = getattr(m, "config", None)
        if c is not None and all(c is not o for o in out):
            out.append(c)
    return out


_TEXT_DECODERS = ("qwen2", "qwen3", "qwen2_vl_text", "qwen2_5_vl_text")
_VLMS = ("qwen2_vl", "qwen2_5_vl")
_ENCODERS = ("bert",)


def _text_configs(model: nn.Module) -> list:
    """The configs ``create_causal_mask`` reads ``is_causal`` from (language-model configs)."""
    out = []
    text = getattr(model.config, "text_config", None)
    if text is not None:
        out.append(text)
    elif getattr(model.config, "model_type", None) in _TEXT_DECODERS:
        out.append(model.config)
    for m in model.modules():
        c = getattr(m, "config", None)
        if c is not None and getattr(c, "model_type", None) in _TEXT_DECODERS and all(c is not o for o in out):
            out.append(c)
    return out


def _sliding(cfg) -> Optional[str]:
    kinds = getattr(cfg, "layer_types", None) or []
    if any(k != "full_attention" for k in kinds):
        return f"config.layer_types has {sorted(set(k for k in kinds if k != 'full_attention'))}"
    if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
        return f"config.use_sliding_window=True (sliding_window={cfg.sliding_window})"
    return None


def _problems(model: nn.Module, causal: Optional[bool]) -> List[str]:
    """Everything that keeps ``model`` from running under "moca" (empty: supported)."""
    name = type(model).__name__
    cfg = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or cfg is None:
        return [f"{name} is not a transformers model (no .config)"]
    kind = getattr(cfg, "model_type", None)
    supported = _TEXT_DECODERS + _VLMS + _ENCODERS
    if kind not in supported:
        return [f"{name} has model_type {kind!r}; supported: Qwen2 / Qwen2.5 (qwen2), Qwen3 (qwen3), Qwen2-VL "
                "(qwen2_vl), Qwen2.5-VL (qwen2_5_vl) and BERT-family encoders (bert, e.g. MiniLM)"]
    out = []
    if causal is not None and not isinstance(causal, bool):
        out.append(f"causal must be None, True or False, got {causal!r}")
    if kind in _ENCODERS:
        if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
            out.append(f"{name}: config.is_decoder / add_cross_attention is set; moca supports BERT encoders "
                       "(bidirectional self-attention), not BERT decoders or cross-attention")
        pe = getattr(cfg, "position_embedding_type", "absolute")
        if pe not in (None, "absolute"):
            out.append(f"{name}: config.position_embedding_type={pe!r} adds relative-position scores that moca's "
                       "attention cannot take; only 'absolute' is supported")
        if causal:
            out.append(f"{name} is a bidirectional encoder; causal=True is not supported (leave causal=None)")
    else:
        for c in _text_configs(model):
            why = _sliding(c)
            if why:
                out.append(f"{name}: {type(c).__name__} {why}; moca attends to whole documents (no sliding window)")
    for m_name, m in model.named_modules():
        if _is_vision_attention(m) and not getattr(type(m), "_moca_packed", False) and _vision_rotary(type(m)) is None:
            out.append(f"{m_name} ({type(m).__name__}): {type(m).__module__} has no apply_rotary_pos_emb_vision "
                       "(this transformers version's vision tower is not supported)")
            break
    return out


def apply_moca_kernels(model: nn.Module, causal: Optional[bool] = None, lm_loss: bool = False) -> nn.Module:
    """Run a transformers model's attention through ``moca_kernels.masked_attention``, in place, in one call.

    Supported: Qwen2-VL and Qwen2.5-VL (``...ForConditionalGeneration`` / ``...Model``: language model and
    vision tower, the tower as one packed call per block over all images/windows), Qwen2 / Qwen2.5 / Qwen3 text
    models (``...Model``, ``...ForCausalLM`` and other heads) and BERT-family encoders (``BertModel`` and heads;
    MiniLM is a BERT).

    Args:
        model: the transformers model instance.
        causal: None keeps the model's own attention direction (decoders causal, encoders bidirectional);
            False makes a decoder's language model bidirectional within each document (MoCa embeddings);
            True makes it causal. Stored as the text config's ``is_causal``, which transformers'
            ``create_causal_mask`` reads (``eager`` / ``sdpa`` follow the same flag).
        lm_loss: also compute the causal-LM loss through ``moca_kernels.masked_token_loss`` when the forward gets
            ``labels`` (``...ForCausalLM`` / ``...ForConditionalGeneration``; the [B, S, V] logits are never built
            and the output's ``logits`` is None). Same value and gradients as transformers' loss, including the
            Trainer's ``num_items_in_batch``. Without labels the forward is unchanged.

    Returns:
        ``model`` (converted in place).

    Everything is checked before anything changes: an unsupported model or setting (other model types, sliding
    windows, BERT decoders / cross-attention / relative positions, causal=True on an encoder) raises
    ``ValueError`` naming the module or config and why, and leaves the model as it was.
    """
    problems = _problems(model, causal)
    if lm_loss and not problems:
        why = _lm_loss_problem(model)
        if why:
            problems.append(why)
    if problems:
        raise ValueError("apply_moca_kernels: cannot convert " + type(model).__name__ + ":\n  - "
                         + "\n  - ".join(problems))
    register()
    for c in _configs(model):
        c._attn_implementation = ATTN_NAME
    if causal is not None:
        for c in _text_configs(model):
            c.is_causal = bool(causal)
    for m in model.modules():
        if _is_vision_attention(m):
            _patch_vision_attention(m)
    if lm_loss:
        import types

        model.forward = types.MethodType(_fused_lm_forward, model)
    return model


def use_moca_attention(vlm: nn.Module, causal: bool = False, implementation: str = ATTN_NAME) -> nn.Module:
    """Switch a Qwen2-VL / Qwen2.5-VL model (``...ForConditionalGeneration`` or ``...Model``) to an attention
    implementation, in place (moca's training code; :func:`apply_moca_kernels` converts any supported model).

    Args:
        vlm: the transformers model.
        causal: False (MoCa) = the language model attends bidirectionally within each sample; True keeps the
            original causal attention (ablations). The vision tower is bidirectional per image either way.
        implementation: ``"moca"`` (our kernels), or ``"eager"`` / ``"sdpa"`` for references.

    The flag is stored as the text config's ``is_causal``, which transformers' ``create_causal_mask`` reads to
    build a causal or a bidirectional mask. Checks first: a model without a vision-language text model raises
    TypeError and is left unchanged.
    """
    text_models = [m for m in vlm.modules() if type(m).__name__.endswith("TextModel")]
    if not text_models:
        raise TypeError(f"use_moca_attention: {type(vlm).__name__} has no vision-language model (a *TextModel "
                        "module); nothing was changed. For Qwen2 / Qwen3 text models and BERT encoders use "
                        "moca_kernels.integrations.transformers.apply_moca_kernels(model)")
    vision = [m for m in vlm.modules() if _is_vision_attention(m)]
    if implementation == ATTN_NAME and vision and _vision_rotary(type(vision[0])) is None \
            and not getattr(type(vision[0]), "_moca_packed", False):
        raise RuntimeError(f"use_moca_attention: {type(vision[0]).__module__} has no apply_rotary_pos_emb_vision; "
                           "this transformers version's vision tower is not supported (nothing was changed)")
    register()
    for c in _configs(vlm):
        c._attn_implementation = implementation
    for m in text_models:
        m.config.is_causal = bool(causal)  # the config create_causal_mask reads
    text_cfg = getattr(vlm.config, "text_config", None)
    if text_cfg is not None:
        text_cfg.is_causal = bool(causal)
    for m in vision:
        _patch_vision_attention(m)
    return vlm


register()
