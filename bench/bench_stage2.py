"""Benchmark: one MoCa Stage 2 step (InfoNCE with hard negatives, forward + backward, bf16 autocast) on the
Qwen2.5-VL-3B-shaped slice of bench_stage1 (3B text dimensions with 4 layers, vision tower at full width with 2
blocks), random init, no downloads.

Batch: B text queries (48..96 tokens), B positives and B hard negatives (one image of 12..16 x 12..16 merged
tokens + 16..32 text tokens each), mean pooling, temperature 0.03, each query against every positive and its own
hard negative (MoCa's scope).

Cases (same weights, same samples):
  * transformers sdpa, padded   the usual recipe: one padded row per sample, sdpa with an explicit bidirectional
                                padding mask, mean pooling, InfoNCE on materialised logits (torch)
  * moca packed                 ours: queries and documents packed into one row, masked_attention, mk.info_nce
  * moca packed + GradCache     ours through mk.GradCache (chunks of B/4 queries, B/2 documents): one extra
                                forward, activation memory of one chunk

Reports milliseconds per step, tokens/s (real tokens) and peak extra memory.
"""

from __future__ import annotations

import random
from typing import List

import torch
import torch.nn.functional as F

try:
    from bench.bench_stage1 import ENDOFTEXT, IMAGE_PAD, VISION_END, VISION_START, print_steps, slice_args, slice_config
    from bench.harness import Case, run_cases
except ImportError:  # run as a script from bench/
    from bench_stage1 import ENDOFTEXT, IMAGE_PAD, VISION_END, VISION_START, print_steps, slice_args, slice_config
    from harness import Case, run_cases

import moca_kernels as mk
from moca.data.batch import Sample, VisionSpec, collate
from moca.embedding import pool_hidden
from moca.modeling import PIXEL_ROW, MocaBackbone

TEMPERATURE = 0.03


def make_batch(B: int, seed: int = 0, small: bool = False) -> List[Sample]:
    """B queries, then B positives, then B hard negatives (the mk.info_nce layout with k = 1)."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    lo, hi = (12, 16) if not small else (2, 4)

    def text(n):
        return torch.randint(0, 151000, (n,), generator=g).tolist()

    queries = [Sample(torch.tensor(text(rng.randint(48, 96)) + [ENDOFTEXT]), record_id=f"q{i}") for i in range(B)]
    docs = []
    for i in range(2 * B):
        hm, wm = rng.randint(lo, hi), rng.randint(lo, hi)
        ids = [VISION_START] + [IMAGE_PAD] * (hm * wm) + [VISION_END] + text(rng.randint(16, 32)) + [ENDOFTEXT]
        px = torch.randn(4 * hm * wm, PIXEL_ROW, generator=g)
        docs.append(Sample(torch.tensor(ids), px, torch.tensor([[1, 2 * hm, 2 * wm]]), f"d{i}"))
    return queries + docs


def build_backbone(cfg, device) -> MocaBackbone:
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device(device):
        torch.manual_seed(0)
        vlm = Qwen2_5_VLForConditionalGeneration._from_config(cfg, attn_implementation="eager")
    return MocaBackbone(vlm).to(device)


def sdpa_embed(bb: MocaBackbone, batch) -> torch.Tensor:
    """Padded rows through transformers' sdpa with an explicit bidirectional padding mask; mean pooling."""
    embeds = bb.input_embeddings(batch)
    B, S = batch.input_ids.shape
    mask4 = batch.attention_mask[:, None, None, :].expand(B, 1, S, S)
    hidden = bb.language_model(inputs_embeds=embeds, position_ids=batch.position_ids, attention_mask=mask4,
                               use_cache=False).last_hidden_state
    m = batch.attention_mask[..., None].to(hidden.dtype)
    return F.normalize(((hidden * m).sum(1) / m.sum(1)).float(), dim=-1)


def naive_info_nce(q, d, B):
    """Each query against the B positives and its own hard negative, logits materialised."""
    s = (q @ d.T) / TEMPERATURE                                                  # [B, 2B]
    cols = torch.arange(2 * B, device=q.device)[None, :]
    allowed = (cols < B) | (cols - B == torch.arange(B, device=q.device)[:, None])
    return F.cross_entropy(s.masked_fill(~allowed, float("-inf")), torch.arange(B, device=q.device))


FIRST_LOSS = {}


