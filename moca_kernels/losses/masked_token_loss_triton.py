"""Triton kernels of masked_token_loss: fused LM head + cross-entropy, the [n, V] logits never stored whole.

Imported lazily (only when the triton backend runs), so moca_kernels works without triton installed. This
module holds the launchers; the kernels are in ``masked_token_loss_kernels.py`` (v1 and the backward GEMM) and
``masked_token_loss_desc.py`` (the descriptor variants v2, v3).

Notation: n counted rows (labels != ignore_index, compacted first), H hidden size, V vocabulary.
S = h @ W^T (+ b) are the logits, lse[r] = logsumexp_v S[r, v], loss[r] = lse[r] - S[r, y_r].
The gradient of sum_r g_r loss[r] is G = g_r (softmax(S) - onehot(y)), and
    dHidden = G @ W      [n, H]      dWeight = G^T @ h      [V, H]      dBias = sum_r G[r, :]   [V]

Passes over the logit tiles (each pass is 2 n H V FLOP on tensor cores):

1. Forward (``_lse_fwd_kernel``): one program owns BLOCK_M rows x one vocabulary split of SPLIT_V columns and
   walks its split tile by tile, each tile S = h @ W^T accumulated in float32 over H, keeping a running max
   and sum of exponentials per row (online log-sum-exp) and picking the label's logit when the label falls in
   the tile. It writes one partial log-sum-exp per (row, split) and the label logit; the splits are combined
   on the host side with a logsumexp over [n, n_splits]. Work 2nHV.
2. Backward, per vocabulary chunk of ``cv`` columns:
   a. ``_grad_logits_kernel`` recomputes S for [n, cv] from the saved lse and writes G (input dtype) into a
      chunk buffer [n, cv]; dBias comes from the float32 tile by atomics. Work 2nHcv.
   b. dWeight[chunk] = G^T @ h : one GEMM with the full reduction over n, written once, no accumulator.
   c. dHidden += G @ W[chunk] : one GEMM into a float32 accumulator [n, H] (fp32 across chunks).
   Work 4nHcv. Total forward + backward: 8 nHV (the "effective" 6 nHV counts one logit pass).

Why this split: dHidden needs every vocabulary column of a row and dWeight every row of a column, while G
needs the row's lse, known only after the whole vocabulary. Keeping G for all of [n, V] costs n V bytes x 2
(2.3 GiB at n = 8192); a float32 dWeight accumulator costs 1.16 GiB. Chunking the vocabulary keeps dWeight's
reduction inside one GEMM and accumulates only dHidden (n H x 4 bytes = 64 MiB at n = 8192) across chunks.
The G chunk is sized to the tuning setting ``mtl_g_chunk_bytes`` (48 MiB; at least MIN_CHUNK_V columns so the
accumulator's read-modify-write stays a small fraction of each GEMM).

The two backward GEMMs run on cuBLAS (``torch.mm`` / ``torch.addmm`` with float32 output) for bfloat16 and
float32 when available, otherwise on the Triton GEMM below (``_gemm_kernel``). float16 always takes the Triton
GEMM: its G is stored pre-scaled by 2^14 / max|g| (p * 2^14 stays a normal float16 number down to p ~ 4e-9,
where (p - y) / n_counted unscaled would flush to zero below p ~ 5e-4 at n = 8192) and the GEMM epilogue undoes
the scale in float32 before rounding.

Gradient filter (``backward(..., filter_eps=)``, opt-in; the op's ``filter_eps=``): Cut Cross-Entropy's. The
vocabulary is taken in its order (columns sorted by average logit, ``reference.vocab_order``); each chunk's G
kernel runs on the chunk's gathered weight rows, drops every tile whose |softmax - onehot| < filter_eps (zeros
stored) and marks the columns of kept tiles; the two GEMMs then multiply only those columns, gathered into a
compact block, and dWeight's rows are scattered back (rows of columns no kept tile reaches are zero). Only
whole columns of a chunk (all its rows) drop out of the GEMMs: the tile-level sparsity inside kept columns is
not exploited (bench/NOTES.md, "Gradient filter").

Kernel variants of the two tile kernels, parts "fwd" (the log-sum-exp forward) and "grad" (the backward's G
kernel) of the triton backend's variants in masked_token_loss.py (``impl="triton:v3"``: both kernels,
``"triton:fwd.v3+grad.v2"``: per kernel). They compute the same values; v1 stays the default until a GPU run
shows which is faster (``bench/bench_masked_token_loss.py --quick --profile`` times them side by side):

- ``v1``: the kernels above; operand tiles come through pointer loads (cp.async on sm_80+), one G tile per program.
- ``v2``: the same work per program, operand tiles through tensor descriptors (TMA on sm_90: one bulk copy per
  tile, out-of-range rows / columns / K zero-filled by the copy engine instead of masks), and candidates with
  automatic warp specialisation of the K loop (``tl.range(..., warp_specialize=True)``: a producer warp issues
  the copies while the consumer warps run the tensor-core dots).
- ``v3``: tensor descriptors, and the tile loop flattened with the K loop (``tl.range(..., flatten=True)``) so
  the next tile's first copies are issued while the current tile's epilogue runs: the forward's walk over its
  vocabulary split, and the G kernel as persistent programs (one per SM) looping over the chunk's tiles.

The descriptor variants need what the copy engine needs: unit stride along H and 16-byte aligned row strides
and base addresses of hidden and weight (:func:`descriptor_reasons`; the op refuses a forced variant without
it, never running another kernel; ``last_kernels`` says which ran).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import triton

from .. import _alloc, reference, tuning
from .masked_token_loss_desc import (_FWD_DESC, _GRAD_DESC, VARIANTS, _desc_configs, _descriptors,  # noqa: F401
                                     descriptor_reasons, reset_tuning)
from .masked_token_loss_kernels import (_FP16_G_RANGE, _INTERPRET, _gemm_kernel, _grad_logits_kernel,  # noqa: F401
                                        _lse_fwd_kernel, _tile_configs)

# The smallest backward G chunk (columns) whatever the budget (tuning setting mtl_g_chunk_bytes) says. The
# chunk width (mtl_vocab_chunk), the GEMM engine (mtl_bwd_gemm, MOCA_MTL_BWD_GEMM) and the descriptor
# kernels' forced config (mtl_desc_config) are tuning settings too.
MIN_CHUNK_V = 2048
# Last backward's GEMM engine, for benchmarks and tests to report.
last_bwd_gemm: Optional[str] = None

# Last call's kernel variant per tile kernel ("fwd", "grad"), for benchmarks and tests to report.
last_kernels: Dict[str, str] = {}

# Last filtered backward's tile counts {"tiles": all G tiles, "kept": tiles not filtered, "active_columns":
# vocabulary columns multiplied in the GEMMs, "columns": V}; empty after an exact backward.
last_filter_stats: Dict[str, int] = {}

# What each tile kernel runs by default (flip after a GPU measurement).
DEFAULT_VARIANT = {"fwd": "v1", "grad": "v1"}


# ---------------------------------------------------------------------------------------------------------
# Host launchers.
# ---------------------------------------------------------------------------------------------------------


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs: full-precision products, as torch.matmul does by default (tf32 would lose 13 bits)
    return "ieee" if dtype == torch.float32 else "tf32"


def split_v() -> int:
    """Vocabulary columns per forward split (a multiple of every config's BLOCK_V)."""
    return 32 if _INTERPRET else 4096


def lse_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                labels: torch.Tensor, variant: str = "v1") -> Tuple[torch.Tensor, torch.Tensor]:
    """hidden [n, H] (counted rows) and weight [V, H] of one dtype (float32 / float16 / bfloat16, any strides),
    bias [V] float (any stride) or None, labels int32 [n] in [0, V); variant: the forward kernel's.

    Returns (lse float32 [n], label logit float32 [n])."""
    bias = bias.contiguous() if bias is not None else None  # the kernels read bias[cols] at unit stride
    n, H = hidden.shape
    V = weight.shape[0]
    sv = split_v()
    n_splits = triton.cdiv(V, sv)
    part = _alloc.empty(n, n_splits, dtype=torch.float32, device=hidden.device)
    target = _alloc.empty(n, dtype=torch.float32, device=hidden.device)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]) * n_splits,)

    hd, wd = _descriptors(variant, hidden, weight)
    last_kernels["fwd"] = variant
    if variant == "v1":
        _lse_fwd_kernel[grid](
            hidden, weight, bias if bias is not None else part, labels, part, target,
            n, V, H, n_splits,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            SPLIT_V=sv, HAS_BIAS=bias is not None, DOT_PRECISION=_dot_precision(hidden.dtype),
        )
    else:
        _FWD_DESC[variant][grid](
            hd, wd, bias if bias is not None else part, labels, part, target,
            n, V, H, n_splits, hidden.element_size(),
            SPLIT_V=sv, HAS_BIAS=bias is not None, DOT_PRECISION=_dot_precision(hidden.dtype),
        )
    lse = part[:, 0] if n_splits == 1 else torch.logsumexp(part, dim=1)
    return lse, target


