"""The published training-set schemas, chosen by ``format:``: MoCa's pre-training rows (Stage 1) and
MoCa-CL-Pairs / mmE5 / MMEB-train pairs (Stage 2), read, trained on for two steps with the tiny model, and the
result evaluated on an MMEB-shaped fixture."""

import pytest
import torch

from moca.config import from_dict
from moca.data.loader import RecordSet
from moca.data.processor import BadRecord, MocaProcessor
from moca.data.published import EncodedImage, pair_record
from moca.data.retrieval import PairLoader, SubsetConfig

from .published_fixtures import write_mmeb, write_pairs, write_pretrain

TINY = dict(tiny_hidden=32, tiny_layers=2, tiny_heads=2, tiny_kv_heads=1, tiny_vision_hidden=16, tiny_vision_depth=2,
            tiny_image_size=56)


def test_pair_rows_parse_literal_lists_and_pad_negatives(tmp_path):
    f = write_pairs(tmp_path / "pairs.parquet", tmp_path / "img", n=4)
    rec = pair_record({"qry": "<|image_1|> Q", "qry_image_path": "a.png", "pos_text": "<|image_1|> P",
                       "pos_image_path": "", "neg_text": "['n1', '']", "neg_image_path": "['', '']"}, tmp_path, "r")
    assert rec["query"] == {"content": [{"image": str(tmp_path / "a.png")}, {"text": " Q"}]}
    assert rec["positive"] == " P" and rec["negatives"] == ["n1"]          # empty negative dropped
    with pytest.raises(ValueError, match="r: not a pairs record: no 'qry'"):
        pair_record({"query": "x"}, None, "r")
    proc = MocaProcessor.tiny(56)
    cfg = SubsetConfig(name="p", files=[str(f)], format="pairs", image_root=str(tmp_path / "img"))
    loader = PairLoader([cfg], proc, 4, hard_negatives=2)
    q, docs, rid = loader.subsets[0].samples(0, proc)                       # row 0 has one negative: repeated
    assert len(docs) == 3 and torch.equal(docs[1].input_ids, docs[2].input_ids)
    assert q.image_grid_thw.shape == (1, 3) and docs[0].pixel_values is None     # image query, text documents
    with pytest.raises(BadRecord, match="few_negatives|hard negatives"):
        PairLoader([cfg], proc, 4, hard_negatives=2, pad_negatives=False)
    with pytest.raises(ValueError, match="format must be 'moca' or 'pairs'"):
        SubsetConfig(name="p", files=[str(f)], format="mmE5")


def test_pretrain_rows_become_interleaved_records(tmp_path):
    f = write_pretrain(tmp_path / "pt.parquet", n=2)
    rs = RecordSet([f], format="moca_pretrain")
    rec, rid, _ = rs.get(0)
    kinds = ["image" if "image" in s else "text" for s in rec["content"]]
    assert kinds == ["text", "image", "text", "image", "text"]
    assert isinstance(rec["content"][1]["image"], EncodedImage)
    s = MocaProcessor.tiny(56).process(rec, rid)
    assert s.image_grid_thw.shape == (2, 3)
    with pytest.raises(ValueError, match="data format must be"):
        RecordSet([f], format="webdataset")


def test_train_both_stages_on_published_schemas_then_evaluate(tmp_path):
    from moca.eval import EvalConfig, EvalTask, evaluate
    from moca.embedding import MocaEmbedder
    from moca.train.contrastive import ClConfig, run_cl
    from moca.train.core import DistEnv
    from moca.train.cpt import CptConfig, run_cpt

    torch.set_num_threads(1)
    pt = write_pretrain(tmp_path / "pt" / "train-00000.parquet", n=6)
    hist1 = run_cpt(from_dict(CptConfig, {
        "model": {k: v for k, v in TINY.items() if k != "tiny_vision_depth"},
        "data": {"train": [str(pt)], "format": "moca_pretrain", "token_budget": 256, "prefetch": 0},
        "train": {"output_dir": str(tmp_path / "cpt"), "max_steps": 2, "lr": 1e-3, "progress": False,
                  "tensorboard": False, "log_every": 1}}), DistEnv())
    assert len(hist1) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in hist1)
    pairs = write_pairs(tmp_path / "pairs" / "train.parquet", tmp_path / "img", n=8)
    cfg = from_dict(ClConfig, {
        "model": dict(TINY, path=str(tmp_path / "cpt" / "final")),
        "data": {"subsets": [{"name": "ImageNet_1K", "files": [str(pairs)], "format": "pairs",
                              "image_root": str(tmp_path / "img")}], "global_batch_size": 4, "hard_negatives": 2},
        "train": {"output_dir": str(tmp_path / "cl"), "max_steps": 2, "lr": 1e-3, "progress": False,
                  "tensorboard": False, "log_every": 1}})
    hist2 = run_cl(cfg, DistEnv())
    assert len(hist2) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in hist2)
    mm, img_root = write_mmeb(tmp_path / "mmeb", n_queries=4, n_cands=3)
    model = MocaEmbedder.from_pretrained(tmp_path / "cl" / "final")
    res = evaluate(model, [EvalTask(name="ImageNet-1K", type="mmeb", path=str(mm["ImageNet-1K"]),
                                    image_root=str(img_root))], EvalConfig(show_progress=False))
    assert 0 <= res["tasks"]["ImageNet-1K"]["metrics"]["precision@1"] <= 1


