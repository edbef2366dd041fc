"""Benchmark: masked_token_loss forward+backward (fused LM head + cross-entropy) against naive torch, Liger, CCE.

Headline (DESIGN.md section 4): N = 8192 tokens, H = 2048, V = 151936 (Qwen2.5-VL-3B), bf16, every row
counted, forward + backward with gradients for hidden and weight. Target on H100: <= 35 ms, <= 0.7 GiB extra.

Work. "Effective" FLOPs (the TFLOP/s column, as the issue and DESIGN.md count them): 6 N H V = 15.3 TFLOP
(logits once, dHidden, dWeight) -> 20.7 ms at 738 TFLOP/s. Without holding [N, V] the logits are formed twice
(once for the log-sum-exp, once for the gradient), so our kernels do 8 N H V = 20.4 TFLOP -> 27.6 ms at the
ceiling; 35 ms means 583 TFLOP/s sustained over the four GEMM-shaped passes. Bytes are minor: weight 622 MB read
~2-3 times, dWeight 622 MB written once, the G chunks (2 N V bytes = 2.5 GB written and read back) and the
float32 dHidden accumulator (8 N H bytes per vocabulary chunk, ~6.7 GB at 3072-column chunks).

Memory. dWeight (V H x 2 B = 0.58 GiB) and dHidden (N H x 2 B = 0.03 GiB) are outputs, so 0.61 GiB is the floor
for any method; the timed call frees them at its end, so "extra GiB" (peak minus what was allocated before the
call) counts them for every case. Ours adds the
float32 dHidden accumulator (64 MiB) and one G chunk (48 MiB budget).

Peers: naive torch materialises the logits; Liger's fused linear cross-entropy chunks the rows; Cut
Cross-Entropy (CCE) recomputes tiles like us. Two pairs are compared, each like with like:
- exact against exact: "moca triton" (filter_eps=None, the default) against "CCE exact (filter_eps=None)";
- filtered against filtered: "moca triton filtered (filter_eps='auto')" against "CCE filtered (default
  filter_eps='high')", both dropping the backward's logit tiles whose |softmax - onehot| stays below
  finfo(bf16).eps / 32 = 2^-12 (CCE also reorders the vocabulary by average logit first; we do not).
Inputs are random with logits of standard deviation ~0.9 (hidden ~ N(0, 1), weight ~ N(0, 0.02^2)). With
V = 151936 the softmax is ~1 / V = 6.6e-6 on average and rarely reaches 2^-12, so most 128 x 128 tiles ARE
filtered: only the tiles holding a row's label and a few with a large logit survive. ``--tile-stats`` measures
the fraction kept (CPU or GPU, torch reference, a block of rows); bench/NOTES.md has the numbers.
"""

from __future__ import annotations

import statistics
import sys

import torch
import torch.nn.functional as F

try:
    from bench.harness import Case, common_args, floor_ms, kernel_breakdown, peer, run_cases, time_fn
except ImportError:  # run as a script from bench/
    from harness import Case, common_args, floor_ms, kernel_breakdown, peer, run_cases, time_fn

import moca_kernels as mk
from moca_kernels import tuning

IGNORE = -100


def make_inputs(N, H, V, dtype, device, counted=1.0, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(N, H, device=device, dtype=dtype, generator=g).requires_grad_()
    weight = (torch.randn(V, H, device=device, dtype=dtype, generator=g) * 0.02).requires_grad_()
    labels = torch.randint(0, V, (N,), device=device, generator=g)
    if counted < 1.0:
        labels[torch.rand(N, device=device, generator=g) >= counted] = IGNORE
    return hidden, weight, labels


def make_setup(loss_fn, N, H, V, dtype, device, counted=1.0, backward=True, settings=None):
    """loss_fn(hidden, weight, labels) -> scalar loss; the timed call runs forward and backward, both under
    ``tuning.override(**settings)`` when given."""
    def setup():
        hidden, weight, labels = make_inputs(N, H, V, dtype, device, counted)

        def run():
            with tuning.override(**(settings or {})):
                return step()

        def step():
            if not backward:
                with torch.no_grad():
                    return loss_fn(hidden, weight, labels)
            loss = loss_fn(hidden, weight, labels)
            loss.backward()
            # drop the gradients inside the timed call, so "extra GiB" counts them (0.61 GiB of outputs)
            hidden.grad = None
            weight.grad = None
            return loss
        return run
    return setup


def missing(reason):
    def setup():
        raise RuntimeError(reason)
    return setup


def naive(hidden, weight, labels):
    return F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=IGNORE)


