"""Benchmark: masked_attention over packed sequences against FlexAttention, torch varlen_attn and SDPA.

Headline (DESIGN.md section 4): T = 16384 in documents of 4096, 2048, 3072, 1024, 512, 2560, 3072 tokens,
Hq = 16, Hkv = 2, D = 128, bf16; forward and forward + backward, for two masks:

* documents: bidirectional within each document (MoCa);
* mixed: causal text, each image bidirectional (``causal=True`` + ``block_ids``). Image layout (ours, chosen
  to look like packed interleaved VLM samples): each document opens with a 32-token text prompt, then images
  of 1024, 256, 576, 784, 1024, ... merged tokens (Qwen2.5-VL: 256..1024 per image) separated by 96 text
  tokens, as long as an image and 64 more tokens fit; the rest is text. About 3/4 of the tokens are image
  tokens. FLOPs count only allowed (q, k) pairs: 4 * D * Hq * pairs forward, 3.5x that forward + backward.

Peers, same masks, same inputs: FlexAttention (torch.compile'd ``flex_attention``, its block mask built once
outside the timing; ``create_block_mask`` is timed in the metadata table), torch ``varlen_attn``
(FlashAttention-2; documents mask only: the mixed mask is not expressible), xformers'
``memory_efficient_attention`` with a ``BlockDiagonalMask`` (documents only; where its kernels do not load,
the table shows the reason in its row), SDPA flash on one unmasked
sequence of T (5.6x the work of the documents mask) and, without ``--quick``, SDPA efficient with a dense
[T, T] boolean mask. Ours: the default backward (dQ by float32 atomics) and ``deterministic=True``.

Metadata: ours (CUDA builder: spans from the device's cu_seqlens / block_ids, then the per-tile tables; also
the torch builder, and from_seqlens from a host list end to end) against ``create_block_mask``.

Without ``--quick``, two more shapes: the Qwen2.5-VL-7B text model (Hq = 28, Hkv = 4, same documents) and the
vision tower (Hq = Hkv = 16, D = 80, one bidirectional document per image of 1024, 4096, 2048, 1024, 3136,
2048, 1024, 2016 patches, T = 16416; documents mask only).
"""

from __future__ import annotations

import inspect
import os
import sys
import time

import torch

try:
    from bench.harness import Case, common_args, run_cases
except ImportError:  # run as a script from bench/
    from harness import Case, common_args, run_cases

import moca_kernels as mk
from moca_kernels import _ext, tuning
from moca_kernels.attention import metadata

HEADLINE_DOCS = [4096, 2048, 3072, 1024, 512, 2560, 3072]
VISION_IMAGES = [1024, 4096, 2048, 1024, 3136, 2048, 1024, 2016]
IMAGE_SIZES = [1024, 256, 576, 784]
MATMUL_PEAK = 738e12   # DESIGN.md section 4, bf16 matmul on one H100

TARGETS = {  # issue 3, H100, ms
    ("headline", "documents", "fwd"): 0.83, ("headline", "documents", "fwd+bwd"): 3.25,
    ("headline", "mixed", "fwd+bwd"): 2.45,
}


def mixed_block_ids(lens, prompt=32, gap=96, tail=64) -> torch.Tensor:
    """int64 [T]: the image layout described in the module docstring (-1 = text)."""
    ids = []
    image = 0
    for L in lens:
        doc = [-1] * min(prompt, L)
        while True:
            size = IMAGE_SIZES[image % len(IMAGE_SIZES)]
            if len(doc) + size + tail > L:
                break
            doc += [image] * size
            image += 1
            doc += [-1] * min(gap, L - len(doc))
        doc += [-1] * (L - len(doc))
        ids += doc
    return torch.tensor(ids, dtype=torch.int64)


