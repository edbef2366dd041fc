"""Route a transformers Qwen2-VL / Qwen2.5-VL model's attention through ``moca_kernels.masked_attention``.

transformers looks attention up by name in two registries: ``AttentionInterface`` (the attention function
every layer calls) and ``AttentionMaskInterface`` (the function ``create_causal_mask`` /
``create_bidirectional_mask`` call to build the mask handed to that attention function). We register both
under the name ``"moca"``:

* the **mask hook** (:func:`moca_mask_interface`) builds no dense mask. It reads which mask transformers asked
  for (causal or bidirectional, from the text config's ``is_causal``) and the 2-D padding mask, and returns a
  :class:`MocaMask` that the attention function understands. Any other request (sliding window, custom
  overlays, packed-sequence detection from position ids) raises instead of being silently dropped;
* the **attention function** (:func:`moca_attention_forward`) turns the [B, H, S, D] tensors of the language
  model into the packed [T, H, D] layout of ``masked_attention``: a padded batch becomes one packed sequence of
  its rows (padding removed), a packed row uses the documents given as ``moca_docs`` (an ``AttentionMask``);
* the **vision tower** attends bidirectionally within each image (full-attention blocks) or window
  (Qwen2.5-VL's windowed blocks). transformers' non-flash vision path calls attention once per image/window
  after a host sync; :func:`use_moca_attention` gives each vision attention module a forward that makes the
  whole tower one ``masked_attention`` call per block, with images/windows as the documents.

Whether the language model attends causally is decided in one place, :func:`use_moca_attention` (``causal``
flag, kept in the text config as ``is_causal``), and every layer checks that the mask it receives agrees.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

import moca_kernels as mk
from moca_kernels.attention import pack, unpack

ATTN_NAME = "moca"


# --------------------------------------------------------------------------------------------------------
# The mask transformers hands to every language-model layer
# --------------------------------------------------------------------------------------------------------


class MocaMask:
    """What the mask hook returns: causality and padding, plus the packed layout built once per forward.

    Attributes:
        causal: bool, whether the model asked for a causal mask (False = bidirectional, MoCa).
        padding: bool [B, S] (True = real token) or None (no padding).
        batch_size, seq_len: ints.
    """

    def __init__(self, causal: bool, padding: Optional[torch.Tensor], batch_size: int, seq_len: int):
        self.causal = bool(causal)
        self.padding = padding
        self.batch_size = int(batch_size)
        self.seq_len = int(seq_len)
        self._packed = None

    def packed(self, device: torch.device) -> mk.AttentionMask:
        """The AttentionMask with one document per row, built once (host syncs: whether any padding exists, then
        the row lengths of a padded batch in ``AttentionMask.from_padding_mask``) and reused by every layer, so
        per-mask metadata the kernels cache is built once per forward. Without padding its ``padding_index`` is
        None (no gather needed)."""
        if self._packed is None:
            B, S = self.batch_size, self.seq_len
            if self.padding is None or bool(self.padding.all()):
                self._packed = mk.AttentionMask.from_seqlens([S] * B, causal=self.causal, device=device)
            else:
                self._packed = mk.AttentionMask.from_padding_mask(self.padding.to(device), causal=self.causal)
        return self._packed

    def __repr__(self) -> str:
        return (f"MocaMask(causal={self.causal}, batch={self.batch_size}, seq={self.seq_len}, "
                f"padding={'yes' if self.padding is not None else 'no'})")


def _mask_kind(mask_function) -> Optional[bool]:
    """True for transformers' plain causal mask function, False for the bidirectional one, None otherwise."""
    from transformers import masking_utils as mu

    if mask_function is mu.causal_mask_function:
        return True
    if mask_function is getattr(mu, "bidirectional_mask_function", None):
        return False
    return None


