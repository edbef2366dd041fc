"""Evaluation metrics against hand-computed values on toy rankings, and the task runners with a fake model."""

import json
import math

import pytest
import torch

from moca.eval import EvalConfig, EvalTask, evaluate, results_table
from moca.eval.metrics import ndcg_at_k, precision_at_1, rank_documents, recall_at_k


def test_precision_at_1_counts_strict_wins_only():
    scores = [[0.9, 0.1, 0.3],          # gold 0 wins
              [0.2, 0.8, 0.5],          # gold 2 loses to 0.8
              [0.4, 0.4, 0.1],          # gold 0 ties with 1: no credit (strict), a hit (official, the default)
              [0.7, 0.95]]              # lists may differ in length; gold 1 wins
    assert precision_at_1(scores, [0, 2, 0, 1], rule="strict") == pytest.approx(2 / 4)
    assert precision_at_1(scores, [0, 2, 0, 1]) == pytest.approx(3 / 4)
    assert precision_at_1(torch.tensor([[0.1, 0.2]]), [1]) == 1.0
    with pytest.raises(ValueError, match="gold index 3 outside its 3 candidates"):
        precision_at_1([[0.1, 0.2, 0.3]], [3])
    with pytest.raises(ValueError, match="2 score lists but 1 gold"):
        precision_at_1([[0.1], [0.2]], [0])


def test_recall_and_ndcg_match_hand_computed_values():
    ranked = [["d3", "d1", "d5", "d2", "d4"], ["b", "x", "a", "y", "z"]]
    relevant = [{"d1": 1, "d2": 1}, {"a": 2, "b": 1}]
    assert recall_at_k(ranked, relevant, 1) == pytest.approx((0 + 1 / 2) / 2)
    assert recall_at_k(ranked, relevant, 2) == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert recall_at_k(ranked, relevant, 5) == pytest.approx(1.0)
    # query 0: DCG = 1/log2(3) + 1/log2(5), IDCG = 1 + 1/log2(3)
    q0 = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    # query 1 (graded, linear gains): DCG = 1/log2(2) + 2/log2(4) = 2, IDCG = 2 + 1/log2(3)
    q1 = 2 / (2 + 1 / math.log2(3))
    assert ndcg_at_k(ranked, relevant, 5) == pytest.approx((q0 + q1) / 2)
    assert ndcg_at_k([["a", "b"]], [{"a": 1}], 5) == pytest.approx(1.0)
    assert ndcg_at_k([["b", "a"]], [{"a": 1}], 1) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="no query has a judgment"):
        recall_at_k([["a"]], [{}], 1)


def test_ranking_breaks_ties_against_relevant_documents():
    scores = torch.tensor([[0.5, 0.5, 0.9, 0.5]])
    top = rank_documents(scores, ["a", "b", "c", "d"], [{"b": 1}], k=4, ties="pessimistic")[0]
    assert top[0] == "c" and top[-1] == "b"          # b ties with a and d: it goes after them
    assert rank_documents(scores, ["a", "b", "c", "d"], [{"b": 1}], k=2, ties="pessimistic")[0] == ["c", "a"]


