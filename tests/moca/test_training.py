"""Stage 1 trainer on CPU: loss decreases on the embedded data, resume equals an uninterrupted run, bad records,
a 2-process gloo run through torchrun and the ``moca`` command."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moca.config import from_dict, load_config
from moca.data.embedded import write_cpt_corpus
from moca.data.loader import PackingLoader, RecordSet
from moca.data.processor import BadRecord, MocaProcessor
from moca.train.cpt import CptConfig, run_cpt
from moca.train.core import DistEnv
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(tiny_hidden=32, tiny_layers=2, tiny_heads=2, tiny_kv_heads=1, tiny_vision_hidden=16)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_cpt_corpus(tmp_path_factory.mktemp("corpus"), n_docs=48, seed=0, passage_words=24)


def _cfg(out, corpus, data_budget=384, prefetch=2, **train):
    t = dict(output_dir=str(out), max_steps=8, lr=2e-3, warmup_ratio=0.1, log_every=1, seed=0, progress=False,
             tensorboard=False, resume="auto")
    t.update(train)
    return from_dict(CptConfig, {"model": TINY, "data": {"train": [str(corpus)], "token_budget": data_budget,
                                                                    "prefetch": prefetch},
                                 "train": t})


def _losses(history):
    return [(h["step"], h["loss"], h["mlm_loss"], h["mae_loss"]) for h in history]


def test_loss_decreases_on_embedded_data(tmp_path, corpus):
    hist = run_cpt(_cfg(tmp_path / "run", corpus, max_steps=14, lr=4e-3, warmup_ratio=0.0), DistEnv())
    first = sum(h["loss"] for h in hist[:3]) / 3
    last = sum(h["loss"] for h in hist[-3:]) / 3
    assert last < first - 0.5, (first, last)
    assert all(h["mlm_count"] > 0 for h in hist) and any(h["mae_count"] > 0 for h in hist)
    lines = (tmp_path / "run" / "logs" / "train.jsonl").read_text().splitlines()
    rec = json.loads(lines[-1])
    assert {"loss", "mlm_loss", "mae_loss", "lr", "grad_norm", "tokens_per_s", "skipped"} <= rec.keys()
    final = tmp_path / "run" / "final"
    assert (final / "config.json").exists() and (final / "mae_decoder.safetensors").exists()
    assert (final / "tokenizer.json").exists() and (final / "preprocessor_config.json").exists()
    # the exported model loads back with the same weights (what Stage 2 starts from)
    from moca.modeling import MocaBackbone

    bb = MocaBackbone.from_pretrained(final)
    assert not bb.causal and bb.vlm.config._attn_implementation == "moca"
    proc = MocaProcessor.from_pretrained(final)
    assert proc.ids["mask"] == 8
    # and Stage 1 continues from a checkpoint directory (the path a real Qwen2.5-VL takes)
    cfg = _cfg(tmp_path / "again", corpus, max_steps=2)
    cfg.model.path = str(final)
    again = run_cpt(cfg, DistEnv())
    assert again[0]["loss"] < first, "continuing from the exported model starts from the trained weights"


def test_resume_reproduces_the_uninterrupted_run(tmp_path, corpus):
    # the uninterrupted run prepares batches in the foreground, the interrupted one ahead in a thread
    full = _losses(run_cpt(_cfg(tmp_path / "a", corpus, max_steps=4, grad_accum=2, prefetch=0), DistEnv()))
    part1 = _losses(run_cpt(_cfg(tmp_path / "b", corpus, max_steps=4, grad_accum=2, stop_at_step=2), DistEnv()))
    assert (tmp_path / "b" / "checkpoints" / "step_00000002" / "COMPLETE").exists()
    assert not (tmp_path / "b" / "final").exists()
    part2 = _losses(run_cpt(_cfg(tmp_path / "b", corpus, max_steps=4, grad_accum=2), DistEnv()))
    assert part1 == full[:2]
    assert part2 == full[2:], "resumed losses differ from the uninterrupted run"


def test_a_crash_mid_save_keeps_the_previous_checkpoint(tmp_path, corpus, monkeypatch):
    from moca.train import core

    run_cpt(_cfg(tmp_path / "c", corpus, max_steps=4, stop_at_step=2, data_budget=128), DistEnv())
    calls = {"n": 0}
    real = core.torch.save

    def dying_save(obj, f, *a, **k):
        calls["n"] += 1
        if "optimizer" in str(f):
            raise KeyboardInterrupt("simulated crash while saving")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(core.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        run_cpt(_cfg(tmp_path / "c", corpus, max_steps=4, stop_at_step=3, data_budget=128), DistEnv())
    monkeypatch.setattr(core.torch, "save", real)
    ck = core.find_checkpoint("auto", tmp_path / "c")
    assert ck.name == "step_00000002", ck
    hist = run_cpt(_cfg(tmp_path / "c", corpus, max_steps=4, data_budget=128), DistEnv())
    assert [h["step"] for h in hist] == [3, 4]
    log_steps = lambda: [json.loads(x)["step"] for x in (tmp_path / "c" / "logs" / "train.jsonl").read_text().splitlines()]
    assert log_steps() == [1, 2, 3, 4], "the resumed run's log holds each step once (step 3 was logged before the crash)"
    run_cpt(_cfg(tmp_path / "c", corpus, max_steps=2, data_budget=128, resume=None), DistEnv())
    assert log_steps() == [1, 2], "a fresh run in an old folder starts a fresh log"


def _bad_corpus(tmp_path, corpus):
    good = corpus.read_text().splitlines()[:6]
    img_dir = corpus.parent
    (img_dir / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")   # inside the data folder
    bad = [
        json.dumps({"id": "missing", "content": [{"text": "hello"}, {"image": "images/nope.png"}]}),
        json.dumps({"id": "corrupt", "content": [{"text": "hello"}, {"image": "corrupt.png"}]}),
        json.dumps({"id": "notext", "content": [{"image": "images/doc00000_0.png"}]}) if
        (img_dir / "images" / "doc00000_0.png").exists() else json.dumps({"id": "notext", "content": []}),
        json.dumps({"id": "toolong", "text": "word " * 2000}),
        "{not json",
    ]
    path = img_dir / "with_bad.jsonl"
    path.write_text("\n".join(good[:3] + bad + good[3:]) + "\n")
    return path


def test_bad_records_raise_naming_the_record_or_are_counted_and_skipped(tmp_path, corpus):
    path = _bad_corpus(tmp_path, corpus)
    proc = MocaProcessor.tiny()
    records = RecordSet(path)
    loader = PackingLoader(records, proc, token_budget=384, shuffle=False)
    with pytest.raises(BadRecord, match=r"record missing \(with_bad.jsonl:4\).*does not exist.*skip_bad"):
        for _ in range(10):
            loader.next_micro_batch()
    loader = PackingLoader(records, proc, token_budget=384, shuffle=False, skip_bad=True, max_samples=1)
    seen = []
    while loader.epoch == 0:
        seen += [s.record_id for s in loader.next_micro_batch()]
    assert dict(loader.skipped) == {"missing_image": 1, "not_an_image": 1, "no_text": 1, "too_long": 1,
                                    "malformed": 1}
    assert len([r for r in seen if "with_bad" in r]) == 6
    for name in ("corrupt", "notext", "toolong"):
        with pytest.raises(BadRecord, match=name):
            i = [k for k in range(len(records)) if f'"{name}"' in str(records.items[k][0])][0]
            rec, rid, root = records.get(i)
            s = proc.process(rec, rid, root)
            if len(s) > 384:
                raise BadRecord(rid, "too long", "too_long")


def test_config_rejects_unknown_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  max_stepz: 3\n")
    with pytest.raises(ValueError, match="max_stepz"):
        load_config(CptConfig, p)
    cfg = load_config(CptConfig, None, ["train.max_steps=3", "masking.image_corruption=drop"])
    assert cfg.train.max_steps == 3 and cfg.masking.image_corruption == "drop"


@pytest.mark.parametrize("override", [
    "data.train=a.jsonl", "data.train=[1]", "train.betas=0.9", "model.dtype=bf16", "data.pad_to_multiple=0",
    "data.max_samples=0", "data.prefetch=-1", "train.log_every=0", "train.save_every=-1", "loss.impl=cuda2",
    "loss.mae_weight=-1"])
def test_config_rejects_bad_values_naming_the_key(override):
    """Each would otherwise fail later and obscurely (a path read as its characters, a KeyError, a division by
    zero) or silently change the run (a negative save_every saved every step)."""
    key = override.split("=")[0].split(".")[-1]
    with pytest.raises(ValueError, match=key):
        load_config(CptConfig, None, [override])


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", MOCA_KERNELS_IMPL="torch")
    env.pop("TRITON_INTERPRET", None)
    return env


def _split_corpus(corpus):
    """Text-only records at even lines, records with images at odd ones: unshuffled with one sample per
    micro-batch, rank 0 never sees an image and rank 1 always does."""
    recs = [json.loads(x) for x in corpus.read_text().splitlines()]
    with_images = [r for r in recs if any("image" in seg for seg in r["content"])]
    lines = []
    for i, r in enumerate(with_images[:4]):
        lines += [json.dumps({"id": f"text{i}", "text": f"words only, record {i}"}), json.dumps(r)]
    path = corpus.parent / "split.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_process_gloo_run_through_torchrun(tmp_path, corpus, parallel):
    """FSDP2 runs on data where one rank has no image (its vision tower, MAE decoder and mask vector must
    still take part in every collective); DDP on the shuffled corpus."""
    out = tmp_path / parallel
    steps = 4 if parallel == "ddp" else 2
    data = ([f"data.train=[{corpus}]"] if parallel == "ddp" else
            [f"data.train=[{_split_corpus(corpus)}]", "data.shuffle=false", "data.max_samples=1"])
    sets = [f"model.{k}={v}" for k, v in TINY.items()] + data + [
        "data.token_budget=256", f"train.output_dir={out}", f"train.max_steps={steps}",
        "train.progress=false", "train.tensorboard=false", "train.lr=1e-3", f"train.parallel={parallel}",
        "train.log_every=1", "train.save_every=0",
        "masking.image_corruption=" + ("drop" if parallel == "ddp" else "mask_token")]
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           "-m", "moca.cli", "train", "cpt"] + sum((["--set", s] for s in sets), [])
    res = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("stage 1: step") == 1, "only rank 0 reports"
    ck = out / "checkpoints" / f"step_{steps:08d}"
    assert (ck / "rank00000.pt").exists() and (ck / "rank00001.pt").exists()
    d0 = torch.load(ck / "rank00000.pt", weights_only=False)["data"]
    d1 = torch.load(ck / "rank00001.pt", weights_only=False)["data"]
    assert (d0["rank"], d1["rank"]) == (0, 1) and d0["world_size"] == 2
    lines = [json.loads(x) for x in (out / "logs" / "train.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, steps + 1)), "only rank 0 logs"
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in lines)
    assert (out / "final" / "model.safetensors").exists() or list((out / "final").glob("model*.safetensors"))


def test_config_errors_name_the_section_once_and_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"^config train: expected a section"):
        load_config(CptConfig, None, ["train=3"])
    with pytest.raises(ValueError, match=r"^config data: expected a section"):
        load_config(CptConfig, None, ["data=[1, 2]"])
    with pytest.raises(ValueError) as err:      # a nested section's own error is not prefixed a second time
        load_config(CptConfig, None, ["model.dtype=bf16"])
    assert str(err.value).count("config ") == 1, str(err.value)
    from moca.train.contrastive import ClConfig

    with pytest.raises(ValueError, match="model.dtype"):   # Stage 2's model section runs Stage 1's checks too
        load_config(ClConfig, None, ["model.dtype=bf16"])
    p = tmp_path / "broken.yaml"
    p.write_text("train: {max_steps: 3\n")
    with pytest.raises(ValueError, match="invalid YAML in config file") as err:
        load_config(CptConfig, p)
    assert str(p) in str(err.value) and "<unicode string>" not in str(err.value)
    with pytest.raises(ValueError, match=r"invalid YAML in override 'train.max_steps=\[3'"):
        load_config(CptConfig, None, ["train.max_steps=[3"])
