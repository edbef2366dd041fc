#!/usr/bin/env bash
# Kept for old instructions: the pending GPU checks are now one prepared run, bench/gpu_run.sh (bench/NOTES.md,
# "The GPU run"). Part 1 runs its decision steps (gate tests, attention backward and forward, masked_patch_loss,
# masked_token_loss), part 2 the rest (shapes, sweeps, full GPU tests, ncu); no part: everything, in order.
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  1) GPU_RUN_ONLY="a b c d e" exec bash bench/gpu_run.sh ;;
  2) GPU_RUN_ONLY="f g1 g2 h i" exec bash bench/gpu_run.sh ;;
  "") exec bash bench/gpu_run.sh ;;
  *) echo "usage: bash bench/gpu_pending.sh [1|2]   (prefer: bash bench/gpu_run.sh)" >&2; exit 2 ;;
esac
