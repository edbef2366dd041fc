"""info_nce: every option and their combinations against float64, on the triton (interpreted on CPU) and torch
backends; masking edge cases; bad inputs. GPU-only tests (bf16, tf32, large shapes, memory) are marked gpu."""

import contextlib
import itertools
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import moca_kernels as mk
from moca_kernels import _alloc, reference
from moca_kernels.dispatch import BackendUnavailable
from tests.helpers import assert_close_like_torch, rand

HAS_CUDA = torch.cuda.is_available()
B, D = 13, 24          # odd sizes: neither is a multiple of the tiles
IN_BATCH = B + 4        # in-batch documents (positives first, then 4 more)


def make_case(opts, dtype, device, B=B, D=D, in_batch=IN_BATCH, scale=1.0):
    """Random normalised embeddings in the layout the options describe, plus the options as info_nce kwargs."""
    g = torch.Generator().manual_seed(1234)
    k = opts.get("hard_negatives", 0)
    M = in_batch + B * k
    q = F.normalize(torch.randn(B, D, generator=g), dim=-1) * scale
    d = F.normalize(torch.randn(M, D, generator=g), dim=-1) * scale
    kw = dict(opts)
    if kw.pop("positives", None) == "shuffled":  # a permutation with two queries sharing one positive
        pos = torch.randperm(in_batch, generator=g)[:B]
        pos[3] = pos[7]
        kw["positive_index"] = pos.to(device)
    if kw.pop("ids", False):                      # few distinct ids: many collisions (false negatives)
        kw["doc_ids"] = torch.randint(0, 5, (M,), generator=g).to(device)
    t = torch.tensor(0.05, device=device)
    return q.to(device=device, dtype=dtype), d.to(device=device, dtype=dtype), t, kw


def loss_and_grads(fn, q, d, t, region=contextlib.nullcontext):
    """region: a context manager both passes run in (an autocast region)."""
    q, d, t = (x.detach().clone().requires_grad_() for x in (q, d, t))
    with region():
        loss = fn(q, d, t)
        (loss * 1.7).backward()   # a grad_output other than 1
    return loss.detach(), q.grad, d.grad, t.grad


def lowp_reference(q, d, t, **kw):
    """PyTorch computing the same loss in the inputs' own precision (logits, softmax and all): the baseline
    error of the tolerance rule."""
    with mock.patch.object(reference, "compute_dtype", lambda *ts: ts[0].dtype):
        return reference.info_nce(q, d, t.to(q.dtype), **kw)


def check_against_float64(impl, q, d, t, kw, factor=2.0, round_inputs=None, region=contextlib.nullcontext,
                          call=None):
    """round_inputs: emulates a lower product precision for PyTorch's baseline (tf32), by rounding its inputs.
    region: a context manager our forward and backward run in (the references run outside it); call: our loss
    as a function of (q, d, t), instead of info_nce(q, d, t, impl=impl, **kw)."""
    call = call or (lambda q, d, t: mk.info_nce(q, d, t, impl=impl, **kw))
    ours = loss_and_grads(call, q, d, t, region)
    ref = loss_and_grads(lambda q, d, t: reference.info_nce(q, d, t, **kw), q.double(), d.double(), t.double())
    bq, bd = (q, d) if round_inputs is None else (round_inputs(q), round_inputs(d))
    base = loss_and_grads(lambda q, d, t: lowp_reference(q, d, t, **kw), bq, bd, t)
    assert ours[0].dtype == torch.float32 and ours[0].shape == ()
    assert ours[1].dtype == q.dtype and ours[2].dtype == d.dtype
    for what, o, r, b in zip(("loss", "d query", "d doc", "d temperature"), ours, ref, base):
        assert_close_like_torch(o, r, b, dtype=q.dtype, factor=factor, what=what)