# Tile-kernel variants (backends "triton:v2", "triton:v3" of masked_token_loss, passed as impl=); --variants picks
# which run.
VARIANTS = ("v1", "v2", "v3")


def spec(variant):
    """The impl= string of a tile-kernel variant (None: the default backend)."""
    return "triton" if variant is None else f"triton:{variant}"


def moca(impl="triton", bwd_gemm="auto", variant=None, filter_eps=None):
    """(loss fn, tuning settings) of masked_token_loss on ``impl`` with tile-kernel ``variant`` (filter_eps:
    None exact, "auto" Cut Cross-Entropy's threshold)."""
    spelled = spec(variant) if impl == "triton" else impl

    def fn(hidden, weight, labels):
        return mk.masked_token_loss(hidden, weight, labels, ignore_index=IGNORE, impl=spelled, filter_eps=filter_eps)
    return fn, dict(mtl_bwd_gemm=bwd_gemm)


def variant_label(variant):
    from moca_kernels.losses import masked_token_loss_triton as kernels

    default = variant is None or variant == kernels.DEFAULT_VARIANT["fwd"] == kernels.DEFAULT_VARIANT["grad"]
    return "moca triton" if default else f"moca triton {variant}"


def liger_case():
    """(loss fn, None), or (None, the reason) where Liger is not installed."""
    why = peer("liger_kernel.transformers.fused_linear_cross_entropy")
    if why:
        return None, why
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="mean")
    return (lambda hidden, weight, labels: loss(weight, hidden, labels)), None


def cce_case(filter_eps):
    """(loss fn, None), or (None, the reason) where Cut Cross-Entropy is not installed."""
    why = peer("cut_cross_entropy")
    if why:
        return None, why
    from cut_cross_entropy import linear_cross_entropy

    return (lambda hidden, weight, labels: linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE,
                                                              reduction="mean", filter_eps=filter_eps)), None


def peer_setup(peer_case, N, H, V, dtype, device, counted):
    """The setup of a peer's case; the peer is imported (or found missing, raising the reason) only when the case
    runs, so building the case list imports no peer (the pytest suite builds it at collection)."""
    def setup():
        fn, why = peer_case()
        if fn is None:
            raise RuntimeError(why)
        return make_setup(fn, N, H, V, dtype, device, counted)()
    return setup


def naive_bytes(N, V):
    # bf16 logits, their float32 copy, log-softmax saved for backward, float32 gradient of the logits
    return N * V * (2 + 4 + 4 + 4)


def cases_for(N, H, V, dtype, device, counted=1.0, quick=False, variants=("v1",)):
    cases = []
    total = torch.cuda.get_device_properties(0).total_memory if device == "cuda" else 0
    if device == "cuda" and naive_bytes(N, V) > 0.8 * total:
        cases.append(Case("naive torch (logits materialised)",
                          missing(f"skipped: needs ~{naive_bytes(N, V) / 2**30:.0f} GiB of logits")))
    else:
        cases.append(Case("naive torch (logits materialised)", make_setup(naive, N, H, V, dtype, device, counted)))
    for variant in variants:
        fn, settings = moca("triton", "auto", variant)
        cases.append(Case(variant_label(variant), make_setup(fn, N, H, V, dtype, device, counted, settings=settings)))
    if not quick:
        fn, settings = moca("triton", "triton", None)
        cases.append(Case("moca triton (Triton backward GEMMs)",
                          make_setup(fn, N, H, V, dtype, device, counted, settings=settings)))
    cases.append(Case("Liger fused linear CE", peer_setup(liger_case, N, H, V, dtype, device, counted)))
    # like with like: exact against exact, filtered against filtered (both pairs also under --quick)
    cases.append(Case("CCE exact (filter_eps=None)",
                      peer_setup(lambda: cce_case(None), N, H, V, dtype, device, counted)))
    fn, settings = moca("triton", "auto", None, filter_eps="auto")
    cases.append(Case("moca triton filtered (filter_eps='auto')",
                      make_setup(fn, N, H, V, dtype, device, counted, settings=settings)))
    for eps, name in (("high", "CCE filtered (default filter_eps='high')"),):
        cases.append(Case(name, peer_setup(lambda eps=eps: cce_case(eps), N, H, V, dtype, device, counted)))
    return cases


