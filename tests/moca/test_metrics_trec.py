"""Recall@k / nDCG@k against trec_eval (pytrec-eval-terrier) and ranx on random runs with ties and graded, zero
and negative judgments; MMEB precision@1 rules; TREC run files re-score to the reported numbers."""

import random

import pytest
import torch

from moca.eval.metrics import (ndcg_at_k, precision_at_1, rank_documents, read_trec_run, recall_at_k,
                               write_trec_run)

pytrec_eval = pytest.importorskip("pytrec_eval")


def _random_case(seed, Q=12, N=30, tie_levels=None):
    g = random.Random(seed)
    doc_ids = [f"d{g.randrange(10**6):06d}" for _ in range(N)]
    doc_ids = list(dict.fromkeys(doc_ids))
    N = len(doc_ids)
    if tie_levels:   # few distinct values: many ties
        scores = torch.tensor([[g.randrange(tie_levels) / tie_levels for _ in range(N)] for _ in range(Q)])
    else:
        scores = torch.randn(Q, N, generator=torch.Generator().manual_seed(seed))
    qids = [f"q{i}" for i in range(Q)]
    relevant = []
    for i in range(Q):
        kind = i % 4
        judged = g.sample(doc_ids, g.randrange(1, 8))
        if kind == 0:      # all judgments zero: counts as 0
            rel = {d: 0 for d in judged}
        else:              # graded, with zeros and negatives mixed in
            rel = {d: g.choice([-2, -1, 0, 1, 1, 2, 3]) for d in judged}
            if all(v < 0 for v in rel.values()):
                # pytrec_eval 0.5 reads out of bounds (segfaults, or not) on a query whose judgments are all
                # negative; ours counts it as 0 (test_negative_grades_count_as_zero_the_issue_example)
                rel[judged[0]] = 0
        relevant.append(rel)
    return qids, doc_ids, scores, relevant


def _trec(qids, relevant, run, ks):
    measures = {f"ndcg_cut.{k}" for k in ks} | {f"recall.{k}" for k in ks}
    qrels = {q: {d: int(g) for d, g in rel.items()} for q, rel in zip(qids, relevant) if rel}
    per = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    mean = lambda m: sum(v[m] for v in per.values()) / len(per)  # noqa: E731  (BEIR's mean over judged queries)
    return {k: (mean(f"ndcg_cut_{k}"), mean(f"recall_{k}")) for k in ks}


def _run_dict(qids, doc_ids, scores):
    return {q: {d: float(s) for d, s in zip(doc_ids, row.double().tolist())} for q, row in zip(qids, scores)}


@pytest.mark.parametrize("seed,tie_levels", [(0, None), (1, 3), (2, 5), (3, 2)])
def test_ndcg_and_recall_equal_trec_eval_with_ties_and_graded_zero_negative_judgments(seed, tie_levels):
    qids, doc_ids, scores, relevant = _random_case(seed, tie_levels=tie_levels)
    ks = [1, 3, 5, 10]
    ranked = rank_documents(scores, doc_ids, k=max(ks))
    ref = _trec(qids, relevant, _run_dict(qids, doc_ids, scores), ks)
    for k in ks:
        assert ndcg_at_k(ranked, relevant, k) == pytest.approx(ref[k][0], abs=1e-12), k
        assert recall_at_k(ranked, relevant, k) == pytest.approx(ref[k][1], abs=1e-12), k


def test_queries_without_judgments_are_left_out_all_zero_ones_count_as_zero():
    ranked = [["a", "b"], ["a", "b"], ["a", "b"]]
    assert ndcg_at_k(ranked, [{"a": 1}, {}, {"b": 0}], 2) == pytest.approx(0.5)      # (1 + 0) / 2, {} skipped
    assert recall_at_k(ranked, [{"a": 1}, {}, {"a": 0}], 1) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no query has a judgment"):
        ndcg_at_k([["a"]], [{}], 1)


def test_negative_grades_count_as_zero_the_issue_example():
    ranked = rank_documents(torch.tensor([[0.9, 0.5, 0.1]]), ["a", "b", "c"])
    assert ndcg_at_k(ranked, [{"a": -2, "c": 1}], 3) == pytest.approx(0.5)   # was -1.5
    assert ndcg_at_k(ranked, [{"a": -2}], 3) == 0.0 and recall_at_k(ranked, [{"a": -2}], 3) == 0.0
    ranx = pytest.importorskip("ranx")
    r = ranx.evaluate(ranx.Qrels({"q": {"a": -2, "c": 1}}), ranx.Run({"q": {"a": 0.9, "b": 0.5, "c": 0.1}}),
                      "ndcg@3")
    assert r == pytest.approx(0.5)


