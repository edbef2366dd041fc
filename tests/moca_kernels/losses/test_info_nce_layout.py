"""info_nce(hard_negative_layout="columns"): hard negatives in sentence-transformers' order (every query's first,
then every query's second, ...) give the loss and gradients of the default grouped layout after reordering,
positive_index and doc_ids indexed in the columns order (issue 12 item 3: before, only the grouped layout existed
and feeding the columns order to hard_negative_scope="own" gave another loss without an error)."""

import pytest
import torch

import moca_kernels as mk


def test_info_nce_columns_layout_equals_grouped():
    """info_nce(hard_negative_layout="columns") = the grouped layout after reordering, values and gradients,
    positive_index and doc_ids indexed in the columns order; "own" with the wrong layout gives another loss."""
    g = torch.Generator().manual_seed(0)
    Bq, k, P, D = 5, 3, 7, 8
    q = torch.randn(Bq, D, generator=g, dtype=torch.float64, requires_grad=True)
    cols = torch.randn(P + Bq * k, D, generator=g, dtype=torch.float64, requires_grad=True)
    pos = torch.tensor([0, 3, 6, 2, 1])
    ids = torch.randint(0, 4, (P + Bq * k,), generator=g)
    grouped_rows = torch.cat([torch.arange(P), P + torch.arange(Bq * k).view(k, Bq).T.reshape(-1)])
    for scope in ("own", "batch"):
        a = mk.info_nce(q, cols, 0.1, pos, hard_negatives=k, hard_negative_scope=scope, doc_ids=ids,
                        hard_negative_layout="columns", symmetric=True)
        ga = torch.autograd.grad(a, (q, cols))
        b = mk.info_nce(q, cols[grouped_rows], 0.1, pos, hard_negatives=k, hard_negative_scope=scope,
                        doc_ids=ids[grouped_rows], symmetric=True)
        gb = torch.autograd.grad(b, (q, cols))
        assert torch.allclose(a, b, rtol=1e-13, atol=0) and all(torch.allclose(x, y, rtol=1e-12, atol=1e-14)
                                                                for x, y in zip(ga, gb))
    wrong = mk.info_nce(q, cols, 0.1, pos, hard_negatives=k, hard_negative_scope="own")
    assert abs(wrong.item() - mk.info_nce(q, cols[grouped_rows], 0.1, pos, hard_negatives=k,
                                          hard_negative_scope="own").item()) > 1e-3
    # a positive_index into the hard negatives ("batch" scope) follows the columns order
    pos_hard = torch.tensor([P + 0 * Bq + 4, 1, P + 2 * Bq + 0, 2, 3])   # query 4's 1st, query 0's 3rd negative
    a = mk.info_nce(q, cols, 0.1, pos_hard, hard_negatives=k, hard_negative_layout="columns")
    b = mk.info_nce(q, cols[grouped_rows], 0.1, torch.tensor([P + 4 * k + 0, 1, P + 0 * k + 2, 2, 3]),
                    hard_negatives=k)
    assert torch.allclose(a, b, rtol=1e-13, atol=0)
    with pytest.raises(ValueError, match="hard_negative_layout"):
        mk.info_nce(q, cols, 0.1, hard_negatives=k, hard_negative_layout="column")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_columns_layout_on_each_backend(impl):
    """float32 (the interpreter's bf16 tl.dot is wrong); the reorder happens before dispatch."""
    g = torch.Generator().manual_seed(1)
    Bq, k, D = 4, 2, 16
    q = torch.nn.functional.normalize(torch.randn(Bq, D, generator=g), dim=-1).requires_grad_()
    cols = torch.nn.functional.normalize(torch.randn(Bq + Bq * k, D, generator=g), dim=-1).requires_grad_()
    grouped_rows = torch.cat([torch.arange(Bq), Bq + torch.arange(Bq * k).view(k, Bq).T.reshape(-1)])
    a = mk.info_nce(q, cols, 0.05, impl=impl, hard_negatives=k, hard_negative_scope="own",
                    hard_negative_layout="columns")
    ga = torch.autograd.grad(a, (q, cols))
    b = mk.info_nce(q.double(), cols.double()[grouped_rows], 0.05, impl="torch", hard_negatives=k,
                    hard_negative_scope="own")
    gb = torch.autograd.grad(b, (q, cols))
    torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x.double(), y.double(), rtol=1e-4, atol=1e-5)
