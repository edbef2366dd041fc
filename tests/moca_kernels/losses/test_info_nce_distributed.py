"""info_nce(group=...) on CPU with gloo, 2 and 3 processes: each rank's loss and gradients against one process
holding the whole (global) batch, for uneven per-rank batches and every option, on both backends."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import moca_kernels as mk
from moca_kernels import reference

from tests.helpers import gloo_worker, spawn_workers

D = 12

# Each case: queries per rank (cycled over ranks), extra in-batch docs per rank, options, dtype, backend.
CASES = [
    dict(name="plain equal batches", queries=[5], extra=[2], opts={}, positives="default"),
    dict(name="own hard negatives + symmetric + ids, uneven", queries=[4, 6, 3], extra=[3, 1, 2],
         opts=dict(hard_negatives=2, hard_negative_scope="own", symmetric=True), ids=True, positives="shuffled"),
    dict(name="batch-scope hard negatives, a positive among them", queries=[3, 5, 4], extra=[1, 2, 0],
         opts=dict(hard_negatives=1, symmetric=True), ids=True, positives="into_hard"),
    dict(name="triton fp32, own scope + symmetric + ids", queries=[5, 4, 3], extra=[2, 0, 1],
         opts=dict(hard_negatives=2, hard_negative_scope="own", symmetric=True), ids=True, positives="shuffled",
         impl="triton"),
]


def _rank_data(case, world):
    """Every rank's (queries, in-batch docs, hard negatives, local positive_index, in-batch ids, hard ids)."""
    g = torch.Generator().manual_seed(11)
    k = case["opts"].get("hard_negatives", 0)
    out = []
    for r in range(world):
        b = case["queries"][r % len(case["queries"])]
        p = b + case["extra"][r % len(case["extra"])]
        q = F.normalize(torch.randn(b, D, generator=g, dtype=torch.float64), dim=-1)
        docs = F.normalize(torch.randn(p, D, generator=g, dtype=torch.float64), dim=-1)
        hard = F.normalize(torch.randn(b * k, D, generator=g, dtype=torch.float64), dim=-1)
        if case["positives"] == "default":
            pos = None
        else:
            pos = torch.randperm(p, generator=g)[:b]
            if case["positives"] == "into_hard":
                pos[0] = p + b * k - 1        # the last hard negative of this rank serves as a positive
        ids_docs = torch.randint(0, 4, (p,), generator=g) if case.get("ids") else None
        ids_hard = torch.randint(0, 4, (b * k,), generator=g) if case.get("ids") else None
        out.append((q, docs, hard, pos, ids_docs, ids_hard))
    return out


def _global_batch(data, k):
    """The single-process batch: all queries; all in-batch docs, then all hard negatives; positives mapped."""
    qs, docs, hards, poss, idd, idh = zip(*data)
    n_in = [d.shape[0] for d in docs]
    n_q = [q.shape[0] for q in qs]
    p_all = sum(n_in)
    pos = []
    for r, p in enumerate(poss):
        p = torch.arange(n_q[r]) if p is None else p
        hard_row = p_all + sum(n_q[:r]) * k + (p - n_in[r])
        pos.append(torch.where(p < n_in[r], p + sum(n_in[:r]), hard_row))
    ids = torch.cat(list(idd) + list(idh)) if idd[0] is not None else None
    return torch.cat(qs), torch.cat(list(docs) + list(hards)), torch.cat(pos), ids


def _check_case(rank, world, case):
    k = case["opts"].get("hard_negatives", 0)
    impl = case.get("impl", "torch")
    dtype = torch.float32 if impl == "triton" else torch.float64
    tol = dict(rtol=2e-4, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-12)
    data = _rank_data(case, world)
    q, docs, hard, pos, ids_docs, ids_hard = data[rank]
    doc = torch.cat([docs, hard]).to(dtype).requires_grad_()
    q = q.to(dtype).clone().requires_grad_()
    t = torch.tensor(0.05, dtype=dtype, requires_grad=True)
    ids = torch.cat([ids_docs, ids_hard]) if ids_docs is not None else None
    loss = mk.info_nce(q, doc, t, positive_index=pos, doc_ids=ids, group=dist.group.WORLD, impl=impl,
                       **case["opts"])
    loss.backward()

    Q, DOC, POS, IDS = _global_batch(data, k)
    Q, DOC = Q.requires_grad_(), DOC.requires_grad_()
    T = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    ref = reference.info_nce(Q, DOC, T, positive_index=POS, doc_ids=IDS, **case["opts"])
    ref.backward()

    # mean over ranks of the losses (and of the temperature gradients) = the single-process values
    stats = torch.stack([loss.detach(), t.grad]).double()
    dist.all_reduce(stats)
    msg = lambda m: f"{case['name']} (rank {rank} of {world}): {m}"  # noqa: E731
    torch.testing.assert_close(stats / world, torch.stack([ref.detach(), T.grad]), **tol, msg=msg)
    # each embedding's gradient, summed over every rank's loss, is world x the single-process gradient
    n_q = [d[0].shape[0] for d in data]
    n_in = [d[1].shape[0] for d in data]
    q0, p0, h0 = sum(n_q[:rank]), sum(n_in[:rank]), sum(n_in) + sum(n_q[:rank]) * k
    torch.testing.assert_close(q.grad.double() / world, Q.grad[q0:q0 + n_q[rank]], **tol, msg=msg)
    want_doc = torch.cat([DOC.grad[p0:p0 + n_in[rank]], DOC.grad[h0:h0 + n_q[rank] * k]])
    torch.testing.assert_close(doc.grad.double() / world, want_doc, **tol, msg=msg)


def _worker(rank, world, port, cases):
    with gloo_worker(rank, world, port):
        for case in cases:
            _check_case(rank, world, case)


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3])
def test_distributed_loss_and_gradients_equal_one_process_on_the_global_batch(world):
    # gloo runs on CPU tensors: the triton case needs the interpreter (set by conftest when there is no GPU)
    cases = [c for c in CASES if c.get("impl") != "triton" or os.environ.get("TRITON_INTERPRET") == "1"]
    spawn_workers(_worker, world, cases)