OPTIONS = {
    "plain": {},
    "positive_index": dict(positives="shuffled"),
    "hard_batch_scope": dict(hard_negatives=2),
    "hard_own_scope": dict(hard_negatives=2, hard_negative_scope="own", positives="shuffled"),
    "symmetric": dict(symmetric=True),
    "doc_ids": dict(ids=True),
    "own_symmetric_ids": dict(hard_negatives=3, hard_negative_scope="own", symmetric=True, ids=True,
                              positives="shuffled"),
    "batch_symmetric_ids": dict(hard_negatives=1, symmetric=True, ids=True, positives="shuffled"),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_torch_backend_matches_float64(name):
    q, d, t, kw = make_case(OPTIONS[name], torch.float32, "cpu")
    check_against_float64("torch", q, d, t, kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_triton_matches_float64(name, dtype, device):
    q, d, t, kw = make_case(OPTIONS[name], dtype, device)
    check_against_float64("triton", q, d, t, kw)


# Every combination of the options: positives (default / shuffled) x hard negatives (none / batch / own scope)
# x symmetric x false-negative ids.
COMBINATIONS = {
    f"{pos}-{hard}-{'sym' if sym else 'nosym'}-{'ids' if ids else 'noids'}": dict(
        {} if pos == "default" else dict(positives="shuffled"),
        **({} if hard == "none" else dict(hard_negatives=2, hard_negative_scope=hard)),
        **(dict(symmetric=True) if sym else {}), **(dict(ids=True) if ids else {}))
    for pos, hard, sym, ids in itertools.product(("default", "shuffled"), ("none", "batch", "own"),
                                                 (False, True), (False, True))
}


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("name", list(COMBINATIONS))
def test_every_option_combination_matches_float64(name, impl, device):
    q, d, t, kw = make_case(COMBINATIONS[name], torch.float32, device)
    check_against_float64(impl, q, d, t, kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_feature_dim_a_multiple_of_the_tile_matches_float64(dtype, device, one_config):
    """D = 64: the kernels' unmasked (EVEN_D) loads over D, the path of D = 2048 (D = 24 elsewhere takes the
    masked one)."""
    from moca_kernels.losses import info_nce_triton as kernels

    q, d, t, kw = make_case(OPTIONS["own_symmetric_ids"], dtype, device, D=64)
    assert all(64 % c.kwargs["BLOCK_D"] == 0 for c in kernels._fwd_kernel.configs + kernels._grad_kernel.configs)
    check_against_float64("triton", q, d, t, kw)


@pytest.mark.parametrize("impl, region", [("triton", "forward and backward"), ("torch", "forward")])
def test_an_enclosing_autocast_region_does_not_lower_the_precision(impl, region, device):
    """float32 inputs inside a bfloat16 autocast region: info_nce computes in the inputs' precision (as documented),
    not autocast's; the triton op's backward too. The torch backend's backward is plain autograd, which follows
    the autocast state of the .backward() call (PyTorch's advice: call it outside autocast, as GradCache does)."""
    q, d, t, kw = make_case(OPTIONS["own_symmetric_ids"], torch.float32, device)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731

    def forward(q, d, t):
        with autocast() if region == "forward" else contextlib.nullcontext():
            return mk.info_nce(q, d, t, impl=impl, **kw)

    check_against_float64(impl, q, d, t, kw, call=forward,
                          region=autocast if region == "forward and backward" else contextlib.nullcontext)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_column_splits_and_row_chunks_give_the_same_result(dtype, device, monkeypatch):
    """Forward split into several column ranges (merged on the host), backward in several row chunks
    (dDoc accumulated in fp32 across chunks)."""
    from moca_kernels.losses import info_nce_triton as kernels

    monkeypatch.setattr(kernels, "SPLIT_COLS", 16)
    monkeypatch.setattr(kernels, "G_CHUNK_ROWS", 5)
    q, d, t, kw = make_case(OPTIONS["own_symmetric_ids"], dtype, device)
    check_against_float64("triton", q, d, t, kw)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_rows_with_every_negative_masked_give_zero_loss_not_nan(impl, device):
    """All documents share one id: each query keeps only its positive, so every row's loss is exactly 0 and its
    gradients vanish (exactly on CPU; on GPU up to the rounding of the logits recomputed in backward)."""
    opts = dict(hard_negatives=2, hard_negative_scope="own", symmetric=True)
    q, d, t, kw = make_case(opts, torch.float32, device)
    kw["doc_ids"] = torch.zeros(d.shape[0], dtype=torch.long, device=device)
    loss, dq, dd, dt = loss_and_grads(lambda q, d, t: mk.info_nce(q, d, t, impl=impl, **kw), q, d, t)
    assert loss.item() == 0.0
    for g in (dq, dd, dt):
        assert torch.isfinite(g).all() and g.abs().max().item() <= (1e-6 if HAS_CUDA else 0.0)


def test_partly_masked_rows_match_float64(device):
    """Half the documents share the id of query 0's positive: that row keeps few negatives, others keep many."""
    q, d, t, kw = make_case(dict(hard_negatives=1, hard_negative_scope="own"), torch.float32, device)
    ids = torch.arange(d.shape[0], device=device)
    ids[::2] = ids[0]
    kw["doc_ids"] = ids
    check_against_float64("triton", q, d, t, kw)


def test_large_logits_stay_finite_and_exact(device):
    """Unnormalised embeddings and t = 0.01: logits in the hundreds; the online max keeps the LSE exact."""
    q, d, t, kw = make_case(dict(hard_negatives=2, symmetric=True), torch.float32, device, scale=3.0)
    t = torch.tensor(0.01, device=device)
    check_against_float64("triton", q, d, t, kw)


def test_float_and_tensor_temperatures_agree(device):
    q, d, _, _ = make_case({}, torch.float32, device)
    a = mk.info_nce(q, d, 0.07, impl="triton")
    t = torch.tensor([0.07], device=device, requires_grad=True)   # a one-element tensor of shape [1]
    b = mk.info_nce(q, d, t, impl="triton")
    b.backward()
    torch.testing.assert_close(a, b.detach())
    assert t.grad.shape == (1,) and torch.isfinite(t.grad).all()


@pytest.mark.parametrize("needs", ["query", "doc", "temperature"])
def test_gradient_for_only_one_input(needs, device):
    q, d, t, kw = make_case(OPTIONS["hard_own_scope"], torch.float32, device)
    ins = dict(query=q.clone(), doc=d.clone(), temperature=t.clone())
    ins[needs].requires_grad_()
    mk.info_nce(ins["query"], ins["doc"], ins["temperature"], impl="triton", **kw).backward()
    ref = {n: x.double().requires_grad_(n == needs) for n, x in (("query", q), ("doc", d), ("temperature", t))}
    reference.info_nce(ref["query"], ref["doc"], ref["temperature"], **kw).backward()
    torch.testing.assert_close(ins[needs].grad.double(), ref[needs].grad, rtol=1e-4, atol=1e-5)


def test_kernel_outputs_are_fully_written(device):
    """Poisoned (NaN-filled) output buffers change nothing: every element is written."""
    q, d, t, kw = make_case(OPTIONS["own_symmetric_ids"], torch.float32, device)
    fn = lambda q, d, t: mk.info_nce(q, d, t, impl="triton", **kw)  # noqa: E731
    clean = loss_and_grads(fn, q, d, t)
    with _alloc.poisoned():
        dirty = loss_and_grads(fn, q, d, t)
    for a, b in zip(clean, dirty):
        assert torch.equal(a, b)


def test_noncontiguous_inputs(device):
    q, d, t, kw = make_case({}, torch.float32, device)
    qt = torch.cat([q, q], dim=1)[:, ::2]        # stride 2 along D
    assert not qt.is_contiguous()
    check_against_float64("triton", qt, d, t, kw)


def test_bfloat16_is_not_interpreted():
    """On CPU the interpreter's bf16 tl.dot is wrong: automatic dispatch falls back to torch, forcing raises."""
    if HAS_CUDA:
        pytest.skip("CPU-only dispatch rule")
    q, d, t, kw = make_case({}, torch.bfloat16, "cpu")
    with pytest.raises(BackendUnavailable, match="bfloat16"):
        mk.info_nce(q, d, t, impl="triton")
    ours = mk.info_nce(q, d, t)
    torch.testing.assert_close(ours, reference.info_nce(q, d, t))


def test_custom_op_registration_passes_opcheck(device):
    """Schema, fake (meta) implementation and autograd registration of the fused op, as torch.compile sees them."""
    from moca_kernels.losses.info_nce import _fused

    R, P, k, dim = 13, 17, 2, 24
    x = torch.randn(R, dim, device=device, requires_grad=True)
    y = torch.randn(P + R * k, dim, device=device, requires_grad=True)
    t = torch.tensor(0.05, device=device, requires_grad=True)
    tgt = torch.randint(0, P, (R,), device=device)
    rk = torch.randint(0, 4, (R,), dtype=torch.int32, device=device)
    ck = torch.randint(0, 4, (P + R * k,), dtype=torch.int32, device=device)
    torch.library.opcheck(_fused, (x, y, t, tgt, None, None, P + R * k, 0, 0))
    torch.library.opcheck(_fused, (x, y, t, tgt, rk, ck, P, k, 0))


def test_works_under_torch_compile_fullgraph(device):
    """One graph with a learnable temperature, positive_index and every option: the value checks are graph asserts
    under compile (no data-dependent branch), which still reject bad values. aot_eager: the fused op is opaque to
    the compiler, so this checks tracing (fake implementation, autograd) without inductor's compile time."""
    q, d, t, kw = make_case(OPTIONS["own_symmetric_ids"], torch.float32, device)
    step = torch.compile(lambda q, d, t, p: mk.info_nce(q, d, t, p, impl="triton", **kw), fullgraph=True,
                         backend="aot_eager")
    pos = kw.pop("positive_index")
    check_against_float64("triton", q, d, t, dict(kw, positive_index=pos), call=lambda q, d, t: step(q, d, t, pos))
    with pytest.raises(RuntimeError, match="temperature must be > 0"):
        step(q, d, -t, pos)
    with pytest.raises(RuntimeError, match="positive_index out of range"):
        step(q, d, t, pos + d.shape[0])


def test_default_backend_is_triton_where_it_can_run(device):
    from moca_kernels.losses.info_nce import _OP

    q, d, t, _ = make_case({}, torch.float32, device)
    args = dict(x=q, y=d, temperature=t, target=torch.arange(B, device=device), row_key=None, col_key=None,
                n_dense=d.shape[0], own_k=0, own_offset=0)
    assert _OP.select(None, **args).name == "triton"


# ---------------------------------------------------------------------------------------------------------
# Bad inputs: one clear error each.
# ---------------------------------------------------------------------------------------------------------


def _bad(**over):
    q, d = rand(4, 8), rand(6, 8)
    args = dict(query=q, doc=d, temperature=0.05)
    args.update(over)
    return args


@pytest.mark.parametrize("args, err, match", [
    (_bad(doc=rand(6, 9)), ValueError, "dim"),
    (_bad(query=rand(0, 8)), ValueError, "empty"),
    (_bad(doc=rand(0, 8)), ValueError, "empty"),
    (_bad(positive_index=torch.tensor([0, 1, 2, 6])), ValueError, "out of range"),
    (_bad(positive_index=torch.tensor([0, 1, -1, 2])), ValueError, "out of range"),
    (_bad(positive_index=torch.tensor([0, 1, 2])), ValueError, r"shape \[4\]"),
    (_bad(positive_index=torch.tensor([0.0, 1, 2, 3])), TypeError, "integer"),
    (_bad(temperature=0.0), ValueError, "temperature must be > 0"),
    (_bad(temperature=-0.1), ValueError, "temperature must be > 0"),
    (_bad(temperature=torch.tensor(-0.1)), ValueError, "temperature must be > 0"),
    (_bad(temperature=torch.tensor([0.1, 0.2])), ValueError, "one-element"),
    (_bad(query=rand(4, 8, dtype=torch.float16)), TypeError, "share one dtype"),
    (_bad(query=rand(4, 8).long()), TypeError, "float32"),
    (_bad(query=rand(4, 8, 1)), ValueError, "2-D"),
    (_bad(hard_negatives=-1), ValueError, "hard_negatives"),
    (_bad(hard_negatives=2), ValueError, "hard negatives need"),
    (_bad(doc=rand(10, 8), hard_negatives=2), ValueError, "first B = 4 rows"),
    (_bad(doc=rand(14, 8), hard_negatives=2, hard_negative_scope="own", positive_index=torch.tensor([0, 1, 2, 6])),
     ValueError, "in-batch rows"),
    (_bad(hard_negative_scope="mine"), ValueError, "hard_negative_scope"),
    (_bad(doc_ids=torch.arange(5)), ValueError, r"doc_ids must have shape \[6\]"),
    (_bad(symmetric=1), TypeError, "symmetric"),
    (_bad(doc=rand(6, 8).to("meta")), ValueError, "one device"),
    (_bad(temperature=torch.tensor(0.05, device="meta")), ValueError, "one device"),
    (_bad(positive_index=torch.arange(4, device="meta")), ValueError, "one device"),
    (_bad(doc_ids=torch.arange(6, device="meta")), ValueError, "one device"),
    (_bad(group=object()), RuntimeError, "torch.distributed"),
])
def test_bad_input_raises_one_clear_error(args, err, match):
    with pytest.raises(err, match=match):
        mk.info_nce(**args)


def test_unknown_option_is_rejected():
    with pytest.raises(TypeError, match="hard_negative"):
        mk.info_nce(rand(4, 8), rand(4, 8), hard_negative=2)


# ---------------------------------------------------------------------------------------------------------
# GPU: bf16 / fp16 / fp32 (exact and tf32), larger shapes, several splits and chunks, memory.
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def one_config(monkeypatch):
    """Skip autotuning in tests: one tensor-core config and one CUDA-core (exact fp32) config, of which the
    pruning keeps the one the launch needs. Compile time, not correctness, is what tuning costs (under the
    interpreter there is one config anyway)."""
    from moca_kernels.losses import info_nce_triton as kernels

    for kern in (kernels._fwd_kernel, kernels._grad_kernel):
        tc = [c for c in kern.configs if not c.kwargs.get("FMA")][:1]
        fma = [c for c in kern.configs if c.kwargs.get("FMA")][:1]
        monkeypatch.setattr(kern, "configs", tc + fma)


# Few option sets per dtype: every (dtype, masking, even-D) variant is a Triton compile on the GPU machine.
GPU_OPTIONS = {torch.bfloat16: ["plain", "own_symmetric_ids", "batch_symmetric_ids"],
               torch.float16: ["own_symmetric_ids"], torch.float32: ["own_symmetric_ids"]}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_matches_float64(dtype, one_config):
    for name in GPU_OPTIONS[dtype]:
        q, d, t, kw = make_case(OPTIONS[name], dtype, "cuda", B=300, D=200, in_batch=337)
        check_against_float64("triton", q, d, t, kw)


@pytest.mark.gpu
def test_gpu_tf32_when_torch_allows_it(one_config, monkeypatch):
    """fp32 inputs with torch.backends.cuda.matmul.allow_tf32: tf32 products, judged against PyTorch computing
    on tf32-rounded inputs (torch 2.11's cuBLAS was seen keeping full fp32 at this size despite the flag, so its
    own matmul is no tf32 baseline)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    q, d, t, kw = make_case(OPTIONS["own_symmetric_ids"], torch.float32, "cuda", B=300, D=200, in_batch=337)

    def tf32(x):  # round to nearest on tf32's 10 mantissa bits
        bits = x.detach().contiguous().view(torch.int32)
        return ((bits + 0x1000) & -0x2000).view(torch.float32)

    # factor 3: which elements round worst differs between Triton's tf32 and the emulation
    check_against_float64("triton", q, d, t, kw, factor=3.0, round_inputs=tf32)


@pytest.mark.gpu
def test_gpu_large_batch_with_splits_and_chunks(one_config, monkeypatch):
    from moca_kernels.losses import info_nce_triton as kernels

    monkeypatch.setattr(kernels, "G_CHUNK_ROWS", 1536)   # 3 row chunks: fp32 accumulation of dDoc
    # D = 256, a multiple of every BLOCK_D: the unmasked (EVEN_D) loads of D = 2048 (the other GPU tests mask D)
    q, d, t, kw = make_case(dict(hard_negatives=1, hard_negative_scope="own", ids=True), torch.bfloat16, "cuda",
                            B=4000, D=256, in_batch=4100)
    check_against_float64("triton", q, d, t, kw)


@pytest.mark.gpu
def test_gpu_memory_stays_far_below_the_logits(one_config):
    """B = M = 16384, D = 456 bf16: the [B, M] fp32 logits would take 1 GiB; we use the G chunk + fp32 dDoc."""
    from moca_kernels.losses import info_nce_triton as kernels

    n, dim = 16384, 456
    q = torch.randn(n, dim, device="cuda", dtype=torch.bfloat16).requires_grad_()
    d = torch.randn(n, dim, device="cuda", dtype=torch.bfloat16).requires_grad_()
    mk.info_nce(q, d, impl="triton").backward()          # warm-up (compile) outside the measurement
    q.grad = d.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    mk.info_nce(q, d, impl="triton").backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grads = 2 * n * dim * 2
    budget = kernels.workspace_bytes(n, n, dim, 2) + grads + (48 << 20)   # + forward partials, small buffers
    assert extra <= budget, f"peak extra {extra / 2**20:.0f} MiB > workspace + grads {budget / 2**20:.0f} MiB"
    assert extra < n * n * 4 // 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="drives the interpreted kernel's tf32 branch")
def test_tf32_products_use_round_to_nearest_operands(monkeypatch):
    """In tf32 mode the kernels round fp32 operands to the nearest tf32 value before tl.dot. The interpreter
    multiplies whatever it is given exactly, so the forward loss must equal float64 math on rounded inputs,
    and differ from float64 math on the raw inputs."""
    from moca_kernels.losses import info_nce_triton as kernels

    monkeypatch.setattr(kernels, "dot_precision", lambda dtype: "tf32")
    q, d, t, kw = make_case(OPTIONS["plain"], torch.float32, "cpu")

    def tf32(x):
        bits = x.contiguous().view(torch.int32)
        return ((bits + 0x1000) & -0x2000).view(torch.float32)

    with torch.no_grad():
        ours = mk.info_nce(q, d, t, impl="triton").double()
    rounded = reference.info_nce(tf32(q).double(), tf32(d).double(), t.double())
    raw = reference.info_nce(q.double(), d.double(), t.double())
    assert abs(ours - rounded) < 1e-5 * abs(rounded)
    assert abs(raw - rounded) > 10 * abs(ours - rounded)