class FakeModel:
    """Embeds a side by a fixed table: text "x<i>" -> e_i (basis vector), so scores are hand-computable."""

    def __init__(self, table):
        self.table = table
        self.calls = 0

    def encode_items(self, items, **_):
        self.calls += 1
        texts = [side if isinstance(side, str) else side["text"] for side, _, _ in items]
        return torch.stack([torch.tensor(self.table[t], dtype=torch.float32) for t in texts])


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_task_runners_on_a_fake_model(tmp_path):
    table = {"q0": [1, 0, 0], "q1": [0, 1, 0], "c0": [0.9, 0.1, 0], "c1": [0.1, 0.9, 0], "c2": [0, 0, 1],
             "d0": [1, 0, 0], "d1": [0.8, 0.6, 0], "d2": [0, 0.6, 0.8], "d3": [0, 0, 1]}
    cand = _write(tmp_path / "cand.jsonl", [
        {"id": "a", "query": {"text": "q0"}, "candidates": [{"text": "c1"}, {"text": "c0"}, {"text": "c2"}], "answer": 1},
        {"id": "b", "query": {"text": "q1"}, "candidates": [{"text": "c0"}, {"text": "c2"}], "answer": 1}])
    queries = _write(tmp_path / "q.jsonl", [{"id": "q0", "query": "q0", "relevant": {"d1": 1}},
                                           {"id": "q1", "query": "q1", "relevant": ["d2", "d3"]}])
    corpus = _write(tmp_path / "c.jsonl", [{"id": f"d{i}", "doc": {"text": f"d{i}"}} for i in range(4)])
    tasks = [EvalTask(name="cand", type="candidates", file=cand),
             EvalTask(name="ret", type="retrieval", queries=queries, corpus=corpus)]
    res = evaluate(FakeModel(table), tasks, EvalConfig(recall_k=[1, 2], ndcg_k=2, show_progress=False))
    # candidates: q0 picks c0 (gold) ; q1 scores c0 0.1 > c2 0 (gold c2 loses)
    assert res["tasks"]["cand"]["metrics"]["precision@1"] == pytest.approx(0.5)
    # q0 ranks d0 (1.0), d1 (0.8): recall@1 0, recall@2 1; q1 ranks d1 (0.6) = d2 (0.6) -> trec_eval's tie order
    # (document id descending): d2 first, then d1
    m = res["tasks"]["ret"]["metrics"]
    assert m["recall@1"] == pytest.approx((0 + 0.5) / 2)
    assert m["recall@2"] == pytest.approx((1 + 0.5) / 2)
    q0 = (1 / math.log2(3)) / 1.0
    q1 = 1.0 / (1 + 1 / math.log2(3))
    assert m["ndcg@2"] == pytest.approx((q0 + q1) / 2)
    assert res["overall"] == pytest.approx((0.5 + m["ndcg@2"]) / 2)
    table_text = results_table(res)
    assert "precision@1" in table_text and "ndcg@2" in table_text and "50.0" in table_text


def test_bad_task_files_name_the_record(tmp_path):
    cand = _write(tmp_path / "c.jsonl", [{"id": "r7", "query": "q", "candidates": [{"text": "a"}], "answer": 4}])
    with pytest.raises(ValueError, match=r"r7 .*answer 4 is not an index"):
        evaluate(FakeModel({}), [EvalTask(name="t", type="candidates", file=cand)], EvalConfig(show_progress=False))
    q = _write(tmp_path / "q.jsonl", [{"id": "q9", "query": "q", "relevant": {"nope": 1}}])
    c = _write(tmp_path / "d.jsonl", [{"id": "d0", "doc": "x"}])
    with pytest.raises(ValueError, match=r"q9 .*not in the corpus: \['nope'\]"):
        evaluate(FakeModel({}), [EvalTask(name="t", type="retrieval", queries=q, corpus=c)],
                 EvalConfig(show_progress=False))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        EvalTask(name="t", type="candidates", file=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="needs 'corpus'"):
        EvalTask(name="t", type="retrieval", queries=q)


def test_a_missing_image_fails_before_any_embedding_work(tmp_path):
    """Sides are checked as the task is read: the error names task, record and side, and nothing was embedded."""
    cand = _write(tmp_path / "c.jsonl", [{"id": "a", "query": "q0", "candidates": ["c0", "c1"], "answer": 0},
                                         {"id": "r2", "query": "q1", "candidates": ["c0", {"image": "gone.png"}],
                                          "answer": 1}])
    model = FakeModel({"q0": [1.0], "q1": [1.0], "c0": [1.0], "c1": [1.0]})
    with pytest.raises(ValueError, match=r"eval task t: r2 \(c.jsonl:2\) candidates\[1\]: image file .*gone.png "
                                         r"does not exist"):
        evaluate(model, [EvalTask(name="t", type="candidates", file=cand)], EvalConfig(show_progress=False))
    assert model.calls == 0


def test_eval_config_and_model_errors_name_the_key(tmp_path):
    from moca.eval import EvalModelConfig, load_embedder

    with pytest.raises(ValueError, match=r"recall_k must be a list of integers"):
        EvalConfig(recall_k=5)
    with pytest.raises(ValueError, match="model.dtype must be float32, bfloat16 or float16, got 'bf16'"):
        load_embedder(EvalModelConfig(dtype="bf16"))               # checked for the tiny default too
    with pytest.raises(ValueError, match="model.device: 'gpu' is not a device"):
        load_embedder(EvalModelConfig(device="gpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="model.device: 'cuda' asked for, but torch sees no CUDA device"):
            load_embedder(EvalModelConfig(device="cuda"))
    with pytest.raises(FileNotFoundError, match="eval task t: queries: .* is not a file"):
        EvalTask(name="t", type="retrieval", queries=str(tmp_path), corpus=str(tmp_path))
