"""Stage 2 on CPU: the task-aware sampler (one subset per batch, identical on 2 gloo ranks), a GradCache step
equals the plain step, resume equals an uninterrupted run, bad pair records, LoRA, and the commands."""

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from moca.config import from_dict
from moca.data.embedded_retrieval import write_eval_tasks, write_train_subsets
from moca.data.processor import BadRecord
from moca.data.retrieval import PairLoader, SubsetConfig
from moca.data.sampler import TaskBatchSampler
from moca.train.contrastive import ClConfig, ContrastiveTrainer, build_contrastive_model, run_cl
from moca.train.core import DistEnv
from tests.helpers import free_port

TINY = dict(tiny_hidden=32, tiny_layers=2, tiny_heads=2, tiny_kv_heads=1, tiny_vision_hidden=16, tiny_vision_depth=2,
            tiny_image_size=56)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def subsets(tmp_path_factory):
    return write_train_subsets(tmp_path_factory.mktemp("pairs"), n_per_subset=12, hard_negatives=2, seed=0,
                               image_size=56)


# ------------------------------------------------------------------------------------------------------------
# The sampler
# ------------------------------------------------------------------------------------------------------------


def test_sampler_never_mixes_subsets_and_never_repeats_a_record():
    sizes, weights = [50, 23, 31], [1.0, 2.0, 1.0]
    s = TaskBatchSampler(sizes, weights, global_batch_size=8, seed=5)
    seen = {i: [] for i in range(3)}
    counts = Counter()
    for _ in range(300):
        d = s.next()
        assert len(d.global_indices) == 8 and len(set(d.global_indices)) == 8
        assert all(0 <= j < sizes[d.subset] for j in d.global_indices)   # indices of the drawn subset only
        seen[d.subset].append(d.global_indices)
        counts[d.subset] += 1
    # weights respected (2:1:1 within sampling noise)
    assert 0.40 < counts[1] / 300 < 0.60, counts
    # within an epoch a subset never repeats a record: consecutive draws of subset 1 (23 records, 2 batches
    # of 8 per epoch) are disjoint in pairs
    for a, b in zip(seen[1][0::2], seen[1][1::2]):
        assert not set(a) & set(b)


def test_sampler_state_resumes_the_same_draws():
    a = TaskBatchSampler([20, 20], None, 4, seed=1)
    for _ in range(7):
        a.next()
    b = TaskBatchSampler([20, 20], None, 4, seed=1)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(20):
        da, db = a.next(), b.next()
        assert (da.subset, da.global_indices) == (db.subset, db.global_indices)
    with pytest.raises(ValueError, match="belongs to another run"):
        TaskBatchSampler([20, 21], None, 4, seed=1).load_state_dict(a.state_dict())


def test_sampler_rejects_batches_it_cannot_draw():
    with pytest.raises(ValueError, match="smaller than the global batch of 8: b \\(5 records\\)"):
        TaskBatchSampler([10, 5], None, 8, names=["a", "b"])
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        TaskBatchSampler([10], None, 6, world_size=4, rank=0)


