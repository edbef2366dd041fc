"""Official MoCa behaviour by default, this project's earlier behaviour as options: pooling by attention (causal
pools the last token), no <|endoftext|> unless configured, MAE head without an extra RMSNorm, Bernoulli(0.5)
image masking per merged token, short hard-negative lists padded (test_contrastive / test_training_formats),
truncation at a maximum length."""

import json

import pytest
import torch

from moca.config import from_dict
from moca.data.masking import MaskingConfig, ModalityMasker
from moca.data.processor import MocaProcessor
from moca.data.retrieval import build_sample
from moca.embedding import MocaEmbedder

SIZES = dict(hidden=32, layers=2, heads=2, kv_heads=1, vision_hidden=16)
CFG_SIZES = {f"tiny_{k}": v for k, v in SIZES.items()}


def test_pooling_follows_the_attention_unless_set():
    from moca.eval import EvalModelConfig, load_embedder
    from moca.train.contrastive import ClConfig, build_contrastive_model

    assert MocaEmbedder.tiny(causal=True, image_size=56, **SIZES).pooling == "last"
    assert MocaEmbedder.tiny(causal=False, image_size=56, **SIZES).pooling == "mean"
    assert MocaEmbedder.tiny(causal=True, pooling="mean", image_size=56, **SIZES).pooling == "mean"
    assert load_embedder(EvalModelConfig(causal=True, device="cpu")).pooling == "last"
    m = build_contrastive_model(from_dict(ClConfig, {"model": dict(CFG_SIZES, causal=True, tiny_image_size=56)}))
    assert m.embedder.pooling == "last" and not m.embedder.add_eos


def test_no_endoftext_unless_configured_and_saved_with_the_model(tmp_path):
    model = MocaEmbedder.tiny(image_size=56, **SIZES)
    eos = model.processor.ids["endoftext"]
    assert eos not in model.sample("a red circle", "x").input_ids.tolist()
    model.append_eos = True
    assert model.sample("a red circle", "x").input_ids[-1] == eos
    model.save_pretrained(tmp_path / "m")
    assert MocaEmbedder.from_pretrained(tmp_path / "m").append_eos
    assert not MocaEmbedder.from_pretrained(tmp_path / "m", append_eos=False).append_eos
    # a moca save from before the option existed was trained with <|endoftext|>; a released checkpoint has no
    # moca metadata and gets none
    meta_file = next(p for p in (tmp_path / "m").iterdir() if p.suffix == ".json" and "embedding" in p.read_text())
    meta = json.loads(meta_file.read_text())
    del meta["embedding"]["append_eos"]
    meta_file.write_text(json.dumps(meta))
    assert MocaEmbedder.from_pretrained(tmp_path / "m").append_eos
    meta_file.unlink()
    assert not MocaEmbedder.from_pretrained(tmp_path / "m").append_eos
    # mean pooling over the same tokens: appending changes the embedding
    a = MocaEmbedder.tiny(image_size=56, **SIZES)
    b = MocaEmbedder.tiny(image_size=56, append_eos=True, **SIZES)
    assert not torch.allclose(a.encode(texts=["a red circle"]), b.encode(texts=["a red circle"]), atol=1e-4)


def test_mae_head_has_no_extra_norm_unless_asked():
    from moca.modeling import MocaBackbone
    from moca.stage1 import CptModel, LossConfig

    proc = MocaProcessor.tiny(56)
    bb = MocaBackbone.tiny(proc.vocab_size, proc.ids, **SIZES)
    assert CptModel(bb).mae_decoder.norm is None
    assert CptModel(bb, LossConfig(mae_head_norm=True)).mae_decoder.norm is not None
    # without the norm, the head sees the decoder layer's output as is (captured by a hook)
    dec = CptModel(bb).mae_decoder
    seen = []
    dec.layer.register_forward_hook(lambda mod, args, out: seen.append(out[0] if isinstance(out, tuple) else out))
    h = torch.randn(1, 6, bb.hidden_size)
    pos = torch.arange(6)[None].expand(3, 1, 6)
    rope = bb.language_model.rotary_emb(h, pos)
    pred = dec(h, rope, torch.tensor([1, 4]), padding=torch.ones(1, 6, dtype=torch.bool))
    torch.testing.assert_close(pred, dec.head(seen[0].reshape(6, -1)[[1, 4]]), atol=1e-6, rtol=1e-6)


