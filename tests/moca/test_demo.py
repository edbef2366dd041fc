"""``moca demo --quick`` end to end (every arm and amount, both attentions, seeds, summary, table, JSON, PNGs) and
deterministic embedded data."""

import json
import math
import statistics
from collections import Counter
from pathlib import Path

import pytest

from moca.data.embedded_retrieval import write_eval_tasks, write_train_subsets
from tests.helpers import tree_digest


pytestmark = pytest.mark.usefixtures("one_thread")


_digest = tree_digest


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
    res = json.loads((tmp_path / "demo" / "results.json").read_text())
    s = res["settings"]
    assert s["seeds"] == 2 and s["unlabeled"] == [1, 2]
    cells = [("no training", 0), ("Stage 2 only", 0)] + [("Stage 1 + Stage 2", a * s["corpus_docs"])
                                                         for a in s["unlabeled"]]
    # header, rule, chance, then one row per (arm, amount) x attention, each with mean ± standard error
    assert len(lines) == 3 + 2 * len(cells)
    for arm, unlabeled in cells:
        rows = [ln for ln in lines if ln.startswith(f"| {arm} ") and f"| {unlabeled} " in ln]
        assert len(rows) == 2 and all("±" in ln for ln in rows)
    assert "wall time" in out and "CPU time" in out and "minus Stage 2 only" in out
    # every (attention, seed, arm, amount) was run once; histories have the configured lengths
    assert len(res["runs"]) == 2 * 2 * len(cells)
    for r in res["runs"]:
        assert 0 <= r["eval"]["overall"] <= 1 and len(r["eval"]["tasks"]) == 3
        if r["arm"] != "no training":
            assert len(r["stage2_history"]) == s["stage2_steps"]
        if r["arm"] == "Stage 1 + Stage 2":
            assert len(r["stage1_history"]) == s["stage1_steps"] * r["unlabeled"] // s["corpus_docs"]
    # the summary: one row per cell, mean and standard error of the per-seed overall scores
    summary = res["summary"]
    assert [(r["arm"], r["unlabeled"]) for r in summary] == [c for c in cells for _ in range(2)]
    for row in summary:
        assert {"arm", "attention", "unlabeled", "overall_mean", "overall_stderr", "seeds"} <= set(row)
        per_seed = [r["eval"]["overall"] for r in sorted(res["runs"], key=lambda r: r["seed"])
                    if (r["arm"], r["attention"], r["unlabeled"]) == (row["arm"], row["attention"], row["unlabeled"])]
        assert row["seeds"] == len(per_seed) == 2
        assert row["overall_mean"] == pytest.approx(statistics.mean(per_seed), abs=1e-12)
        assert row["overall_stderr"] == pytest.approx(statistics.stdev(per_seed) / math.sqrt(2), abs=1e-12)
    for png in ("scores.png", "loss_curves.png"):
        assert (tmp_path / "demo" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the Stage 2 arms differ from the untrained model (training happened and was evaluated)
    evals = {(r["arm"], r["attention"], r["seed"]): r["eval"] for r in res["runs"] if r["unlabeled"] == 0}
    assert evals[("Stage 2 only", "bidirectional", 0)] != evals[("no training", "bidirectional", 0)]


def test_summary_mean_and_standard_error():
    from moca.demo import comparisons, mean_stderr, summarize

    assert mean_stderr([0.5]) == (0.5, None)
    vals = [0.2, 0.4, 0.9]
    m, se = mean_stderr(vals)
    assert m == pytest.approx(0.5) and se == pytest.approx(math.sqrt(0.13 / 3))

    def run(arm, unlabeled, seed, overall):
        return {"arm": arm, "attention": "bidirectional", "unlabeled": unlabeled, "seed": seed,
                "eval": {"overall": overall, "tasks": {"t": {"headline": "p", "metrics": {"p": overall}}}}}

    runs = [run("Stage 1 + Stage 2", 10, s, v + 0.1 * s) for s, v in enumerate(vals)]
    runs += [run("Stage 2 only", 0, s, v) for s, v in enumerate(vals)][::-1]   # order of arrival is irrelevant
    rows = summarize(runs, ["bidirectional"])
    assert [r["arm"] for r in rows] == ["Stage 2 only", "Stage 1 + Stage 2"]
    assert rows[0]["overall"] == vals and rows[0]["overall_stderr"] == pytest.approx(se)
    assert rows[1]["overall_mean"] == pytest.approx(0.6) and rows[1]["tasks"]["t"]["mean"] == pytest.approx(0.6)
    (c,) = comparisons(rows)   # paired differences 0.0, 0.1, 0.2
    assert c["diff_mean"] == pytest.approx(0.1) and c["diff_stderr"] == pytest.approx(0.1 / math.sqrt(3))


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
                 "--seeds", "1", "--out", str(tmp_path / "demo"), "--device", "cpu"]) == 0
    res = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert res["settings"]["model"] == str(tmp_path / "ckpt") and res["settings"]["temperature"] == 0.03
    assert {r["attention"] for r in res["runs"]} == {"bidirectional"}
    final = tmp_path / "demo" / "bidirectional" / "seed0" / "stage1_x1_stage2" / "final"
    assert json.loads((final / "moca_config.json").read_text())["stage"] == "contrastive"
    assert sum(ln.startswith("| ") for ln in capsys.readouterr().out.splitlines()) == 2 + 1 + 4


def test_rerunning_the_demo_in_the_same_folder_starts_fresh_logs(tmp_path):
    """The trainer appends to its JSONL logs: a second demo in the same folder must not report both runs."""
    from moca.cli import main

    for run in ("stage2_only", "stage1_x1"):   # what an earlier demo in this folder left
        log = tmp_path / "demo" / "causal" / "seed0" / run / "logs" / "train.jsonl"
        log.parent.mkdir(parents=True)
        log.write_text(json.dumps({"step": 7, "loss": 1.0, "mlm_loss": 1.0, "mae_loss": 1.0}) + "\n")
    assert main(["demo", "--quick", "--attention", "causal", "--stage1-steps", "1", "--stage2-steps", "2",
                 "--seeds", "1", "--unlabeled", "1", "--out", str(tmp_path / "demo"), "--device", "cpu"]) == 0
    runs = json.loads((tmp_path / "demo" / "results.json").read_text())["runs"]
    arms = {r["arm"]: r for r in runs}
    assert [h["step"] for h in arms["Stage 2 only"]["stage2_history"]] == [1, 2]
    assert [h["step"] for h in arms["Stage 1 + Stage 2"]["stage1_history"]] == [1]


def test_bad_demo_arguments_fail_before_any_work(tmp_path, capsys):
    from moca.cli import main

    out = str(tmp_path / "demo")
    for args, message in ((["--workers", "0"], "argument --workers: expected an integer >= 1, got 0"),
                          (["--stage2-steps", "-1"], "argument --stage2-steps: expected an integer >= 1, got -1"),
                          (["--unlabeled", "1,0"], "argument --unlabeled: expected distinct integers >= 1"),
                          (["--seeds", "0"], "argument --seeds: expected an integer >= 1, got 0")):
        with pytest.raises(SystemExit) as exc:
            main(["demo", "--out", out, *args])
        assert exc.value.code == 2 and message in capsys.readouterr().err
    for args, message in ((["--model", str(tmp_path / "nowhere")], "nowhere is not a checkpoint directory"),
                          (["--device", "gpu"], "--device: 'gpu' is not a device")):
        assert main(["demo", "--quick", "--out", out, *args]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
