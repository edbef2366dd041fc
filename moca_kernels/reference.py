"""Plain-PyTorch versions of every public op: CPU fallback, test oracle and benchmark baseline.

Kept short and obviously right. They compute in float32 (float64 when given float64, for oracle runs), return
losses as float32 (float64) scalars and outputs in the input dtype, and differentiate through autograd.
Inputs are assumed valid: the public ops in ``moca_kernels`` check them first.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ._checks import compute_dtype


def masked_attention(q, k, v, mask, scale: Optional[float] = None, return_lse: bool = False):
    """softmax(q k^T * scale + mask) v, per document of ``mask`` (an AttentionMask).

    q [T, Hq, D], k and v [T, Hkv, D] -> out [T, Hq, D] (input dtype), lse [Hq, T] (float32, float64 for float64).
    Query head h reads key/value head h // (Hq // Hkv).
    """
    cd = compute_dtype(q, k, v)
    T, Hq, D = q.shape
    group = Hq // k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    outs, lses = [], []
    end = 0
    for length in mask.seqlens:
        start, end = end, end + length
        if length == 0:
            continue
        qd = q[start:end].to(cd).transpose(0, 1)                                   # [Hq, L, D]
        kd = k[start:end].to(cd).transpose(0, 1).repeat_interleave(group, dim=0)   # [Hq, L, D]
        vd = v[start:end].to(cd).transpose(0, 1).repeat_interleave(group, dim=0)
        scores = (qd @ kd.transpose(1, 2)) * scale                                  # [Hq, L, L]
        if mask.causal:
            allowed = _doc_mask(mask, start, end).to(q.device)
            scores = scores.masked_fill(~allowed, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)                                       # [Hq, L]
        outs.append((torch.exp(scores - lse[..., None]) @ vd).transpose(0, 1))      # [L, Hq, D]
        lses.append(lse)
    out = torch.cat(outs, 0).to(q.dtype)
    return (out, torch.cat(lses, 1)) if return_lse else out


def _doc_mask(mask, start: int, end: int) -> torch.Tensor:
    """bool [L, L] of one document under the causal (+ blocks) rule."""
    idx = torch.arange(end - start, device=mask.device)
    allowed = idx[None, :] <= idx[:, None]
    if mask.block_ids is not None:
        b = mask.block_ids[start:end]
        allowed = allowed | ((b[:, None] == b[None, :]) & (b[:, None] >= 0))
    return allowed


def masked_patch_loss(pred, target, mask=None, norm_pix: bool = False, eps: float = 1e-6, weight: float = 1.0):
    """weight times the mean over counted rows and P of (pred - t)^2; t = target, or per row
    (target - mean) / sqrt(var + eps) with the unbiased variance (MAE's norm_pix_loss).

    pred, target [N, P]; mask bool [N] (True = counted) or None (all rows). No counted row: 0.
    """
    cd = compute_dtype(pred, target)
    p, t = pred.to(cd), target.to(cd)
    if norm_pix:
        t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True, unbiased=True) + eps).sqrt()
    per_row = (p - t).pow(2).mean(-1)                                               # [N]
    if mask is None:
        return per_row.mean() * weight
    w = mask.to(cd)
    return (per_row * w).sum() / w.sum().clamp(min=1) * weight


def masked_token_loss(hidden, weight, labels, bias=None, ignore_index: int = -100, reduction: str = "mean",
                      chunk_size: int = 2048):
    """Cross-entropy of hidden @ weight.T (+ bias) over the vocabulary at rows whose label != ignore_index.

    hidden [N, H], weight [V, H], labels [N] int, bias [V] or None. reduction "mean" (over counted rows; 0 when
    none), "sum", or "none" ([N], 0 at ignored rows). The logits are formed ``chunk_size`` rows at a time and
    recomputed in backward (checkpointing), so [N, V] is never held at once.
    """
    cd = compute_dtype(hidden, weight, bias)
    N = hidden.shape[0]
    keep = (labels != ignore_index).nonzero().squeeze(1)
    per_row = torch.zeros(N, dtype=cd, device=hidden.device)

    def chunk_loss(h, w, b, y):
        logits = h.to(cd) @ w.to(cd).T
        if b is not None:
            logits = logits + b.to(cd)
        return F.cross_entropy(logits, y.long(), reduction="none")

    parts = []
    for s in range(0, keep.numel(), chunk_size):
        rows = keep[s:s + chunk_size]
        args = (hidden[rows], weight, bias, labels[rows])
        grad_needed = torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in args[:3])
        parts.append(checkpoint(chunk_loss, *args, use_reentrant=False) if grad_needed else chunk_loss(*args))
    if parts:
        per_row = per_row.index_put((keep,), torch.cat(parts))
    else:  # keep the graph connected so backward gives zero gradients
        per_row = per_row + 0.0 * hidden.sum() + 0.0 * weight.sum() + (0.0 * bias.sum() if bias is not None else 0.0)
    if reduction == "none":
        return per_row
    total = per_row.sum()
    return total if reduction == "sum" else total / max(keep.numel(), 1)


def filter_tile_mask(d, block_m: int, block_v: int, filter_eps: float):
    """Cut Cross-Entropy's gradient filter on d = softmax - onehot [n, V]: bool [ceil(n / block_m),
    ceil(V / block_v)], True where the tile (rows from row 0, columns from column 0) is kept, i.e. some
    |d| >= filter_eps in it."""
    n, V = d.shape
    mt, vt = -(-n // block_m), -(-V // block_v)
    pad = d.abs().new_zeros(mt * block_m, vt * block_v)
    pad[:n, :V] = d.abs()
    return pad.view(mt, block_m, vt, block_v).amax(dim=(1, 3)) >= filter_eps


def vocab_order(hidden, weight, bias=None):
    """Cut Cross-Entropy's vocabulary order for the gradient filter: the columns sorted by their average logit
    over the rows, (mean_r hidden[r]) @ weight.T (+ bias) (one GEMV, no logits), so that tokens unlikely in every
    row share tiles and whole tiles drop out. hidden [n, H] counted rows, weight [V, H]. Returns int64 [V]."""
    mean = hidden.float().mean(0).to(weight.dtype)
    avg = (weight @ mean[:, None]).squeeze(1).float()
    if bias is not None:
        avg = avg + bias.float()
    return torch.argsort(avg)


class _FilteredTokenLoss(torch.autograd.Function):
    """Per counted row cross-entropy; backward with the gradient filter (dense [n, V], for tests)."""

    @staticmethod
    def forward(ctx, h, w, b, y, filter_eps, block_m, block_v, order):
        logits = h @ w.T + (b if b is not None else 0)
        lse = torch.logsumexp(logits, dim=1)
        ctx.save_for_backward(h, w, b, y, lse, order)
        ctx.cfg = (filter_eps, block_m, block_v)
        return lse - logits.gather(1, y[:, None]).squeeze(1)

    @staticmethod
    def backward(ctx, grad_rows):
        h, w, b, y, lse, order = ctx.saved_tensors
        filter_eps, block_m, block_v = ctx.cfg
        logits = h @ w.T + (b if b is not None else 0)
        d = (logits - lse[:, None]).exp()
        d[torch.arange(d.shape[0], device=d.device), y] -= 1.0
        kept = filter_tile_mask(d[:, order], block_m, block_v, filter_eps)      # tiles over the ordered columns
        keep = torch.empty_like(d, dtype=torch.bool)
        keep[:, order] = kept.repeat_interleave(block_m, 0).repeat_interleave(block_v, 1)[:d.shape[0], :d.shape[1]]
        g = torch.where(keep, d, torch.zeros_like(d)) * grad_rows[:, None]
        return (g @ w, g.T @ h, g.sum(0) if b is not None else None, None, None, None, None, None)


def masked_token_loss_filtered(hidden, weight, labels, filter_eps: float, bias=None, ignore_index: int = -100,
                               reduction: str = "mean", block_m: int = 128, block_v: int = 128, order=None):
    """masked_token_loss with Cut Cross-Entropy's gradient filter in backward: the loss is exact; in the
    gradient of the logits G = softmax - onehot over the counted rows (in order), with the vocabulary columns
    taken in ``order`` (int64 [V]; None: :func:`vocab_order` of the counted rows), every block_m x block_v tile
    whose |G| < filter_eps everywhere is dropped. Holds the [n, V] logits (a reference for small shapes)."""
    cd = compute_dtype(hidden, weight, bias)
    keep = (labels != ignore_index).nonzero().squeeze(1)
    if order is None:
        order = vocab_order(hidden[keep], weight, bias)
    rows = _FilteredTokenLoss.apply(hidden[keep].to(cd), weight.to(cd), bias.to(cd) if bias is not None else None,
                                    labels[keep].long(), float(filter_eps), block_m, block_v, order)
    per_row = torch.zeros(hidden.shape[0], dtype=cd, device=hidden.device).index_put((keep,), rows)
    if keep.numel() == 0:  # keep the graph connected so backward gives zero gradients
        per_row = per_row + 0.0 * hidden.sum() + 0.0 * weight.sum()
    if reduction == "none":
        return per_row
    total = per_row.sum()
    return total if reduction == "sum" else total / max(keep.numel(), 1)


def info_nce(query, doc, temperature=0.03, positive_index=None, hard_negatives=0, hard_negative_scope="batch",
             symmetric=False, doc_ids=None):
    """mean_i( logsumexp_{j allowed} (q_i . d_j / t) - q_i . d_pos(i) / t ), dense logits, one process.

    query [B, D], doc [M, D], positive_index [B] int into doc (default arange(B)), temperature float or tensor.
    Options (moca_kernels.info_nce has the full definitions): hard_negative_scope "own" lets query i score only
    the first M - B k docs and its own k hard negatives (rows M - B k + i k + r); doc_ids [M] leaves out docs
    sharing the id of the query's positive; symmetric averages in the doc->query direction.
    """
    cd = compute_dtype(query, doc)
    logits = (query.to(cd) @ doc.to(cd).T) / (temperature.to(cd) if torch.is_tensor(temperature) else temperature)
    B, M = logits.shape
    rows, cols = torch.arange(B, device=query.device), torch.arange(M, device=query.device)
    pos = rows if positive_index is None else positive_index.long()
    allowed = torch.ones(B, M, dtype=torch.bool, device=query.device)
    if hard_negative_scope == "own" and hard_negatives:
        first_hard = M - B * hard_negatives
        owner = torch.div(cols - first_hard, hard_negatives, rounding_mode="floor")  # query owning each hard negative
        allowed = (cols[None, :] < first_hard) | (owner[None, :] == rows[:, None])
    if doc_ids is not None:
        same = doc_ids[None, :] == doc_ids[pos][:, None]
        allowed = allowed & (~same | (cols[None, :] == pos[:, None]))
    loss = (torch.logsumexp(logits.masked_fill(~allowed, float("-inf")), 1) - logits[rows, pos]).mean()
    if not symmetric:
        return loss
    back = logits[:, pos].T                                             # [i, n] = d_pos(i) . q_n / t
    allowed_back = torch.ones(B, B, dtype=torch.bool, device=query.device)
    if doc_ids is not None:
        qid = doc_ids[pos]
        allowed_back = (qid[None, :] != qid[:, None]) | torch.eye(B, dtype=torch.bool, device=query.device)
    back_loss = (torch.logsumexp(back.masked_fill(~allowed_back, float("-inf")), 1) - back[rows, rows]).mean()
    return (loss + back_loss) / 2
