"""Retrieval metrics as the benchmarks compute them: MMEB's precision@1 over candidate lists, and Recall@k /
nDCG@k over a corpus as trec_eval computes them (ViDoRe and BEIR score with ``pytrec_eval``).

Conventions, stated once:

* **Ranking** (:func:`rank_documents`): documents sorted by descending score (compared as float64); equal
  scores are ordered by document id, *descending* (Python string order, i.e. code point / UTF-8 byte order),
  which is trec_eval's rule, so a run scored here and the same run re-scored by trec_eval / pytrec_eval rank
  every query identically. ``ties="pessimistic"`` instead puts relevant documents after every irrelevant one
  with the same score (no credit for ties; not what the benchmarks do).
* **Grades**: a judgment's grade is its gain; grades <= 0 count as 0 (trec_eval and ranx treat a negative
  grade as not relevant). A document is *relevant* when its grade is > 0 (trec_eval: grade >= 1, the same for
  the integer grades of TREC / BEIR qrels).
* **Which queries count**: a query with no judgment at all is left out of the mean (BEIR evaluates only the
  queries present in its qrels); a query whose judgments are all <= 0 counts, with score 0 (trec_eval gives it
  0 and BEIR averages it in).
* **Recall@k**: |relevant among the top k| / |relevant| (0 when nothing is relevant).
* **nDCG@k**: DCG@k / IDCG@k with linear gains, DCG@k = sum_{r=1..k} max(grade(doc at rank r), 0) / log2(r + 1)
  (trec_eval's ``ndcg_cut``), IDCG@k = the same sum over the positive grades sorted in descending order
  (0 when there is none).
* **precision@1 (MMEB)**: ``rule="official"`` (default) is VLM2Vec's evaluation: the prediction is the
  argmax over the candidates listed with the gold first, so the first maximum wins and a tie with the gold is
  a hit (gold score >= every other). ``rule="strict"``: the gold must score strictly above every other.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

TIE_RULES = ("trec", "pessimistic")
P1_RULES = ("official", "strict")


def precision_at_1(scores: Sequence[Sequence[float]], gold: Sequence[int], rule: str = "official") -> float:
    """Fraction of queries whose gold candidate is the prediction.

    Args:
        scores: per query, the scores of its candidates (lists may differ in length), or a [Q, C] tensor.
        gold: per query, the index of its gold candidate.
        rule: ``"official"`` (a tie with the gold counts, as MMEB's argmax over gold-first lists) or
            ``"strict"`` (the gold must score strictly highest).
    """
    if rule not in P1_RULES:
        raise ValueError(f"precision_at_1: rule must be one of {P1_RULES}, got {rule!r}")
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
        if others.numel() == 0:
            hits += 1
        elif rule == "official":
            hits += int(bool(row[g] >= others.max()))
        else:
            hits += int(bool(row[g] > others.max()))
    return hits / len(gold)


def rank_documents(scores: torch.Tensor, doc_ids: Sequence[str], relevant: Optional[Sequence[Dict[str, float]]] = None,
                   k: Optional[int] = None, ties: str = "trec") -> List[List[str]]:
    """Top-``k`` document ids per query by descending score, ties ordered as the module docstring says.

    Args:
        scores: [Q, N] scores (any float dtype; compared as float64) of every query against the N documents.
        doc_ids: the N document ids (strings).
        relevant: per query, {doc_id: grade}; only needed for ``ties="pessimistic"``.
        k: how many to keep (None = all N).
        ties: ``"trec"`` (trec_eval's order: equal scores by document id, descending) or ``"pessimistic"``.
    """
    if ties not in TIE_RULES:
        raise ValueError(f"rank_documents: ties must be one of {TIE_RULES}, got {ties!r}")
    scores = torch.as_tensor(scores)
    if scores.dim() != 2:
        raise ValueError(f"rank_documents: scores must be [Q, N], got shape {tuple(scores.shape)}")
    Q, N = scores.shape
    if N != len(doc_ids) or (relevant is not None and Q != len(relevant)):
        raise ValueError(f"rank_documents: scores {tuple(scores.shape)} for "
                         f"{len(relevant) if relevant is not None else Q} queries x {len(doc_ids)} docs")
    k = N if k is None else min(k, N)
    s = scores.detach().double().cpu()
    if ties == "trec":
        # documents in descending id order, then a stable sort on descending score keeps that order among ties
        by_id = torch.tensor(sorted(range(N), key=lambda j: doc_ids[j], reverse=True), dtype=torch.long)
        order = by_id[torch.argsort(-s[:, by_id], dim=1, stable=True)]
        return [[doc_ids[j] for j in row[:k].tolist()] for row in order]
    if relevant is None:
        raise ValueError("rank_documents: ties='pessimistic' needs the judgments (relevant)")
    out = []
    for i in range(Q):
        rel = torch.tensor([1.0 if relevant[i].get(d, 0) > 0 else 0.0 for d in doc_ids], dtype=torch.float64)
        order = torch.argsort(rel, stable=True)
        order = order[torch.argsort(-s[i][order], stable=True)]
        out.append([doc_ids[j] for j in order[:k].tolist()])
    return out


def _judged(ranked, relevant, name) -> List[Tuple[Sequence[str], Dict[str, float]]]:
    if len(ranked) != len(relevant):
        raise ValueError(f"{name}: {len(ranked)} rankings but {len(relevant)} judgment sets")
    pairs = [(top, rel) for top, rel in zip(ranked, relevant) if rel]
    if not pairs:
        raise ValueError(f"{name}: no query has a judgment")
    return pairs


def recall_per_query(ranked, relevant, k: int) -> List[Optional[float]]:
    """Recall@k of each query (None for a query without judgments)."""
    out = []
    for top, rel in zip(ranked, relevant):
        if not rel:
            out.append(None)
            continue
        pos = {d for d, g in rel.items() if g > 0}
        out.append(len(pos & set(top[:k])) / len(pos) if pos else 0.0)
    return out


def ndcg_per_query(ranked, relevant, k: int) -> List[Optional[float]]:
    """nDCG@k of each query (None for a query without judgments)."""
    out = []
    for top, rel in zip(ranked, relevant):
        if not rel:
            out.append(None)
            continue
        grades = sorted((g for g in rel.values() if g > 0), reverse=True)
        if not grades:
            out.append(0.0)
            continue
        dcg = sum(max(rel.get(d, 0.0), 0.0) / math.log2(r + 2) for r, d in enumerate(top[:k]))
        idcg = sum(g / math.log2(r + 2) for r, g in enumerate(grades[:k]))
        out.append(dcg / idcg)
    return out


def recall_at_k(ranked: Sequence[Sequence[str]], relevant: Sequence[Dict[str, float]], k: int) -> float:
    """Mean Recall@k over the queries with judgments (module docstring).

    Args:
        ranked: per query, document ids best first (at least its top k).
        relevant: per query, {doc_id: grade}.
    """
    _judged(ranked, relevant, "recall_at_k")
    vals = [v for v in recall_per_query(ranked, relevant, k) if v is not None]
    return sum(vals) / len(vals)


def ndcg_at_k(ranked: Sequence[Sequence[str]], relevant: Sequence[Dict[str, float]], k: int = 5) -> float:
    """Mean nDCG@k (linear gains, trec_eval's ``ndcg_cut.k``) over the queries with judgments."""
    _judged(ranked, relevant, "ndcg_at_k")
    vals = [v for v in ndcg_per_query(ranked, relevant, k) if v is not None]
    return sum(vals) / len(vals)


def write_trec_run(path, query_ids: Sequence[str], doc_ids: Sequence[str], scores: torch.Tensor, k: int,
                   tag: str = "moca", ties: str = "trec") -> None:
    """Write the top ``k`` of each query as a TREC run file: ``qid Q0 docid rank score tag`` per line (ranks from
    1, scores as float64 in shortest round-trip form, so trec_eval re-ranks them exactly as we did).

    Args:
        query_ids: the Q query ids; doc_ids: the N document ids; scores: [Q, N].
    """
    for name, ids in (("query", query_ids), ("document", doc_ids)):
        bad = [i for i in ids if not str(i) or any(c.isspace() for c in str(i))]
        if bad:
            raise ValueError(f"write_trec_run: {name} id {bad[0]!r} is empty or holds whitespace (TREC runs are "
                             "whitespace-separated)")
    ranked = rank_documents(scores, [str(d) for d in doc_ids], k=k, ties="trec")
    col = {str(d): j for j, d in enumerate(doc_ids)}
    s = torch.as_tensor(scores).detach().double().cpu()
    lines = []
    for i, (qid, top) in enumerate(zip(query_ids, ranked)):
        for r, d in enumerate(top, 1):
            lines.append(f"{qid} Q0 {d} {r} {float(s[i, col[d]])!r} {tag}\n")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)


def read_trec_run(path) -> Dict[str, Dict[str, float]]:
    """A TREC run file -> {qid: {docid: score}} (the form pytrec_eval and ranx take)."""
    run: Dict[str, Dict[str, float]] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 6:
                raise ValueError(f"{path}:{n}: expected 'qid Q0 docid rank score tag', got {line.strip()!r}")
            run.setdefault(parts[0], {})[parts[2]] = float(parts[4])
    return run
