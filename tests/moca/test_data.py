"""Data layer: image preprocessing equals transformers' Qwen2-VL processor, the shipped tokenizer, records ->
samples, embedded data determinism, the corruption modes through the model, padded == packed."""

import json
import random

import numpy as np
import pytest
import torch

from moca.data.batch import VisionSpec, collate
from moca.data.embedded import caption, draw_scene, passages, random_scene, write_cpt_corpus
from moca.data.images import ImageSpec, preprocess_image
from moca.data.masking import CptCollator, MaskingConfig, ModalityMasker
from moca.data.processor import BadRecord, MocaProcessor
from moca.data.tokenizer import MASK_TOKEN, load_tokenizer, never_masked_ids, special_ids


@pytest.mark.parametrize("hw", [(97, 150), (300, 41), (28, 28)])
def test_image_rows_equal_transformers_qwen2vl_processor(hw):
    from PIL import Image

    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, "Qwen2VLImageProcessorPil", None)
    if cls is None:
        pytest.skip("this transformers has no Qwen2VLImageProcessorPil")
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (*hw, 3), dtype=np.uint8))
    spec = ImageSpec(min_pixels=56 * 56, max_pixels=28 * 28 * 30)
    ours, grid = preprocess_image(img, spec)
    ref = cls(min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)(images=[img], return_tensors="pt")
    assert list(grid) == ref["image_grid_thw"][0].tolist()
    torch.testing.assert_close(ours, ref["pixel_values"].float(), rtol=0, atol=1e-6)


def test_shipped_tokenizer_has_qwen_specials_and_mask():
    tok = load_tokenizer(None)
    ids = special_ids(tok)
    assert ids["mask"] == tok.convert_tokens_to_ids(MASK_TOKEN)
    assert {"endoftext", "vision_start", "vision_end", "image_pad", "video_pad"} <= ids.keys()
    assert set(ids.values()) <= set(never_masked_ids(tok))
    text = "a large red circle to the left of a small blue triangle: the import statement."
    enc = tok.encode(text, add_special_tokens=False)
    assert tok.decode(enc) == text and len(enc) < len(text) / 2
    assert len(tok) == 2048


def test_record_becomes_interleaved_sequence(tmp_path):
    proc = MocaProcessor.tiny(image_size=56)
    draw_scene(random_scene(random.Random(0)), 56).save(tmp_path / "a.png")
    rec = {"content": [{"text": "before"}, {"image": "a.png"}, {"text": "after"}]}
    s = proc.process(rec, "r", tmp_path)
    ids = s.input_ids.tolist()
    i = ids.index(proc.ids["vision_start"])
    assert ids[i + 1:i + 5] == [proc.ids["image_pad"]] * 4 and ids[i + 5] == proc.ids["vision_end"]
    assert ids[-1] == proc.ids["endoftext"] and s.pixel_values.shape == (16, 1176)
    assert s.image_grid_thw.tolist() == [[1, 4, 4]]
    # shorthand forms
    assert torch.equal(proc.process({"text": "before"}, "t").input_ids,
                       torch.tensor(proc.tokenizer.encode("before", add_special_tokens=False) + [proc.ids["endoftext"]]))
    with pytest.raises(BadRecord, match="vision placeholder"):
        proc.process({"text": "sneaky <|image_pad|>"}, "x")
    with pytest.raises(BadRecord, match="exactly one"):
        proc.process({"content": [{"text": "a", "image": "b"}]}, "y")