def sweep_setup(args):
    """((device, dtype, T, Hq, Hkv, D), (q, k, v, do), {"documents": mask, "mixed": mask}) of the variant sweeps
    (sweep_attention_fwd / _bwd.py): the headline shape on a GPU (its name and versions printed), a small
    interpreted one on CPU (``args.smoke``: T = 32; no FlexAttention, one timed call, no kernel breakdown); None on
    a CPU without TRITON_INTERPRET=1 (said why)."""
    shape = _sweep_shape(args)
    if shape is None:
        return None
    dev, dt, docs, Hq, Hkv, D = shape
    T = sum(docs)
    masks = {kind: build_mask(kind, docs, dev) for kind in ("documents", "mixed")}
    return (dev, dt, T, Hq, Hkv, D), inputs(T, Hq, Hkv, D, dt, dev), masks


def _sweep_shape(args):
    if torch.cuda.is_available():
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
              f"{__import__('triton').__version__}")
        return "cuda", torch.bfloat16, HEADLINE_DOCS, 16, 2, 128
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("no GPU: run with TRITON_INTERPRET=1 for the interpreted smoke version")
        return None
    args.no_flex, args.rep, args.no_breakdown = True, 1, True
    if args.smoke:
        return "cpu", torch.float32, [8, 8, 16], 2, 1, 32
    return "cpu", torch.float32, [d // 128 for d in HEADLINE_DOCS], 2, 1, 64


def write_rows(path, bench: str, T: int, Hq: int, Hkv: int, D: int, dtype, **fields) -> None:
    """The sweeps' ``--json`` file (bench/decide.py reads it): the shape, the device and ``fields`` (rows, ...)."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    path.write_text(json.dumps(dict(bench=bench, device=device, T=T, Hq=Hq, Hkv=Hkv, D=D, dtype=str(dtype), **fields),
                               indent=1))


def build_mask(kind, lens, device):
    if kind == "documents":
        return mk.AttentionMask.from_seqlens(lens, device=device)
    return mk.AttentionMask.from_seqlens(lens, block_ids=mixed_block_ids(lens).to(device), causal=True, device=device)


def allowed_pairs(mask) -> int:
    return int((mask.spans[1] - mask.spans[0]).sum(dtype=torch.int64).item())


def inputs(T, Hq, Hkv, D, dtype, device, layout="packed"):
    """q [T, Hq, D], k, v [T, Hkv, D] (packed) or [1, H, T, D] (layout='bhsd'), plus the upstream gradient."""
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(T, Hq, D, device=device, dtype=dtype, generator=g)
    k = torch.randn(T, Hkv, D, device=device, dtype=dtype, generator=g)
    v = torch.randn(T, Hkv, D, device=device, dtype=dtype, generator=g)
    do = torch.randn(T, Hq, D, device=device, dtype=dtype, generator=g)
    if layout == "bhsd":
        q, k, v, do = (t.transpose(0, 1).unsqueeze(0).contiguous() for t in (q, k, v, do))
    return q, k, v, do


def timed(fn, q, k, v, do, backward):
    """The timed call: forward, or forward + backward with a fixed upstream gradient."""
    for t in (q, k, v):
        t.requires_grad_(backward)

    def run():
        out = fn(q, k, v)
        if backward:
            q.grad = k.grad = v.grad = None
            out.backward(do)
        return out
    return run


# ---------------------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------------------


def case_moca(mask, shape, backward, deterministic=False, impl=None):
    def setup():
        q, k, v, do = inputs(*shape)
        return timed(lambda a, b, c: mk.masked_attention(a, b, c, mask, impl=impl, deterministic=deterministic),
                     q, k, v, do, backward)
    return setup


def _flex_mask_mod(mask):
    doc = mask.document_ids()
    if not mask.causal:
        return lambda b, h, q_idx, kv_idx: doc[q_idx] == doc[kv_idx]
    blk = mask.block_ids

    def mod(b, h, q_idx, kv_idx):
        same_block = (blk[q_idx] == blk[kv_idx]) & (blk[q_idx] >= 0)
        return (doc[q_idx] == doc[kv_idx]) & ((kv_idx <= q_idx) | same_block)
    return mod


_FLEX = {}


def case_flex(mask, shape, backward):
    def setup():
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        T = mask.total_len
        block_mask = create_block_mask(_flex_mask_mod(mask), None, None, T, T, device=mask.device)
        if "fn" not in _FLEX:
            _FLEX["fn"] = torch.compile(flex_attention)
        flex = _FLEX["fn"]
        q, k, v, do = inputs(*shape, layout="bhsd")
        gqa = q.shape[1] != k.shape[1]
        return timed(lambda a, b, c: flex(a, b, c, block_mask=block_mask, enable_gqa=gqa), q, k, v, do, backward)
    return setup


def case_varlen(mask, shape, backward):
    def setup():
        from torch.nn.attention.varlen import varlen_attn

        T, Hq, Hkv, D, dtype, device = shape
        q, k, v, do = inputs(*shape)
        params = inspect.signature(varlen_attn).parameters
        kw = {}
        if Hq != Hkv:
            if "enable_gqa" in params:
                kw["enable_gqa"] = True
            else:   # this torch's varlen_attn has no GQA: repeat K/V once, outside the timing
                k = k.repeat_interleave(Hq // Hkv, 1).contiguous()
                v = v.repeat_interleave(Hq // Hkv, 1).contiguous()
        cu = mask.cu_seqlens
        longest = max(mask.seqlens)
        return timed(lambda a, b, c: varlen_attn(a, b, c, cu, cu, longest, longest, **kw), q, k, v, do, backward)
    return setup


def xformers_unavailable(exc: BaseException) -> str:
    """One line saying why xformers' kernels did not run (its own error spans many lines)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    why = []
    try:   # the extension build that did not load, first: the table keeps the first 200 characters
        from xformers import _cpp_lib

        load = getattr(_cpp_lib, "_cpp_library_load_exception", None)
        if load is not None:
            why += [f"extensions built for {ln.strip()}" for ln in str(load).splitlines()
                    if "PyTorch" in ln and "you have" in ln][:1]
    except Exception:
        pass
    why += [ln.split(" - see ")[0] for ln in lines
            if ("supported" in ln or "built" in ln) and "is not supported because" not in ln]
    text = "; ".join(dict.fromkeys(why)) or (lines[0] if lines else type(exc).__name__)
    return f"xformers kernels do not run here: {text}"


def case_xformers(mask, shape, backward):
    """xformers' memory_efficient_attention with a BlockDiagonalMask over the documents, layout [1, T, G, g, D]
    (K/V expanded over the g query heads of each of the G = Hkv groups, xformers' GQA form). Where xformers or
    its kernels do not load, setup raises one line with the reason, and the table shows it as the row."""
    def setup():
        try:
            import xformers.ops as xops
            from xformers.ops.fmha.attn_bias import BlockDiagonalMask
        except Exception as exc:
            raise RuntimeError(f"xformers does not import: {type(exc).__name__}: {str(exc)[:120]}") from None
        T, Hq, Hkv, D, dtype, device = shape
        q, k, v, do = inputs(*shape)
        on_gpu = {"device": device} if device == "cuda" else {}   # xformers pins host memory for CPU offsets
        bias = BlockDiagonalMask.from_seqlens(list(mask.seqlens), **on_gpu)
        G, g = Hkv, Hq // Hkv

        def fn(a, b, c):
            b = b.view(1, T, G, 1, D).expand(1, T, G, g, D)
            c = c.view(1, T, G, 1, D).expand(1, T, G, g, D)
            return xops.memory_efficient_attention(a.view(1, T, G, g, D), b, c, attn_bias=bias).view(T, Hq, D)
        try:
            with torch.no_grad():
                fn(q, k, v)
        except Exception as exc:
            raise RuntimeError(xformers_unavailable(exc)) from None
        return timed(fn, q, k, v, do, backward)
    return setup


def case_sdpa_flash_unmasked(shape, backward):
    def setup():
        from torch.nn.attention import SDPBackend, sdpa_kernel
        import torch.nn.functional as F

        T, Hq, Hkv, D, dtype, device = shape
        q, k, v, do = inputs(*shape, layout="bhsd")
        k = k.repeat_interleave(Hq // Hkv, 1).contiguous()   # outside the timing
        v = v.repeat_interleave(Hq // Hkv, 1).contiguous()

        def fn(a, b, c):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(a, b, c)
        return timed(fn, q, k, v, do, backward)
    return setup


def case_sdpa_dense(mask, shape, backward):
    def setup():
        from torch.nn.attention import SDPBackend, sdpa_kernel
        import torch.nn.functional as F

        T, Hq, Hkv, D, dtype, device = shape
        q, k, v, do = inputs(*shape, layout="bhsd")
        k = k.repeat_interleave(Hq // Hkv, 1).contiguous()
        v = v.repeat_interleave(Hq // Hkv, 1).contiguous()
        dense = mask.to_dense()

        def fn(a, b, c):
            with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                return F.scaled_dot_product_attention(a, b, c, attn_mask=dense)
        return timed(fn, q, k, v, do, backward)
    return setup


def metadata_cases(kind, lens, device, q_tile=128, k_tile=128):
    mask = build_mask(kind, lens, device)
    T = mask.total_len
    cases = []
    if device == "cuda" and _ext.available():
        cases.append(Case("moca metadata, CUDA (spans + tables)", lambda: (lambda: metadata.tile_tables(
            metadata.row_spans(mask.cu_seqlens, mask.block_ids, T, mask.causal, impl="cuda"), q_tile, k_tile,
            impl="cuda"))))
    cases.append(Case("moca metadata, torch builder", lambda: (lambda: metadata.tile_tables(
        metadata.row_spans(mask.cu_seqlens, mask.block_ids, T, mask.causal, impl="torch"), q_tile, k_tile,
        impl="torch"))))
    blocks_host = None if kind == "documents" else mixed_block_ids(lens)

    def from_host():
        def run():
            m = mk.AttentionMask.from_seqlens(lens, block_ids=None if blocks_host is None else blocks_host.to(device),
                                              causal=kind != "documents", device=device, check_blocks=False)
            return m.tile_metadata(q_tile, k_tile)
        return run
    cases.append(Case("moca from_seqlens (host list) + tables", from_host,
                      note="host->device copies included; block contiguity check off (1 sync when on)"))
    if device == "cuda":
        def flex_build():
            from torch.nn.attention.flex_attention import create_block_mask

            mod = _flex_mask_mod(mask)
            return lambda: create_block_mask(mod, None, None, T, T, device=device)
        cases.append(Case("FlexAttention create_block_mask", flex_build))
    return cases


# ---------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------


def run_shape(label, lens, Hq, Hkv, D, kinds, args, device, dtype, full):
    T = sum(lens)
    shape = (T, Hq, Hkv, D, dtype, device)
    smoke = getattr(args, "smoke", False)
    rep = 1 if smoke else 10 if args.quick else args.rep
    warmup = 0 if smoke else 3 if args.quick else args.warmup
    masks = {kind: build_mask(kind, lens, device) for kind in kinds}
    # the targeted numbers first (documents fwd, fwd+bwd; mixed fwd+bwd), in case a time limit cuts the run
    first = [("documents", False), ("documents", True), ("mixed", True)]
    jobs = sorted(((kind, backward) for kind in kinds for backward in (False, True)),
                  key=lambda job: first.index(job) if job in first else len(first))
    for kind, backward in jobs:
        mask = masks[kind]
        pairs = allowed_pairs(mask)
        fwd_flops = 4.0 * D * Hq * pairs
        mode = "fwd+bwd" if backward else "fwd"
        flops = fwd_flops * (3.5 if backward else 1.0)
        print(f"\n{label} {kind} {mode}: T={T} Hq={Hq} Hkv={Hkv} D={D} {dtype}, allowed pairs {pairs / 1e6:.1f}M "
              f"({pairs / T / T:.1%} of T^2); floor {flops / 1e9:.0f} GFLOP -> {flops / MATMUL_PEAK * 1e3:.3f} ms "
              f"at {MATMUL_PEAK / 1e12:.0f} TFLOP/s", flush=True)
        cases = [Case("moca triton", case_moca(mask, shape, backward))]
        if backward:
            cases.append(Case("moca triton deterministic", case_moca(mask, shape, backward, deterministic=True)))
        if device == "cuda":
            cases.append(Case("FlexAttention (compiled)", case_flex(mask, shape, backward)))
            if kind == "documents":
                cases.append(Case("torch varlen_attn", case_varlen(mask, shape, backward)))
                cases.append(Case("xformers memory_efficient_attention", case_xformers(mask, shape, backward)))
            cases.append(Case("SDPA flash, unmasked T (more work)", case_sdpa_flash_unmasked(shape, backward)))
            if full:
                cases.append(Case("SDPA efficient + dense mask", case_sdpa_dense(mask, shape, backward)))
        else:
            cases.append(Case("moca torch (reference)", case_moca(mask, shape, backward, impl="torch")))
            if kind == "documents":   # a row with the reason where xformers' kernels do not run
                cases.append(Case("xformers memory_efficient_attention", case_xformers(mask, shape, backward)))
        t0 = time.perf_counter()
        run_cases(f"masked_attention {label} {kind} {mode}", cases,
                  shape=dict(T=T, Hq=Hq, Hkv=Hkv, D=D, dtype=str(dtype), mask=kind, pairs=pairs),
                  flops=flops, baseline="FlexAttention (compiled)" if device == "cuda" else "moca torch (reference)",
                  warmup=warmup, rep=rep, out=args.out, tag=f"attention_{label}_{kind}_{mode.replace('+', '_')}")
        target = TARGETS.get((label, kind, mode))
        print(f"  ({time.perf_counter() - t0:.0f} s including compilation)"
              + (f"   target on an H100: moca triton <= {target} ms" if target else ""))
    if label in ("headline", "smoke") or full:
        for kind in kinds:
            run_cases(f"attention metadata {label} {kind}", metadata_cases(kind, lens, device),
                      shape=dict(T=T, mask=kind, q_tile=128, k_tile=128), baseline=None, warmup=warmup,
                      rep=rep if smoke else max(rep, 20), out=args.out, tag=f"attention_metadata_{label}_{kind}")


def main(argv=None):
    parser = common_args(__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=("headline", "7B-text", "vision"), default=None,
                        help="run only these shapes (default: the headline with --quick, all three without); "
                             "with --quick, no dense-mask SDPA case")
    parser.add_argument("--smoke", action="store_true",
                        help="without a GPU: T = 32 instead of 256 (the CPU test of bench/gpu_run.sh)")
    args = parser.parse_args(argv)
    # --quick: time the first 2 of the 3 config candidates per kernel (compile time), unless MOCA_ATTENTION_TUNE says
    quick_tune = args.quick and not os.environ.get("MOCA_ATTENTION_TUNE", "").strip()
    with tuning.override(**(dict(attention_tune=2) if quick_tune else {})):
        return _main(args)


def _main(args):
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    t_start = time.perf_counter()
    if cuda:
        dtype = torch.bfloat16
        shapes = args.shapes or (("headline",) if args.quick else ("headline", "7B-text", "vision"))
        full = not args.quick
        if "headline" in shapes:
            run_shape("headline", HEADLINE_DOCS, 16, 2, 128, ("documents", "mixed"), args, device, dtype, full)
        if "7B-text" in shapes:
            run_shape("7B-text", HEADLINE_DOCS, 28, 4, 128, ("documents", "mixed"), args, device, dtype, full)
        if "vision" in shapes:
            run_shape("vision", VISION_IMAGES, 16, 16, 80, ("documents",), args, device, dtype, full)
    else:
        print("no GPU: a CPU smoke run at a small shape (moca triton runs only under TRITON_INTERPRET=1)")
        small = [d // (512 if args.smoke else 64) for d in HEADLINE_DOCS]
        heads = (2, 1, 32) if args.smoke else (4, 2, 64)
        run_shape("smoke", small, *heads, ("documents", "mixed"), args, device, torch.float32, False)
    print("\nconfigs chosen (kernel, head dim, dtype, group, ...): (walked tile, warps, stages)")
    for key, cfg in tuning.cached("masked_attention").items():
        if key[1] == "dq_strategy":
            print(f"  dQ of the default backward (head dim, dtype, group, q_tile, k_tile, variant) {key[2:-1]}: {cfg}")
        else:
            print(f"  {key[1:-1]}: {cfg}")
    print(f"\nbench_attention total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