def test_tie_order_is_trec_evals_descending_doc_id():
    scores = torch.tensor([[0.5, 0.5, 0.9, 0.5]])
    assert rank_documents(scores, ["a", "b", "c", "d"])[0] == ["c", "d", "b", "a"]
    assert rank_documents(scores, ["a", "b", "c", "d"], [{"b": 1}], ties="pessimistic")[0] == ["c", "a", "d", "b"]
    # trec_eval ranks this all-tied query d, c, b, a: nDCG@1 = 1 only with d first
    qrels = {"q": {"d": 1}}
    run = {"q": {x: 0.5 for x in "abcd"}}
    assert pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.1"}).evaluate(run)["q"]["ndcg_cut_1"] == 1.0
    assert ndcg_at_k(rank_documents(torch.full((1, 4), 0.5), list("abcd")), [{"d": 1}], 1) == 1.0
    with pytest.raises(ValueError, match="ties must be one of"):
        rank_documents(scores, list("abcd"), ties="random")


@pytest.mark.parametrize("seed", [4, 5])
def test_ndcg_and_recall_equal_ranx_on_tie_free_runs(seed):
    """ranx breaks ties in its own order (not trec_eval's), so it is compared where no two scores are equal."""
    ranx = pytest.importorskip("ranx")
    qids, doc_ids, scores, relevant = _random_case(seed)       # all-zero-judged queries included: 0 in ranx too
    ranked = rank_documents(scores, doc_ids, k=10)
    qrels = ranx.Qrels({q: {d: int(g) for d, g in r.items()} for q, r in zip(qids, relevant)})
    run = ranx.Run(_run_dict(qids, doc_ids, scores))
    for k in (1, 5, 10):
        ref = ranx.evaluate(qrels, run, [f"ndcg@{k}", f"recall@{k}"])
        assert ndcg_at_k(ranked, relevant, k) == pytest.approx(ref[f"ndcg@{k}"], abs=1e-9)
        assert recall_at_k(ranked, relevant, k) == pytest.approx(ref[f"recall@{k}"], abs=1e-9)


def test_trec_run_file_rescores_to_the_same_numbers(tmp_path):
    qids, doc_ids, scores, relevant = _random_case(7, tie_levels=4)
    scores = scores.float() + 1e-3 * torch.randn(scores.shape).round(decimals=1)   # float32 scores, some ties
    path = tmp_path / "t.run"
    write_trec_run(path, qids, doc_ids, scores, k=10, tag="x")
    lines = path.read_text().splitlines()
    assert len(lines) == 10 * len(qids)
    assert lines[0].split()[1] == "Q0" and lines[0].split()[3] == "1" and lines[0].split()[5] == "x"
    ranked = rank_documents(scores, doc_ids, k=10)
    ref = _trec(qids, relevant, read_trec_run(path), [5, 10])
    for k in (5, 10):
        assert ndcg_at_k(ranked, relevant, k) == pytest.approx(ref[k][0], abs=1e-12)
        assert recall_at_k(ranked, relevant, k) == pytest.approx(ref[k][1], abs=1e-12)
    with pytest.raises(ValueError, match="holds whitespace"):
        write_trec_run(path, ["q 1"], ["a"], torch.zeros(1, 1), k=1)


def test_precision_at_1_official_rule_gives_ties_to_the_gold():
    scores = [[0.4, 0.4, 0.1], [0.2, 0.8, 0.5], [0.3, 0.9, 0.9]]
    assert precision_at_1(scores, [0, 2, 2]) == pytest.approx(2 / 3)                  # ties go to the gold
    assert precision_at_1(scores, [0, 2, 2], rule="strict") == pytest.approx(0.0)
    # the official code: argmax over the list with the gold first (np.argmax takes the first maximum)
    import numpy as np
    g = torch.Generator().manual_seed(0)
    rows = (torch.randint(0, 3, (200, 6), generator=g) / 3.0).tolist()
    gold = torch.randint(0, 6, (200,), generator=g).tolist()
    ref = sum(int(np.argmax([r[gi]] + r[:gi] + r[gi + 1:]) == 0) for r, gi in zip(rows, gold)) / 200
    assert precision_at_1(rows, gold) == pytest.approx(ref)
    with pytest.raises(ValueError, match="rule must be one of"):
        precision_at_1(scores, [0, 0, 0], rule="loose")