def test_embedded_data_is_deterministic(tmp_path):
    a = write_cpt_corpus(tmp_path / "a", n_docs=12, seed=3)
    b = write_cpt_corpus(tmp_path / "b", n_docs=12, seed=3)
    assert a.read_text() == b.read_text()
    recs = [json.loads(x) for x in a.read_text().splitlines()]
    imgs = [seg["image"] for r in recs for seg in r["content"] if "image" in seg]
    assert imgs and all((tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes() for p in imgs)
    assert len(passages()) > 500
    s = random_scene(random.Random(1))
    assert s.things[0].color in caption(s) and s.things[0].shape in caption(s)


@pytest.mark.parametrize("corruption", ["noise", "mask_token", "drop"])
def test_every_corruption_trains_through_the_model(corruption):
    from moca.modeling import MocaBackbone
    from moca.stage1 import CptModel

    proc = MocaProcessor.tiny(image_size=112)
    rng = random.Random(0)
    samples = []
    for i in range(3):
        img = draw_scene(random_scene(rng), 112)
        rows, grid = preprocess_image(img, proc.image_spec)
        ids = proc.tokenizer.encode(caption(random_scene(rng)), add_special_tokens=False)
        ids = ids[:3] + [proc.ids["vision_start"]] + [proc.ids["image_pad"]] * (rows.shape[0] // 4) + \
            [proc.ids["vision_end"]] + ids[3:] + [proc.ids["endoftext"]]
        from moca.data.batch import Sample

        samples.append(Sample(torch.tensor(ids), rows, torch.tensor([grid]), f"s{i}"))
    bb = MocaBackbone.tiny(proc.vocab_size, proc.ids, image_corruption=corruption, hidden=32, layers=2, heads=2,
                           kv_heads=1, vision_hidden=16)
    model = CptModel(bb)
    masker = ModalityMasker(MaskingConfig(image_corruption=corruption, image_mask_mode="exact"), proc.ids["mask"],
                            proc.never_masked)
    batch = CptCollator(masker, VisionSpec.from_config(bb.vlm.config), proc.ids["endoftext"])(samples, seed=0)
    out = model(batch)
    assert torch.isfinite(out["loss"]) and out["mae_count"] == 3 * 8
    out["loss"].backward()
    learned = {"mask_token": bb.pixel_mask_token, "drop": bb.drop_embedding}.get(corruption)
    if learned is not None:
        assert learned.grad is not None and learned.grad.abs().sum() > 0


def test_padded_and_packed_batches_give_the_same_hidden_states():
    from moca.modeling import MocaBackbone

    proc = MocaProcessor.tiny(image_size=56)
    rng = random.Random(1)
    samples = []
    for i in range(3):
        rec = {"text": caption(random_scene(rng)) * (i + 1)}
        samples.append(proc.process(rec, f"r{i}"))
    bb = MocaBackbone.tiny(proc.vocab_size, proc.ids, hidden=32, layers=2, heads=2, kv_heads=1, vision_hidden=16)
    spec = VisionSpec.from_config(bb.vlm.config)
    with torch.no_grad():
        packed = bb(collate(samples, spec, packed=True))[0]
        pb = collate(samples, spec, packed=False)
        padded = bb(pb).reshape(-1, 32)[pb.sample_index >= 0]
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)


def test_parquet_records_read_like_jsonl(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from moca.data.loader import RecordSet

    jsonl = write_cpt_corpus(tmp_path, n_docs=6, seed=1)
    recs = [json.loads(x) for x in jsonl.read_text().splitlines()]
    table = pa.table({"id": [r["id"] for r in recs], "content": [json.dumps(r["content"]) for r in recs]})
    pq.write_table(table, tmp_path / "cpt.parquet")
    a, b = RecordSet(jsonl), RecordSet(tmp_path / "cpt.parquet")
    proc = MocaProcessor.tiny()
    for i in range(len(recs)):
        (ra, ida, root_a), (rb, idb, root_b) = a.get(i), b.get(i)
        assert ra["content"] == rb["content"] and root_a == root_b
        assert torch.equal(proc.process(ra, ida, root_a).input_ids, proc.process(rb, idb, root_b).input_ids)


def test_prefetcher_hands_out_in_order_saves_consumed_position_and_raises_where_it_failed():
    from moca.data.prefetch import Prefetcher

    class Loader:
        def __init__(self):
            self.pos = 0

        def next(self):
            if self.pos == 5:
                raise BadRecord("r5", "broken", "malformed")
            self.pos += 1
            return self.pos

        def state_dict(self):
            return {"pos": self.pos, "skipped": {}}

        def load_state_dict(self, st):
            self.pos = st["pos"]

    loader = Loader()
    pf = Prefetcher(lambda i: (i, loader.next()), loader, depth=3)
    assert [pf(i) for i in range(3)] == [(0, 1), (1, 2), (2, 3)]
    import time

    time.sleep(0.2)                        # the worker reads ahead up to the failure
    assert pf.state_dict()["pos"] == 3     # ... but the saved position is what was consumed
    pf.close()
    assert loader.pos == 3                 # closing rewinds past the read-ahead
    assert [pf(i) for i in range(3, 5)] == [(3, 4), (4, 5)]
    with pytest.raises(BadRecord, match="r5"):
        pf(5)
    pf.load_state_dict({"pos": 1, "skipped": {}})
    assert pf(1) == (1, 2)
    pf.close()


def _qwen_like_checkpoint(folder):
    """A local checkpoint like a real Qwen2-VL one: a tokenizer with Qwen's special tokens but no <|mask|>, and
    a tiny model whose embedding has exactly the tokenizer's rows."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from moca.data.tokenizer import QWEN_SPECIAL
    from moca.modeling import MocaBackbone

    specials = list(QWEN_SPECIAL.values())
    vocab = {t: i for i, t in enumerate(specials + ["[UNK]", "hello", "world"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(specials)
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>").save_pretrained(str(folder))
    ids = {role: vocab[t] for role, t in QWEN_SPECIAL.items()}
    MocaBackbone.tiny(len(vocab), ids, hidden=32, layers=1, heads=2, kv_heads=1, vision_hidden=16,
                      vision_depth=1).save_pretrained(folder)
    return vocab


def test_checkpoint_tokenizer_without_mask_gets_one_and_the_embeddings_grow(tmp_path):
    """Real Qwen tokenizers have no <|mask|>: it is added as one special token and the model gets a row for it."""
    from moca.train.cpt import ModelConfig, build_model_and_processor

    vocab = _qwen_like_checkpoint(tmp_path)
    assert MASK_TOKEN not in vocab
    bb, proc = build_model_and_processor(ModelConfig(path=str(tmp_path)), "noise")
    mask = proc.ids["mask"]
    assert mask == len(vocab) and mask in proc.never_masked
    assert bb.language_model.embed_tokens.weight.shape[0] > mask and bb.lm_head_weight.shape[0] > mask
    enc = proc.tokenizer.encode("hello <|mask|> world", add_special_tokens=False)
    assert enc == [vocab["hello"], mask, vocab["world"]]
    proc.save_pretrained(tmp_path / "saved")                 # the Stage 1 export keeps the same id
    assert MocaProcessor.from_pretrained(tmp_path / "saved").ids["mask"] == mask


def test_checkpoint_paths_are_local_directories_never_hub_ids(tmp_path, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError(f"network lookup of {args[:1]}")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        MocaProcessor.from_pretrained("Qwen/Qwen2-VL-2B-Instruct")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        MocaProcessor.from_pretrained(tmp_path)
