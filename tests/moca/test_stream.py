"""Streaming records (moca.data.stream): sharding over ranks x workers, mixture proportions, exact resume,
bad records named by source/shard/row, and Stage 1's simple ``data.train`` form on top of the stream."""

import json
import math
from collections import Counter

import pytest
import torch

from moca.data.processor import BadRecord, MocaProcessor
from moca.data.stream import ReaderStream, Source, SourceConfig, StreamLoader


def _write_jsonl(path, n, start=0, tag="t"):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in range(start, start + n):
            f.write(json.dumps({"id": f"{tag}{i}", "text": f"record {tag} number {i} " + "word " * (i % 7)}) + "\n")
    return path


def _write_parquet(path, n, start=0, tag="p", row_group_size=16):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    ids = [f"{tag}{i}" for i in range(start, start + n)]
    content = [json.dumps([{"text": f"parquet {tag} {i} " + "x " * (i % 5)}]) for i in range(start, start + n)]
    pq.write_table(pa.table({"id": ids, "content": content}), path, row_group_size=row_group_size)
    return path


@pytest.fixture
def shards(tmp_path):
    """A folder of 3 JSONL shards (uneven sizes) and 2 parquet shards: 231 records."""
    d = tmp_path / "data"
    _write_jsonl(d / "a-0.jsonl", 70, 0)
    _write_jsonl(d / "a-1.jsonl", 41, 70)
    _write_jsonl(d / "sub" / "a-2.jsonl", 60, 111)
    _write_parquet(d / "b-0.parquet", 33, 0)
    _write_parquet(d / "b-1.parquet", 27, 33)
    return d


def _ids_of_one_epoch(src_cfg, S, seed=0):
    """Each reader's records of epoch 0 of a single source (read through ReaderStream until its epoch ends)."""
    sources = [Source(src_cfg, S)]
    out = []
    for g in range(S):
        r = ReaderStream(sources, g, S, seed=seed)
        ids = []
        while True:
            raw, loc, si = r.next()
            if r.pos[0][0] > 0:     # moved into epoch 1: the last record belongs to it
                break
            ids.append(r.record(raw, loc, si, exact=True)[1])
        out.append(ids)
    return out


@pytest.mark.parametrize("ranks", [2, 3])
def test_no_record_lost_or_repeated_across_ranks_and_workers(shards, ranks):
    S = ranks * 2                                   # 2 DataLoader workers per rank
    per_reader = _ids_of_one_epoch(SourceConfig(name="all", path=str(shards)), S)
    every = [i.split(" ")[0] for ids in per_reader for i in ids]
    assert len(every) == 231 and len(set(every)) == 231, (len(every), len(set(every)))
    assert all(per_reader), "a reader got no record"
    # the record ids name source/shard:row; a JSONL line number is the file's line
    one = next(i for ids in per_reader for i in ids if i.startswith("t75 "))
    assert one == "t75 (all/a-1.jsonl:6)"


def test_loader_with_workers_hands_out_each_readers_batches_round_robin(shards):
    proc = MocaProcessor.tiny()
    src = [{"name": "all", "path": str(shards)}]
    with_workers = StreamLoader(src, proc, token_budget=48, rank=1, world_size=2, num_workers=2, seed=3)
    got = [[s.record_id for s in with_workers.next_micro_batch()] for _ in range(8)]
    with_workers.close()
    # the same readers (rank 1 of 2, 2 workers: readers 2 and 3 of 4) run here, one after the other
    ref = StreamLoader(src, proc, token_budget=48, rank=1, world_size=2, num_workers=2, seed=3)
    packers = [ref._packer(0), ref._packer(1)]
    want = [[s.record_id for s in packers[i % 2].next_micro_batch()] for i in range(8)]
    assert got == want


