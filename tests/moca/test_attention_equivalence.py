"""The model through moca's attention equals transformers' own eager / sdpa path given explicit 4-D masks.

Tiny Qwen2.5-VL and Qwen2-VL configs in float64, random weights, inputs of text and images. Our path:
``masked_attention`` through the registered "moca" implementation (packed rows with documents, or padded rows).
Reference: the same weights with ``eager`` / ``sdpa``, the language model given an explicit additive
bidirectional (or causal) block-diagonal [B, 1, S, S] mask and the same mRoPE positions; the vision tower runs
transformers' own per-image / per-window path.
"""

import pytest
import torch

from moca.attention import MocaMask, moca_mask_interface
from moca.data.batch import Sample, VisionSpec, collate, mrope_positions
from moca.modeling import MocaBackbone

SPECIAL = dict(endoftext=0, vision_start=3, vision_end=4, image_pad=6, video_pad=7)
VOCAB = 96


def _samples(gen, n=3):
    """Samples with text, one or two images of different grids, and odd lengths."""
    out = []
    layouts = [[(4, 6)], [], [(6, 4), (4, 4)]][:n]
    for i, grids in enumerate(layouts):
        ids, rows, g = [], [], []
        ids += torch.randint(10, VOCAB, (3 + 2 * i,), generator=gen).tolist()
        for gh, gw in grids:
            n_units = gh * gw // 4
            ids += [3] + [6] * n_units + [4] + torch.randint(10, VOCAB, (2,), generator=gen).tolist()
            rows.append(torch.randn(gh * gw, 1176, generator=gen, dtype=torch.float64))
            g.append([1, gh, gw])
        ids += [0]
        out.append(Sample(torch.tensor(ids), torch.cat(rows) if rows else None,
                          torch.tensor(g) if g else None, f"s{i}"))
    return out


def _dense_mask(batch, causal):
    """Additive [B, 1, S, S] float64 mask: a token sees tokens of its own sample (causally if asked)."""
    B, S = batch.input_ids.shape
    si = batch.sample_index.view(B, S)
    allowed = (si[:, :, None] == si[:, None, :]) & (si[:, :, None] >= 0)
    if causal:
        allowed &= torch.ones(S, S, dtype=torch.bool).tril()
    allowed |= torch.eye(S, dtype=torch.bool)   # padding rows see themselves (their outputs are ignored)
    return torch.zeros(B, 1, S, S, dtype=torch.float64).masked_fill(~allowed[:, None], torch.finfo(torch.float64).min)


def _reference(model, batch, impl, causal):
    model.set_attention(impl, causal=causal)
    try:
        embeds = model.input_embeddings(batch)
        out = model.language_model(inputs_embeds=embeds, position_ids=batch.position_ids,
                                   attention_mask=_dense_mask(batch, causal), use_cache=False)
        return out.last_hidden_state
    finally:
        model.set_attention("moca", causal=False)


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen2_vl"])
def model(request):
    m = MocaBackbone.tiny(VOCAB, SPECIAL, kind=request.param, hidden=64, layers=2, heads=4, kv_heads=2,
                          vision_hidden=32, vision_depth=2).double().eval()
    return m


# eager runs its softmax in float32 even for float64 inputs, so it is compared at float32 precision
TOL = {"sdpa": 1e-10, "eager": 1e-5}


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_hidden_states_equal_transformers_with_explicit_4d_masks(model, packed, causal, impl):
    gen = torch.Generator().manual_seed(1)
    samples = _samples(gen)
    batch = collate(samples, VisionSpec.from_config(model.vlm.config), packed=packed, pad_token_id=0)
    batch.pixel_values = batch.pixel_values.double()
    model.set_attention("moca", causal=causal)
    with torch.no_grad():
        ours = model(batch)
        ref = _reference(model, batch, impl, causal)
    real = (batch.sample_index >= 0).view(ours.shape[:2])
    err = (ours - ref)[real].abs().max().item()
    assert err < TOL[impl] * max(ref[real].abs().max().item(), 1.0), f"max abs error {err:.3e}"
    # the mask changes the result (the test can fail): bidirectional differs from causal
    model.set_attention("moca", causal=not causal)
    with torch.no_grad():
        other = model(batch)
    model.set_attention("moca", causal=False)
    assert (other - ours)[real].abs().max().item() > 1e-3


def test_packing_equals_one_sample_at_a_time(model):
    """A sample packed with others gets the same hidden states as alone (documents never see each other)."""
    gen = torch.Generator().manual_seed(3)
    samples = _samples(gen)
    spec = VisionSpec.from_config(model.vlm.config)
    with torch.no_grad():
        packed = model(collate(samples, spec, packed=True))[0]
        alone = [model(collate([s], spec, packed=True))[0] for s in samples]
    ref = torch.cat(alone)
    assert torch.allclose(packed.float(), ref.float(), atol=1e-5)


def test_mrope_positions_match_transformers_get_rope_index(model):
    gen = torch.Generator().manual_seed(4)
    samples = _samples(gen)
    spec = VisionSpec.from_config(model.vlm.config)
    for s in samples:
        ours = mrope_positions(s.input_ids, [len(s)], s.image_grid_thw, spec.image_token_id)
        if s.image_grid_thw is None:
            assert torch.equal(ours, torch.arange(len(s)).expand(3, -1))
            continue
        types = (s.input_ids == spec.image_token_id).int()[None]
        ref, _ = model.vlm.model.get_rope_index(s.input_ids[None], mm_token_type_ids=types,
                                                image_grid_thw=s.image_grid_thw)
        assert torch.equal(ours, ref[:, 0])


def test_mask_hook_refuses_what_it_cannot_express():
    from transformers import masking_utils as mu

    m = moca_mask_interface(2, 5, 5, mask_function=mu.bidirectional_mask_function)
    assert isinstance(m, MocaMask) and not m.causal
    assert moca_mask_interface(2, 5, 5, mask_function=mu.causal_mask_function).causal
    with pytest.raises(NotImplementedError, match="cannot express"):
        moca_mask_interface(2, 5, 5, mask_function=mu.and_masks(mu.causal_mask_function, mu.causal_mask_function))
    with pytest.raises(NotImplementedError, match="cache"):
        moca_mask_interface(2, 1, 5, q_offset=4, mask_function=mu.causal_mask_function)


def test_dense_mask_to_moca_attention_is_an_error(model):
    gen = torch.Generator().manual_seed(5)
    batch = collate(_samples(gen, 2), VisionSpec.from_config(model.vlm.config), packed=False)
    batch.pixel_values = batch.pixel_values.double()
    with torch.no_grad(), pytest.raises(TypeError, match="dense 4-D mask"):
        embeds = model.input_embeddings(batch)
        model.language_model(inputs_embeds=embeds, position_ids=batch.position_ids,
                             attention_mask=_dense_mask(batch, False), use_cache=False)
