"""GradCache.loss(): the second pass runs from the returned loss's backward (issue 12 item 2), so whatever the
caller multiplies the loss by (a gradient-accumulation divisor, a GradScaler's scale) reaches the parameters,
the autocast settings of the first pass are replayed although backward runs outside autocast, and under
no_grad only the first pass runs. (Before, a trainer could not back-propagate GradCache: step() ran its own
backward and returned a detached loss.)"""

import pytest
import torch

import moca_kernels as mk
from tests.moca_kernels.test_grad_cache import contrastive, full_batch_step, grads_of, make_batch, tower


pytestmark = pytest.mark.usefixtures("one_thread")


def test_backward_of_the_scaled_loss_gives_scaled_full_batch_gradients():
    torch.manual_seed(0)
    net = tower()
    t = torch.tensor(0.05, requires_grad=True)
    params = list(net.parameters()) + [t]
    queries, docs, ids = make_batch()
    loss_fn = contrastive(t, ids, impl="torch")
    cache = mk.GradCache(net, loss_fn, chunk_sizes=(3, 7))
    torch.manual_seed(4)
    loss = cache.loss(queries, docs)
    assert loss.requires_grad and all(p.grad is None for p in params)   # nothing back-propagated yet
    (0.25 * loss).backward()
    ours = grads_of(params)
    torch.manual_seed(4)
    ref = full_batch_step([net, net], lambda q, d: 0.25 * loss_fn(q, d), [queries, docs], (3, 7))
    torch.testing.assert_close(0.25 * loss.detach(), ref)
    for a, b in zip(ours, grads_of(params)):   # the temperature's gradient is scaled too
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_accumulating_two_halves_equals_one_step_on_the_same_batch():
    torch.manual_seed(0)
    net = tower(dropout=0.0)
    queries, docs, ids = make_batch()
    cache = mk.GradCache(net, contrastive(0.05, ids, impl="torch"), chunk_sizes=4)
    cache.step(queries, docs)
    once = grads_of(list(net.parameters()))
    for _ in range(2):
        (cache.loss(queries, docs) / 2).backward()
    for a, b in zip(grads_of(list(net.parameters())), once):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_autocast_of_the_first_pass_is_replayed_in_backward():
    torch.manual_seed(0)
    net = tower()
    params = list(net.parameters())
    queries, docs, ids = make_batch()
    loss_fn = contrastive(0.05, ids, impl="torch")
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)  # noqa: E731
    cache = mk.GradCache(net, loss_fn, chunk_sizes=(4, 8))
    torch.manual_seed(9)
    with autocast():
        loss = cache.loss(queries, docs)
    loss.backward()                    # outside autocast: the re-encoding must still run in bf16
    ours = grads_of(params)
    torch.manual_seed(9)
    full_batch_step([net, net], loss_fn, [queries, docs], (4, 8), forward_region=autocast)
    want = grads_of(params)
    for a, b in zip(ours, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    torch.manual_seed(9)               # control: a float32 forward gives other gradients
    full_batch_step([net, net], loss_fn, [queries, docs], (4, 8))
    assert max((a - b).abs().max().item() for a, b in zip(grads_of(params), want)) > 1e-4


def test_under_no_grad_only_the_first_pass_runs():
    torch.manual_seed(0)
    net = tower()
    calls = []
    net.register_forward_hook(lambda *a: calls.append(1))
    queries, docs, ids = make_batch()
    with torch.no_grad():
        loss = mk.GradCache(net, contrastive(0.05, ids, impl="torch"), chunk_sizes=8).loss(queries, docs)
    assert not loss.requires_grad and torch.isfinite(loss) and len(calls) == 2 + 4
