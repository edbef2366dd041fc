"""Stage 1 masking: ratios, what is never masked, labels, image units, corruptions, targets."""

import pytest
import torch

from moca.data.batch import IGNORE, Sample, VisionSpec, collate, vision_layout
from moca.data.masking import CptCollator, MaskingConfig, ModalityMasker

SPECIAL = [0, 1, 2, 3, 4, 5, 6, 7]          # endoftext, im_*, vision_start/end/pad, image_pad, video_pad
MASK_ID, IMAGE, VS, VE = 8, 6, 3, 4
SPEC = VisionSpec(image_token_id=IMAGE, spatial_merge_size=2, patch_size=14, window_size=56)


def _sample(gen, n_text=40, grids=((8, 8), (4, 6)), rid="r"):
    ids = torch.randint(9, 500, (n_text,), generator=gen).tolist()
    rows, g = [], []
    for gh, gw in grids:
        ids = ids[:5] + [VS] + [IMAGE] * (gh * gw // 4) + [VE] + ids[5:]
        rows.append(torch.randn(gh * gw, 1176, generator=gen))
        g.append([1, gh, gw])
    ids += [1, 2, 0]
    return Sample(torch.tensor(ids), torch.cat(rows) if rows else None, torch.tensor(g) if g else None, rid)


def _masker(corruption="noise", text=0.4, image=0.5, mode="exact"):
    return ModalityMasker(MaskingConfig(text, image, corruption, image_mask_mode=mode), MASK_ID, SPECIAL)


def test_text_ratio_and_never_masked_tokens():
    gen = torch.Generator().manual_seed(0)
    masker = _masker()
    eligible = chosen = 0
    for i in range(60):
        s = _sample(gen, n_text=200)
        m = masker.mask_sample(s, gen)
        special = torch.isin(s.input_ids, torch.tensor(SPECIAL))
        hit = m.mlm_labels != IGNORE
        assert not hit[special].any(), "a special or vision token was masked"
        assert torch.equal(m.input_ids[hit], torch.full((int(hit.sum()),), MASK_ID))
        assert torch.equal(m.mlm_labels[hit], s.input_ids[hit]), "labels must be the original tokens, same position"
        assert torch.equal(m.input_ids[~hit], s.input_ids[~hit])
        eligible += int((~special).sum())
        chosen += int(hit.sum())
    ratio = chosen / eligible                     # ~12000 Bernoulli(0.4) draws: std ~0.0045
    assert abs(ratio - 0.4) < 0.02, ratio


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_image_units_masked_at_the_given_ratio_per_image(ratio):
    gen = torch.Generator().manual_seed(1)
    masker = _masker(image=ratio)
    s = _sample(gen, grids=((8, 8), (4, 6), (2, 2)))
    m = masker.mask_sample(s, gen)
    counts = [16, 6, 1]
    parts = torch.split(m.unit_masked, counts)
    for n, part in zip(counts, parts):
        assert int(part.sum()) == int(ratio * n + 0.5)
    # different seeds pick different units (uniform choice, not a fixed pattern)
    other = masker.mask_sample(s, torch.Generator().manual_seed(2))
    assert not torch.equal(other.unit_masked, m.unit_masked)


@pytest.mark.parametrize("corruption", ["noise", "mask_token", "drop"])
@pytest.mark.parametrize("packed", [True, False])
def test_corruption_and_targets(corruption, packed):
    gen = torch.Generator().manual_seed(3)
    samples = [_sample(gen, rid="a"), _sample(gen, n_text=17, grids=((4, 4),), rid="b"), _sample(gen, grids=(), rid="c")]
    batch = CptCollator(_masker(corruption), SPEC, pad_token_id=0, packed=packed)(samples, seed=7)
    original = torch.cat([s.pixel_values for s in samples if s.pixel_values is not None])
    units = original.view(-1, 4 * 1176)
    masked = torch.zeros(units.shape[0], dtype=torch.bool)
    flat_ids = batch.input_ids.reshape(-1)
    img_pos = (flat_ids == IMAGE).nonzero().squeeze(1)
    masked[torch.isin(img_pos, batch.mae_positions)] = True
    assert masked.sum() == int(0.5 * 16 + 0.5) + int(0.5 * 6 + 0.5) + int(0.5 * 4 + 0.5)
    # targets are the original rows of the masked units, in order
    assert torch.equal(batch.mae_target, units[masked])
    rows = masked.repeat_interleave(4)
    if corruption == "noise":
        px = batch.pixel_values
        assert torch.equal(px[~rows], original[~rows])
        assert (px[rows] == px[rows][0]).all(), "masked rows must be overwritten by one random vector"
        assert not torch.equal(px[rows][0], original[rows][0])
    elif corruption == "mask_token":
        assert torch.equal(batch.pixel_mask_rows, rows) and torch.equal(batch.pixel_values, original)
    else:
        assert torch.equal(batch.pixel_values, original[~rows])
        assert torch.equal(batch.image_positions, img_pos[~masked])
        assert torch.equal(batch.drop_positions, img_pos[masked])
        # the tower's kept rows keep their rotary coordinates; documents and windows count kept rows
        full = vision_layout(batch.image_grid_thw, SPEC)
        assert torch.equal(batch.vision.position_ids, full.position_ids[~rows])
        assert sum(batch.vision.seqlens) == int((~rows).sum()) == sum(batch.vision.window_seqlens)
        assert sorted(batch.vision.window_index.tolist()) == list(range(int((~masked).sum())))
    # text masking went through the same collator: labels at the masked positions of the flat grid
    assert torch.equal(flat_ids[batch.mlm_positions], torch.full_like(batch.mlm_labels, MASK_ID))


def test_same_seed_same_masks_different_seed_different_masks():
    gen = torch.Generator().manual_seed(4)
    samples = [_sample(gen), _sample(gen)]
    col = CptCollator(_masker(), SPEC, pad_token_id=0)
    a, b, c = col(samples, seed=1), col(samples, seed=1), col(samples, seed=2)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixel_values, b.pixel_values)
    assert not torch.equal(a.input_ids, c.input_ids)


