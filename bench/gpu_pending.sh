#!/usr/bin/env bash
# The GPU checks still pending (bench/NOTES.md says which numbers are unmeasured), in two calls that each fit
# one device command (10 min) and together about fill a 15-minute session with its start-up (if time is short,
# part 1 alone decides the defaults; in part 2 the jobs are in order of importance):
#
#   bash bench/gpu_pending.sh 1   # ~7 min: build; every kernel GPU test (the new masked_patch_loss and attention
#                                 # variants, info_nce tf32); masked_patch_loss variants side by side (v1 with
#                                 # set_materialize_grads, v2, v2p, triton v2); attention backward variants
#                                 # (base/even/fused) and forward variants (base/ws/tma) against Flex
#   bash bench/gpu_pending.sh 2   # ~6 min: masked_token_loss v1/v2/v3 and per-kernel breakdown; info_nce
#                                 # scaling sweep up to B = 262144 (fits one 80 GB card?); attention at the 7B-text
#                                 # and vision-tower shapes; the G chunk budget sweep
#
# Part 1 first: it decides the default kernel variants of masked_patch_loss (cuda:v2 / cuda:v2p / triton:v2) and
# masked_attention (triton:ws / tma, triton:even / fused); part 2 those of masked_token_loss (triton:v2 / v3). The
# benchmarks pass each variant as impl= (README, "Kernel variants"). Both write under $OUT (logs,
# gpu_check.tgz with every JSON/PNG/log) through bench/gpu_check.sh, which this only drives.
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:-1}
case "$part" in
  1)
    TEST_TIMEOUT=${TEST_TIMEOUT:-240} BENCH_TIMEOUT=${BENCH_TIMEOUT:-150} \
      TEST_PATHS="${TEST_PATHS:-tests/moca_kernels}" \
      bash bench/gpu_check.sh masked_patch_loss "sweep_attention_bwd:--tune 2" sweep_attention_fwd
    ;;
  2)
    SKIP_TESTS=1 BENCH_TIMEOUT=${BENCH_TIMEOUT:-200} \
      bash bench/gpu_check.sh "masked_token_loss:--profile" "info_nce:--sweep 4096 16384 65536 262144" \
      "attention:--shapes 7B-text vision" "masked_token_loss:--chunks 32 48 64"
    ;;
  *)
    echo "usage: bash bench/gpu_pending.sh 1|2" >&2
    exit 2
    ;;
esac