@pytest.mark.distributed
def test_sampler_agrees_across_two_gloo_ranks(tmp_path):
    import torch.multiprocessing as mp

    from tests.moca._sampler_ranks import sampler_rank

    out = tmp_path / "draws.json"
    mp.spawn(sampler_rank, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    r0, r1 = json.loads(out.read_text())
    for (s0, sub0, g0, l0), (s1, sub1, g1, l1) in zip(r0, r1):
        assert s0 == s1 and sub0 == sub1 and g0 == g1       # the same subset and global batch on both ranks
        assert l0 + l1 == g0 and not set(l0) & set(l1)     # the local shares partition it
    assert len({sub for _, sub, _, _ in r0}) == 3


# ------------------------------------------------------------------------------------------------------------
# Pair data
# ------------------------------------------------------------------------------------------------------------


def test_pair_batches_follow_the_info_nce_layout(subsets):
    from moca.data.processor import MocaProcessor

    loader = PairLoader([SubsetConfig(**c) for c in subsets], MocaProcessor.tiny(56), global_batch_size=4,
                        hard_negatives=2, seed=0)
    for _ in range(6):
        pb = loader.next_micro_batch()
        assert len(pb.queries) == 4 and len(pb.docs) == 4 + 4 * 2
        names = [rid.split(" ")[0] for rid in pb.record_ids]
        prefix = {"scene_t2i": "t2i", "scene_i2t": "i2t", "scene_edit": "edit", "passage_next": "passage"}[pb.subset]
        assert all(n.startswith(prefix) for n in names)           # one subset per batch
        # query i's positive at row i, its negatives at rows 4 + 2i, 4 + 2i + 1
        assert [d.record_id for d in pb.docs[:4]] == [f"{r} positive" for r in pb.record_ids]
        assert pb.docs[4 + 2 * 3 + 1].record_id == f"{pb.record_ids[3]} negatives[1]"


def test_subset_instructions_go_before_queries_and_documents_and_a_record_instruction_wins(tmp_path):
    from moca.data.processor import MocaProcessor
    from moca.data.retrieval import PairSubset

    f = tmp_path / "ins.jsonl"
    f.write_text(json.dumps({"id": "a", "query": "a red circle", "positive": "a blue square", "negatives": ["a cat"]})
                 + "\n" + json.dumps({"id": "b", "query": "a red circle", "positive": "x", "negatives": ["y"],
                                      "instruction": "Own: "}) + "\n")
    proc = MocaProcessor.tiny(56)
    sub = PairSubset(SubsetConfig(name="s", files=[str(f)], query_instruction="Find it: ", doc_instruction="Doc: "), 1)
    enc = proc.encode_text
    eos = [proc.ids["endoftext"]]
    q, docs, _ = sub.samples(0, proc)
    assert q.input_ids.tolist() == enc("Find it: ") + enc("a red circle") + eos
    assert docs[0].input_ids.tolist() == enc("Doc: ") + enc("a blue square") + eos
    assert docs[1].input_ids.tolist() == enc("Doc: ") + enc("a cat") + eos
    q, docs, _ = sub.samples(1, proc)
    assert q.input_ids.tolist() == enc("Own: ") + enc("a red circle") + eos   # the record's own query instruction
    assert docs[0].input_ids.tolist() == enc("Doc: ") + enc("x") + eos


def test_stage2_config_errors_name_the_key(tmp_path, subsets, capsys):
    from moca.cli import main

    with pytest.raises(ValueError, match="grad_cache.query_chunk_size and doc_chunk_size must be >= 0"):
        _cfg(tmp_path, subsets, **{"grad_cache.query_chunk_size": -3})
    with pytest.raises(FileNotFoundError, match="model.path: .*nowhere is not a checkpoint directory"):
        _cfg(tmp_path, subsets, **{"model.path": str(tmp_path / "nowhere")})
    (tmp_path / "broken.yaml").write_text("train: {max_steps: 3\n")
    assert main(["train", "cl", "--config", str(tmp_path / "broken.yaml")]) == 2
    assert "moca: error: invalid YAML" in capsys.readouterr().err
    assert main(["train", "cl", "--set", "data.global_batchsize=4"]) == 2
    assert "unknown key(s) ['global_batchsize']" in capsys.readouterr().err


def test_embedded_subsets_are_rewritten_when_their_settings_change(tmp_path):
    from moca.train.contrastive import embedded_subsets

    def n_records(cfgs):
        return len(Path(cfgs[0].files[0]).read_text().splitlines())

    assert n_records(embedded_subsets(tmp_path, 3, 1, seed=0)) == 3
    assert n_records(embedded_subsets(tmp_path, 5, 1, seed=0)) == 5      # not the 3 records written before


def test_bad_pair_records_are_named_or_counted(tmp_path, subsets):
    from moca.data.processor import MocaProcessor

    good = [json.loads(line) for line in Path(subsets[0]["files"][0]).read_text().splitlines()]
    root = Path(subsets[0]["files"][0]).parent
    records = good[:6] + [dict(good[6], id="broken", negatives=[{"image": "images/none.png"}, good[6]["negatives"][1]]),
                          dict(good[7], id="short", negatives=good[7]["negatives"][:1]),
                          dict(good[8], id="empty", query={"text": " "})]
    f = root / "bad.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = SubsetConfig(name="bad", files=[str(f)])
    proc = MocaProcessor.tiny(56)
    with pytest.raises(BadRecord, match=r"broken \(bad.jsonl:7\) negatives\[0\]: image file .*none.png does not exist"):
        PairLoader([cfg], proc, 4, hard_negatives=2)
    loader = PairLoader([cfg], proc, 4, hard_negatives=2, skip_bad=True, pad_negatives=False)
    assert loader.skipped == Counter({"missing_image": 1, "few_negatives": 1, "empty_text": 1})
    assert len(loader.subsets[0]) == 6
    # the official rule (default): a record with 1 of 2 negatives is padded by repeating its last one
    loader = PairLoader([cfg], proc, 4, hard_negatives=2, skip_bad=True)
    assert loader.skipped == Counter({"missing_image": 1, "empty_text": 1}) and len(loader.subsets[0]) == 7
    q, docs, rid = loader.subsets[0].samples(6, proc)
    assert rid.startswith("short") and len(docs) == 3 and torch.equal(docs[1].input_ids, docs[2].input_ids)


# ------------------------------------------------------------------------------------------------------------
# The Stage 2 step
# ------------------------------------------------------------------------------------------------------------


def _cfg(out, subsets, **over):
    d = {"model": dict(TINY), "data": {"subsets": subsets, "global_batch_size": 6, "hard_negatives": 2},
         "loss": {"learnable_temperature": True},
         "train": {"output_dir": str(out), "max_steps": 4, "lr": 1e-3, "log_every": 1, "progress": False,
                   "tensorboard": False, "resume": "auto", "warmup_ratio": 0.25}}
    for key, value in over.items():
        section, name = key.split(".")
        d.setdefault(section, {})[name] = value
    return from_dict(ClConfig, d)


def _trainer(cfg):
    model = build_contrastive_model(cfg)
    loader = PairLoader(cfg.data.subsets, model.embedder.processor, cfg.data.global_batch_size,
                        cfg.data.hard_negatives, seed=cfg.train.seed)
    return ContrastiveTrainer(cfg, model, loader, DistEnv())


@pytest.mark.parametrize("scope", ["own", "batch"])
def test_a_grad_cache_step_equals_the_plain_step(tmp_path, subsets, scope):
    plain = _trainer(_cfg(tmp_path / "a", subsets, **{"loss.hard_negative_scope": scope}))
    cached = _trainer(_cfg(tmp_path / "b", subsets, **{"loss.hard_negative_scope": scope, "grad_cache.enabled": True,
                                                        "grad_cache.query_chunk_size": 4,
                                                        "grad_cache.doc_chunk_size": 5}))
    for _ in range(2):   # two batches (two subsets): text, image and interleaved inputs
        pb = plain.data.next_micro_batch()
        pb2 = cached.data.next_micro_batch()
        assert pb.record_ids == pb2.record_ids
        a, b = plain.contrastive_step(pb), cached.contrastive_step(pb2)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["loss"] > 0
        assert a["accuracy"] == b["accuracy"]
        ga = {n: p.grad for n, p in plain.module.named_parameters() if p.grad is not None}
        gb = {n: p.grad for n, p in cached.module.named_parameters() if p.grad is not None}
        assert ga.keys() == gb.keys() and "log_temperature" in ga and len(ga) > 20
        scale = max(g.abs().max() for g in ga.values())
        for n in ga:
            torch.testing.assert_close(gb[n], ga[n], atol=1e-5 * scale, rtol=1e-4, msg=n)
    plain.logger.close()
    cached.logger.close()


def test_stage2_resume_reproduces_the_uninterrupted_run(tmp_path, subsets):
    def losses(hist):
        return [(h["step"], h["loss"], h["temperature"]) for h in hist]

    full = losses(run_cl(_cfg(tmp_path / "a", subsets), DistEnv()))
    first = losses(run_cl(_cfg(tmp_path / "b", subsets, **{"train.stop_at_step": 2}), DistEnv()))
    rest = losses(run_cl(_cfg(tmp_path / "b", subsets), DistEnv()))
    assert first == full[:2] and rest == full[2:]
    assert full[-1][2] != pytest.approx(0.03)                   # the learnable temperature moved
    meta = json.loads((tmp_path / "a" / "final" / "moca_config.json").read_text())
    assert meta["stage"] == "contrastive" and meta["embedding"]["pooling"] == "mean"


def test_lora_without_peft_says_how_to_fix_it(tmp_path, subsets, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match="pip install peft.*lora.enabled: false"):
        build_contrastive_model(_cfg(tmp_path, subsets, **{"lora.enabled": True}))


def test_lora_trains_only_the_adapters_and_exports_merged_weights(tmp_path, subsets):
    pytest.importorskip("peft")
    from moca.embedding import MocaEmbedder

    hist = run_cl(_cfg(tmp_path / "l", subsets, **{"lora.enabled": True, "lora.r": 4, "train.max_steps": 2}),
                  DistEnv())
    assert len(hist) == 2
    base = build_contrastive_model(_cfg(tmp_path / "x", subsets))
    trained = MocaEmbedder.from_pretrained(tmp_path / "l" / "final")
    sd_base, sd_new = base.embedder.state_dict(), trained.state_dict()
    assert set(sd_base) == set(sd_new)                            # merged: plain layers again
    changed = [k for k in sd_base if not torch.equal(sd_base[k], sd_new[k])]
    assert changed and all(k.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj") for k in changed)


# ------------------------------------------------------------------------------------------------------------
# The commands
# ------------------------------------------------------------------------------------------------------------


def test_train_cl_and_eval_commands(tmp_path, subsets, capsys):
    import yaml

    from moca.cli import main

    cfg = {"model": dict(TINY), "data": {"subsets": subsets, "global_batch_size": 4, "hard_negatives": 1},
           "grad_cache": {"enabled": True, "query_chunk_size": 3, "doc_chunk_size": 3},
           "train": {"output_dir": str(tmp_path / "cl"), "max_steps": 2, "progress": False, "tensorboard": False}}
    (tmp_path / "cl.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "cl", "--config", str(tmp_path / "cl.yaml"), "--set", "train.stop_at_step=1",
                 "--set", f"train.output_dir={tmp_path / 'stopped'}"]) == 0
    out = capsys.readouterr().out
    assert "stage 2 stopped: step 1" in out and "run again to resume" in out
    assert not (tmp_path / "stopped" / "final").exists()
    assert main(["train", "cl", "--config", str(tmp_path / "cl.yaml"), "--set", "train.lr=1e-4"]) == 0
    assert "stage 2 done: step 2" in capsys.readouterr().out
    tasks = write_eval_tasks(tmp_path / "eval", n_queries=4, n_candidates=3, corpus_size=8, image_size=56)
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump({"tasks": tasks, "output": str(tmp_path / "res.json"),
                                                        "show_progress": False}))
    assert main(["eval", "--config", str(tmp_path / "eval.yaml"), "--model", str(tmp_path / "cl" / "final")]) == 0
    out = capsys.readouterr().out
    assert "| scene_t2i" in out and "| passage_search" in out and "overall" in out
    res = json.loads((tmp_path / "res.json").read_text())
    assert set(res["tasks"]) == {t["name"] for t in tasks} and 0 <= res["overall"] <= 1
    assert main(["eval", "--config", str(tmp_path / "eval.yaml"), "--model", str(tmp_path / "nowhere")]) == 2