def tuned_configs(kernels):
    """The autotuner's choice of the tile kernels that ran last (kwargs, warps, stages), for the log."""
    fwd = kernels._lse_fwd_kernel if kernels.last_kernels.get("fwd", "v1") == "v1" else \
        kernels._FWD_DESC[kernels.last_kernels["fwd"]]
    grad = kernels._grad_logits_kernel if kernels.last_kernels.get("grad", "v1") == "v1" else \
        kernels._GRAD_DESC[kernels.last_kernels["grad"]]
    out = {}
    for name, k in (("fwd", fwd), ("grad", grad)):
        c = getattr(k, "best_config", None)
        out[name] = "-" if c is None else f"{c.kwargs} w{c.num_warps} s{c.num_stages}"
    return out


def phases(N, H, V, dtype, device, rep, variant=None):
    """Forward alone and forward + backward of moca triton, each as a fraction of the 738 TFLOP/s ceiling."""
    from moca_kernels.losses import masked_token_loss_triton as kernels

    fn = moca(variant=variant)[0]
    fwd = statistics.median(time_fn(make_setup(fn, N, H, V, dtype, device, backward=False)(), rep=rep))
    both = statistics.median(time_fn(make_setup(fn, N, H, V, dtype, device)(), rep=rep))
    unit = 2 * N * H * V
    print(f"  phases of {variant_label(variant)} (kernels run: "
          f"{dict(kernels.last_kernels)}): forward {fwd:.2f} ms ({unit / fwd / 1e9:.0f} TFLOP/s on 2NHV), backward {both - fwd:.2f} ms "
          f"({3 * unit / (both - fwd) / 1e9:.0f} TFLOP/s on 6NHV), backward GEMMs on {kernels.last_bwd_gemm}, "
          f"chunk {kernels.vocab_chunk(N, V, torch.finfo(dtype).bits // 8)} columns")
    print(f"    tuned: {tuned_configs(kernels)}")


