"""GradCache: a chunked step gives the parameter gradients of one backward through the whole batch (same
dropout masks), with module and function encoders, dict / tuple chunks, AMP autocast and GradScaler, and DDP
(gloo, 2 processes: no all-reduce before the last chunk, for a DDP encoder and for one named in sync_modules)."""

import contextlib

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import moca_kernels as mk

from tests.helpers import gloo_worker, spawn_workers

B, K, IN, OUT = 10, 2, 12, 16   # 10 queries, 2 hard negatives each; docs = 10 positives + 20 negatives


def tower(dropout=0.3):
    return nn.Sequential(nn.Linear(IN, 32), nn.GELU(), nn.Dropout(dropout), nn.Linear(32, OUT))


def make_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(B, IN, generator=g)
    docs = torch.randn(B + B * K, IN, generator=g)
    ids = torch.randint(0, 6, (B + B * K,), generator=g)
    return queries, docs, ids


def contrastive(temperature, ids, **kw):
    def loss_fn(q, d):
        return mk.info_nce(F.normalize(q, dim=-1), F.normalize(d, dim=-1), temperature, hard_negatives=K,
                           hard_negative_scope="own", symmetric=True, doc_ids=ids, **kw)
    return loss_fn


def grads_of(params):
    out = [p.grad.detach().clone() for p in params]
    for p in params:
        p.grad = None
    return out


def full_batch_step(encoders, loss_fn, batches, chunk_sizes, forward_region=contextlib.nullcontext):
    """The plain computation GradCache must equal: encode chunk by chunk *with* grad (drawing dropout masks in
    the same order as GradCache's first pass), concatenate, one loss, one backward through everything.
    forward_region: a context (autocast) for the forward only; the backward runs outside it, as PyTorch advises."""
    with forward_region():
        embs = [torch.cat([enc(c) for c in b.split(n)]) for enc, b, n in zip(encoders, batches, chunk_sizes)]
        loss = loss_fn(*embs)
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_gradients_equal_one_full_batch_backward_with_dropout(dev):
    """cuda: dropout draws from the CUDA generator, whose state GradCache replays."""
    torch.manual_seed(0)
    q_tower, d_tower = tower().to(dev), tower().to(dev)
    q_fn = lambda x: q_tower(x)  # noqa: E731  (a plain function encoder, next to a module encoder)
    t = torch.tensor(0.05, device=dev, requires_grad=True)
    params = list(q_tower.parameters()) + list(d_tower.parameters()) + [t]
    queries, docs, ids = (x.to(dev) for x in make_batch())
    loss_fn = contrastive(t, ids)
    sizes = (3, 7)                                          # query and document chunks differ
    rng_state = torch.get_rng_state if dev == "cpu" else torch.cuda.get_rng_state

    cache = mk.GradCache([q_fn, d_tower], loss_fn, chunk_sizes=sizes)
    torch.manual_seed(123)
    loss = cache.step(queries, docs)
    rng_after = rng_state()
    ours = grads_of(params)

    torch.manual_seed(123)
    ref = full_batch_step([q_fn, d_tower], loss_fn, [queries, docs], sizes)
    assert torch.equal(rng_after, rng_state()), "GradCache must leave the RNG as one pass would"
    want = grads_of(params)
    torch.testing.assert_close(loss, ref)
    for a, b in zip(ours, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)

    torch.manual_seed(124)                                  # control: other dropout masks, other gradients
    full_batch_step([q_fn, d_tower], loss_fn, [queries, docs], sizes)
    other = grads_of(params)
    assert max((a - b).abs().max().item() for a, b in zip(other[:-1], want[:-1])) > 1e-4


def test_shared_encoder_with_dict_and_tuple_chunks():
    torch.manual_seed(0)
    net = tower()

    def encode(x, scale=1.0, shift=None):
        out = net(x) * scale
        return out if shift is None else out + shift

    queries, docs, ids = make_batch()
    shift = torch.randn(docs.shape[0], OUT)
    loss_fn = contrastive(0.05, ids, impl="torch")
    cache = mk.GradCache(encode, loss_fn, chunk_sizes=4)
    torch.manual_seed(5)
    # a dict chunk is passed as encode(**chunk), a tuple chunk as encode(*chunk)
    cache.step({"x": queries, "scale": 2.0}, (docs, 1.0, shift))
    ours = grads_of(list(net.parameters()))

    torch.manual_seed(5)
    q = torch.cat([encode(c, scale=2.0) for c in queries.split(4)])
    d = torch.cat([encode(c, 1.0, s) for c, s in zip(docs.split(4), shift.split(4))])
    loss_fn(q, d).backward()
    for a, b in zip(ours, grads_of(list(net.parameters()))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_autocast_and_grad_scaler():
    """Under torch.autocast (bf16 on CPU) both forward passes run in mixed precision, the backward passes outside
    autocast (PyTorch's advice), so the float32 loss (info_nce upcasts) is differentiated in float32; with a
    GradScaler the parameter gradients come out scaled by its scale, and unscale_ recovers the full-batch ones.

    cache_enabled=False: with autocast's weight-cast cache, the full-batch reference would sum the chunks'
    weight gradients in bf16 (one shared bf16 weight copy), GradCache in fp32 (one backward per chunk);
    without it both sum in fp32 and must agree to fp32 rounding."""
    torch.manual_seed(0)
    net = tower()
    params = list(net.parameters())
    queries, docs, ids = make_batch()
    loss_fn = contrastive(0.05, ids, impl="torch")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    cache = mk.GradCache(net, loss_fn, chunk_sizes=(4, 8), scaler=scaler)
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)  # noqa: E731
    torch.manual_seed(9)
    with autocast():
        cache.step(queries, docs)
    scaled = grads_of(params)

    torch.manual_seed(9)
    full_batch_step([net, net], loss_fn, [queries, docs], (4, 8), forward_region=autocast)
    want = grads_of(params)
    for a, b in zip(scaled, want):
        torch.testing.assert_close(a / 1024.0, b, rtol=1e-5, atol=1e-7)
    opt = torch.optim.SGD(params, lr=0.1)
    for p, g in zip(params, scaled):
        p.grad = g
    scaler.unscale_(opt)
    for p, b in zip(params, want):
        torch.testing.assert_close(p.grad, b, rtol=1e-5, atol=1e-7)


