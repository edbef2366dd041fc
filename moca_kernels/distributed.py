"""Collectives for cross-GPU contrastive losses: gathers whose backward returns each gradient to its owner.

``gather_rows(x, sizes, group)`` concatenates every rank's rows ``[sizes[0] + sizes[1] + ..., *x.shape[1:]]``
in rank order. Its backward sums, over all ranks, the gradient each rank computed for the gathered tensor and
hands every rank the rows it owns: the gradient of rank r's rows is d(sum_s loss_s) / d x_r, not only the
part that flowed through rank r's own copy. Ranks may hold different numbers of rows (padded internally).

Works with any backend: NCCL uses reduce_scatter in backward, gloo (no reduce_scatter) an all_reduce.
Every rank must make the same calls in the same order, forward and backward.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.distributed as dist


def world(group) -> tuple:
    """(rank, world size) within ``group``."""
    return dist.get_rank(group), dist.get_world_size(group)


def gather_sizes(values: Sequence[int], group, device) -> List[List[int]]:
    """Every rank's ``values`` (a few ints), as a list per rank."""
    _, w = world(group)
    mine = torch.tensor(list(values), dtype=torch.int64, device=device)
    out = [torch.empty_like(mine) for _ in range(w)]
    dist.all_gather(out, mine, group=group)
    return [t.tolist() for t in torch.stack(out).cpu()]


def _gather_padded(x: torch.Tensor, sizes: Sequence[int], group) -> torch.Tensor:
    _, w = world(group)
    x = x.contiguous()
    most = max(sizes)
    if x.shape[0] < most:
        x = torch.cat([x, x.new_zeros((most - x.shape[0],) + tuple(x.shape[1:]))])
    parts = [torch.empty_like(x) for _ in range(w)]
    dist.all_gather(parts, x, group=group)
    if all(s == most for s in sizes):
        return torch.cat(parts)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group = list(sizes), group
        return _gather_padded(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        sizes, group = ctx.sizes, ctx.group
        rank, w = world(group)
        most = max(sizes)
        grad = grad.contiguous()
        full = grad.new_zeros((w, most) + tuple(grad.shape[1:]))
        start = 0
        for r, s in enumerate(sizes):
            full[r, :s] = grad[start:start + s]
            start += s
        if dist.get_backend(group) == "nccl":
            mine = torch.empty_like(full[0])
            dist.reduce_scatter_tensor(mine, full, group=group)
        else:
            dist.all_reduce(full, group=group)
            mine = full[rank]
        return mine[:sizes[rank]], None, None


def gather_rows(x: torch.Tensor, sizes: Sequence[int], group) -> torch.Tensor:
    """All ranks' rows in rank order; differentiable (see the module docstring). ``sizes``: rows per rank."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _GatherRows.apply(x, list(sizes), group)
    return _gather_padded(x, sizes, group)
