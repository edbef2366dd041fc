"""InfoNCELoss(gather_across_devices=True) against MultipleNegativesRankingLoss(gather_across_devices=True) in two
processes (gloo): on each rank the loss and the gradient of every local embedding column are equal (info_nce's
group= against sentence-transformers' all_gather_with_grad), with a hard-negative column."""

import pytest
import torch

from tests.helpers import gloo_worker, spawn_workers

pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")

B, D = 4, 8


def _worker(rank, world, port):
    with gloo_worker(rank, world, port):
        try:
            from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss as MNRL
        except ImportError:  # sentence-transformers < 6
            from sentence_transformers.losses import MultipleNegativesRankingLoss as MNRL
        from moca_kernels.integrations.sentence_transformers import InfoNCELoss

        g = torch.Generator().manual_seed(rank)
        columns = [torch.randn(B, D, generator=g, dtype=torch.float64) for _ in range(3)]   # anchor, pos, neg
        results = []
        for loss in (InfoNCELoss(None, scale=20.0, gather_across_devices=True, impl="torch"),
                     MNRL(None, scale=20.0, gather_across_devices=True)):
            emb = [c.clone().requires_grad_() for c in columns]
            value = loss.compute_loss_from_embeddings(emb, None)
            value.backward()
            results.append((value.detach(), [e.grad for e in emb]))
        (la, ga), (lb, gb) = results
        torch.testing.assert_close(la, lb, rtol=1e-12, atol=0)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.distributed
def test_gather_across_devices_equals_mnrl():
    spawn_workers(_worker, 2)
