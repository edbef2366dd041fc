"""The MoCa model: a transformers Qwen2-VL / Qwen2.5-VL run bidirectionally through moca_kernels.

:class:`MocaBackbone` wraps the transformers model (``Qwen2_5_VLForConditionalGeneration`` or
``Qwen2VLForConditionalGeneration``) and turns a collated :class:`~moca.data.batch.Batch` (packed or padded)
into final hidden states. It is shared by both stages: Stage 1 (:class:`moca.stage1.CptModel`) adds the MLM
loss through the LM head and the MAE decoder; Stage 2 (:class:`moca.stage2.ContrastiveModel`) pools the hidden
states into embeddings.

Loading never touches the network: ``from_pretrained(path)`` reads a local checkpoint directory,
``tiny(...)`` builds the small default model (random init) used by tests and the demo.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

import moca_kernels as mk

from .attention import ATTN_NAME, moca_mask_interface, use_moca_attention

PIXEL_ROW = 1176          # 3 channels x 2 frames x 14 x 14 values per patch row
MOCA_CONFIG = "moca_config.json"


def tiny_vlm_config(vocab_size: int, special: dict, kind: str = "qwen2_5_vl", hidden: int = 64, layers: int = 4,
                    heads: int = 4, kv_heads: int = 2, vision_hidden: int = 32, vision_depth: int = 2):
    """Config of the tiny default model (random init), Qwen2.5-VL (or Qwen2-VL) architecture.

    Text: ``hidden`` wide, ``layers`` layers, GQA ``heads``/``kv_heads``; vision: ``vision_hidden`` wide,
    ``vision_depth`` blocks (Qwen2.5-VL: windowed blocks plus a full-attention last block, windows of 2x2
    merged tokens), patch 14, temporal patch 2, 2x2 merge. ``special`` maps Qwen's token names to ids
    (image_pad, video_pad, vision_start, vision_end, endoftext).
    """
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    head_dim = hidden // heads
    half = head_dim // 2
    section = [half - 2 * (half // 3), half // 3, half // 3]      # temporal, height, width; sums to head_dim / 2
    text = dict(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab_size,
                max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
                rope_scaling={"type": "mrope", "mrope_section": section}, rope_theta=10000.0,
                bos_token_id=None, eos_token_id=special["endoftext"], pad_token_id=special["endoftext"])
    ids = dict(image_token_id=special["image_pad"], video_token_id=special["video_pad"],
               vision_start_token_id=special["vision_start"], vision_end_token_id=special["vision_end"])
    if kind == "qwen2_5_vl":
        vision = dict(hidden_size=vision_hidden, intermediate_size=vision_hidden * 2, depth=vision_depth,
                      num_heads=max(vision_hidden // 16, 1), out_hidden_size=hidden, patch_size=14,
                      temporal_patch_size=2, spatial_merge_size=2, window_size=56,
                      fullatt_block_indexes=[vision_depth - 1], in_channels=3)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    if kind == "qwen2_vl":
        vision = dict(embed_dim=vision_hidden, hidden_size=hidden, depth=vision_depth, mlp_ratio=2,
                      num_heads=max(vision_hidden // 16, 1), patch_size=14, temporal_patch_size=2,
                      spatial_merge_size=2, in_channels=3)
        return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    raise ValueError(f"tiny_vlm_config: kind must be 'qwen2_5_vl' or 'qwen2_vl', got {kind!r}")


def _vlm_class(model_type: str):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    classes = {"qwen2_5_vl": Qwen2_5_VLForConditionalGeneration, "qwen2_vl": Qwen2VLForConditionalGeneration}
    if model_type not in classes:
        raise ValueError(f"moca supports Qwen2-VL and Qwen2.5-VL checkpoints (model_type qwen2_vl / qwen2_5_vl), "
                         f"got model_type {model_type!r}")
    return classes[model_type]


def fsdp_sharded(module: nn.Module) -> bool:
    """Whether FSDP2 (``fully_shard``) sharded ``module`` or one of its sub-modules."""
    if not torch.distributed.is_available():
        return False
    import torch.distributed.fsdp as fsdp

    cls = getattr(fsdp, "FSDPModule", None)
    return cls is not None and any(isinstance(m, cls) for m in module.modules())


class MocaBackbone(nn.Module):
    """A Qwen2-VL / Qwen2.5-VL model whose attention runs through ``moca_kernels.masked_attention``.

    Attributes:
        vlm: the transformers ``...ForConditionalGeneration`` model (``vlm.model.visual``,
            ``vlm.model.language_model``, ``vlm.lm_head``).
        causal: False = bidirectional language model (MoCa); True = the original causal attention.
        image_token_id: id of ``<|image_pad|>``.
        pixel_mask_token: learned pixel row [1176] used by the ``mask_token`` image corruption (or None).
        drop_embedding: learned LM-input vector [H] for image tokens dropped by the ``drop`` corruption (or None).
    """

    def __init__(self, vlm: nn.Module, causal: bool = False, image_corruption: Optional[str] = None):
        super().__init__()
        if image_corruption not in (None, "noise", "mask_token", "drop"):
            raise ValueError(f"MocaBackbone: image_corruption must be noise, mask_token, drop or None, "
                             f"got {image_corruption!r}")
        self.vlm = vlm
        self.causal = bool(causal)
        self.image_token_id = int(vlm.config.image_token_id)
        use_moca_attention(vlm, causal=self.causal)
        H = self.hidden_size
        self.pixel_mask_token = nn.Parameter(torch.zeros(PIXEL_ROW)) if image_corruption == "mask_token" else None
        self.drop_embedding = nn.Parameter(torch.zeros(H)) if image_corruption == "drop" else None
        if self.pixel_mask_token is not None:
            nn.init.normal_(self.pixel_mask_token, std=0.02)
        if self.drop_embedding is not None:
            nn.init.normal_(self.drop_embedding, std=0.02)

    # -- construction -----------------------------------------------------------------------------------

    @classmethod
    def tiny(cls, vocab_size: int, special: dict, causal: bool = False, image_corruption: Optional[str] = None,
             seed: int = 0, kind: str = "qwen2_5_vl", **sizes) -> "MocaBackbone":
        """The tiny default model, randomly initialised from ``seed`` (see :func:`tiny_vlm_config`)."""
        cfg = tiny_vlm_config(vocab_size, special, kind=kind, **sizes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vlm = _vlm_class(cfg.model_type)._from_config(cfg, attn_implementation="eager")
        return cls(vlm, causal=causal, image_corruption=image_corruption)

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], causal: Optional[bool] = None,
                        image_corruption: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> "MocaBackbone":
        """Load a local checkpoint directory (a transformers Qwen2-VL / Qwen2.5-VL save, or a moca save).

        ``causal=None`` takes the flag saved by moca (bidirectional when the directory is a plain checkpoint).
        """
        from transformers import AutoConfig

        path = Path(path)
        if (path / "INCOMPLETE").exists():   # an export cut short (moca.train.core.Trainer._export)
            raise ValueError(f"{path} is an incomplete export ({path / 'INCOMPLETE'}: "
                             f"{(path / 'INCOMPLETE').read_text(errors='replace').strip()[:300]})")
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path}: no config.json (expected a local transformers checkpoint directory)")
        meta = json.loads((path / MOCA_CONFIG).read_text()) if (path / MOCA_CONFIG).exists() else {}
        cfg = AutoConfig.from_pretrained(path, local_files_only=True)
        kwargs = {"local_files_only": True, "attn_implementation": "eager"}
        if dtype is not None:
            kwargs["dtype"] = dtype
        vlm = _vlm_class(cfg.model_type).from_pretrained(path, **kwargs)
        causal = meta.get("causal", False) if causal is None else causal
        image_corruption = image_corruption or meta.get("image_corruption")
        model = cls(vlm, causal=causal, image_corruption=image_corruption)
        extra = path / "moca_extra.safetensors"
        if extra.exists():
            from safetensors.torch import load_file

            state = load_file(str(extra))
            for name in ("pixel_mask_token", "drop_embedding"):
                if name in state and getattr(model, name) is not None:
                    getattr(model, name).data.copy_(state[name])
        return model

    def save_pretrained(self, path: Union[str, os.PathLike], extra_meta: Optional[dict] = None) -> None:
        """Save the transformers model (config + safetensors), moca's flags and its extra parameters."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        impl = self.vlm.config._attn_implementation
        use_moca_attention(self.vlm, causal=self.causal, implementation="eager")  # save a loadable config
        try:
            self.vlm.save_pretrained(path, safe_serialization=True)
        finally:
            use_moca_attention(self.vlm, causal=self.causal, implementation=impl)
        extra = {n: p.detach().cpu().contiguous() for n, p in (("pixel_mask_token", self.pixel_mask_token),
                                                                ("drop_embedding", self.drop_embedding)) if p is not None}
        if extra:
            save_file(extra, str(path / "moca_extra.safetensors"))
        meta = {"causal": self.causal, "image_corruption": "mask_token" if self.pixel_mask_token is not None else
                ("drop" if self.drop_embedding is not None else None), **(extra_meta or {})}
        (path / MOCA_CONFIG).write_text(json.dumps(meta, indent=2))

    # -- properties -------------------------------------------------------------------------------------

    @property
    def language_model(self) -> nn.Module:
        return self.vlm.model.language_model

    @property
    def visual(self) -> nn.Module:
        return self.vlm.model.visual

    @property
    def hidden_size(self) -> int:
        return int(self.vlm.config.text_config.hidden_size)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """[V, H] weight of the LM head (tied to the input embedding when the checkpoint ties them)."""
        return self.vlm.lm_head.weight

    def set_attention(self, implementation: str = ATTN_NAME, causal: Optional[bool] = None) -> None:
        """Switch attention implementation (``"moca"``, or ``"eager"`` / ``"sdpa"`` as references)."""
        if causal is not None:
            self.causal = bool(causal)
        use_moca_attention(self.vlm, causal=self.causal, implementation=implementation)

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each decoder layer / vision block in backward (non-reentrant checkpointing)."""
        kw = {"use_reentrant": False}
        if hasattr(self.vlm, "activation_checkpointing_enable"):      # transformers >= 5.2x
            self.vlm.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            self.vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)

    # -- forward ----------------------------------------------------------------------------------------

    def documents(self, batch, causal: Optional[bool] = None) -> Optional[mk.AttentionMask]:
        """The packed row's AttentionMask (one document per sample), or None for a padded batch."""
        if batch.seqlens is None:
            return None
        causal = self.causal if causal is None else causal
        return mk.AttentionMask.from_seqlens(batch.seqlens, causal=causal, device=batch.input_ids.device)

    def image_features(self, batch) -> Optional[torch.Tensor]:
        """Vision tower output [n_visible_image_tokens, H] in the order of ``batch.image_positions``."""
        if batch.pixel_values is None:
            return None
        px = batch.pixel_values.to(self.visual.dtype if hasattr(self.visual, "dtype") else batch.pixel_values.dtype)
        if batch.pixel_mask_rows is not None:
            if self.pixel_mask_token is None:
                raise ValueError("the batch marks pixel rows for a learned mask token, but the model was built "
                                 "without one (image_corruption='mask_token')")
            px = torch.where(batch.pixel_mask_rows[:, None], self.pixel_mask_token.to(px.dtype), px)
        kwargs = {}
        if batch.vision is not None:
            kwargs.update(batch.vision_kwargs())
        out = self.visual(px, grid_thw=batch.image_grid_thw, **kwargs)
        return out.pooler_output if hasattr(out, "pooler_output") else out

    def idle_term(self, like: torch.Tensor, tower: bool = True) -> torch.Tensor:
        """0 * (the learned corruption vectors + with ``tower`` the vision tower on one blank merged token): a
        zero scalar of ``like``'s dtype that uses those parameters. Under FSDP2 every rank must run every sharded
        module and give every parameter a gradient in every step (gathers and reductions are collectives all
        ranks join), also when its micro-batch has no image; :meth:`input_embeddings` adds it then."""
        term = like.new_zeros((), dtype=torch.float32)
        if tower:
            m = int(self.vlm.config.vision_config.spatial_merge_size)
            dtype = self.visual.dtype if hasattr(self.visual, "dtype") else like.dtype
            px = torch.zeros(m * m, PIXEL_ROW, device=like.device, dtype=dtype)
            out = self.visual(px, grid_thw=torch.tensor([[1, m, m]], device=like.device))
            term = term + (out.pooler_output if hasattr(out, "pooler_output") else out).float().sum()
        for p in (self.pixel_mask_token, self.drop_embedding):
            if p is not None:
                term = term + p.float().sum()
        return (term * 0).to(like.dtype)

    def input_embeddings(self, batch) -> torch.Tensor:
        """Token embeddings [B, S, H] with the vision tower's outputs written at the image tokens."""
        embeds = self.language_model.embed_tokens(batch.input_ids)
        B, S, H = embeds.shape
        feats = self.image_features(batch)
        if fsdp_sharded(self.visual):   # FSDP2: this rank may have no image, or no masked one, in its micro-batch
            embeds = embeds + self.idle_term(embeds, tower=feats is None)
        if feats is None and batch.drop_positions is None:
            return embeds
        flat = embeds.reshape(B * S, H)
        if feats is not None:
            if feats.shape[0] != batch.image_positions.numel():
                raise ValueError(f"the vision tower gave {feats.shape[0]} image tokens but the batch has "
                                 f"{batch.image_positions.numel()} image positions")
            flat = flat.index_copy(0, batch.image_positions, feats.to(flat.dtype))
        if batch.drop_positions is not None and batch.drop_positions.numel():
            if self.drop_embedding is None:
                raise ValueError("the batch drops image tokens, but the model was built without a drop embedding "
                                 "(image_corruption='drop')")
            n = batch.drop_positions.numel()
            flat = flat.index_copy(0, batch.drop_positions, self.drop_embedding.to(flat.dtype).expand(n, H))
        return flat.view(B, S, H)

    def forward(self, batch, docs: Optional[mk.AttentionMask] = None):
        """Final hidden states [B, S, H] (after the final norm) of a collated batch.

        ``docs``: the packed row's AttentionMask when the caller already built it (it must match the model's
        causal flag); default :meth:`documents`. Reusing one mask lets kernels reuse its cached metadata.
        """
        embeds = self.input_embeddings(batch)
        docs = docs if docs is not None else self.documents(batch)
        kwargs = {"moca_docs": docs} if docs is not None else {}
        out = self.language_model(inputs_embeds=embeds, position_ids=batch.position_ids,
                                  attention_mask=batch.attention_mask, use_cache=False, **kwargs)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        """(cos, sin) of the language model's mRoPE for ``position_ids`` [3, B, S]."""
        return self.language_model.rotary_emb(hidden, position_ids)


