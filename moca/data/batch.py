"""Collated batches: packed rows (one document per sample) or padded rows, with Qwen's 3-D mRoPE positions.

A :class:`Sample` is one processed record: token ids with ``<|image_pad|>`` placeholders (one per merged
image token) and the patch rows of its images. :func:`collate` turns samples into a :class:`Batch`:

* ``packed=True``: one row [1, T], T = sum of sample lengths, ``seqlens`` = the sample lengths; every
  sample's mRoPE positions restart at 0 (so packing changes nothing a sample sees);
* ``packed=False``: rows [B, S] right-padded to the longest sample, with a bool ``attention_mask``.

Everything the model needs that would otherwise cost a host sync on the GPU (flat indices of image tokens,
masked positions, the vision tower's rotary positions and window layout) is computed here, on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

IGNORE = -100


@dataclass
class Sample:
    """One processed record.

    Attributes:
        input_ids: long [L].
        pixel_values: float32 [Np, 1176] patch rows of all images (Qwen's patch order) or None.
        image_grid_thw: long [n_images, 3] patch grid (t, h, w) per image, or None.
        record_id: the record's name (for messages).
        mlm_labels: long [L], the original token at masked positions and -100 elsewhere (after masking).
        unit_masked: bool [n_units] per merged image token of all images (after masking), or None.
    """

    input_ids: torch.Tensor
    pixel_values: Optional[torch.Tensor] = None
    image_grid_thw: Optional[torch.Tensor] = None
    record_id: str = ""
    mlm_labels: Optional[torch.Tensor] = None
    unit_masked: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return int(self.input_ids.numel())


@dataclass
class VisionLayout:
    """Precomputed inputs of the vision tower (transformers pops them from its kwargs instead of computing them).

    Attributes:
        position_ids: long [Np, 2] rotary (h, w) coordinates of the patch rows fed to the tower.
        seqlens: per-image patch-row counts (host ints), the documents of full-attention blocks.
        window_index: long [Np / 4] merged-unit order of windowed blocks (Qwen2.5-VL) or None.
        window_seqlens: per-window patch-row counts (host ints) or None.
    """

    position_ids: torch.Tensor
    seqlens: List[int]
    window_index: Optional[torch.Tensor] = None
    window_seqlens: Optional[List[int]] = None


@dataclass
class Batch:
    """A collated batch (see the module docstring). Flat indices index the [B * S] grid of tokens.

    Attributes:
        input_ids: long [B, S] (B = 1 when packed).
        position_ids: long [3, B, S] mRoPE positions (t, h, w).
        attention_mask: bool [B, S] (padded) or None (packed).
        seqlens: tuple of sample lengths (packed) or None.
        sample_index: long [B * S], the sample each token belongs to (-1 at padding).
        pixel_values: float [Np, 1176] rows fed to the vision tower (corrupted for Stage 1), or None (no image,
            or ``drop`` removed every unit; ``vision`` is then None too and the tower does not run).
        image_grid_thw: long [n_images, 3] or None.
        vision: VisionLayout or None (None lets transformers compute it).
        image_positions: long [n_visible], flat positions receiving the vision tower's outputs, in order.
        drop_positions: long [n_dropped] flat positions of dropped image tokens (``drop`` corruption) or None.
        pixel_mask_rows: bool [Np] rows to replace by the learned mask token (``mask_token``) or None.
        mlm_positions: long [N] flat positions of masked text tokens; mlm_labels: long [N] their tokens.
        mae_positions: long [M] flat positions of masked image tokens; mae_target: float [M, 4 * 1176].
        num_tokens: real tokens in the batch (host int); record_ids: names of the samples.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: Optional[torch.Tensor] = None
    seqlens: Optional[tuple] = None
    sample_index: Optional[torch.Tensor] = None
    pixel_values: Optional[torch.Tensor] = None
    image_grid_thw: Optional[torch.Tensor] = None
    vision: Optional[VisionLayout] = None
    image_positions: Optional[torch.Tensor] = None
    drop_positions: Optional[torch.Tensor] = None
    pixel_mask_rows: Optional[torch.Tensor] = None
    mlm_positions: Optional[torch.Tensor] = None
    mlm_labels: Optional[torch.Tensor] = None
    mae_positions: Optional[torch.Tensor] = None
    mae_target: Optional[torch.Tensor] = None
    num_tokens: int = 0
    record_ids: List[str] = field(default_factory=list)

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """Tensors moved to ``device`` (the vision layout too); host data unchanged."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device, non_blocking=non_blocking)
            elif isinstance(v, VisionLayout):
                v = VisionLayout(v.position_ids.to(device, non_blocking=non_blocking), v.seqlens,
                                 None if v.window_index is None else v.window_index.to(device, non_blocking=non_blocking),
                                 v.window_seqlens)
            out[f.name] = v
        return Batch(**out)

    def vision_kwargs(self) -> dict:
        """Keyword arguments for transformers' vision tower: precomputed rotary positions, documents and windows,
        plus the matching ``AttentionMask``s for moca's attention (same cu_seqlens tensors)."""
        import moca_kernels as mk

        v = self.vision
        dev = v.position_ids.device
        full = mk.AttentionMask.from_seqlens(v.seqlens, device=dev)
        kw = {"position_ids": v.position_ids, "cu_seqlens": full.cu_seqlens, "moca_vision_masks": {"full": full}}
        if v.window_index is not None:
            win = mk.AttentionMask.from_seqlens(v.window_seqlens, device=dev)
            kw.update(window_index=v.window_index, cu_window_seqlens=win.cu_seqlens)
            kw["moca_vision_masks"]["window"] = win
        return kw


# ------------------------------------------------------------------------------------------------------------
# mRoPE positions
# ------------------------------------------------------------------------------------------------------------


def mrope_positions(input_ids: torch.Tensor, seqlens: Sequence[int], image_grid_thw: Optional[torch.Tensor],
                    image_token_id: int, spatial_merge_size: int = 2) -> torch.Tensor:
    """Qwen2-VL's 3-D rotary positions of a packed row, restarting at 0 for every sample.

    Text tokens get (p, p, p) with p counting up; the tokens of an image whose merged grid is gh x gw, starting
    at p, get (p, p + row, p + col); the text after it continues at p + max(gh, gw). Computed for all samples
    at once with tensor ops (no loop over samples or tokens).

    Args:
        input_ids: long [T], the packed row.
        seqlens: the sample lengths (sum T).
        image_grid_thw: long [n_images, 3] patch grids of the images in row order, or None.
        image_token_id: id of ``<|image_pad|>``.
        spatial_merge_size: 2 for Qwen2-VL / Qwen2.5-VL.

    Returns:
        long [3, T] positions (t, h, w).
    """
    T = input_ids.numel()
    dev = input_ids.device
    is_img = input_ids == image_token_id
    advance = (~is_img).long()
    img_pos = is_img.nonzero().squeeze(1)
    row = col = None
    if img_pos.numel():
        if image_grid_thw is None:
            raise ValueError("mrope_positions: the row has image tokens but no image_grid_thw")
        g = image_grid_thw.to(dev).long()
        gh, gw = g[:, 1] // spatial_merge_size, g[:, 2] // spatial_merge_size
        n = g[:, 0] * gh * gw                                         # tokens per image
        if int(n.sum()) != img_pos.numel():
            raise ValueError(f"mrope_positions: {img_pos.numel()} image tokens but the grids hold {int(n.sum())}")
        which = torch.repeat_interleave(torch.arange(len(n), device=dev), n)      # image of each image token
        first = torch.cumsum(n, 0) - n
        k = torch.arange(img_pos.numel(), device=dev) - first[which]              # index within the image
        row = (k // gw[which]) % gh[which]
        col = k % gw[which]
        last = img_pos[first + n - 1]
        advance = advance.index_put((last,), torch.maximum(gh, gw))
    excl = torch.cumsum(advance, 0) - advance                                  # position before each token
    lens = torch.as_tensor(list(seqlens), device=dev)
    starts = torch.cumsum(lens, 0) - lens
    doc = torch.repeat_interleave(torch.arange(len(lens), device=dev), lens)
    base = excl - excl[starts][doc]
    pos = base.unsqueeze(0).repeat(3, 1)
    if row is not None:
        pos[1, img_pos] += row
        pos[2, img_pos] += col
    return pos


# ------------------------------------------------------------------------------------------------------------
# Vision layout
# ------------------------------------------------------------------------------------------------------------


@dataclass
class VisionSpec:
    """What the collator needs to know about the vision tower (from the model config)."""

    image_token_id: int
    spatial_merge_size: int = 2
    patch_size: int = 14
    window_size: Optional[int] = None      # Qwen2.5-VL windowed attention (None: Qwen2-VL, full attention only)

    @classmethod
    def from_config(cls, config) -> "VisionSpec":
        v = config.vision_config
        window = getattr(v, "window_size", None) if config.model_type == "qwen2_5_vl" else None
        return cls(int(config.image_token_id), int(v.spatial_merge_size), int(v.patch_size), window)


def vision_layout(grid_thw: torch.Tensor, spec: VisionSpec, keep_units: Optional[torch.Tensor] = None) -> VisionLayout:
    """Rotary positions, per-image documents and windows for the tower, optionally for a subset of merged units.

    Args:
        grid_thw: long [n_images, 3] patch grids.
        keep_units: bool [n_units] (all images, Qwen's merged-unit order) or None = all. Dropped units' patch
            rows are absent from the tower input; the kept rows keep their original rotary coordinates, image and
            window.
    """
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    m2 = spec.spatial_merge_size ** 2
    grid_thw = grid_thw.long().cpu()
    pos = get_vision_position_ids(grid_thw, spec.spatial_merge_size)                 # [Np, 2]
    units_per_image = (grid_thw.prod(-1) // m2).tolist()
    if keep_units is None:
        keep_units = torch.ones(sum(units_per_image), dtype=torch.bool)
    keep_units = keep_units.cpu().bool()
    keep_rows = keep_units.repeat_interleave(m2)
    pos = pos[keep_rows]
    seqlens = [int(c) * m2 for c in torch.split(keep_units.long(), units_per_image) for c in [c.sum()]]
    seqlens = [s for s in seqlens if s > 0]
    if spec.window_size is None:
        return VisionLayout(pos, seqlens)
    win_index, cu_win = get_vision_window_index(grid_thw, spec.spatial_merge_size, spec.window_size, spec.patch_size)
    unit_lens = ((cu_win[1:] - cu_win[:-1]) // m2).tolist()
    kept_in_order = keep_units[win_index]
    new_id = torch.cumsum(keep_units.long(), 0) - 1                                   # rank among kept units
    window_index = new_id[win_index[kept_in_order]]
    window_seqlens = [int(c) * m2 for c in torch.split(kept_in_order.long(), unit_lens) for c in [c.sum()]]
    window_seqlens = [s for s in window_seqlens if s > 0]
    return VisionLayout(pos, seqlens, window_index, window_seqlens)


# ------------------------------------------------------------------------------------------------------------
# Collation
# ------------------------------------------------------------------------------------------------------------


def collate(samples: Sequence[Sample], spec: VisionSpec, packed: bool = True, pad_token_id: int = 0,
            corruption: Optional[str] = None, generator: Optional[torch.Generator] = None,
            pad_to_multiple: int = 1) -> Batch:
    """Collate (masked or plain) samples into a :class:`Batch`.

    Args:
        samples: processed samples; after Stage 1 masking they carry ``mlm_labels`` and ``unit_masked``.
        spec: the vision tower's layout parameters.
        packed: one packed row (True) or right-padded rows (False).
        corruption: how masked image units reach the tower: ``"noise"`` (their rows overwritten by one random
            vector drawn from ``generator``), ``"mask_token"`` (rows flagged for the model's learned vector),
            ``"drop"`` (rows removed; their LM positions get the model's drop embedding), or None (no masking).
        pad_to_multiple: pad the packed row / each padded row to a multiple of this (packed: a final padding
            document made of pad tokens).
    """
    if not samples:
        raise ValueError("collate: no samples")
    if corruption not in (None, "noise", "mask_token", "drop"):
        raise ValueError(f"collate: corruption must be noise, mask_token, drop or None, got {corruption!r}")
    if int(pad_to_multiple) < 1:
        raise ValueError(f"collate: pad_to_multiple must be >= 1, got {pad_to_multiple}")
    lens = [len(s) for s in samples]
    B = 1 if packed else len(samples)
    S = sum(lens) if packed else max(lens)
    S_pad = -(-S // pad_to_multiple) * pad_to_multiple
    ids = torch.full((B, S_pad), pad_token_id, dtype=torch.long)
    labels = torch.full((B, S_pad), IGNORE, dtype=torch.long)
    sample_index = torch.full((B, S_pad), -1, dtype=torch.long)
    offsets = []
    for i, s in enumerate(samples):
        r, o = (0, sum(lens[:i])) if packed else (i, 0)
        ids[r, o:o + lens[i]] = s.input_ids
        if s.mlm_labels is not None:
            labels[r, o:o + lens[i]] = s.mlm_labels
        sample_index[r, o:o + lens[i]] = i
        offsets.append(r * S_pad + o)

    grids = [s.image_grid_thw for s in samples if s.image_grid_thw is not None and len(s.image_grid_thw)]
    grid = torch.cat(grids).long() if grids else None

    # positions: computed on the packed layout, then placed into rows
    flat_ids = torch.cat([s.input_ids for s in samples])
    pos_flat = mrope_positions(flat_ids, lens, grid, spec.image_token_id, spec.spatial_merge_size)
    position_ids = torch.zeros(3, B, S_pad, dtype=torch.long)
    seqlens = None
    if packed:
        position_ids[:, 0, :S] = pos_flat
        seqlens = tuple(lens) + ((S_pad - S,) if S_pad > S else ())
        if S_pad > S:   # padding document: its own positions, never attended by real tokens
            position_ids[:, 0, S:] = torch.arange(S_pad - S)
    else:
        o = 0
        for i, n in enumerate(lens):
            position_ids[:, i, :n] = pos_flat[:, o:o + n]
            o += n
    attention_mask = None if packed else (sample_index >= 0)

    batch = Batch(input_ids=ids, position_ids=position_ids, attention_mask=attention_mask, seqlens=seqlens,
                  sample_index=sample_index.reshape(-1), num_tokens=sum(lens),
                  record_ids=[s.record_id for s in samples])

    flat = ids.reshape(-1)
    lab = labels.reshape(-1)
    mlm_pos = (lab != IGNORE).nonzero().squeeze(1)
    batch.mlm_positions, batch.mlm_labels = mlm_pos, lab[mlm_pos]

    if grid is None:
        return batch
    img_pos = (flat == spec.image_token_id).nonzero().squeeze(1)                      # every image token, in order
    px = torch.cat([s.pixel_values for s in samples if s.pixel_values is not None]).float()
    m2 = spec.spatial_merge_size ** 2
    n_units = px.shape[0] // m2
    if img_pos.numel() != n_units:
        raise ValueError(f"collate: {img_pos.numel()} <|image_pad|> tokens but the images hold {n_units} merged tokens")
    masked = None
    if corruption is not None and any(s.unit_masked is not None for s in samples):
        masked = torch.cat([s.unit_masked if s.unit_masked is not None else torch.zeros(
            int((s.image_grid_thw.prod(-1) // m2).sum()) if s.image_grid_thw is not None else 0, dtype=torch.bool)
            for s in samples])
    batch.image_grid_thw = grid
    if masked is None or not bool(masked.any()):
        batch.pixel_values, batch.image_positions = px, img_pos
        batch.vision = vision_layout(grid, spec)
        return batch

    units = px.view(n_units, m2 * px.shape[1])
    batch.mae_positions = img_pos[masked]
    batch.mae_target = units[masked].clone()
    rows = masked.repeat_interleave(m2)
    if corruption == "noise":
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        noise = torch.randn(px.shape[1], generator=g)
        px = torch.where(rows[:, None], noise, px)
    elif corruption == "mask_token":
        batch.pixel_mask_rows = rows
    if corruption == "drop":
        keep = ~masked
        batch.image_positions = img_pos[keep]
        batch.drop_positions = img_pos[masked]
        if bool(keep.any()):
            batch.pixel_values = px[keep.repeat_interleave(m2)]
            batch.vision = vision_layout(grid, spec, keep_units=keep)
        # else every unit was dropped (e.g. single-unit images): the tower has no input and does not run
    else:
        batch.pixel_values, batch.image_positions = px, img_pos
        batch.vision = vision_layout(grid, spec)
    return batch