def make_case(name, kind, samples, B, cfg, device, spec_pad):
    def setup():
        bb = build_backbone(cfg, device)
        bb.set_attention("sdpa" if kind == "sdpa" else "moca")
        spec = VisionSpec.from_config(bb.vlm.config)
        params = [p for p in bb.parameters() if p.requires_grad]
        auto = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

        def embed(chunk):
            batch = collate(chunk, spec, packed=kind != "sdpa", pad_token_id=spec_pad).to(device)
            if kind == "sdpa":
                return sdpa_embed(bb, batch)
            return pool_hidden(bb(batch), batch.sample_index, len(chunk))

        def loss_fn(q, d):
            if kind == "sdpa":
                return naive_info_nce(q, d, B)
            return mk.info_nce(q, d, temperature=TEMPERATURE, hard_negatives=1, hard_negative_scope="own")

        cache = mk.GradCache(embed, loss_fn, chunk_sizes=(max(B // 4, 1), max(B // 2, 1)),
                             split_fn=lambda s, n: [(s[i:i + n],) for i in range(0, len(s), n)])   # encoder(chunk)

        def step():
            for p in params:
                p.grad = None
            with auto:
                if kind == "gradcache":
                    loss = cache.step(samples[:B], samples[B:])
                else:
                    e = embed(samples)
                    loss = loss_fn(e[:B], e[B:])
                    loss.backward()
            if name not in FIRST_LOSS:
                FIRST_LOSS[name] = float(loss.detach())
            return loss
        return step
    return Case(name, setup)


def step_flops(samples, cfg) -> float:
    """Useful matmul FLOPs of one forward + backward (no GradCache re-encode): 6 x linear params x tokens,
    3.5 x the forward attention FLOPs over allowed pairs."""
    t, v = cfg.text_config, cfg.vision_config
    H, I, hd = t.hidden_size, t.intermediate_size, t.hidden_size // t.num_attention_heads
    kv = t.num_key_value_heads * hd
    lens = [len(s) for s in samples]
    T = sum(lens)
    f = 6 * t.num_hidden_layers * (2 * H * H + 2 * H * kv + 3 * H * I) * T
    f += 3.5 * 4 * hd * t.num_attention_heads * sum(n * n for n in lens) * t.num_hidden_layers
    C, vI = v.hidden_size, v.intermediate_size
    n_img = sum(int(s.image_grid_thw.prod()) // 4 for s in samples if s.image_grid_thw is not None)
    patches = 4 * n_img
    f += 6 * v.depth * (4 * C * C + 3 * C * vI) * patches + 6 * PIXEL_ROW * C * patches + 6 * (16 * C * C + 4 * C * H) * n_img
    return f


def main(argv=None):
    args, cuda, device = slice_args(__doc__.splitlines()[0], argv, "--queries", type=int, default=32,
                                    help="queries per step (default 32)")
    if not cuda:
        print("no GPU: CPU smoke run of a small model of the same structure (numbers mean nothing)")
        args.queries, args.layers, args.rep, args.warmup = 4, 1, 2, 1
    cfg = slice_config(args.layers, args.vision_blocks, small=not cuda)
    B = args.queries
    samples = make_batch(B, small=not cuda)
    T = sum(len(s) for s in samples)
    flops = step_flops(samples, cfg)
    cases = [make_case("transformers sdpa, padded", "sdpa", samples, B, cfg, device, ENDOFTEXT),
             make_case("moca packed", "packed", samples, B, cfg, device, ENDOFTEXT),
             make_case("moca packed + GradCache", "gradcache", samples, B, cfg, device, ENDOFTEXT)]
    print(f"Stage 2 step: {B} queries + {B} positives + {B} hard negatives, {T} tokens, {args.layers} LM layers, "
          f"{args.vision_blocks} vision blocks; ~{flops / 1e12:.1f} TFLOP per step (useful matmuls)")
    report = run_cases("Stage 2 train step fwd+bwd (3B-shaped slice)", cases,
                       shape=dict(queries=B, tokens=T, layers=args.layers, vision_blocks=args.vision_blocks,
                                  dtype="bf16 autocast" if cuda else "fp32"),
                       flops=flops, baseline="transformers sdpa, padded",
                       warmup=args.warmup if not args.quick else 2, rep=args.rep if not args.quick else 6,
                       out=args.out, tag=f"stage2_step_B{B}")
    print_steps(report, FIRST_LOSS, T, "same weights and samples")


if __name__ == "__main__":
    main()
