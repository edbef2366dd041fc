"""Benchmark: one MoCa Stage 1 training step (forward + backward, bf16 autocast) on a Qwen2.5-VL-3B-shaped slice.

The slice: the 3B text dimensions (hidden 2048, 16 query / 2 KV heads, head dim 128, MLP 11008, vocab 151936,
tied embeddings) with 4 layers; the vision tower at its real width (1280, 16 heads, MLP 3420) with 2 blocks (one
windowed, one full); the MAE decoder (one LM layer + Linear(2048 -> 4704)). Random init, no downloads.
Data: synthetic samples of 900..1280 tokens (official max 1280), one image of 256..576 merged tokens each, with
Stage 1 masking (text 0.4, images 0.5, noise corruption), ~8k tokens per micro-batch.

Cases (same weights' shapes, same samples, same masks):
  * transformers sdpa + Liger  the official recipe's parts: padded rows (one sample per row, as the official
                               length buckets), sdpa with a bidirectional padding mask, Liger fused linear CE
                               for the MLM loss, torch MSE for the MAE loss; vision tower on transformers' sdpa
                               path (one call per image / window)
  * moca packed                ours: one packed row, masked_attention everywhere (LM, decoder, vision tower with
                               images/windows as documents), masked_token_loss, masked_patch_loss
  (full run adds: transformers sdpa + naive CE, and moca on padded rows)

Reports milliseconds per step, tokens/s (real tokens) and peak extra memory. Target: moca >= 1.5x tokens/s of
the baseline at no more memory.
"""

from __future__ import annotations

import random
import sys
from typing import List

import torch
import torch.nn.functional as F

try:
    from bench.harness import Case, common_args, peer, run_cases
except ImportError:  # run as a script from bench/
    from harness import Case, common_args, peer, run_cases

from moca.data.batch import Sample, VisionSpec
from moca.data.masking import CptCollator, MaskingConfig, ModalityMasker
from moca.modeling import PIXEL_ROW, MocaBackbone
from moca.stage1 import CptModel, LossConfig

# Qwen2.5-VL token ids
ENDOFTEXT, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD, MASK = 151643, 151652, 151653, 151655, 151656, 151665
SPECIAL = list(range(151643, 151666))


def slice_config(layers: int = 4, vision_blocks: int = 2, small: bool = False):
    """The 3B-shaped slice (``small``: a CPU smoke-test size with the same structure)."""
    from transformers import Qwen2_5_VLConfig

    h, heads, inter, vw, vi = (2048, 16, 11008, 1280, 3420) if not small else (256, 2, 512, 64, 128)
    text = dict(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=2 if not small else 1, vocab_size=151936 if not small else 151680, max_position_embeddings=128000, rms_norm_eps=1e-6,
                rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24] if not small else [16, 24, 24]},
                rope_theta=1000000.0,
                tie_word_embeddings=True, eos_token_id=ENDOFTEXT, pad_token_id=ENDOFTEXT)
    vision = dict(hidden_size=vw, intermediate_size=vi, depth=vision_blocks, num_heads=16 if not small else 1,
                  out_hidden_size=h,
                  patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                  fullatt_block_indexes=[vision_blocks - 1], in_channels=3)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                            image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD, vision_start_token_id=VISION_START,
                            vision_end_token_id=VISION_END)