class MaeDecoder(nn.Module):
    """MoCa's MAE decoder: one bidirectional decoder layer of the LM's shape (initialised from its middle
    layer) and ``Linear(hidden -> 4 * 1176)`` applied only at the masked image tokens, as the official code
    (its decoder layer's output goes straight to the projection). ``norm=True`` adds an RMSNorm (a copy of the
    LM's final norm) before the projection (``loss.mae_head_norm``; this project's earlier head).
    """

    def __init__(self, backbone: MocaBackbone, out_dim: int = 4 * PIXEL_ROW, norm: bool = False):
        super().__init__()
        layers = backbone.language_model.layers
        self.source_layer = len(layers) // 2
        self.layer = copy.deepcopy(layers[self.source_layer])
        for m in self.layer.modules():   # share the LM's config, so switching attention switches the decoder too
            if getattr(m, "config", None) is not None:
                m.config = backbone.language_model.config
        self.norm = copy.deepcopy(backbone.language_model.norm) if norm else None
        self.head = nn.Linear(backbone.hidden_size, out_dim)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, hidden: torch.Tensor, position_embeddings, positions: torch.Tensor,
                padding: Optional[torch.Tensor] = None, docs: Optional[mk.AttentionMask] = None) -> torch.Tensor:
        """Predict pixel rows at ``positions``.

        Args:
            hidden: [B, S, H] final hidden states of the language model.
            position_embeddings: (cos, sin) of the LM's mRoPE for the batch.
            positions: long [M], flat indices into B * S of the masked image tokens.
            padding: bool [B, S] padding mask (padded batches) or None.
            docs: bidirectional AttentionMask of the packed row (packed batches) or None.

        Returns:
            [M, 4 * 1176] predictions (hidden's dtype).
        """
        from transformers import masking_utils as mu

        B, S, H = hidden.shape
        mask = moca_mask_interface(B, S, S, mask_function=mu.bidirectional_mask_function, attention_mask=padding)
        kwargs = {"moca_docs": docs} if docs is not None else {}
        out = self.layer(hidden, attention_mask=mask, position_ids=None, position_embeddings=position_embeddings,
                         use_cache=False, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        picked = out.reshape(B * S, H).index_select(0, positions)
        if self.norm is not None:
            picked = self.norm(picked)
        return self.head(picked)
