"""Random masks and a low-precision PyTorch attention for the attention tests."""

import random

import torch

import moca_kernels as mk

KINDS = ("documents", "causal", "mixed")


def random_lengths(rng: random.Random, total: int, with_empty: bool = True):
    """Document lengths summing to ``total``: a mix of 1-token documents, short and long ones (and, when
    allowed, empty ones)."""
    lens, left = [], total
    while left > 0:
        pick = rng.random()
        n = 1 if pick < 0.25 else rng.randint(2, max(2, total // 2))
        n = min(n, left)
        lens.append(n)
        left -= n
        if with_empty and rng.random() < 0.1:
            lens.append(0)
    rng.shuffle(lens)
    return lens


def random_blocks(rng: random.Random, lens, image_prob: float = 0.35, max_image: int = 24) -> torch.Tensor:
    """int64 [T]: -1 for text, one id per image; images are contiguous runs inside a document, some start at
    the document start, some end at its end, ids repeat across documents (never on both sides of a document
    boundary: from_seqlens refuses that as one image split by the document lengths)."""
    T = sum(lens)
    blocks = torch.full((T,), -1, dtype=torch.int64)
    pos = 0
    for L in lens:
        i, next_id = 0, rng.randint(0, 3)
        while i < L:
            if rng.random() < image_prob:
                if i == 0 and pos > 0 and next_id == int(blocks[pos - 1]):
                    next_id += 1
                n = min(rng.randint(1, max_image), L - i)
                blocks[pos + i:pos + i + n] = next_id
                next_id += rng.randint(1, 2)
                i += n
            else:
                i += rng.randint(1, 4)
        pos += L
    return blocks


def random_mask(rng: random.Random, total: int, kind: str, device="cpu", **kw) -> mk.AttentionMask:
    lens = random_lengths(rng, total, kw.pop("with_empty", True))
    blocks = random_blocks(rng, lens, **kw).to(device) if kind == "mixed" else None
    return build_mask(lens, blocks, kind != "documents", device)


def build_mask(lens, blocks, causal: bool, device="cpu") -> mk.AttentionMask:
    """from_seqlens, or with documents of length 0 (which from_seqlens refuses, but from_padding_mask makes for
    rows of padding only, so the kernels must take them) the class constructor itself."""
    if 0 in lens:
        return mk.AttentionMask(lens, blocks, causal, device)
    return mk.AttentionMask.from_seqlens(lens, block_ids=blocks, causal=causal, device=device)


def naive_attention(q, k, v, mask, scale=None, return_lse=False):
    """Dense masked attention in the inputs' own dtype (PyTorch's own low-precision error, the tolerance
    baseline). q [T, Hq, D], k/v [T, Hkv, D]."""
    T, Hq, D = q.shape
    group = Hq // k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    kk = k.repeat_interleave(group, dim=1)
    vv = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,shd->hts", q, kk) * scale
    scores = scores.masked_fill(~mask.to_dense()[None], float("-inf"))
    out = torch.einsum("hts,shd->thd", torch.softmax(scores, -1), vv)
    if return_lse:
        return out, torch.logsumexp(scores.float(), -1)
    return out