def test_embeddings_the_loss_ignores_are_not_re_encoded():
    calls = []
    net = tower(0.0)

    def encode(x):
        calls.append(x.shape[0])
        return net(x)

    queries, docs, _ = make_batch()
    cache = mk.GradCache(encode, lambda q, d: q.pow(2).sum(), chunk_sizes=5)
    cache.step(queries, docs)
    assert calls == [5, 5, 5, 5, 5, 5, 5, 5, 5, 5]     # 8 no-grad chunks (2 + 6), then only the 2 query chunks


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(chunk_sizes=0), ValueError, "chunk_sizes"),
    (dict(chunk_sizes=(2, 0)), ValueError, "chunk_sizes"),
    (dict(encoders=3), TypeError, "callable"),
    (dict(encoders=[tower(), tower(), tower()]), ValueError, "3 encoders for 2 batches"),
    (dict(encoders=lambda x: "not a tensor"), TypeError, "tensor of embeddings"),
    (dict(loss_fn=lambda q, d: q), TypeError, "scalar"),
    (dict(loss_fn=lambda q, d: torch.tensor(1.0)), RuntimeError, "does not depend"),
])
def test_bad_usage_raises_one_clear_error(kwargs, err, match):
    args = dict(encoders=tower(), loss_fn=lambda q, d: (q.sum() + d.sum()), chunk_sizes=4)
    args.update(kwargs)
    queries, docs, _ = make_batch()
    with pytest.raises(err, match=match):
        mk.GradCache(args.pop("encoders"), args.pop("loss_fn"), **args).step(queries, docs)


def test_batch_that_cannot_be_split_along_dim0_asks_for_split_fn():
    cache = mk.GradCache(tower(), lambda q: q.sum(), chunk_sizes=4)
    with pytest.raises(ValueError, match="split_fn"):
        cache.step((torch.randn(8, IN), torch.randn(5, IN)))


# ---------------------------------------------------------------------------------------------------------
# DDP (gloo, 2 processes): one all-reduce per step, gradients equal one process on the global batch.
# ---------------------------------------------------------------------------------------------------------


def _ddp_worker(rank, world, port):
    with gloo_worker(rank, world, port):
        torch.manual_seed(0)
        net = tower(0.0)
        plain = tower(0.0)
        plain.load_state_dict(net.state_dict())
        ddp = nn.parallel.DistributedDataParallel(net)
        calls = []

        def counting_allreduce(state, bucket):
            calls.append(1)
            t = bucket.buffer().div_(world)
            return dist.all_reduce(t, async_op=True).get_future().then(lambda f: f.value()[0])

        ddp.register_comm_hook(None, counting_allreduce)
        data = [make_batch(seed=r) for r in range(world)]      # every rank's local batch
        queries, docs, ids = data[rank]
        loss_fn = contrastive(0.05, ids, impl="torch", group=dist.group.WORLD)
        mk.GradCache(ddp, loss_fn, chunk_sizes=(3, 7)).step(queries, docs)   # 4 + 5 chunks
        assert len(calls) == 1, f"expected one all-reduce (last chunk only), got {len(calls)}"

        # one process holding the global batch: queries, then all positives, then all hard negatives
        q_all = torch.cat([d[0] for d in data])
        d_all = torch.cat([d[1][:B] for d in data] + [d[1][B:] for d in data])
        ids_all = torch.cat([d[2][:B] for d in data] + [d[2][B:] for d in data])
        contrastive(0.05, ids_all, impl="torch")(plain(q_all), plain(d_all)).backward()
        for p, r in zip(ddp.module.parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad, r.grad, rtol=1e-4, atol=1e-6)  # fp32, other summation order

        # a function encoder that calls the DDP module: named in sync_modules, it syncs on the very last chunk
        ddp.zero_grad(set_to_none=True)
        calls.clear()
        mk.GradCache(lambda x: ddp(x) * 1.0, loss_fn, chunk_sizes=(3, 7), sync_modules=[ddp]).step(queries, docs)
        assert len(calls) == 1, f"sync_modules: expected one all-reduce (last chunk only), got {len(calls)}"
        for p, r in zip(ddp.module.parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad, r.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.distributed
def test_ddp_step_syncs_once_and_equals_one_process_on_the_global_batch():
    spawn_workers(_ddp_worker, 2)