def make_samples(tokens: int, seed: int = 0) -> List[Sample]:
    """Samples of 900..1280 tokens, each with one image of 16..24 x 16..24 merged tokens, filling ``tokens``."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    out, used = [], 0
    while True:
        hm, wm = rng.randint(16, 24), rng.randint(16, 24)
        n_img = hm * wm
        total = rng.randint(900, 1280)
        n_text = max(total - n_img - 3, 16)
        if used + n_text + n_img + 3 > tokens:
            break
        cut = rng.randint(0, n_text)
        text = torch.randint(0, 151000, (n_text,), generator=g).tolist()
        ids = text[:cut] + [VISION_START] + [IMAGE_PAD] * n_img + [VISION_END] + text[cut:-1] + [ENDOFTEXT]
        px = torch.randn(4 * n_img, PIXEL_ROW, generator=g)
        out.append(Sample(torch.tensor(ids), px, torch.tensor([[1, 2 * hm, 2 * wm]]), f"s{len(out)}"))
        used += len(ids)
    return out


def build_model(cfg, device):
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device(device):
        torch.manual_seed(0)
        vlm = Qwen2_5_VLForConditionalGeneration._from_config(cfg, attn_implementation="eager")
    return CptModel(MocaBackbone(vlm), LossConfig()).to(device)


def _bf16(x):
    return x.to(torch.bfloat16) if x.is_floating_point() else x


def baseline_loss(mlm_fn):
    """The official recipe's parts on padded rows: sdpa with an explicit bidirectional padding mask (keys of
    the row's real tokens), ``mlm_fn(weight, hidden, labels)`` for the MLM loss, torch MSE for MAE."""

    def loss(model: CptModel, batch):
        bb = model.backbone
        embeds = bb.input_embeddings(batch)
        B, S = batch.input_ids.shape
        mask4 = batch.attention_mask[:, None, None, :].expand(B, 1, S, S)      # bool, True = attend
        hidden = bb.language_model(inputs_embeds=embeds, position_ids=batch.position_ids, attention_mask=mask4,
                                   use_cache=False).last_hidden_state
        H = hidden.shape[-1]
        flat = hidden.reshape(-1, H)
        h = _bf16(flat.index_select(0, batch.mlm_positions))
        mlm = mlm_fn(bb.lm_head_weight.to(h.dtype), h, batch.mlm_labels)
        rope = bb.rotary(hidden, batch.position_ids)
        dec = model.mae_decoder
        out = dec.layer(hidden, attention_mask=mask4, position_embeddings=rope, use_cache=False)
        out = out[0] if isinstance(out, tuple) else out
        picked = out.reshape(-1, H).index_select(0, batch.mae_positions)
        pred = dec.head(dec.norm(picked) if dec.norm is not None else picked)   # no norm by default (official head)
        mae = F.mse_loss(pred.float(), batch.mae_target.float())
        return mlm + 0.1 * mae
    return loss


def ours_loss(model: CptModel, batch):
    return model(batch)["loss"]


FIRST_LOSS = {}   # case -> loss of its first step: equal weights and masks, so the cases must agree


def make_case(name, impl, packed, loss_fn, samples, device, collate_args, note=""):
    def setup():
        model = build_model(collate_args["config"], device)
        model.backbone.set_attention(impl)
        masker = ModalityMasker(MaskingConfig(0.4, 0.5, "noise"), MASK, SPECIAL)
        col = CptCollator(masker, VisionSpec.from_config(model.backbone.vlm.config), ENDOFTEXT, packed=packed)
        batch = col(samples, seed=1).to(device)
        params = [p for p in model.parameters() if p.requires_grad]

        def step():
            for p in params:
                p.grad = None
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = loss_fn(model, batch)
            loss.backward()
            if name not in FIRST_LOSS:          # one host sync, on the first (untimed) call only
                FIRST_LOSS[name] = float(loss.detach())
            return loss
        return step
    return Case(name, setup, note)