def moca_mask_interface(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                        mask_function=None, attention_mask: Optional[torch.Tensor] = None, **kwargs) -> MocaMask:
    """Mask hook registered in ``transformers.masking_utils.AttentionMaskInterface`` under ``"moca"``.

    Called by ``create_causal_mask`` / ``create_bidirectional_mask`` once per forward. Returns a
    :class:`MocaMask` (no [B, 1, S, S] tensor is ever built). Raises for anything it cannot express.
    """
    kind = _mask_kind(mask_function)
    if kind is None:
        name = getattr(mask_function, "__name__", type(mask_function).__name__)
        raise NotImplementedError(
            f"moca attention: transformers asked for a mask built from {name!r}, which moca cannot express "
            "(only plain causal or bidirectional masks over documents). Packed batches must be given as "
            "moca_docs=AttentionMask with 3-row position ids, not detected from position ids; sliding windows "
            "and mask overlays are not supported.")
    if q_offset != 0 or kv_offset != 0 or q_length != kv_length:
        raise NotImplementedError(f"moca attention: no KV cache support (q_length={q_length}, kv_length={kv_length}, "
                                  f"offsets {q_offset}/{kv_offset}); call the model without a cache")
    padding = None
    if attention_mask is not None:
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch_size, kv_length):
            raise ValueError(f"moca attention: expected a 2-D padding mask [{batch_size}, {kv_length}], "
                             f"got {tuple(attention_mask.shape)}")
        padding = attention_mask.to(torch.bool)
    return MocaMask(kind, padding, batch_size, q_length)


# --------------------------------------------------------------------------------------------------------
# The attention function
# --------------------------------------------------------------------------------------------------------


def moca_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask, scaling: Optional[float] = None, dropout: float = 0.0, **kwargs):
    """Attention function registered in ``transformers.AttentionInterface`` under ``"moca"``.

    Args:
        query: [B, Hq, S, D]; key, value: [B, Hkv, S, D] (transformers' layout).
        attention_mask: a :class:`MocaMask` from the mask hook (language model), or None with
            ``cu_seq_lens_q`` (vision tower: int32 [n_docs + 1] cumulative lengths, B = 1).
        kwargs: ``moca_docs`` (an ``AttentionMask`` over the packed row, B = 1) for packed batches;
            ``moca_vision_masks`` (dict of precomputed vision ``AttentionMask``s keyed by their cu_seqlens).

    Returns:
        (out [B, S, Hq, D], None).
    """
    if dropout:
        raise NotImplementedError(f"moca attention: attention dropout ({dropout}) is not supported")
    if kwargs.get("sliding_window") is not None:
        raise NotImplementedError("moca attention: sliding-window layers are not supported")
    B, Hq, S, D = query.shape
    dt = _attention_dtype(query, key, value)
    if not (query.dtype == key.dtype == value.dtype == dt):
        query, key, value = query.to(dt), key.to(dt), value.to(dt)
    q = query.transpose(1, 2).reshape(B * S, Hq, D)
    k = key.transpose(1, 2).reshape(B * S, key.shape[1], D)
    v = value.transpose(1, 2).reshape(B * S, value.shape[1], D)

    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:  # vision tower: documents are images or windows
        if attention_mask is not None or B != 1:
            raise ValueError("moca attention: cu_seq_lens_q is only for one packed row without another mask")
        docs = _vision_mask(cu, kwargs.get("moca_vision_masks"), q.device)
        out = mk.masked_attention(q, k, v, docs, scale=scaling)
        return out.view(B, S, Hq, D), None

    if isinstance(attention_mask, torch.Tensor) or attention_mask is None:
        what = "no mask" if attention_mask is None else f"a dense {attention_mask.dim()}-D mask"
        raise TypeError(f"moca attention: {type(module).__name__} received {what}; the language model must get its "
                        "mask from the moca mask hook (pass a 2-D padding mask or None, never a 4-D mask)")
    if not isinstance(attention_mask, MocaMask):
        raise TypeError(f"moca attention: unexpected mask object {type(attention_mask).__name__}")

    docs = kwargs.get("moca_docs")
    if docs is not None:  # packed row: one document per sample
        if B != 1 or attention_mask.padding is not None:
            raise ValueError("moca attention: moca_docs describes one packed row; got batch "
                             f"{B} {'with' if attention_mask.padding is not None else 'without'} padding")
        if docs.causal != attention_mask.causal:
            raise ValueError(f"moca attention: the packed documents are {'causal' if docs.causal else 'bidirectional'} "
                             f"but the model asked for a {'causal' if attention_mask.causal else 'bidirectional'} mask")
        if docs.total_len != S:
            raise ValueError(f"moca attention: moca_docs covers {docs.total_len} tokens, the row has {S}")
        out = mk.masked_attention(q, k, v, docs.to(q.device), scale=scaling)
        return out.view(B, S, Hq, D), None

    docs = attention_mask.packed(q.device)
    if getattr(docs, "padding_index", None) is None:
        out = mk.masked_attention(q, k, v, docs, scale=scaling)
        return out.view(B, S, Hq, D), None
    # padded batch: drop the padding, attend over the packed rows, put the rows back (padding outputs are 0)
    qp, kp, vp = (pack(t.transpose(1, 2), docs) for t in (query, key, value))
    out = unpack(mk.masked_attention(qp, kp, vp, docs, scale=scaling), docs)
    return out, None


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