def _persistent_programs(device: torch.device) -> int:
    """Programs of the persistent (v3) G kernel: one per SM (3 under the interpreter, so tests take several
    tiles per program)."""
    if device.type != "cuda":
        return 3
    return torch.cuda.get_device_properties(device).multi_processor_count


def vocab_chunk(n: int, V: int, esize: int) -> int:
    """Columns of G per backward chunk: the mtl_g_chunk_bytes budget (48 MiB), at least MIN_CHUNK_V, a multiple of 256."""
    forced = tuning.get("mtl_vocab_chunk")
    if forced is not None:
        return max(1, min(forced, V))
    cv = tuning.get("mtl_g_chunk_bytes") // max(1, n * esize)
    cv = max(MIN_CHUNK_V, cv // 256 * 256)
    return min(cv, V)


_CUBLAS_FP32_OUT: Dict[Tuple[torch.dtype, int], bool] = {}


def cublas_fp32_accumulate_ok(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether torch.mm / torch.addmm take ``out_dtype=torch.float32`` for ``dtype`` inputs with a float32
    ``out`` that is also the added matrix (torch >= 2.8 on CUDA; the aliasing form was fixed later).
    Checked once per dtype and device on tiny deterministic matrices."""
    key = (dtype, device.index if device.index is not None else torch.cuda.current_device())
    if key not in _CUBLAS_FP32_OUT:
        ok = False
        try:
            a = (torch.arange(64 * 48, device=device, dtype=torch.float32).reshape(64, 48) * 0.37).sin().to(dtype)
            b = (torch.arange(48 * 40, device=device, dtype=torch.float32).reshape(48, 40) * 0.23).cos().to(dtype)
            exact = a.float() @ b.float()
            c = torch.empty(64, 40, device=device, dtype=torch.float32)
            torch.mm(a, b, out_dtype=torch.float32, out=c)
            first = torch.allclose(c, exact, rtol=1e-4, atol=1e-4)
            torch.addmm(c, a, b, out_dtype=torch.float32, out=c)
            ok = bool(first and torch.allclose(c, 2 * exact, rtol=1e-4, atol=1e-4))
        except Exception:  # TypeError / RuntimeError on torch without the float32-output overloads
            ok = False
        _CUBLAS_FP32_OUT[key] = ok
    return _CUBLAS_FP32_OUT[key]


def _bwd_engine(dtype: torch.dtype, device: torch.device) -> str:
    """"torch" (cuBLAS) or "triton" for the two backward GEMMs."""
    if dtype == torch.float16 or device.type != "cuda" or tuning.get("mtl_bwd_gemm") == "triton":
        return "triton"   # float16: G is pre-scaled and only the Triton epilogue undoes it in float32
    if dtype == torch.float32:
        return "torch"
    return "torch" if cublas_fp32_accumulate_ok(dtype, device) else "triton"


def _gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, accumulate: bool, scale: Optional[torch.Tensor]):
    """c (=|+=) scale * a @ b on the Triton GEMM, float32 accumulation."""
    M, K = a.shape
    N = b.shape[1]

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _gemm_kernel[grid](
        a, b, c, scale if scale is not None else c, M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        ACCUMULATE=accumulate, HAS_SCALE=scale is not None, DOT_PRECISION=_dot_precision(a.dtype),
    )


def _filtered_chunk_gemms(g, sel, ids, hidden, w_chunk, dweight, acc, engine, dtype, first, inv_scale,
                          need_weight, need_hidden):
    """A filtered chunk's two GEMMs. g [n, width] is G over the vocabulary ids ``ids`` (int64 [width], in the
    filter's order), w_chunk [width, H] = weight[ids]; sel (int64 [k]) the active columns of g, or None for
    all. G[:, sel] and W[ids[sel]] are gathered into compact blocks; dWeight's rows ids[sel] are written (the
    caller zeroed the others)."""
    if sel is None:
        gc, wc, rows_w = g, w_chunk, ids
    elif sel.numel() == 0:
        return
    else:
        gc, wc, rows_w = g.index_select(1, sel), w_chunk.index_select(0, sel), ids.index_select(0, sel)
    k = gc.shape[1]
    if need_weight:
        out = torch.empty(k, hidden.shape[1], dtype=dweight.dtype, device=dweight.device)
        if engine == "torch":
            torch.mm(gc.t(), hidden, out=out)
        else:
            _gemm(gc.t(), hidden, out, accumulate=False, scale=inv_scale)
        dweight.index_copy_(0, rows_w, out)
    if need_hidden:
        if engine == "triton":
            _gemm(gc, wc, acc, accumulate=not first, scale=inv_scale)
        elif dtype == torch.float32:
            torch.mm(gc, wc, out=acc) if first else torch.addmm(acc, gc, wc, out=acc)
        elif first:
            torch.mm(gc, wc, out_dtype=torch.float32, out=acc)
        else:
            torch.addmm(acc, gc, wc, out_dtype=torch.float32, out=acc)


def backward(grad_rows: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             labels: torch.Tensor, lse: torch.Tensor, need_hidden: bool, need_weight: bool, need_bias: bool,
             variant: str = "v1", filter_eps: float = 0.0):
    """Gradients of sum_r grad_rows[r] * loss[r] over the counted rows.

    hidden [n, H] counted rows and weight [V, H] of one dtype (float32 / float16 / bfloat16, any strides),
    bias [V] float (any stride) or None, labels int32 [n], lse float32 [n], grad_rows float32 [n] (contiguous).
    variant: the G kernel's. filter_eps > 0: Cut Cross-Entropy's gradient filter (G tiles whose
    |softmax - onehot| < filter_eps everywhere are dropped; the GEMMs multiply only the vocabulary columns of
    kept tiles, gathered into a compact block: one host synchronisation per chunk); 0: exact.
    Returns (d hidden [n, H] input dtype, d weight [V, H] weight dtype, d bias [V] float32), each None when not
    asked for.
    """
    global last_bwd_gemm
    bias = bias.contiguous() if bias is not None else None  # the kernels read bias[cols] at unit stride
    n, H = hidden.shape
    V = weight.shape[0]
    dtype = hidden.dtype
    device = hidden.device
    engine = _bwd_engine(dtype, device)
    last_bwd_gemm = engine
    if engine == "torch" and hidden.stride(1) != 1:
        hidden = hidden.contiguous()  # one copy instead of one inside every chunk's GEMM

    scaled = dtype == torch.float16
    inv_scale = None
    gscale = grad_rows
    if scaled:
        # G in float16 would flush softmax values below 6e-8 to zero; store it scaled by R = 2^14 / max|g|
        gmax = grad_rows.abs().amax()
        r = _FP16_G_RANGE / gmax
        r = torch.where(torch.isfinite(r) & (r > 0), r, torch.ones_like(r))
        gscale = grad_rows * r
        inv_scale = (1.0 / r).reshape(1).to(torch.float32)

    dweight = _alloc.empty(V, H, dtype=weight.dtype, device=device) if need_weight else None
    dbias = torch.zeros(V, dtype=torch.float32, device=device) if need_bias else None
    acc = None
    if need_hidden:
        acc = _alloc.empty(n, H, dtype=torch.float32, device=device)  # written whole by the first chunk
    if not (need_hidden or need_weight or need_bias):
        return None, None, None

    cv = vocab_chunk(n, V, hidden.element_size())
    g_buf = _alloc.empty(n * cv, dtype=dtype, device=device)
    precision = _dot_precision(dtype)
    hd, wd = _descriptors(variant, hidden, weight)
    last_kernels["grad"] = variant
    programs = _persistent_programs(device) if variant == "v3" else None
    filtering = filter_eps > 0
    if filtering:
        active = torch.zeros(cv, dtype=torch.int8, device=device)
        stats = torch.zeros(2, dtype=torch.int32, device=device)
        n_active = 0
        # Cut Cross-Entropy's order: columns sorted by average logit, so unlikely tokens share tiles; the G
        # kernel runs on each chunk's gathered weight rows with the labels' positions in the order
        order = reference.vocab_order(hidden, weight, bias)
        position = torch.empty_like(order)
        position[order] = torch.arange(V, device=device)
        label_pos = position.index_select(0, labels.long())
        if need_weight:
            dweight.zero_()  # rows of columns no kept tile reaches stay zero
    else:
        active = stats = lse  # unused by the kernels without FILTER
    last_filter_stats.clear()
    first = True
    for v0 in range(0, V, cv):
        width = min(cv, V - v0)
        g = g_buf[: n * width].view(n, width)

        def grid(meta):
            tiles = triton.cdiv(n, meta["BLOCK_M"]) * triton.cdiv(width, meta["BLOCK_V"])
            return (tiles if programs is None else min(tiles, programs),)

        if filtering:  # the chunk's columns in the filter's order, as a vocabulary of its own
            ids = order[v0:v0 + width]
            k_weight = weight.index_select(0, ids)
            k_bias = bias.index_select(0, ids) if bias is not None else None
            k_labels = (label_pos - v0).to(torch.int32)     # outside [0, width): not in this chunk
            k_dbias = torch.zeros(width, dtype=torch.float32, device=device) if need_bias else None
            k_V, k_v0 = width, 0
            k_hd, k_wd = _descriptors(variant, hidden, k_weight)
        else:
            k_weight, k_bias, k_labels, k_dbias, k_V, k_v0, k_hd, k_wd = weight, bias, labels, dbias, V, v0, hd, wd
        if variant == "v1":
            _grad_logits_kernel[grid](
                hidden, k_weight, k_bias if k_bias is not None else lse, k_labels, lse, gscale,
                inv_scale if inv_scale is not None else lse, g, k_dbias if k_dbias is not None else lse,
                filter_eps, active, stats, n, k_V, H, k_v0, width,
                hidden.stride(0), hidden.stride(1), k_weight.stride(0), k_weight.stride(1),
                HAS_BIAS=bias is not None, BIAS_GRAD=need_bias, HAS_SCALE=scaled, FILTER=filtering,
                DOT_PRECISION=precision,
            )
        else:
            _GRAD_DESC[variant][grid](
                k_hd, k_wd, k_bias if k_bias is not None else lse, k_labels, lse, gscale,
                inv_scale if inv_scale is not None else lse, g, k_dbias if k_dbias is not None else lse,
                filter_eps, active, stats, n, k_V, H, k_v0, width, hidden.element_size(),
                HAS_BIAS=bias is not None, BIAS_GRAD=need_bias, HAS_SCALE=scaled, FILTER=filtering,
                DOT_PRECISION=precision,
            )
        w_chunk = weight[v0:v0 + width]
        if filtering:
            if need_bias:
                dbias.index_copy_(0, ids, k_dbias)
            cols = active[:width].nonzero().squeeze(1)  # host sync: the compact block's width
            active.zero_()
            n_active += cols.numel()
            _filtered_chunk_gemms(g, cols if cols.numel() < width else None, ids, hidden, k_weight, dweight, acc,
                                  engine, dtype, first, inv_scale, need_weight, need_hidden)
            first = first and not (need_hidden and cols.numel() > 0)
            continue
        if need_weight:
            out = dweight[v0:v0 + width]
            if engine == "torch":
                torch.mm(g.t(), hidden, out=out)
            else:
                _gemm(g.t(), hidden, out, accumulate=False, scale=inv_scale)
        if need_hidden:
            if engine == "torch":
                if dtype == torch.float32 and first:
                    torch.mm(g, w_chunk, out=acc)
                elif dtype == torch.float32:
                    torch.addmm(acc, g, w_chunk, out=acc)
                elif first:
                    torch.mm(g, w_chunk, out_dtype=torch.float32, out=acc)
                else:
                    torch.addmm(acc, g, w_chunk, out_dtype=torch.float32, out=acc)
            else:
                _gemm(g, w_chunk, acc, accumulate=not first, scale=inv_scale)
        first = False
    del g_buf, g
    if filtering:
        tiles, kept = stats.tolist()
        last_filter_stats.update(tiles=tiles, kept=kept, active_columns=n_active, columns=V)
    if need_hidden and first:  # every chunk filtered away: dHidden is zero
        acc.zero_()
    dhidden = None
    if need_hidden:
        dhidden = acc if dtype == torch.float32 else acc.to(dtype)
    return dhidden, dweight, dbias
