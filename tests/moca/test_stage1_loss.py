"""One Stage 1 step's loss equals a loss computed by hand on a tiny batch (float64).

The hand computation does not use moca's attention or losses: hidden states from transformers' sdpa path with
an explicit 4-D bidirectional mask, logits and log-softmax written out, the MAE decoder layer run through sdpa
with the same mask, targets cut from the unmasked pixel rows, plain mean squared error.
"""

import pytest
import torch

from moca.data.batch import Sample, VisionSpec
from moca.data.masking import CptCollator, MaskingConfig, ModalityMasker
from moca.modeling import MocaBackbone
from moca.stage1 import CptModel, LossConfig

SPECIAL = dict(endoftext=0, vision_start=3, vision_end=4, image_pad=6, video_pad=7)
MASK_ID, VOCAB = 8, 80


def _samples(gen):
    def one(n_text, grids, rid):
        ids = torch.randint(9, VOCAB, (n_text,), generator=gen).tolist()
        rows, g = [], []
        for gh, gw in grids:
            ids = ids[:3] + [3] + [6] * (gh * gw // 4) + [4] + ids[3:]
            rows.append(torch.randn(gh * gw, 1176, generator=gen, dtype=torch.float64))
            g.append([1, gh, gw])
        return Sample(torch.tensor(ids + [0]), torch.cat(rows) if rows else None, torch.tensor(g) if g else None, rid)
    return [one(11, [(4, 4)], "a"), one(7, [], "b"), one(9, [(4, 6), (2, 4)], "c")]


def _dense(batch):
    B, S = batch.input_ids.shape
    si = batch.sample_index.view(B, S)
    ok = ((si[:, :, None] == si[:, None, :]) & (si[:, :, None] >= 0)) | torch.eye(S, dtype=torch.bool)
    return torch.zeros(B, 1, S, S, dtype=torch.float64).masked_fill(~ok[:, None], torch.finfo(torch.float64).min)


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("norm_pix", [False, True])
def test_stage1_loss_equals_hand_computed(packed, norm_pix):
    gen = torch.Generator().manual_seed(0)
    samples = _samples(gen)
    bb = MocaBackbone.tiny(VOCAB, SPECIAL, hidden=32, layers=3, heads=2, kv_heads=1, vision_hidden=16).double()
    model = CptModel(bb, LossConfig(mlm_weight=1.0, mae_weight=0.1, norm_pix=norm_pix)).double()
    masker = ModalityMasker(MaskingConfig(0.4, 0.5, "noise"), MASK_ID, list(range(9)))
    batch = CptCollator(masker, VisionSpec.from_config(bb.vlm.config), pad_token_id=0, packed=packed)(samples, seed=3)
    batch.pixel_values, batch.mae_target = batch.pixel_values.double(), batch.mae_target.double()
    assert batch.mlm_positions.numel() > 0 and batch.mae_positions.numel() > 0

    out = model(batch)

    with torch.no_grad():
        bb.set_attention("sdpa")
        embeds = bb.input_embeddings(batch)
        mask4 = _dense(batch)
        hidden = bb.language_model(inputs_embeds=embeds, position_ids=batch.position_ids,
                                   attention_mask=mask4, use_cache=False).last_hidden_state
        H = hidden.shape[-1]
        flat = hidden.reshape(-1, H)
        # MLM: cross-entropy over the full vocabulary at the masked text positions (no shift)
        logits = flat[batch.mlm_positions] @ bb.lm_head_weight.T
        mlm = -(logits.log_softmax(-1).gather(1, batch.mlm_labels[:, None])).mean()
        # MAE: decoder layer (a copy of the middle layer) -> norm -> linear, at the masked image tokens
        cos_sin = bb.language_model.rotary_emb(hidden, batch.position_ids)
        dec = model.mae_decoder.layer(hidden, attention_mask=mask4, position_embeddings=cos_sin, use_cache=False)
        dec = dec[0] if isinstance(dec, tuple) else dec
        picked = dec.reshape(-1, H)[batch.mae_positions]
        norm = model.mae_decoder.norm
        pred = model.mae_decoder.head(norm(picked) if norm is not None else picked)
        # targets: the original rows of the masked units, taken from the samples (not from the batch)
        units = torch.cat([s.pixel_values for s in samples if s.pixel_values is not None]).view(-1, 4 * 1176)
        img_pos = (batch.input_ids.reshape(-1) == 6).nonzero().squeeze(1)
        target = units[torch.isin(img_pos, batch.mae_positions)].view(-1, 1176)
        if norm_pix:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        mae = (pred.view(-1, 1176) - target).pow(2).mean()
        bb.set_attention("moca")

    assert model.mae_decoder.source_layer == 1
    torch.testing.assert_close(out["mlm_loss"], mlm, rtol=1e-9, atol=0)
    torch.testing.assert_close(out["mae_loss"], mae, rtol=1e-9, atol=0)
    torch.testing.assert_close(out["loss"], mlm + 0.1 * mae, rtol=1e-9, atol=0)
    # and the loss trains both parts
    out["loss"].backward()
    assert bb.lm_head_weight.grad.abs().sum() > 0 and model.mae_decoder.head.weight.grad.abs().sum() > 0
    assert next(bb.visual.parameters()).grad is not None


def test_mae_decoder_starts_as_a_copy_of_the_middle_layer():
    bb = MocaBackbone.tiny(VOCAB, SPECIAL, hidden=32, layers=4, heads=2, kv_heads=1, vision_hidden=16)
    model = CptModel(bb)
    src = bb.language_model.layers[2].state_dict()
    for k, v in model.mae_decoder.layer.state_dict().items():
        assert torch.equal(v, src[k])
    assert model.mae_decoder.layer.self_attn.q_proj.weight is not bb.language_model.layers[2].self_attn.q_proj.weight
    assert model.mae_decoder.head.out_features == 4 * 1176


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    gen = torch.Generator().manual_seed(1)
    samples = _samples(gen)
    bb = MocaBackbone.tiny(VOCAB, SPECIAL, hidden=32, layers=2, heads=2, kv_heads=1, vision_hidden=16).double()
    model = CptModel(bb).double().train()
    masker = ModalityMasker(MaskingConfig(0.4, 0.5, "noise"), MASK_ID, list(range(9)))
    batch = CptCollator(masker, VisionSpec.from_config(bb.vlm.config), pad_token_id=0)(samples, seed=1)
    batch.pixel_values, batch.mae_target = batch.pixel_values.double(), batch.mae_target.double()

    def run():
        model.zero_grad(set_to_none=True)
        out = model(batch)
        out["loss"].backward()
        return out["loss"].detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    loss_a, grads_a = run()
    bb.gradient_checkpointing_enable()
    layers = [m for m in bb.vlm.modules() if type(m).__name__.endswith(("DecoderLayer", "VisionBlock"))]
    assert layers and all(getattr(m, "gradient_checkpointing", False) for m in layers)
    loss_b, grads_b = run()
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-12, atol=0)
    assert len(grads_a) == len(grads_b)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_stage1_step_under_bf16_autocast_runs_and_is_close_to_fp32():
    """The GPU training path (bf16 autocast) exercised on the CPU: transformers hands float32 q/k (rotary) with a
    bf16 v to the attention function, the final norm returns float32; the step must still run in bf16."""
    gen = torch.Generator().manual_seed(2)
    samples = _samples(gen)
    for s in samples:
        if s.pixel_values is not None:
            s.pixel_values = s.pixel_values.float()
    bb = MocaBackbone.tiny(VOCAB, SPECIAL, hidden=32, layers=2, heads=2, kv_heads=1, vision_hidden=16)
    model = CptModel(bb)
    masker = ModalityMasker(MaskingConfig(0.4, 0.5, "noise"), MASK_ID, list(range(9)))
    batch = CptCollator(masker, VisionSpec.from_config(bb.vlm.config), pad_token_id=0)(samples, seed=1)
    ref = model(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    torch.testing.assert_close(out["mlm_loss"], ref["mlm_loss"].detach(), rtol=0.05, atol=0.05)
    torch.testing.assert_close(out["mae_loss"], ref["mae_loss"].detach(), rtol=0.05, atol=0.05)