def _vision_mask(cu: torch.Tensor, precomputed: Optional[dict], device) -> mk.AttentionMask:
    if precomputed:
        for m in precomputed.values():
            if m.cu_seqlens is cu or (m.cu_seqlens.shape == cu.shape and m.cu_seqlens.device == cu.device
                                      and m.cu_seqlens.data_ptr() == cu.data_ptr()):
                return m
    lens = (cu[1:] - cu[:-1]).tolist()  # one host sync; avoided when the collator precomputes the masks
    return mk.AttentionMask.from_seqlens(lens, causal=False, device=device)


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
    kwargs.pop("max_seqlen", None)
    out, _ = moca_attention_forward(self, q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                    None, scaling=self.scaling, cu_seq_lens_q=cu_seqlens,
                                    moca_vision_masks=kwargs.get("moca_vision_masks"))
    return self.proj(out.reshape(N, -1))


_VISION_SUBCLASSES: dict = {}


def _patch_vision_attention(module: nn.Module) -> None:
    """Give one vision attention module the packed forward (a thin subclass; other implementations unchanged)."""
    cls = type(module)
    if getattr(cls, "_moca_packed", False):
        return
    if cls not in _VISION_SUBCLASSES:
        import sys

        rotary = getattr(sys.modules[cls.__module__], "apply_rotary_pos_emb_vision", None)
        if rotary is None:
            raise RuntimeError(f"moca attention: {cls.__module__} has no apply_rotary_pos_emb_vision; "
                               "this transformers version's vision tower is not supported")
        _VISION_SUBCLASSES[cls] = type(f"Moca{cls.__name__}", (cls,), {
            "forward": _vision_attention_forward, "_moca_packed": True,
            "_moca_apply_rotary": staticmethod(rotary)})
    module.__class__ = _VISION_SUBCLASSES[cls]


def register() -> None:
    """Register ``"moca"`` in transformers' attention and mask registries (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, moca_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, moca_mask_interface)


def _configs(vlm: nn.Module):
    cfg = vlm.config
    out = [cfg]
    for name in ("text_config", "vision_config"):
        sub = getattr(cfg, name, None)
        if sub is not None:
            out.append(sub)
    for m in vlm.modules():  # sub-models may hold their own config objects
        c = getattr(m, "config", None)
        if c is not None and all(c is not o for o in out):
            out.append(c)
    return out


def use_moca_attention(vlm: nn.Module, causal: bool = False, implementation: str = ATTN_NAME) -> nn.Module:
    """Switch a Qwen2-VL / Qwen2.5-VL model (``...ForConditionalGeneration`` or ``...Model``) to an attention
    implementation, in place.

    Args:
        vlm: the transformers model.
        causal: False (MoCa) = the language model attends bidirectionally within each sample; True keeps the
            original causal attention (ablations). The vision tower is bidirectional per image either way.
        implementation: ``"moca"`` (our kernels), or ``"eager"`` / ``"sdpa"`` for references.

    The flag is stored as the text config's ``is_causal``, which transformers' ``create_causal_mask`` reads to
    build a causal or a bidirectional mask; with ``"moca"`` the mask hook hands that choice to every layer.
    """
    register()
    for c in _configs(vlm):
        c._attn_implementation = implementation
    text_models = [m for m in vlm.modules() if type(m).__name__.endswith("TextModel")]
    if not text_models:
        raise TypeError(f"use_moca_attention: {type(vlm).__name__} has no language model (a *TextModel module)")
    for m in text_models:
        m.config.is_causal = bool(causal)  # the config create_causal_mask reads
    text_cfg = getattr(vlm.config, "text_config", None)
    if text_cfg is not None:
        text_cfg.is_causal = bool(causal)
    for m in vlm.modules():
        if type(m).__name__.endswith("VisionAttention") and hasattr(m, "qkv") and hasattr(m, "proj"):
            _patch_vision_attention(m)
    return vlm
