"""info_nce: InfoNCE for contrastive training over large batches, with MoCa's options, on one GPU or many.

Every option reduces to one or two calls of a single "direction" primitive (``_OP``): rows x [R, D] scored
against columns y [C, D], loss_i = LSE over row i's allowed columns of s_ij - s_i,target(i), with
s_ij = x_i . y_j / t. The triton backend (``info_nce_triton``) never materialises the [R, C] logits; the torch
backend does (CPU fallback). See ``info_nce`` for the formulas and ``moca_kernels.distributed`` for ``group=``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from .._checks import (KERNEL_DTYPES, check_float, check_int, check_ndim, check_real, check_same_device,
                       compute_dtype)
from ..dispatch import Backend, Op, triton_reasons

_NAME = "info_nce"
SCOPES = ("batch", "own")
LAYOUTS = ("grouped", "columns")
_MIN_TEMPERATURE = torch.finfo(torch.float32).tiny


def info_nce(query: torch.Tensor, doc: torch.Tensor, temperature: Union[float, torch.Tensor] = 0.03,
             positive_index: Optional[torch.Tensor] = None, impl: Optional[str] = None, *,
             hard_negatives: int = 0, hard_negative_scope: str = "batch", symmetric: bool = False,
             doc_ids: Optional[torch.Tensor] = None, group=None,
             hard_negative_layout: str = "grouped") -> torch.Tensor:
    """InfoNCE over similarities q_i . d_j / t (cosine similarities when the embeddings are L2-normalised).

    Basic form, with s_ij = q_i . d_j / t and p(i) = positive_index[i]::

        loss = mean_i ( logsumexp_{j in A(i)} s_ij  -  s_i,p(i) )

    where A(i), the documents in row i's denominator, is every document unless the options below remove some.
    The positive p(i) is always in A(i), so no row is ever empty and every row's term is >= 0; a row whose
    other documents are all removed contributes exactly 0 and zero gradients (on GPU, up to the rounding of
    the logits recomputed in backward), never NaN.

    Args:
        query: [B, D] float32 / float16 / bfloat16 (float64 on the torch backend).
        doc: [M, D], same dtype as query. Layout with ``hard_negatives = k > 0``: the first P = M - B k rows are
            the in-batch documents (usually the positives), then the B k hard negatives, h_i,r = query i's r-th.
            ``hard_negative_layout="grouped"`` (default): query i's k at rows P + i k ... P + i k + k - 1::

                doc = [ d_0 ... d_{P-1} | h_0,0 ... h_0,k-1 | h_1,0 ... h_1,k-1 | ... | h_{B-1},k-1 ]
                        P = M - B k rows    query 0's k         query 1's k

            ``hard_negative_layout="columns"`` (sentence-transformers' order: ``torch.cat([positive,
            negative_1, ..., negative_k])``): every query's first negative, then every query's second, ...,
            h_i,r at row P + r B + i::

                doc = [ d_0 ... d_{P-1} | h_0,0 ... h_{B-1},0 | h_0,1 ... h_{B-1},1 | ... | h_{B-1},k-1 ]
                        P = M - B k rows    every first negative  every second negative

        temperature: a finite real number > 0 (not a bool or a string; at least float32's smallest normal
            number, 1.2e-38), or a tensor of one element (finite, > 0) that then receives a gradient
            d loss / d t = -(1/t) mean_i ( E_{softmax_i}[s_ij] - s_i,p(i) ).
        positive_index: [B] integer indices into doc (default arange(B), which needs M - B k >= B). Under
            ``hard_negative_scope="own"`` they must point into the first M - B k rows.
        impl: "triton", "torch" or None (automatic; see moca_kernels.dispatch).
        hard_negatives: k, the number of hard negatives per query at the end of ``doc`` (layout above); 0 = none.
        hard_negative_scope: which documents each query scores:
            "batch" (default, Tevatron style): every row of doc, i.e. A(i) = all M documents;
            "own" (MoCa's official code): the first M - B k rows plus only its own k hard negatives,
            A(i) = {j < M - B k} + {M - B k + i k + r, r < k}.
        symmetric: also score each query's positive against every query (document-to-query direction) and
            average the two directions::

                loss = ( loss_q->d + loss_d->q ) / 2,
                loss_d->q = mean_i ( logsumexp_{n in A'(i)} (d_p(i) . q_n / t) - d_p(i) . q_i / t )

            over the B queries n (A'(i): every query, less false negatives when doc_ids are given).
        doc_ids: [M] integer id per document, for false-negative masking: a document j != p(i) whose id equals
            the id of q_i's positive, doc_ids[p(i)], is left out of A(i). In the symmetric direction, a query
            n != i whose positive has that same id is left out of A'(i).
        group: a torch.distributed process group (or ``torch.distributed.group.WORLD``). Documents (and, when
            symmetric, queries) are gathered from every rank, in rank order, into the global batch that one
            process would hold: the in-batch rows of all ranks first, then all ranks' hard negatives. Each
            rank's loss covers its own B_r queries against that global set, weighted W / N (W ranks, N = sum
            of the B_r; the plain mean over its own queries when ranks hold equal batches), so the mean over
            ranks of the losses is the single-process loss on the global batch. Gradients flow back to the
            rank that owns each embedding, summed over every rank's loss; a DDP step, which averages
            parameter gradients over ranks, therefore equals single-process training on the global batch.
            Every rank must call with the same options.
        hard_negative_layout: "grouped" (default) or "columns": the order of the hard negatives in ``doc``
            (above). Only the order of the input differs: the loss is the same once each layout holds the same
            negatives; "columns" indexes ``positive_index`` and ``doc_ids`` in its own order too. It costs one
            copy of the B k hard-negative rows (and their ``doc_ids``). With ``group=``, each rank's ``doc``
            in this layout.

    Returns:
        float32 scalar (float64 on the torch backend for float64 inputs).

    Precision and memory (triton backend): logits are tl.dot products accumulated in fp32; bf16 / fp16 inputs
    use tensor cores; fp32 inputs use exact fp32 products unless ``torch.backends.cuda.matmul.allow_tf32`` is
    set, then tf32 tensor cores (the switch torch.matmul obeys, so both agree). Softmax and LSE are fp32.
    An enclosing ``torch.autocast`` region changes none of this: the inputs are used in their own dtype, forward
    and (triton) backward; cast them yourself to get bf16 products (the torch backend's backward is plain
    autograd and follows the autocast state of the ``.backward()`` call: call it outside autocast).
    Extra memory is O(B + M): per-row statistics forward; backward, a [rows, M] gradient chunk in the input
    dtype (at most B rows, else the larger of 4096 rows and ~256 MiB) plus an fp32 copy of d doc. The [B, M]
    logits are never materialised.

    Raises:
        ValueError / TypeError: dimension mismatch, an empty batch, positive_index out of range,
        non-positive temperature, a bad option value, a doc layout that does not fit the options, or tensors
        on different devices. Under torch.compile the two value checks (positive_index range, a tensor
        temperature > 0) are asserts inside the graph, so fullgraph=True works; they raise RuntimeError.
    """
    if hard_negative_layout not in LAYOUTS:
        raise ValueError(f"{_NAME}: hard_negative_layout must be one of {LAYOUTS}, got {hard_negative_layout!r}")
    k = _validate(query, doc, temperature, positive_index, hard_negatives, hard_negative_scope, symmetric,
                  doc_ids, group)
    if hard_negative_layout == "columns" and k > 1:
        doc, positive_index, doc_ids = _columns_to_grouped(doc, positive_index, doc_ids, query.shape[0], k)
    with _no_autocast(query.device):  # the inputs' own precision (above), whatever autocast region encloses us
        return _info_nce(query, doc, temperature, positive_index, impl, k, hard_negative_scope, symmetric, doc_ids,
                         group)


def _columns_to_grouped(doc, positive_index, doc_ids, B: int, k: int):
    """doc (and doc_ids) with the hard negatives reordered from the "columns" to the "grouped" layout;
    positive_index remapped to the new rows. Differentiable (a gather)."""
    P = doc.shape[0] - B * k
    hard = doc[P:].unflatten(0, (k, B)).transpose(0, 1).flatten(0, 1)        # column r*B+i -> row i*k+r
    doc = torch.cat([doc[:P], hard])
    if doc_ids is not None:
        doc_ids = torch.cat([doc_ids[:P], doc_ids[P:].unflatten(0, (k, B)).transpose(0, 1).flatten(0, 1)])
    if positive_index is not None:
        c = positive_index.long() - P
        grouped = P + (c % B) * k + torch.div(c, B, rounding_mode="floor")          # row P + r B + i -> P + i k + r
        positive_index = torch.where(c < 0, positive_index.long(), grouped)
    return doc, positive_index, doc_ids


def _no_autocast(device: torch.device):
    """Leave an enclosing autocast region: products in the inputs' dtype, not autocast's (fp32 inputs would
    otherwise be multiplied in bf16 by the torch backend and the triton backward's GEMMs)."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _info_nce(query, doc, temperature, positive_index, impl, k, hard_negative_scope, symmetric, doc_ids, group):
    B = query.shape[0]
    pos = (torch.arange(B, device=query.device) if positive_index is None else positive_index).long()
    ids = doc_ids.long() if doc_ids is not None else None
    plan = _plan(query, doc, pos, ids, k, hard_negative_scope, symmetric, group)
    t_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    t = (temperature.reshape(()).to(t_dtype) if torch.is_tensor(temperature)
         else torch.full((), float(temperature), dtype=t_dtype, device=query.device))

    own = hard_negative_scope == "own" and k > 0
    row_key = plan.doc_ids[plan.target] if ids is not None else None
    loss = plan.weight * _OP(
        impl, x=query, y=plan.doc, temperature=t, target=plan.target, row_key=row_key, col_key=plan.doc_ids,
        n_dense=plan.n_in_batch if own else plan.doc.shape[0], own_k=k if own else 0,
        own_offset=plan.query_offset)
    if symmetric:
        back = _OP(
            impl, x=plan.doc.index_select(0, plan.target), y=plan.queries, temperature=t,
            target=plan.query_offset + torch.arange(B, device=query.device), row_key=row_key,
            col_key=plan.query_ids, n_dense=plan.queries.shape[0], own_k=0, own_offset=0)
        loss = 0.5 * loss + (0.5 * plan.weight) * back
    return loss


def _validate(query, doc, temperature, positive_index, hard_negatives, scope, symmetric, doc_ids, group) -> int:
    check_float("query", query, _NAME)
    check_float("doc", doc, _NAME)
    check_ndim("query", query, 2, _NAME, "[B, D]")
    check_ndim("doc", doc, 2, _NAME, "[M, D]")
    if query.shape[1] != doc.shape[1]:
        raise ValueError(f"{_NAME}: query dim {query.shape[1]} != doc dim {doc.shape[1]} "
                         "(query [B, D], doc [M, D])")
    if query.shape[0] == 0 or doc.shape[0] == 0 or query.shape[1] == 0:
        raise ValueError(f"{_NAME}: empty batch (query {tuple(query.shape)}, doc {tuple(doc.shape)})")
    if query.dtype != doc.dtype:
        raise TypeError(f"{_NAME}: query ({query.dtype}) and doc ({doc.dtype}) must share one dtype")
    if isinstance(hard_negatives, bool) or not isinstance(hard_negatives, int) or hard_negatives < 0:
        raise ValueError(f"{_NAME}: hard_negatives must be an int >= 0 (hard negatives per query), "
                         f"got {hard_negatives!r}")
    if not isinstance(scope, str) or scope not in SCOPES:
        raise ValueError(f"{_NAME}: hard_negative_scope must be one of {SCOPES}, got {scope!r}")
    if not isinstance(symmetric, bool):
        raise TypeError(f"{_NAME}: symmetric must be a bool, got {type(symmetric).__name__}")
    B, M = query.shape[0], doc.shape[0]
    k = hard_negatives
    n_in_batch = M - B * k
    if n_in_batch < 1:
        raise ValueError(f"{_NAME}: doc has {M} rows but {B} queries x {k} hard negatives need {B * k} rows "
                         "after at least one in-batch document")
    if positive_index is None:
        if n_in_batch < B:
            raise ValueError(f"{_NAME}: without positive_index the first B = {B} rows of doc are the positives, "
                             f"but doc holds only {n_in_batch} rows before its {B * k} hard negatives")
    else:
        check_int("positive_index", positive_index, _NAME)
        if positive_index.shape != (B,):
            raise ValueError(f"{_NAME}: positive_index must have shape [{B}], got {tuple(positive_index.shape)}")
    if doc_ids is not None:
        check_int("doc_ids", doc_ids, _NAME)
        if doc_ids.shape != (M,):
            raise ValueError(f"{_NAME}: doc_ids must have shape [{M}] (one id per doc row), "
                             f"got {tuple(doc_ids.shape)}")
    t_tensor = torch.is_tensor(temperature)
    if temperature is None or isinstance(temperature, (str, bytes, bool)):
        raise TypeError(f"{_NAME}: temperature must be a float > 0 or a one-element float tensor, got "
                        f"{type(temperature).__name__} {temperature!r}")
    if t_tensor and (not temperature.is_floating_point() or temperature.numel() != 1):
        raise ValueError(f"{_NAME}: temperature must be a float or a one-element float tensor, "
                         f"got {temperature.dtype} of shape {tuple(temperature.shape)}")
    # devices before values: a value check on a tensor elsewhere would fail with a less clear error
    check_same_device(_NAME, query=query, doc=doc, positive_index=positive_index, doc_ids=doc_ids,
                      temperature=temperature if t_tensor else None)
    if positive_index is not None:
        limit = n_in_batch if scope == "own" else M
        where = (f"[0, {limit}) (the in-batch rows; hard_negative_scope='own')" if scope == "own" and k
                 else f"[0, {limit})")
        _require(((positive_index >= 0) & (positive_index < limit)).all(),
                 lambda: f"{_NAME}: positive_index out of range {where}")
    if t_tensor:
        t = temperature.detach().reshape(())
        _require(torch.isfinite(t) & (t > 0), lambda: f"{_NAME}: temperature must be > 0 and finite, got "
                 f"{temperature.item() if not torch.compiler.is_compiling() else 'a tensor <= 0 or not finite'}")
    else:
        value = check_real("temperature", temperature, _NAME)
        if not value >= _MIN_TEMPERATURE:
            raise ValueError(f"{_NAME}: temperature must be > 0 (and >= {_MIN_TEMPERATURE:.3g}, float32's smallest "
                             f"normal number, so that it survives the float32 cast), got {temperature!r}")
    if group is not None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"{_NAME}: group= needs torch.distributed to be initialised")
    return k


def _require(cond: torch.Tensor, message) -> None:
    """ValueError(message()) unless the bool tensor ``cond`` holds. Under torch.compile, an assert op in the graph
    instead of a data-dependent branch (so fullgraph=True works); it raises a RuntimeError when it fails."""
    if torch.compiler.is_compiling():
        torch._assert_async(cond, message())
    elif not bool(cond):
        raise ValueError(message())


# ---------------------------------------------------------------------------------------------------------
# The global batch: local, or gathered from every rank of ``group``.
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    doc: torch.Tensor                 # [M_all, D] documents: in-batch rows of all ranks, then all hard negatives
    target: torch.Tensor              # [B] int64 row of each local query's positive in ``doc``
    doc_ids: Optional[torch.Tensor]   # [M_all] int64
    n_in_batch: int                   # rows of ``doc`` before the hard negatives
    query_offset: int                 # global index of this rank's first query
    weight: float                     # 1 / B locally, W / N across ranks
    queries: Optional[torch.Tensor]   # [N, D] all queries (symmetric only)
    query_ids: Optional[torch.Tensor]  # [N] id of each query's positive (symmetric with doc_ids only)


def _plan(query, doc, pos, ids, k, scope, symmetric, group) -> _Plan:
    B, M = query.shape[0], doc.shape[0]
    n_in = M - B * k
    if group is None:
        return _Plan(doc, pos, ids, n_in, 0, 1.0 / B, query if symmetric else None,
                     ids[pos] if (symmetric and ids is not None) else None)
    from .. import distributed as mkd

    rank, w = mkd.world(group)
    sizes = mkd.gather_sizes([B, n_in], group, query.device)
    n_q = [s[0] for s in sizes]
    n_p = [s[1] for s in sizes]
    q_off, p_off = sum(n_q[:rank]), sum(n_p[:rank])
    p_all, n_all = sum(n_p), sum(n_q)

    def gather_docs(x, rows_in, rows_hard):
        if k == 0:
            return mkd.gather_rows(x, rows_in, group)
        return torch.cat([mkd.gather_rows(x[:n_in], rows_in, group), mkd.gather_rows(x[n_in:], rows_hard, group)])

    hard_rows = [b * k for b in n_q]
    doc_all = gather_docs(doc, n_p, hard_rows)
    ids_all = gather_docs(ids, n_p, hard_rows) if ids is not None else None
    # local row j -> global row: in-batch rows shift by this rank's in-batch offset, hard negatives by its
    # hard-negative offset
    target = torch.where(pos < n_in, pos + p_off, pos - n_in + p_all + q_off * k)
    queries = query_ids = None
    if symmetric:
        queries = mkd.gather_rows(query, n_q, group)
        if ids is not None:
            query_ids = ids_all[mkd.gather_rows(target, n_q, group)]
    return _Plan(doc_all, target, ids_all, p_all, q_off, w / n_all, queries, query_ids)


# ---------------------------------------------------------------------------------------------------------
# One direction: rows x against columns y. Backends.
# ---------------------------------------------------------------------------------------------------------


def _rows_torch(x, y, temperature, target, row_key, col_key, n_dense, own_k, own_offset):
    """sum_i ( logsumexp_{j allowed} s_ij - s_i,target(i) ), dense [R, C] logits (differentiable by autograd)."""
    cd = compute_dtype(x, y)
    s = (x.to(cd) @ y.to(cd).T) / temperature.to(cd)
    R, C = s.shape
    rows = torch.arange(R, device=x.device)[:, None]
    cols = torch.arange(C, device=x.device)[None, :]
    allowed = cols < n_dense
    if own_k:
        allowed = allowed | (torch.div(cols - n_dense, own_k, rounding_mode="floor") == rows + own_offset)
    if row_key is not None:
        allowed = allowed & ((col_key[None, :] != row_key[:, None]) | (cols == target[:, None]))
    lse = torch.logsumexp(s.masked_fill(~allowed, float("-inf")), dim=1)
    return (lse - s.gather(1, target[:, None])[:, 0]).sum()


@torch.library.custom_op("moca_kernels::info_nce_rows", mutates_args=())
def _fused(x: torch.Tensor, y: torch.Tensor, temperature: torch.Tensor, target: torch.Tensor,
           row_key: Optional[torch.Tensor], col_key: Optional[torch.Tensor], n_dense: int, own_k: int,
           own_offset: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum_i loss_i [], lse [R] and extra logits [R, k] or [0] in base 2 (for backward),
    sum_i (E[s_i] - s_i,target) [] (for the temperature gradient))."""
    from . import info_nce_triton as kernels

    lse2, pos2, expected2, extra2 = kernels.forward(x, y, temperature, target, row_key, col_key, n_dense, own_k,
                                                    own_offset)
    return ((lse2 - pos2).sum() * kernels.LN2, lse2, (expected2 - pos2).sum() * kernels.LN2,
            extra2 if extra2 is not None else lse2.new_empty(0))


@_fused.register_fake
def _(x, y, temperature, target, row_key, col_key, n_dense, own_k, own_offset):
    R = x.shape[0]
    f = dict(dtype=torch.float32, device=x.device)
    extra = x.new_empty((R, own_k) if own_k else (0,), **f)
    return x.new_empty((), **f), x.new_empty((R,), **f), x.new_empty((), **f), extra


@torch.library.custom_op("moca_kernels::info_nce_rows_backward", mutates_args=())
def _fused_backward(x: torch.Tensor, y: torch.Tensor, temperature: torch.Tensor, target: torch.Tensor,
                    row_key: Optional[torch.Tensor], col_key: Optional[torch.Tensor], lse: torch.Tensor,
                    extra: torch.Tensor, coef: torch.Tensor, n_dense: int, own_k: int, own_offset: int,
                    need_dx: bool, need_dy: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dx [R, D] or [0], dy [C, D] or [0]) of coef * sum_i loss_i."""
    from . import info_nce_triton as kernels

    dx, dy = kernels.backward(x, y, temperature, target, row_key, col_key, n_dense, own_k, own_offset, lse,
                              extra if own_k else None, coef, need_dx, need_dy)
    return (dx if dx is not None else x.new_empty(0)), (dy if dy is not None else y.new_empty(0))


@_fused_backward.register_fake
def _(x, y, temperature, target, row_key, col_key, lse, extra, coef, n_dense, own_k, own_offset, need_dx, need_dy):
    return x.new_empty(x.shape if need_dx else (0,)), y.new_empty(y.shape if need_dy else (0,))


def _setup_context(ctx, inputs, output):
    x, y, temperature, target, row_key, col_key, n_dense, own_k, own_offset = inputs
    _, lse, sum_dt, extra = output
    ctx.n_dense, ctx.own_k, ctx.own_offset = n_dense, own_k, own_offset
    ctx.mark_non_differentiable(lse, sum_dt, extra)
    ctx.save_for_backward(x, y, temperature, target, row_key, col_key, lse, sum_dt, extra)


def _backward(ctx, grad_loss, _g_lse, _g_dt, _g_extra):
    with _no_autocast(grad_loss.device):   # a .backward() called inside autocast must not make the GEMMs bf16
        return _backward_impl(ctx, grad_loss)


def _backward_impl(ctx, grad_loss):
    x, y, temperature, target, row_key, col_key, lse, sum_dt, extra = ctx.saved_tensors
    need_dx, need_dy, need_t = ctx.needs_input_grad[:3]
    coef = grad_loss.float() / temperature            # d loss / d (x_i . y_j) = grad * G_ij / t
    dx = dy = None
    if need_dx or need_dy:
        dx, dy = _fused_backward(x, y, temperature, target, row_key, col_key, lse, extra, coef, ctx.n_dense,
                                 ctx.own_k, ctx.own_offset, need_dx, need_dy)
    # s = x.y / t  =>  d loss / d t = -(1/t) sum_ij G_ij s_ij = -(1/t) sum_i (E[s_i] - s_i,target)
    dt = -coef * sum_dt if need_t else None
    return (dx if need_dx else None, dy if need_dy else None, dt, None, None, None, None, None, None)


torch.library.register_autograd("moca_kernels::info_nce_rows", _backward, setup_context=_setup_context)


def _rows_triton(x, y, temperature, target, row_key, col_key, n_dense, own_k, own_offset):
    x = x if x.stride(-1) == 1 else x.contiguous()
    y = y if y.stride(-1) == 1 else y.contiguous()
    keys = (None, None)
    if row_key is not None:  # ids -> dense int32 ranks (equality is all that matters): 32-bit compares per logit
        _, rank = torch.unique(torch.cat([row_key, col_key]), return_inverse=True)
        rank = rank.to(torch.int32)
        keys = (rank[:row_key.shape[0]], rank[row_key.shape[0]:])
    return _fused(x, y, temperature, target.contiguous(), *keys, n_dense, own_k, own_offset)[0]


def _triton_backend_reasons(x, y, temperature, target, row_key, col_key, n_dense, own_k, own_offset):
    why = triton_reasons(x, y, temperature, target, row_key, col_key)
    if x.dtype not in KERNEL_DTYPES:
        why.append(f"inputs are {x.dtype}; the triton kernels take float32, float16 and bfloat16")
    return why


_OP = Op(_NAME, [
    Backend("triton", _triton_backend_reasons, _rows_triton),
    Backend("torch", lambda **_: [], _rows_torch),
])

__all__ = ["info_nce"]