def chunk_cases(N, H, V, dtype, device, mibs):
    """moca triton with the backward's G chunk budget set to each of ``mibs`` MiB: fewer, wider chunks mean
    fewer read-modify-writes of the float32 dHidden accumulator (8 N H bytes each) and larger GEMMs, at the
    price of a larger G buffer (extra memory)."""
    from moca_kernels.losses import masked_token_loss_triton as kernels

    cases = []
    for mib in mibs:
        settings = dict(mtl_bwd_gemm="auto", mtl_g_chunk_bytes=int(mib * 2**20))
        cv = max(kernels.MIN_CHUNK_V, int(mib * 2**20) // (N * torch.finfo(dtype).bits // 8) // 256 * 256)
        cases.append(Case(f"moca triton, G chunk {mib:g} MiB ({min(cv, V)} cols)",
                          make_setup(moca()[0], N, H, V, dtype, device, settings=settings)))
    return cases


def check(N, H, V, dtype, device, variant=None):
    """moca triton against float32 logits on the headline inputs: the loss and the gradients' relative error."""
    from moca_kernels.losses import masked_token_loss_triton as kernels

    hidden, weight, labels = make_inputs(N, H, V, dtype, device)
    loss = mk.masked_token_loss(hidden, weight, labels, impl=spec(variant))
    loss.backward()
    ours = (loss.detach(), hidden.grad, weight.grad)
    hidden.grad = weight.grad = None
    rows = 1024  # float32 logits of all N rows would need N V x 12 bytes; compare on a block of rows
    ref = F.cross_entropy(F.linear(hidden[:rows].float(), weight.float()), labels[:rows], reduction="sum") / N
    ref.backward()
    mine_rows = mk.masked_token_loss(hidden[:rows], weight, labels[:rows], reduction="sum", impl=spec(variant)) / N

    def rel(a, b):
        return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()

    print(f"  check of {variant or 'the default'} ({dict(kernels.last_kernels)}) vs float32 logits: loss {ours[0].item():.6f} (log V = {torch.log(torch.tensor(float(V))).item():.6f}); "
          f"first {rows} rows: loss diff {abs(mine_rows.item() - ref.item()):.2e}, "
          f"max rel err dHidden {rel(ours[1][:rows], hidden.grad[:rows]):.2e}")
    del hidden, weight, labels, ours, ref


def tile_stats(N, H, V, dtype, device, eps=2.0**-12, block=(128, 128), scale=1.0, seed=0):
    """Fraction of the backward's block[0] x block[1] logit tiles that Cut Cross-Entropy's filter keeps
    (|softmax - onehot| >= eps somewhere in the tile) on make_inputs(N, ...) with hidden scaled by ``scale``:
    in vocabulary order (ours) and with CCE's reordering by average logit. Returns (kept, kept CCE order,
    active columns: the share of column tiles kept in some row tile)."""
    from moca_kernels import reference

    hidden, weight, labels = make_inputs(N, H, V, dtype, device)
    h, w = hidden.detach().float() * scale, weight.detach().float()
    logits = h @ w.T                                                                 # [N, V] float32
    d = torch.softmax(logits, dim=1)
    d[torch.arange(N, device=device), labels] -= 1.0
    order = torch.argsort(logits.mean(0))                                            # CCE's vocab_ordering
    kept = reference.filter_tile_mask(d, block[0], block[1], eps)
    kept_sorted = reference.filter_tile_mask(d[:, order], block[0], block[1], eps)
    return kept.float().mean().item(), kept_sorted.float().mean().item(), kept.any(0).float().mean().item()


def zipf_tile_stats(N, V, exponent=1.0, noise=1.0, eps=2.0**-12, block=(128, 128), seed=0):
    """Tiles kept on LM-like logits: noise ~ N(0, noise^2) - exponent * log(1 + rank(v)), ranks in a random order
    of token ids, labels sampled from the softmax. Returns (kept in vocabulary order, kept in CCE's order,
    column tiles active in some row tile in CCE's order)."""
    from moca_kernels import reference

    g = torch.Generator().manual_seed(seed)
    rank = torch.randperm(V, generator=g).float()
    logits = torch.randn(N, V, generator=g) * noise - exponent * torch.log1p(rank)[None, :]
    d = torch.softmax(logits, dim=1)
    labels = torch.multinomial(d, 1, generator=g).squeeze(1)
    d[torch.arange(N), labels] -= 1.0
    order = torch.argsort(logits.mean(0))
    kept = reference.filter_tile_mask(d, block[0], block[1], eps)
    kept_sorted = reference.filter_tile_mask(d[:, order], block[0], block[1], eps)
    return kept.float().mean().item(), kept_sorted.float().mean().item(), kept_sorted.any(0).float().mean().item()


def filter_error(N, H, V, device, eps=2.0**-12, block=(128, 128), scale=1.0):
    """Max abs error against float64 of dHidden and dWeight (loss = mean over N rows) in float32, exact and with
    the gradient filter (the torch reference's semantics, vocabulary in CCE's order), on make_inputs(N, ...) with hidden scaled by
    ``scale``, each divided by the largest |gradient| (relative to the gradient's scale)."""
    from moca_kernels import reference

    hidden, weight, labels = make_inputs(N, H, V, torch.float32, device)
    h, w = hidden.detach() * scale, weight.detach()
    rows = torch.arange(N, device=device)

    def grads(hh, ww, eps_=None):
        d = torch.softmax(hh @ ww.T, dim=1)
        d[rows, labels] -= 1.0
        if eps_ is not None:  # tiles over the columns in CCE's order, as masked_token_loss(filter_eps=) does
            order = reference.vocab_order(hh, ww)
            keep = reference.filter_tile_mask(d[:, order], block[0], block[1], eps_)
            mask = torch.empty_like(d, dtype=torch.bool)
            mask[:, order] = keep.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:N, :V]
            d = d * mask
        d = d / N
        return d @ ww, d.T @ hh

    dh64, dw64 = grads(h.double(), w.double())
    out = {}
    for name, e in (("exact", None), ("filtered", eps)):
        dh, dw = grads(h, w, e)
        out[name] = ((dh.double() - dh64).abs().max().item() / dh64.abs().max().item(),
                     (dw.double() - dw64).abs().max().item() / dw64.abs().max().item())
    return out