def test_record_caps_per_stage1_source_and_stage2_subset(tmp_path):
    """Stage 1 sources (streamed, moca.data.stream): a capped source hands out max_samples records per epoch (a
    seeded draw, the same again with the same seed), an uncapped one all of its records; the sources take
    data.format. The earlier source keys (files, max_records) are refused naming their new names."""
    from moca.data.stream import ReaderStream
    from moca.train.cpt import DataConfig, build_loader

    a = write_pretrain(tmp_path / "a.parquet", n=8)
    b = write_pretrain(tmp_path / "b.parquet", n=6)
    data = from_dict(DataConfig, {"format": "moca_pretrain", "sources": [
        {"name": "a", "path": str(a), "max_samples": 3}, {"name": "b", "path": str(b)}]})
    loader = build_loader(data, [], MocaProcessor.tiny(56), seed=1)

    def draws(seed):
        r = ReaderStream(loader.sources, 0, 1, seed=seed)
        out = []
        for _ in range(40):
            raw, loc, si = r.next()
            out.append((si, r.pos[si][0], loc))
        return out

    got = draws(1)
    per_epoch = {}
    for si, ep, loc in got:
        per_epoch.setdefault((si, ep), []).append(loc)
    for (si, ep), locs in per_epoch.items():
        assert len(set(locs)) == len(locs)                                    # none twice within an epoch
        if (si, ep + 1) in per_epoch:                                          # a complete epoch
            assert len(locs) == (3 if si == 0 else 6)
    assert got == draws(1) and got != draws(2)                                # the same seeded draw
    batch = loader.next_micro_batch()
    assert batch and all(s.image_grid_thw is not None for s in batch)       # moca_pretrain rows: images as bytes
    with pytest.raises(ValueError, match=r"data.sources\[(0|x)\]"):
        from_dict(DataConfig, {"sources": [{"name": "x"}]})
    with pytest.raises(ValueError, match=r"data.sources\[0\]: 'files', 'max_records' is now 'path', 'max_samples'"):
        from_dict(DataConfig, {"sources": [{"name": "x", "files": [str(a)], "max_records": 3}]})
    pairs = write_pairs(tmp_path / "p.parquet", tmp_path / "img", n=8)
    cfg = SubsetConfig(name="p", files=[str(pairs)], format="pairs", image_root=str(tmp_path / "img"), max_records=5)
    assert len(PairLoader([cfg], MocaProcessor.tiny(56), 4, hard_negatives=1).subsets[0]) == 5


def test_parquet_rows_are_read_on_access_one_row_group_at_a_time(tmp_path):
    import pickle

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": f"r{i}", "content": [{"text": f"text {i}"}]} for i in range(10)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet", row_group_size=3)
    rs = RecordSet([tmp_path / "t.parquet"])
    assert len(rs) == 10 and not rs.items[0][0].src._cache          # nothing read yet
    for i in (9, 0, 4, 7, 3):
        rec, rid, _ = rs.get(i)
        assert rec == rows[i] and rid == f"r{i} (t.parquet:{i + 1})"
    assert len(rs.items[0][0].src._cache) <= 2
    again = pickle.loads(pickle.dumps(rs))
    assert again.get(5)[0] == rows[5]
    pq.write_table(pa.Table.from_pylist([{"content": '[{"text": 1'}]), tmp_path / "bad.parquet")
    with pytest.raises(BadRecord, match=r"bad.parquet:1: 'content' is not valid JSON"):
        RecordSet([tmp_path / "bad.parquet"]).get(0)