def test_mixture_proportions_and_caps(tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", 300, tag="a")
    b = _write_jsonl(tmp_path / "b.jsonl", 300, tag="b")
    c = _write_jsonl(tmp_path / "c.jsonl", 300, tag="c")
    cfgs = [SourceConfig(name="a", path=str(a), weight=1.0), SourceConfig(name="b", path=str(b), weight=3.0),
            SourceConfig(name="c", path=str(c), weight=1.0, max_samples=20)]
    S = 2
    sources = [Source(cfg, S) for cfg in cfgs]
    n = 2000
    counts, c_epochs = Counter(), Counter()
    for g in range(S):
        r = ReaderStream(sources, g, S, seed=5)
        for _ in range(n):
            raw, loc, si = r.next()
            counts[si] += 1
            if si == 2:
                c_epochs[(g, r.pos[2][0])] += 1
    total = S * n
    for si, p in enumerate([0.2, 0.6, 0.2]):
        sd = math.sqrt(total * p * (1 - p))
        assert abs(counts[si] - total * p) < 4 * sd, (si, counts[si], total * p)
    # the cap: each epoch of c hands out 20 records over the 2 readers (10 each)
    full = [v for (g, e), v in c_epochs.items() if (g, e + 1) in c_epochs]
    assert full and all(v == 10 for v in full), c_epochs


@pytest.mark.parametrize("workers,rank,world", [(0, 0, 2), (2, 0, 2), (2, 2, 3)])
def test_resume_mid_epoch_equals_the_uninterrupted_run(shards, workers, rank, world):
    proc = MocaProcessor.tiny()
    src = [{"name": "j", "path": str(shards / "a-0.jsonl")}, {"name": "p", "path": str(shards / "b-*.parquet"),
                                                               "weight": 0.5}]

    def make():
        return StreamLoader(src, proc, token_budget=40, rank=rank, world_size=world, num_workers=workers, seed=1)

    full = make()
    ref = [[s.record_id for s in full.next_micro_batch()] for _ in range(14)]
    full.close()
    first = make()
    part1 = [[s.record_id for s in first.next_micro_batch()] for _ in range(5)]
    state = json.loads(json.dumps(first.state_dict()))            # plain JSON data
    first.close()
    second = make()
    second.load_state_dict(state)
    part2 = [[s.record_id for s in second.next_micro_batch()] for _ in range(9)]
    second.close()
    assert part1 + part2 == ref
    assert sum(state["source_counts"].values()) >= sum(map(len, part1))


def test_resume_at_another_world_size_or_worker_count_is_refused(shards):
    proc = MocaProcessor.tiny()
    src = [{"name": "all", "path": str(shards)}]
    a = StreamLoader(src, proc, token_budget=40, world_size=2, rank=0)
    a.next_micro_batch()
    st = a.state_dict()
    with pytest.raises(ValueError, match="world_size=2.*same world size"):
        StreamLoader(src, proc, token_budget=40, world_size=3, rank=0).load_state_dict(st)
    with pytest.raises(ValueError, match="num_workers=0"):
        StreamLoader(src, proc, token_budget=40, world_size=2, rank=0, num_workers=2).load_state_dict(st)


def test_bad_records_are_named_and_counted_once_each(tmp_path):
    p = tmp_path / "s.jsonl"
    lines = [json.dumps({"id": f"r{i}", "text": f"good {i}"}) for i in range(12)]
    lines[4] = "{not json"
    lines[9] = json.dumps({"id": "r9"})                               # no text
    p.write_text("\n".join(lines) + "\n")
    proc = MocaProcessor.tiny()
    src = [{"name": "web", "path": str(p)}]
    for workers in (0, 2):      # with DataLoader workers the trainer gets the BadRecord too
        ld = StreamLoader(src, proc, token_budget=400, shuffle=False, num_workers=workers)
        with pytest.raises(BadRecord, match=r"web/s.jsonl:5.*skip_bad"):
            for _ in range(12):
                ld.next_micro_batch()
    ld = StreamLoader(src, proc, token_budget=30, shuffle=False, skip_bad=True)
    seen = []
    while sum(ld.state_dict()["source_counts"].values()) < 12:       # one epoch
        seen += [s.record_id for s in ld.next_micro_batch()]
    st = ld.state_dict()
    assert dict(ld.skipped) == {"malformed": 1, "no_text": 1}
    assert "r4" not in " ".join(seen) and not any(s.startswith("r9 ") for s in seen)
    # resume: the skip counts come back once, not again
    ld2 = StreamLoader(src, proc, token_budget=30, shuffle=False, skip_bad=True)
    ld2.load_state_dict(st)
    for _ in range(8):                                              # well into the second pass
        ld2.next_micro_batch()
    assert ld2.state_dict()["source_counts"]["web"] > 20
    assert dict(ld2.skipped) == {"malformed": 1, "no_text": 1}


def test_source_config_errors_name_the_source(tmp_path):
    with pytest.raises(ValueError, match=r"sources\[x\].*weight"):
        SourceConfig(name="x", path="a", weight=0)
    with pytest.raises(ValueError, match=r"unknown format 'webdataset'"):
        SourceConfig(name="x", path="a", format="webdataset")
    with pytest.raises(FileNotFoundError, match=r"sources\[x\].*nope"):
        Source(SourceConfig(name="x", path=str(tmp_path / "nope")), 1)
    _write_parquet(tmp_path / "one.parquet", 3, row_group_size=16)
    with pytest.raises(ValueError, match=r"sources\[y\]: 3 chunks for 4 readers"):
        Source(SourceConfig(name="y", path=str(tmp_path / "one.parquet")), 4)


def test_stage1_mixture_with_workers_resumes_like_the_uninterrupted_run(tmp_path):
    """``data.sources`` + ``data.num_workers`` through ``run_cpt``: a resumed run's losses equal the uninterrupted
    run's (the data position, with DataLoader workers and the prefetch thread, is in the checkpoint)."""
    from moca.config import from_dict
    from moca.data.embedded import write_cpt_corpus
    from moca.train.core import DistEnv
    from moca.train.cpt import CptConfig, run_cpt

    corpus = write_cpt_corpus(tmp_path / "corpus", n_docs=40, seed=0, passage_words=16)
    lines = corpus.read_text().splitlines()
    d = corpus.parent                                  # image paths are relative to the shard's folder
    (d / "w-0.jsonl").write_text("\n".join(lines[:20]) + "\n")
    (d / "w-1.jsonl").write_text("\n".join(lines[20:30]) + "\n")
    (d / "docs.jsonl").write_text("\n".join(lines[30:]) + "\n")

    def cfg(out, **train):
        t = dict(output_dir=str(out), max_steps=5, lr=2e-3, log_every=1, seed=0, progress=False, tensorboard=False,
                 resume="auto")
        t.update(train)
        data = {"sources": [{"name": "web", "path": str(d / "w-*.jsonl"), "weight": 2},
                            {"name": "docs", "path": str(d / "docs.jsonl"), "max_samples": 8}],
                "num_workers": 2, "token_budget": 256}
        model = dict(tiny_hidden=32, tiny_layers=2, tiny_heads=2, tiny_kv_heads=1, tiny_vision_hidden=16)
        return from_dict(CptConfig, {"model": model, "data": data, "train": t})

    def losses(h):
        return [(r["step"], r["loss"]) for r in h]

    full = losses(run_cpt(cfg(tmp_path / "a"), DistEnv()))
    part1 = losses(run_cpt(cfg(tmp_path / "b", stop_at_step=3), DistEnv()))
    part2 = losses(run_cpt(cfg(tmp_path / "b"), DistEnv()))
    assert part1 + part2 == full
    with pytest.raises(ValueError, match="data.train and data.sources"):
        from_dict(CptConfig, {"data": {"train": ["x.jsonl"], "sources": [{"name": "a", "path": "x"}]}})
    with pytest.raises(ValueError, match=r"data.sources\[0\].*unknown key"):
        from_dict(CptConfig, {"data": {"sources": [{"name": "a", "path": "x", "wieght": 2}]}})


def test_parquet_bad_row_is_named_by_its_row_number(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    content = [json.dumps([{"text": f"row {i}"}]) for i in range(20)]
    content[12] = "[{not json"                                      # row 13 (1-based), in the second row group
    pq.write_table(pa.table({"id": [f"q{i}" for i in range(20)], "content": content}), tmp_path / "x.parquet",
                   row_group_size=8)
    proc = MocaProcessor.tiny()
    src = [{"name": "pq", "path": str(tmp_path / "x.parquet")}]
    ld = StreamLoader(src, proc, token_budget=400, shuffle=False)
    with pytest.raises(BadRecord, match=r"pq/x.parquet:13: 'content' is not valid JSON"):
        for _ in range(20):
            ld.next_micro_batch()
    ld = StreamLoader(src, proc, token_budget=12, shuffle=False, skip_bad=True)
    ids = []
    while len(ids) < 19:
        ids += [s.record_id for s in ld.next_micro_batch()]
    assert ids[:19] == [f"q{i} (pq/x.parquet:{i + 1})" for i in range(20) if i != 12]
    assert dict(ld.skipped) == {"malformed": 1}


def test_a_cap_smaller_than_the_readers_is_refused(shards):
    with pytest.raises(ValueError, match=r"max_samples smaller than the 4 readers.*tiny \(3\)"):
        StreamLoader([{"name": "tiny", "path": str(shards), "max_samples": 3}], MocaProcessor.tiny(), 64,
                     world_size=2, num_workers=2)


def test_data_train_files_folders_and_globs_keep_their_order(shards):
    from moca.data.stream import expand_paths

    got = expand_paths([str(shards / "b-1.parquet"), str(shards / "sub"), str(shards / "a-*.jsonl")])
    assert [p.name for p in got] == ["b-1.parquet", "a-2.jsonl", "a-0.jsonl", "a-1.jsonl"]
    with pytest.raises(FileNotFoundError, match="no .jsonl / .json / .parquet files in .*zzz"):
        expand_paths(str(shards / "zzz*.jsonl"))


@pytest.mark.parametrize("ranks", [2, 3])
def test_no_record_lost_or_repeated_through_dataloader_workers(shards, ranks):
    """The same, end to end: each rank's StreamLoader with 2 DataLoader worker processes, one record per
    micro-batch; a record belongs to the first pass while its reader's saved epoch is still 0."""
    proc = MocaProcessor.tiny()
    src = [{"name": "all", "path": str(shards)}]
    every = []
    for rank in range(ranks):
        ld = StreamLoader(src, proc, token_budget=64, rank=rank, world_size=ranks, num_workers=2, max_samples=1, seed=7)
        done = [False, False]
        while not all(done):
            k = ld._next
            (sample,) = ld.next_micro_batch()
            if ld._states[k]["stream"]["pos"][0][0] == 0:
                every.append(sample.record_id.split(" ")[0])
            else:
                done[k] = True
        ld.close()
    assert len(every) == 231 and len(set(every)) == 231, (len(every), len(set(every)))