def main(argv=None):
    parser = common_args(__doc__.splitlines()[0])
    parser.add_argument("--profile", action="store_true",
                        help="print the device time per kernel of moca's forward + backward at the headline shape")
    parser.add_argument("--chunks", type=float, nargs="+", default=None, metavar="MIB",
                        help="only time moca at the headline shape with these backward G chunk budgets (MiB)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                        help="tile-kernel variants (impl='triton:v2' ...) timed side by side at the headline shape "
                             "(default: all; other shapes run the default variant only)")
    parser.add_argument("--smoke", action="store_true",
                        help="the smallest shape (N=16, H=16, V=160) that runs every case: the CPU test of "
                             "bench/gpu_run.sh")
    parser.add_argument("--tile-stats", type=int, default=0, metavar="ROWS",
                        help="only print the fraction of 128 x 128 logit tiles Cut Cross-Entropy's filter keeps "
                             "on ROWS rows of the headline inputs (H = 2048, V = 151936; CPU works: ~1 GiB per 1024 rows)")
    args = parser.parse_args(argv)
    if args.tile_stats:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        for scale in (1.0, 2.0, 4.0):
            k, ks, cols = tile_stats(args.tile_stats, 2048, 151936, torch.float32, device, scale=scale)
            print(f"tiles kept (eps 2^-12, N={args.tile_stats}, logit std {0.905 * scale:.2f}): {k:.1%} in vocabulary "
                  f"order, {ks:.1%} in CCE's order; column tiles active in some row tile: {cols:.1%}")
            err = filter_error(min(args.tile_stats, 256), 2048, 151936, device, scale=scale)
            print("  float32 max abs error / max |grad| vs float64 (dHidden, dWeight): exact "
                  f"{err['exact'][0]:.2e}, {err['exact'][1]:.2e}; filtered {err['filtered'][0]:.2e}, "
                  f"{err['filtered'][1]:.2e}")
        for exponent, noise in ((1.0, 1.0), (1.2, 2.0)):
            k, ks, cols = zipf_tile_stats(args.tile_stats, 151936, exponent, noise)
            print(f"LM-like logits (noise std {noise}, -{exponent} log(1 + rank)): tiles kept {k:.1%} in vocabulary "
                  f"order, {ks:.1%} in CCE's order; column tiles active in CCE's order: {cols:.1%}")
        return 0
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    H, V = (2048, 151936) if cuda else (64, 1000)
    head = 8192 if cuda else 64
    if args.smoke:
        H, V, head, args.quick, args.warmup = 16, 160, 16, True, 0
    if not cuda:
        print("no GPU: a CPU smoke run at a tiny shape (moca triton only under TRITON_INTERPRET=1)")
    rep = (1 if args.smoke else 10) if args.quick else args.rep
    runs = [(head, 1.0)]
    if cuda and not args.quick and not args.smoke:
        runs += [(head, 0.4)] + [(n, 1.0) for n in (2048, 4096, 16384, 32768, 65536)]
    if args.chunks:
        run_cases("masked_token_loss fwd+bwd, G chunk sweep", chunk_cases(head, H, V, dtype, device, args.chunks),
                  shape=dict(N=head, H=H, V=V, dtype=str(dtype)), flops=6 * head * H * V, warmup=2, rep=rep,
                  out=args.out, tag=f"masked_token_loss_chunks_N{head}")
        return 0
    for N, counted in runs:
        n = int(N * counted)
        eff = 6 * n * H * V
        print(f"\nmasked_token_loss N={N} ({counted:.0%} counted) H={H} V={V} {dtype}: 6nHV = {eff / 1e12:.1f} TFLOP -> "
              f"{floor_ms(eff):.1f} ms at 738 TFLOP/s; our 8nHV -> {floor_ms(eff * 4 / 3):.1f} ms")
        headline = N == head and counted == 1.0
        variants = args.variants if headline else [None]
        run_cases("masked_token_loss fwd+bwd", cases_for(N, H, V, dtype, device, counted, quick=args.quick,
                                                         variants=variants),
                  shape=dict(N=N, H=H, V=V, dtype=str(dtype), counted=counted), flops=eff,
                  baseline="naive torch (logits materialised)", warmup=args.warmup if not args.quick or args.smoke else 2,
                  rep=rep, out=args.out, tag=f"masked_token_loss_N{N}_c{int(counted * 100)}")
        # the table the decisions read comes first (a run cut off by its time limit keeps it); then, at the
        # headline, each variant's phases, its check against float32 logits and its per-kernel profile
        if cuda and headline:
            for variant in args.variants:
                phases(N, H, V, dtype, device, rep, variant)
        if headline:
            for variant in args.variants:
                if cuda:
                    check(head, H, V, dtype, device, variant)
                if args.profile:
                    kernel_breakdown(make_setup(moca(variant=variant)[0], head, H, V, dtype, device)(),
                                     calls=1 if args.smoke else 3,
                                     title=f"{variant_label(variant)} masked_token_loss fwd+bwd N={head}")


if __name__ == "__main__":
    sys.exit(main())