def step_flops(samples, cfg) -> float:
    """Matmul FLOPs of one forward + backward (6 x params x tokens for linear layers, 3.5 x the forward
    attention FLOPs over allowed pairs), counting only real tokens."""
    t, v = cfg.text_config, cfg.vision_config
    H, I, hd = t.hidden_size, t.intermediate_size, t.hidden_size // t.num_attention_heads
    kv = t.num_key_value_heads * hd
    layer = H * H * 2 + 2 * H * kv + 3 * H * I
    lens = [len(s) for s in samples]
    T = sum(lens)
    n_img = sum(int(s.image_grid_thw.prod()) // 4 for s in samples)
    n_text_masked = 0.4 * (T - n_img - 3 * len(samples))
    n_img_masked = 0.5 * n_img
    f = 6 * (t.num_hidden_layers + 1) * layer * T                               # LM layers + MAE decoder layer
    f += 3.5 * 4 * hd * t.num_attention_heads * sum(n * n for n in lens) * (t.num_hidden_layers + 1)
    f += 6 * t.vocab_size * H * n_text_masked + 6 * H * 4 * PIXEL_ROW * n_img_masked
    C, vI = v.hidden_size, v.intermediate_size
    patches = 4 * n_img
    f += 6 * v.depth * (4 * C * C + 3 * C * vI) * patches + 6 * PIXEL_ROW * C * patches
    f += 6 * (16 * C * C + 4 * C * H) * n_img                                   # merger
    win = 64  # 112 px windows = 8 x 8 patches
    full = sum(int(s.image_grid_thw.prod()) ** 2 for s in samples)
    f += 3.5 * 4 * C * (win * patches * (v.depth - 1) + full)
    return f


def slice_args(description, argv, option, **kw):
    """The stage benchmarks' command line: the harness's options, the script's own ``option`` (its batch size,
    ``add_argument(option, **kw)``) and the slice's size; returns (args, cuda?, device)."""
    p = common_args(description)
    p.add_argument(option, **kw)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vision-blocks", type=int, default=2)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    return args, cuda, torch.device("cuda" if cuda else "cpu")


def print_steps(report, first_loss, T, same):
    """The stage benchmarks' closing lines: each case's first-step loss (``same``: what the cases share, so the
    losses should agree to bf16 precision) and its real tokens per second and peak extra memory."""
    print(f"\nfirst-step loss per case ({same}; they should agree to bf16 precision):")
    for k, v in first_loss.items():
        print(f"  {k:<42s} {v:.4f}")
    print("\ntokens/s (real tokens):")
    for r in report.results:
        if r.median_ms:
            print(f"  {r.name:<42s} {T / (r.median_ms / 1e3):>12,.0f} tok/s   peak extra "
                  f"{(r.peak_extra_gib if r.peak_extra_gib is not None else float('nan')):.2f} GiB")
        else:
            print(f"  {r.name:<42s} -- {r.error}")


def main(argv=None):
    args, cuda, device = slice_args(__doc__.splitlines()[0], argv, "--tokens", type=int, default=8192,
                                    help="tokens per micro-batch (default 8192)")
    if not cuda:  # a smoke run: tiny shapes, fp32
        print("no GPU: CPU smoke run of a small model of the same structure, 1 layer, ~2.6k tokens (numbers mean nothing)")
        args.tokens, args.layers, args.rep, args.warmup = min(args.tokens, 2600), 1, 2, 1
    cfg = slice_config(args.layers, args.vision_blocks, small=not cuda)
    samples = make_samples(args.tokens)
    T = sum(len(s) for s in samples)
    n_img = sum(int(s.image_grid_thw.prod()) // 4 for s in samples)
    flops = step_flops(samples, cfg)
    ca = {"config": cfg}
    liger_why = peer("liger_kernel.transformers.fused_linear_cross_entropy")
    if liger_why is None:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="mean")
        liger_mlm = lambda w, h, y: liger(w, h, y)  # noqa: E731
    naive_mlm = lambda w, h, y: F.cross_entropy((h @ w.T).float(), y)  # noqa: E731
    baseline = "transformers sdpa + Liger (padded)"
    cases = []
    if liger_why is None:
        cases.append(make_case(baseline, "sdpa", False, baseline_loss(liger_mlm), samples, device, ca))
    else:
        cases.append(Case(baseline, lambda: (_ for _ in ()).throw(RuntimeError(liger_why))))
    if not args.quick or liger_why is not None:
        cases.append(make_case("transformers sdpa + naive CE (padded)", "sdpa", False, baseline_loss(naive_mlm),
                               samples, device, ca))
    cases.append(make_case("moca packed", "moca", True, ours_loss, samples, device, ca))
    if not args.quick:
        cases.append(make_case("moca padded", "moca", False, ours_loss, samples, device, ca))
    print(f"Stage 1 step: {len(samples)} samples, {T} tokens ({n_img} image tokens, {4 * n_img} patches), "
          f"{args.layers} LM layers + MAE decoder, {args.vision_blocks} vision blocks; "
          f"~{flops / 1e12:.1f} TFLOP per step (useful matmuls)")
    report = run_cases("Stage 1 train step fwd+bwd (3B-shaped slice)", cases,
                       shape=dict(tokens=T, samples=len(samples), image_tokens=n_img, layers=args.layers,
                                  vision_blocks=args.vision_blocks, dtype="bf16 autocast" if cuda else "fp32"),
                       flops=flops, baseline=baseline if liger_why is None else "transformers sdpa + naive CE (padded)",
                       warmup=args.warmup if not args.quick else 3, rep=args.rep if not args.quick else 10,
                       out=args.out, tag=f"stage1_step_T{T}")
    print_steps(report, FIRST_LOSS, T, "same weights, samples and masks")


if __name__ == "__main__":
    sys.exit(main())
