"""Streaming Stage 2 pairs (moca.data.stream_pairs): every global batch from one subset on every rank, no record
on two ranks within a pass, the sampler's subset draws, exact resume, bad records named, and run_cl with
``data.stream: true`` resuming like the uninterrupted run."""

import json

import pytest
import torch

from moca.config import from_dict
from moca.data.embedded_retrieval import write_train_subsets
from moca.data.processor import BadRecord, MocaProcessor
from moca.data.retrieval import SubsetConfig
from moca.data.sampler import TaskBatchSampler
from moca.data.stream_pairs import StreamPairLoader
from moca.train.contrastive import ClConfig, run_cl
from moca.train.core import DistEnv


@pytest.fixture(scope="module")
def subsets(tmp_path_factory):
    return write_train_subsets(tmp_path_factory.mktemp("pairs"), n_per_subset=24, hard_negatives=2, seed=0,
                               image_size=56)


@pytest.fixture(scope="module")
def proc():
    return MocaProcessor.tiny(56)


def test_global_batches_come_from_one_subset_and_ranks_share_no_record(subsets, proc):
    cfgs = [SubsetConfig(**c) for c in subsets]
    W, G, steps = 3, 6, 8
    loaders = [StreamPairLoader(cfgs, proc, G, hard_negatives=2, rank=r, world_size=W, seed=4) for r in range(W)]
    sampler = TaskBatchSampler([100] * len(cfgs), [c.weight for c in cfgs], G, seed=4, names=[c.name for c in cfgs])
    seen = {}
    for step in range(steps):
        batches = [ld.next_micro_batch() for ld in loaders]
        assert len({b.subset for b in batches}) == 1                       # one subset per global batch
        assert batches[0].subset == cfgs[sampler.subset_of_step(step)].name  # the sampler's draw
        for r, b in enumerate(batches):
            assert len(b.queries) == G // W and len(b.docs) == G // W * 3
            for rid in b.record_ids:
                seen.setdefault((b.subset, rid.split(" ")[0]), set()).add(r)
    assert all(len(ranks) == 1 for ranks in seen.values()), "a record went to two ranks"
    per_subset = {}
    for (sub, rid) in seen:
        per_subset[sub] = per_subset.get(sub, 0) + 1
    assert all(n <= 24 for n in per_subset.values())


def test_resume_draws_the_same_batches_and_other_world_size_is_refused(subsets, proc):
    cfgs = [SubsetConfig(**c) for c in subsets]

    def ids(ld, n):
        return [(b.subset, b.record_ids) for b in (ld.next_micro_batch() for _ in range(n))]

    full = ids(StreamPairLoader(cfgs, proc, 4, 2, rank=1, world_size=2, seed=2), 9)
    a = StreamPairLoader(cfgs, proc, 4, 2, rank=1, world_size=2, seed=2)
    first = ids(a, 4)
    st = json.loads(json.dumps(a.state_dict()))
    b = StreamPairLoader(cfgs, proc, 4, 2, rank=1, world_size=2, seed=2)
    b.load_state_dict(st)
    assert first + ids(b, 5) == full
    with pytest.raises(ValueError, match="world_size=2.*same world size"):
        StreamPairLoader(cfgs, proc, 4, 2, rank=1, world_size=4, seed=2).load_state_dict(st)


def test_bad_pair_records_are_named_by_line_or_counted_once(tmp_path, proc):
    lines = [json.dumps({"id": f"p{i}", "query": f"question {i}", "positive": f"answer {i}",
                         "negatives": [f"wrong {i}"]}) for i in range(10)]
    lines[3] = json.dumps({"id": "p3", "query": "q", "positive": {"image": "nope.png"}, "negatives": ["x"]})
    lines[6] = "not json"
    (tmp_path / "s.jsonl").write_text("\n".join(lines) + "\n")
    cfg = [SubsetConfig(name="qa", files=[str(tmp_path / "s.jsonl")])]
    ld = StreamPairLoader(cfg, proc, 2, 1, shuffle=False)
    with pytest.raises(BadRecord, match=r"p3 \(qa/s.jsonl:4\) positive: image file .*nope.png does not exist"):
        for _ in range(5):
            ld.next_micro_batch()
    ld = StreamPairLoader(cfg, proc, 2, 1, shuffle=False, skip_bad=True)
    got = [rid for _ in range(12) for rid in ld.next_micro_batch().record_ids]   # three passes
    assert not any(r.startswith("p3 ") for r in got) and len(got) == 24
    assert dict(ld.skipped) == {"missing_image": 1, "malformed": 1}


def test_stage2_streaming_run_resumes_like_the_uninterrupted_run(tmp_path, subsets):
    tiny = dict(tiny_hidden=32, tiny_layers=2, tiny_heads=2, tiny_kv_heads=1, tiny_vision_hidden=16,
                tiny_vision_depth=2, tiny_image_size=56)

    def cfg(out, **train):
        t = {"output_dir": str(out), "max_steps": 3, "lr": 1e-3, "log_every": 1, "progress": False,
             "tensorboard": False, "resume": "auto"}
        t.update(train)
        return from_dict(ClConfig, {"model": tiny, "data": {"subsets": subsets, "global_batch_size": 4,
                                                            "hard_negatives": 2, "stream": True}, "train": t})

    def losses(h):
        return [(r["step"], r["loss"]) for r in h]

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        full = losses(run_cl(cfg(tmp_path / "a"), DistEnv()))
        first = losses(run_cl(cfg(tmp_path / "b", stop_at_step=2), DistEnv()))
        rest = losses(run_cl(cfg(tmp_path / "b"), DistEnv()))
    finally:
        torch.set_num_threads(n)
    assert first + rest == full