@pytest.mark.gpu
def test_a_grad_cache_step_equals_the_plain_step_on_gpu(tmp_path, subsets, monkeypatch):
    """The same check on CUDA with the automatic kernels (Triton info_nce and attention), float32."""
    monkeypatch.delenv("MOCA_KERNELS_IMPL", raising=False)

    def trainer(out, **over):
        cfg = _cfg(out, subsets, **{"train.bf16": "false", **over})
        model = build_contrastive_model(cfg)
        loader = PairLoader(cfg.data.subsets, model.embedder.processor, cfg.data.global_batch_size,
                            cfg.data.hard_negatives, seed=cfg.train.seed)
        return ContrastiveTrainer(cfg, model, loader, DistEnv(device=torch.device("cuda")))

    plain = trainer(tmp_path / "a")
    cached = trainer(tmp_path / "b", **{"grad_cache.enabled": True, "grad_cache.query_chunk_size": 4,
                                        "grad_cache.doc_chunk_size": 5})
    a = plain.contrastive_step(plain.data.next_micro_batch())
    b = cached.contrastive_step(cached.data.next_micro_batch())
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)
    ga = {n: p.grad for n, p in plain.module.named_parameters() if p.grad is not None}
    gb = {n: p.grad for n, p in cached.module.named_parameters() if p.grad is not None}
    scale = max(g.abs().max() for g in ga.values())
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], atol=2e-3 * scale, rtol=2e-2, msg=n)
    # one bf16 step (autocast) through the whole trainer: finite loss and gradients
    bf = trainer(tmp_path / "c", **{"train.bf16": "true", "grad_cache.enabled": True})
    m = bf.compute_step()
    assert math.isfinite(m["loss"]) and math.isfinite(bf.optimizer_step())