def _image_sample(n_units_per_image=(64, 64, 64)):
    from moca.data.batch import Sample

    grids = torch.tensor([[1, 2 * int(n ** 0.5), 2 * int(n ** 0.5)] for n in n_units_per_image])
    ids = torch.arange(10, 40)
    return Sample(ids, torch.zeros(int(grids.prod(-1).sum()), 1176), grids, "s")


def test_image_masking_is_bernoulli_per_merged_token_by_default():
    assert MaskingConfig().image_mask_mode == "bernoulli"
    masker = ModalityMasker(MaskingConfig(), 3, [0, 1, 2])
    counts = []
    for seed in range(40):
        m = masker.mask_sample(_image_sample(), torch.Generator().manual_seed(seed)).unit_masked
        counts += [int(p.sum()) for p in m.split(64)]
    # Binomial(64, 0.5) per image: mean 32, counts vary (exact mode would give 32 every time)
    assert abs(sum(counts) / len(counts) - 32) < 1.5 and len(set(counts)) > 5
    exact = ModalityMasker(MaskingConfig(image_mask_mode="exact"), 3, [0, 1, 2])
    m = exact.mask_sample(_image_sample(), torch.Generator().manual_seed(0)).unit_masked
    assert [int(p.sum()) for p in m.split(64)] == [32, 32, 32]
    with pytest.raises(ValueError, match="image_mask_mode must be"):
        MaskingConfig(image_mask_mode="half")


def test_truncation_at_max_length_drops_a_cut_image_whole():
    from PIL import Image

    proc = MocaProcessor.tiny(56)
    img = Image.new("RGB", (56, 56), (200, 10, 10))
    side = {"content": [{"text": "one two three"}, {"image": img}, {"text": "four five six seven eight nine"}]}
    full = build_sample(proc, side, "x", add_eos=False)
    n_img = int((full.input_ids == proc.ids["image_pad"]).sum()) + 2
    n_text = full.input_ids.numel() - n_img
    assert build_sample(proc, side, "x", add_eos=False, max_length=10 ** 4).input_ids.numel() == full.input_ids.numel()
    cut_text = build_sample(proc, side, "x", add_eos=False, max_length=full.input_ids.numel() - 2)
    assert cut_text.input_ids.numel() == full.input_ids.numel() - 2 and cut_text.image_grid_thw.shape[0] == 1
    cut_img = build_sample(proc, side, "x", add_eos=True, max_length=4)
    assert cut_img.pixel_values is None and cut_img.image_grid_thw is None
    assert cut_img.input_ids[-1] == proc.ids["endoftext"] and proc.ids["vision_start"] not in cut_img.input_ids
    assert n_text > 3


def test_stage1_truncation_keeps_the_final_endoftext_and_whole_images(tmp_path):
    from PIL import Image

    from moca.data.loader import PackingLoader, RecordSet
    from moca.data.processor import truncate_sample

    proc = MocaProcessor.tiny(56)
    Image.new("RGB", (56, 56), (10, 200, 10)).save(tmp_path / "g.png")
    rec = {"content": [{"text": "one two three four"}, {"image": "g.png"}, {"text": "five six seven eight"}]}
    full = proc.process(rec, "r", tmp_path)
    eos = proc.ids["endoftext"]
    assert full.input_ids[-1] == eos and truncate_sample(full, 10 ** 4, proc.ids) is full
    n_before = full.input_ids.tolist().index(proc.ids["vision_start"])
    cut = truncate_sample(full, n_before + 3, proc.ids)            # the cut falls inside the image: it goes
    assert cut.input_ids.tolist() == full.input_ids.tolist()[:n_before] + [eos] and cut.pixel_values is None
    keep = truncate_sample(full, full.input_ids.numel() - 2, proc.ids)   # the cut falls in the last text
    assert keep.input_ids.numel() == full.input_ids.numel() - 2 and keep.input_ids[-1] == eos
    assert torch.equal(keep.pixel_values, full.pixel_values)
    (tmp_path / "d.jsonl").write_text(json.dumps(rec) + "\n")
    loader = PackingLoader(RecordSet([tmp_path / "d.jsonl"]), proc, token_budget=n_before + 1, max_length=n_before + 1)
    assert [len(s) for s in loader.next_micro_batch()] == [n_before + 1]
