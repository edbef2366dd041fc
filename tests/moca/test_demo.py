"""``moca demo --quick`` end to end (every arm, both attentions, table, JSON, PNG) and deterministic embedded data."""

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from moca.data.embedded_retrieval import write_eval_tasks, write_train_subsets


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes().replace(str(root).encode(), b"ROOT"))
    return h.hexdigest()


def test_embedded_retrieval_data_is_deterministic(tmp_path):
    for d in ("a", "b"):
        write_train_subsets(tmp_path / d, n_per_subset=6, hard_negatives=2, seed=4, image_size=56)
        write_eval_tasks(tmp_path / d / "eval", n_queries=5, n_candidates=4, corpus_size=10, seed=4, image_size=56)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    write_train_subsets(tmp_path / "c", n_per_subset=6, hard_negatives=2, seed=5, image_size=56)
    assert (tmp_path / "a" / "scene_t2i.jsonl").read_text() != (tmp_path / "c" / "scene_t2i.jsonl").read_text()


def test_hard_negatives_are_near_misses_and_eval_tasks_are_well_formed(tmp_path):
    subsets = write_train_subsets(tmp_path, n_per_subset=8, hard_negatives=3, seed=0, image_size=56)
    i2t = [json.loads(line) for line in Path(subsets[1]["files"][0]).read_text().splitlines()]
    for r in i2t:
        pos, negs = r["positive"]["text"], [n["text"] for n in r["negatives"]]
        assert len(set(negs + [pos])) == 4                       # distinct captions
        for n in negs:              # each differs from the positive in one attribute: a few words, or their order
            a, b = Counter(pos.split()), Counter(n.split())
            assert sum(((a - b) + (b - a)).values()) <= 5
    tasks = write_eval_tasks(tmp_path / "eval", n_queries=6, n_candidates=5, corpus_size=20, seed=0, image_size=56)
    assert [t["name"] for t in tasks] == ["scene_t2i", "scene_i2t", "scene_vqa", "scene_search", "passage_search"]
    for t in tasks[:2]:
        for line in Path(t["file"]).read_text().splitlines():
            r = json.loads(line)
            assert len(r["candidates"]) == 5 and 0 <= r["answer"] < 5
    # training and held-out passages come from disjoint documentation topics
    train_q = {json.loads(x)["query"]["text"].split(":")[0] for x in Path(subsets[3]["files"][0]).read_text().splitlines()}
    eval_q = {json.loads(x)["query"]["text"].split(":")[0]
              for x in Path(tasks[4]["queries"]).read_text().splitlines()}
    assert train_q and eval_q and not train_q & eval_q


def test_quick_demo_runs_end_to_end(tmp_path, capsys):
    from moca.cli import main

    assert main(["demo", "--quick", "--out", str(tmp_path / "demo"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("| ")]
    assert len(lines) == 2 + 1 + 3 * 2                       # header, rule, chance, 3 arms x 2 attentions
    for arm in ("no training", "Stage 2 only", "Stage 1 + Stage 2"):
        assert sum(ln.startswith(f"| {arm} ") for ln in lines) == 2
    assert "wall time" in out
    res = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert set(res["attention"]) == {"bidirectional", "causal"}
    for attention in res["attention"].values():
        arms = attention["arms"]
        assert set(arms) == {"no training", "Stage 2 only", "Stage 1 + Stage 2"}
        assert len(arms["Stage 2 only"]["stage2_history"]) == res["settings"]["stage2_steps"]
        assert len(arms["Stage 1 + Stage 2"]["stage1_history"]) == res["settings"]["stage1_steps"]
        for arm in arms.values():
            assert 0 <= arm["eval"]["overall"] <= 1 and len(arm["eval"]["tasks"]) == 5
    png = tmp_path / "demo" / "loss_curves.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the Stage 2 arms differ from the untrained model (training happened and was evaluated)
    bi = res["attention"]["bidirectional"]["arms"]
    assert bi["Stage 2 only"]["eval"] != bi["no training"]["eval"]


def test_quick_demo_runs_from_a_local_checkpoint(tmp_path, capsys):
    """``--model PATH``: a plain transformers Qwen2.5-VL save (no moca files) goes through the same pipeline."""
    from moca.cli import main
    from moca.data.processor import MocaProcessor
    from moca.modeling import MocaBackbone

    proc = MocaProcessor.tiny(112)
    bb = MocaBackbone.tiny(proc.vocab_size, proc.ids, seed=3, hidden=32, layers=1, heads=2, kv_heads=1,
                           vision_hidden=16, vision_depth=1)
    bb.vlm.save_pretrained(tmp_path / "ckpt")
    proc.save_pretrained(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "moca_config.json").exists()
    assert main(["demo", "--quick", "--model", str(tmp_path / "ckpt"), "--attention", "bidirectional",
                 "--out", str(tmp_path / "demo"), "--device", "cpu"]) == 0
    res = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert res["settings"]["model"] == str(tmp_path / "ckpt") and res["settings"]["temperature"] == 0.03
    assert list(res["attention"]) == ["bidirectional"]
    final = tmp_path / "demo" / "bidirectional" / "stage1_stage2" / "final"
    assert json.loads((final / "moca_config.json").read_text())["stage"] == "contrastive"
    assert sum(ln.startswith("| ") for ln in capsys.readouterr().out.splitlines()) == 2 + 1 + 3


def test_rerunning_the_demo_in_the_same_folder_starts_fresh_logs(tmp_path):
    """The trainer appends to its JSONL logs: a second demo in the same folder must not report both runs."""
    from moca.cli import main

    for run in ("stage2_only", "stage1"):   # what an earlier demo in this folder left
        log = tmp_path / "demo" / "causal" / run / "logs" / "train.jsonl"
        log.parent.mkdir(parents=True)
        log.write_text(json.dumps({"step": 7, "loss": 1.0, "mlm_loss": 1.0, "mae_loss": 1.0}) + "\n")
    assert main(["demo", "--quick", "--attention", "causal", "--stage1-steps", "1", "--stage2-steps", "2",
                 "--out", str(tmp_path / "demo"), "--device", "cpu"]) == 0
    arms = json.loads((tmp_path / "demo" / "results.json").read_text())["attention"]["causal"]["arms"]
    assert [h["step"] for h in arms["Stage 2 only"]["stage2_history"]] == [1, 2]
    assert [h["step"] for h in arms["Stage 1 + Stage 2"]["stage1_history"]] == [1]


def test_bad_demo_arguments_fail_before_any_work(tmp_path, capsys):
    from moca.cli import main

    out = str(tmp_path / "demo")
    for args, message in ((["--workers", "0"], "argument --workers: expected an integer >= 1, got 0"),
                          (["--stage2-steps", "-1"], "argument --stage2-steps: expected an integer >= 1, got -1")):
        with pytest.raises(SystemExit) as exc:
            main(["demo", "--out", out, *args])
        assert exc.value.code == 2 and message in capsys.readouterr().err
    for args, message in ((["--model", str(tmp_path / "nowhere")], "nowhere is not a checkpoint directory"),
                          (["--device", "gpu"], "--device: 'gpu' is not a device")):
        assert main(["demo", "--quick", "--out", out, *args]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
