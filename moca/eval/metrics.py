"""Retrieval metrics on score matrices: MMEB's precision@1 over candidate lists, and Recall@k / nDCG@k
(ViDoRe / BEIR style) over a corpus.

Conventions, stated once:

* Ranking: documents sorted by descending score; ties are broken against the gold documents (a relevant
  document ranks after every irrelevant one with the same score), so a model that scores everything equal
  gets no credit for it.
* precision@1 (MMEB): a query counts when its gold candidate's score is strictly above every other
  candidate's; the task score is the fraction of queries that count.
* Recall@k: |relevant among the top k| / |relevant|, averaged over queries (queries without a relevant
  document are skipped, as in BEIR).
* nDCG@k: DCG@k / IDCG@k with linear gains, DCG@k = sum_{r=1..k} rel(doc at rank r) / log2(r + 1) (the
  trec_eval / pytrec_eval definition that ViDoRe reports), IDCG@k = the same sum over the relevances sorted
  in descending order.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch


def precision_at_1(scores: Sequence[Sequence[float]], gold: Sequence[int]) -> float:
    """Fraction of queries whose gold candidate scores strictly highest.

    Args:
        scores: per query, the scores of its candidates (lists may differ in length), or a [Q, C] tensor.
        gold: per query, the index of its gold candidate.
    """
    if len(scores) != len(gold):
        raise ValueError(f"precision_at_1: {len(scores)} score lists but {len(gold)} gold indices")
    if len(gold) == 0:
        raise ValueError("precision_at_1: no query")
    hits = 0
    for i, (row, g) in enumerate(zip(scores, gold)):
        row = torch.as_tensor(row, dtype=torch.float64).reshape(-1)
        if not 0 <= int(g) < row.numel():
            raise ValueError(f"precision_at_1: query {i}: gold index {g} outside its {row.numel()} candidates")
        others = torch.cat([row[:g], row[g + 1:]])
        hits += int(others.numel() == 0 or bool(row[g] > others.max()))
    return hits / len(gold)


def rank_documents(scores: torch.Tensor, doc_ids: Sequence[str], relevant: Sequence[Dict[str, float]],
                   k: int) -> List[List[str]]:
    """Top-``k`` document ids per query, by descending score, ties broken against relevant documents.

    Args:
        scores: [Q, N] scores of every query against the N documents.
        doc_ids: the N document ids.
        relevant: per query, {doc_id: grade > 0}.
    """
    Q, N = scores.shape
    if N != len(doc_ids) or Q != len(relevant):
        raise ValueError(f"rank_documents: scores {tuple(scores.shape)} for {len(relevant)} queries x {len(doc_ids)} docs")
    k = min(k, N)
    out = []
    s = scores.double()
    for i in range(Q):
        rel = torch.tensor([1.0 if d in relevant[i] and relevant[i][d] > 0 else 0.0 for d in doc_ids],
                           dtype=torch.float64)
        # sort by score descending, then relevant last among equals: lexsort via two stable sorts
        order = torch.argsort(rel, stable=True)
        order = order[torch.argsort(-s[i][order], stable=True)]
        out.append([doc_ids[j] for j in order[:k].tolist()])
    return out


def recall_at_k(ranked: Sequence[Sequence[str]], relevant: Sequence[Dict[str, float]], k: int) -> float:
    """Mean over queries (with >= 1 relevant document) of |relevant in top k| / |relevant|."""
    vals = []
    for top, rel in zip(ranked, relevant):
        pos = {d for d, g in rel.items() if g > 0}
        if pos:
            vals.append(len(pos & set(top[:k])) / len(pos))
    if not vals:
        raise ValueError("recall_at_k: no query has a relevant document")
    return sum(vals) / len(vals)


def ndcg_at_k(ranked: Sequence[Sequence[str]], relevant: Sequence[Dict[str, float]], k: int = 5) -> float:
    """Mean over queries (with >= 1 relevant document) of nDCG@k with linear gains (module docstring)."""
    vals = []
    for top, rel in zip(ranked, relevant):
        grades = sorted((g for g in rel.values() if g > 0), reverse=True)
        if not grades:
            continue
        dcg = sum(rel.get(d, 0.0) / math.log2(r + 2) for r, d in enumerate(top[:k]))
        idcg = sum(g / math.log2(r + 2) for r, g in enumerate(grades[:k]))
        vals.append(dcg / idcg)
    if not vals:
        raise ValueError("ndcg_at_k: no query has a relevant document")
    return sum(vals) / len(vals)