@pytest.mark.distributed
def test_two_process_ddp_run_equals_one_process_on_the_global_batch(tmp_path, subsets):
    """torchrun, 2 gloo ranks, GradCache, learnable temperature, documents gathered across ranks: the same losses,
    temperatures and gradient norms as one process training on the global batch."""
    import yaml

    cfg = {"model": dict(TINY), "data": {"subsets": subsets, "global_batch_size": 4, "hard_negatives": 2},
           "loss": {"learnable_temperature": True},
           "grad_cache": {"enabled": True, "query_chunk_size": 1, "doc_chunk_size": 3},
           "train": {"output_dir": str(tmp_path / "ddp"), "max_steps": 3, "lr": 1e-3, "log_every": 1,
                     "progress": False, "tensorboard": False}}
    (tmp_path / "cl.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", MOCA_KERNELS_IMPL="torch",
               PYTHONPATH=str(Path(__file__).resolve().parents[2]) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           "-m", "moca.cli", "train", "cl", "--config", str(tmp_path / "cl.yaml")]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("stage 2 done") == 1, "only rank 0 reports"
    one = run_cl(from_dict(ClConfig, dict(cfg, train=dict(cfg["train"], output_dir=str(tmp_path / "one")))), DistEnv())
    two = [json.loads(x) for x in (tmp_path / "ddp" / "logs" / "train.jsonl").read_text().splitlines()]
    assert [h["step"] for h in two] == [1, 2, 3]
    for a, b in zip(one, two):
        for key in ("loss", "temperature", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (key, a, b)
