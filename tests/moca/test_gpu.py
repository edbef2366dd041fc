"""GPU checks of the model with the fast kernels (automatic backends) in bf16 autocast.

* hidden states of the tiny model: moca (packed, bf16) vs transformers sdpa with explicit 4-D masks (bf16), both
  against an fp32 reference: our error at most 2x sdpa's own plus a floor;
* one Stage 1 step: losses and gradients with the automatic kernels vs the torch backends, same inputs;
* a short bf16 training run on the embedded data: finite, decreasing loss.
"""

import pytest
import torch

from moca.data.batch import VisionSpec, collate
from moca.data.masking import CptCollator, MaskingConfig, ModalityMasker
from moca.data.processor import MocaProcessor
from moca.modeling import MocaBackbone
from moca.stage1 import CptModel

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _auto_kernels(monkeypatch):
    monkeypatch.delenv("MOCA_KERNELS_IMPL", raising=False)


def _samples(proc, n=4, seed=0):
    import random

    from moca.data.batch import Sample
    from moca.data.embedded import caption, draw_scene, random_scene
    from moca.data.images import preprocess_image

    rng = random.Random(seed)
    out = []
    for i in range(n):
        rows, grid = preprocess_image(draw_scene(random_scene(rng), 112), proc.image_spec)
        ids = proc.tokenizer.encode(" ".join(caption(random_scene(rng)) for _ in range(3)), add_special_tokens=False)
        ids = ids[:5] + [proc.ids["vision_start"]] + [proc.ids["image_pad"]] * (rows.shape[0] // 4) + \
            [proc.ids["vision_end"]] + ids[5:] + [proc.ids["endoftext"]]
        out.append(Sample(torch.tensor(ids), rows, torch.tensor([grid]), f"s{i}"))
    return out


def _dense(batch):
    B, S = batch.input_ids.shape
    si = batch.sample_index.view(B, S)
    ok = ((si[:, :, None] == si[:, None, :]) & (si[:, :, None] >= 0)) | torch.eye(S, dtype=torch.bool, device=si.device)
    return ok[:, None]


def test_bf16_hidden_states_match_sdpa_within_its_own_error():
    proc = MocaProcessor.tiny()
    bb = MocaBackbone.tiny(proc.vocab_size, proc.ids, hidden=128, layers=2, heads=4, kv_heads=2, vision_hidden=64).cuda()
    batch = collate(_samples(proc), VisionSpec.from_config(bb.vlm.config), packed=True).to("cuda")

    def ref(autocast):
        bb.set_attention("sdpa")
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            e = bb.input_embeddings(batch)
            h = bb.language_model(inputs_embeds=e, position_ids=batch.position_ids, attention_mask=_dense(batch),
                                  use_cache=False).last_hidden_state
        bb.set_attention("moca")
        return h.float()

    ref32, sdpa16 = ref(False), ref(True)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ours = bb(batch).float()
    err = (ours - ref32).abs().max().item()
    base = (sdpa16 - ref32).abs().max().item()
    assert torch.isfinite(ours).all()
    assert err <= 2 * base + 1.6e-2 * ref32.abs().max().item(), (err, base)


def test_stage1_step_with_fast_kernels_matches_torch_backends(monkeypatch):
    proc = MocaProcessor.tiny()
    torch.manual_seed(0)
    bb = MocaBackbone.tiny(proc.vocab_size, proc.ids, hidden=128, layers=2, heads=4, kv_heads=2, vision_hidden=64)
    model = CptModel(bb).cuda()
    masker = ModalityMasker(MaskingConfig(), proc.ids["mask"], proc.never_masked)
    batch = CptCollator(masker, VisionSpec.from_config(bb.vlm.config), proc.ids["endoftext"])(_samples(proc), 0).to("cuda")

    def run():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(batch)
        out["loss"].backward()
        return out, {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}

    fast, g_fast = run()
    monkeypatch.setenv("MOCA_KERNELS_IMPL", "torch")
    slow, g_slow = run()
    for k in ("mlm_loss", "mae_loss"):
        torch.testing.assert_close(fast[k].float(), slow[k].float(), rtol=2e-2, atol=2e-2)
    keys = [k for k in g_fast if k.endswith(("embed_tokens.weight", "mae_decoder.head.weight", "layers.0.self_attn.q_proj.weight",
                                             "blocks.0.attn.qkv.weight"))]
    assert len(keys) == 4, keys
    for key in keys:
        a, b = g_fast[key], g_slow[key]
        assert (a - b).norm() <= 0.05 * b.norm() + 1e-6, (key, (a - b).norm().item(), b.norm().item())


def test_short_bf16_training_run_on_gpu(tmp_path):
    from moca.config import from_dict
    from moca.train.core import DistEnv
    from moca.train.cpt import CptConfig, run_cpt

    cfg = from_dict(CptConfig, {"data": {"embedded_docs": 64, "token_budget": 1024},
                                "train": {"output_dir": str(tmp_path), "max_steps": 20, "lr": 2e-3,
                                          "progress": False, "tensorboard": False, "log_every": 1}})
    hist = run_cpt(cfg, DistEnv(device=torch.device("cuda", 0)))
    losses = [h["loss"] for h in hist]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