def test_bad_masking_config_is_rejected():
    with pytest.raises(ValueError, match="image_corruption"):
        MaskingConfig(image_corruption="blur")
    with pytest.raises(ValueError, match="text_ratio"):
        MaskingConfig(text_ratio=1.5)


def test_collate_rejects_mismatched_image_tokens():
    gen = torch.Generator().manual_seed(5)
    s = _sample(gen, grids=((4, 4),))
    s.input_ids = s.input_ids[s.input_ids != IMAGE]
    with pytest.raises(ValueError, match="merged tokens"):
        collate([s], SPEC)


def test_drop_of_every_unit_leaves_the_tower_out_and_still_trains():
    """Single-unit images at ratio 0.5 lose their only unit: the tower gets no input instead of an empty call."""
    from moca.modeling import MocaBackbone
    from moca.stage1 import CptModel

    gen = torch.Generator().manual_seed(6)
    s = _sample(gen, n_text=6, grids=((2, 2),))
    bb = MocaBackbone.tiny(500, dict(endoftext=0, vision_start=VS, vision_end=VE, image_pad=IMAGE, video_pad=7),
                           image_corruption="drop", hidden=32, layers=2, heads=2, kv_heads=1, vision_hidden=16)
    batch = CptCollator(_masker("drop"), VisionSpec.from_config(bb.vlm.config), pad_token_id=0)([s], seed=0)
    assert batch.pixel_values is None and batch.vision is None and batch.image_positions.numel() == 0
    assert torch.equal(batch.drop_positions, batch.mae_positions) and batch.mae_positions.numel() == 1
    out = CptModel(bb)(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["mae_count"] == 1 and bb.drop_embedding.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="image_corruption"):
        MocaBackbone(bb.vlm, image_corruption="mask-token")
    with pytest.raises(ValueError, match="pad_to_multiple"):
        collate([s], SPEC, pad_to_multiple=0)
