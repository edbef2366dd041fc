#!/usr/bin/env bash
# THE GPU run: every pending GPU check in one command of at most 7 minutes on an H100 (machine start-up excluded),
# so that a rerun still fits a 15-minute device budget. Steps run in decision order, each under its own `timeout`,
# each leaving its log and results in $OUT/gpu_run.tgz before the next starts (a cut-off run still returns what it
# did); the end prints a summary row per step and the decisions of bench/decide.py (bench/NOTES.md, "Decision
# table"). It never compiles moca_kernels._C: it says whether the one carried with the tree loads.
#
#   bash bench/gpu_run.sh                  # on the GPU machine (device tool: run, carry .whl and the built _C)
#   bash bench/gpu_run.sh --cpu-smoke      # or GPU_RUN_SMOKE=1: the same steps on CPU, Triton interpreted, tiny
#                                          # shapes (tests/test_gpu_run.py); timings mean nothing there
#
# Budget (seconds, H100; each is the step's `timeout`; fixed steps sum to 415, h gets what they leave of 420):
#
#   | step         | what                                                                              | budget |
#   | setup        | peers' wheels (.whl/), editable install without building, versions, _C loads?     |     20 |
#   | a gate_tests | GPU tests that gate a default: attention fwd/bwd variants, masked_patch_loss,     |     70 |
#   |              | masked_token_loss variants (pytest -m gpu, junit XML)                             |        |
#   | b attn_bwd   | attention backward base / even / fused against FlexAttention (sweep_attention_bwd) |     80 |
#   | c mpl        | masked_patch_loss cuda v1 / v2 / v2p, triton v1 / v2, phases (bench --quick)      |     35 |
#   | d mtl        | masked_token_loss v1 / v2 / v3, per-kernel profile, Liger, CCE filtered + exact   |     60 |
#   | e attn_fwd   | attention forward base / ws / tma against FlexAttention (sweep_attention_fwd)     |     40 |
#   | f shapes     | attention at the 7B-text (group 7) and vision (D = 80) shapes (bench_attention)   |     40 |
#   | g1 sweep_nce | info_nce scaling sweep B = M = 4096 ... 262144 (bench_info_nce --sweep)           |     20 |
#   | g2 sweep_mtl | masked_token_loss G chunk budget 32 / 48 / 64 MiB (bench_masked_token_loss --chunks)|     15 |
#   | h full_tests | the rest of the GPU test suite (pytest tests -m gpu, gate files left out)         | 420 - elapsed - 35 |
#   | i ncu        | where ncu exists: dK/dV + dQ kernels, masked_patch_loss (one launch each)         |     35 |
#
# Environment: OUT (results; default /tmp/moca_gpu_run), GPU_RUN_SMOKE=1, GPU_RUN_TOTAL (default 420),
# GPU_RUN_ONLY="b c" (run only these steps, setup always; the others get a SKIPPED row), GPU_RUN_WORK (work
# folder), GPU_RUN_DRY=1 (write each step's command to its log instead of running it), GPU_RUN_BUILD_C=1 (the
# one exception to "never compiles": when no _C built for the GPU machine's CPython 3.12 travels with the tree,
# build it in the setup step, budget 120 s more; bench/NOTES.md says why).
# $OUT receives at most 5 files (the device tool returns 8): gpu_run.tgz (every log and result, refreshed after
# each step), summary.txt, run.json and decisions.txt (bench/decide.py), gpu_run.log (this script's own output,
# when the caller tees it there).
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=${GPU_RUN_SMOKE:-0}
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) SMOKE=1 ;;
    *) echo "usage: bash bench/gpu_run.sh [--cpu-smoke]" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-/tmp/moca_gpu_run}
W=${GPU_RUN_WORK:-/tmp/moca_gpu_run_work}
rm -rf "$W"; mkdir -p "$W/results" "$W/logs" "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
TOTAL=${GPU_RUN_TOTAL:-420}
T0=$(date +%s)
SCALE=1
SMOKE_FLAG=""
if [ "$SMOKE" = 1 ]; then
  export TRITON_INTERPRET=1   # Triton kernels on CPU tensors; every step takes its tiny shapes
  export MOCA_BENCH_PLOTS=0   # no PNGs (matplotlib costs seconds per report on a small CPU)
  SCALE=5                     # a shared CPU is slow: the budgets are caps, never the point of the smoke run
  SMOKE_FLAG="--smoke"
fi
printf 'step\tbudget_s\tused_s\tcpu_s\trc\tstatus\tnote\n' > "$W/summary.tsv"
FAILED=0

pack() {
  tar czf "$OUT/gpu_run.tgz.part" -C "$W" . 2>/dev/null && mv "$OUT/gpu_run.tgz.part" "$OUT/gpu_run.tgz"
  column -t -s $'\t' "$W/summary.tsv" > "$OUT/summary.txt" 2>/dev/null || cp "$W/summary.tsv" "$OUT/summary.txt"
}

wanted() {  # step name -> 0 if GPU_RUN_ONLY is unset or names it
  [ -z "${GPU_RUN_ONLY:-}" ] && return 0
  case " $GPU_RUN_ONLY " in *" $1 "*) return 0 ;; esac
  return 1
}

row() { printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$6" "$7" >> "$W/summary.tsv"; }
cpu_s() {  # CPU_S = user + system seconds of this script's finished children so far (`times` in this shell)
  times > "$W/.times"
  CPU_S=$(tail -1 "$W/.times" | awk '{ s = 0; for (i = 1; i <= 2; i++) { split($i, a, "m"); s += a[1] * 60 + a[2] } printf "%.0f", s }')
}

# step NAME BUDGET_S CMD...: run CMD under timeout (budget x SCALE), log to logs/NAME.log, one summary row.
step() {
  local name=$1 budget=$2; shift 2
  local key=${name%% *}
  if [ "$key" != setup ] && ! wanted "$key"; then row "$name" "$budget" 0 0 - SKIPPED "not in GPU_RUN_ONLY"; return 0; fi
  if [ "$budget" -le 0 ]; then row "$name" 0 0 0 - SKIPPED "no time left"; pack; return 0; fi
  local log="$W/logs/${name// /_}.log" t=$(date +%s) c0
  if [ "${GPU_RUN_DRY:-0}" = 1 ]; then   # the commands only (tests/test_gpu_run.py checks the GPU branch's)
    printf '%q ' "$@" > "$log"; echo >> "$log"
    row "$name" "$budget" 0 0 0 ok "dry run"; return 0
  fi
  cpu_s; c0=$CPU_S
  echo "[gpu_run +$(( t - T0 ))s] $name (budget ${budget}s): $*"
  timeout -k 10 $(( budget * SCALE )) "$@" > "$log" 2>&1
  local rc=$? used=$(( $(date +%s) - t )) status=ok note=""
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    status=TIMEOUT; note="cut at ${used}s; log has what ran"; FAILED=$((FAILED + 1))
  elif [ $rc -ne 0 ]; then
    status=FAILED; FAILED=$((FAILED + 1))
    note=$(grep -E "Error|error|FAILED|Traceback" "$log" | tail -1 | tr '\t' ' ' | cut -c1-100)
  fi
  cpu_s
  row "$name" "$budget" "$used" $(( CPU_S - c0 )) "$rc" "$status" "$note"
  [ "$status" != ok ] && tail -8 "$log"
  pack
}

# ---- setup (not a decision; 20 s) -------------------------------------------------------------------------
if [ "$SMOKE" != 1 ] && [ "${GPU_RUN_DRY:-0}" != 1 ] && ls .whl/*.whl >/dev/null 2>&1; then   # liger-kernel, cut-cross-entropy, inf-cl (NOTES.md)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/moca_site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/moca_site
fi
if [ "$SMOKE" = 1 ]; then
  # no install on the CPU machine (the test must not change the environment): the tree is on PYTHONPATH
  step "setup" 20 $PY -c "import sys, torch, triton, moca_kernels; from moca_kernels import _ext
print('smoke run on', sys.platform, 'torch', torch.__version__, 'triton', triton.__version__)
print('moca_kernels._C:', 'loads' if _ext.available() else 'does not load: ' + str(_ext.unavailable_reason()))"
else
  if [ "${GPU_RUN_BUILD_C:-0}" = 1 ]; then
    SETUP_BUDGET=140; INSTALL_ENV="MOCA_KERNELS_CUDA_ARCHS=90a MOCA_KERNELS_REQUIRE_CUDA_BUILD=1"
  else
    SETUP_BUDGET=20; INSTALL_ENV="MOCA_KERNELS_SKIP_CUDA_BUILD=1"
  fi
  step "setup" $SETUP_BUDGET bash -c "nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv,noheader
    echo 'install: $INSTALL_ENV'
    env $INSTALL_ENV $PY -m pip install -q --no-deps --no-build-isolation -e . || echo 'editable install failed (the tree is on PYTHONPATH anyway)'
    $PY -c \"import torch, triton; from moca_kernels import _ext
print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())
print('moca_kernels._C (carried, not built here):', 'loads' if _ext.available() else 'DOES NOT LOAD: ' + str(_ext.unavailable_reason()))\"
    command -v ncu || echo 'ncu: not found'"
fi
cat "$W/logs/setup.log"

R=$W/results
GATE_FILES="tests/moca_kernels/attention/test_forward_variants.py tests/moca_kernels/attention/test_backward_variants.py
tests/moca_kernels/losses/test_masked_patch_loss.py tests/moca_kernels/losses/test_masked_token_loss_variants.py"

# ---- a: the GPU tests that gate a default change ----------------------------------------------------------
step "a gate_tests" 70 $PY -m pytest $GATE_FILES -m gpu -q -p no:cacheprovider --maxfail=20 \
  --junitxml="$R/gate_tests.xml"

# ---- b: attention backward variants against Flex -----------------------------------------------------------
step "b attn_bwd" 80 $PY bench/sweep_attention_bwd.py --tune 2 --json "$R/attention_bwd.json" $SMOKE_FLAG

# ---- c: masked_patch_loss variants -------------------------------------------------------------------------
if [ "$SMOKE" = 1 ]; then C_ARGS="--smoke --warmup 0 --rep 1"; else C_ARGS=""; fi
step "c mpl" 35 $PY bench/bench_masked_patch_loss.py --quick --out "$R" $C_ARGS

# ---- d: masked_token_loss variants, per-kernel profile, CCE filtered and exact ----------------------------
step "d mtl" 60 $PY bench/bench_masked_token_loss.py --quick --profile --out "$R" $SMOKE_FLAG

# ---- e: attention forward variants against Flex ------------------------------------------------------------
step "e attn_fwd" 40 $PY bench/sweep_attention_fwd.py --tune 2 --json "$R/attention_fwd.json" $SMOKE_FLAG

# ---- f: the 7B-text and vision shapes ----------------------------------------------------------------------
step "f shapes" 40 $PY bench/bench_attention.py --quick --shapes 7B-text vision --out "$R" $SMOKE_FLAG

# ---- g: scaling sweeps (smoke: bench_info_nce runs B = M = 32 instead; the sweep loop itself is GPU-only) ----
step "g1 sweep_nce" 20 $PY bench/bench_info_nce.py --quick --sweep 4096 16384 65536 262144 --out "$R" $SMOKE_FLAG
if [ "$SMOKE" = 1 ]; then G2_CHUNKS="32"; else G2_CHUNKS="32 48 64"; fi   # smoke: one chunk budget, same loop
step "g2 sweep_mtl" 15 $PY bench/bench_masked_token_loss.py --quick --chunks $G2_CHUNKS --out "$R" $SMOKE_FLAG

# ---- h: the rest of the GPU test suite, if time is left (35 s kept for i) ----------------------------------
IGNORES=$(for f in $GATE_FILES; do printf -- '--ignore=%s ' "$f"; done)
if [ "$SMOKE" = 1 ]; then
  # collecting the whole suite costs ~30 s of CPU with nothing to run without a GPU: one small file stands in
  step "h full_tests" 60 $PY -m pytest tests/moca_kernels/test_grad_cache.py -m gpu -q -p no:cacheprovider \
    --junitxml="$R/full_tests.xml"
else
  H_BUDGET=$(( TOTAL - ($(date +%s) - T0) - 35 ))
  step "h full_tests" "$H_BUDGET" $PY -m pytest tests -m gpu -q -p no:cacheprovider --maxfail=25 $IGNORES \
    --junitxml="$R/full_tests.xml"
fi

# ---- i: Nsight Compute, one launch of each kernel ----------------------------------------------------------
NCU_SECTIONS="--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats"
if command -v ncu >/dev/null 2>&1 && [ "$SMOKE" != 1 ]; then
  step "i ncu" 35 bash -c "ncu --clock-control none $NCU_SECTIONS -k 'regex:_bwd_(dkdv|dq)_kernel' -c 2 \
      $PY bench/ncu_targets.py attention_bwd && \
    ncu --clock-control none $NCU_SECTIONS -k 'regex:mpl_fwd|masked_patch_loss_fwd' -c 1 $PY bench/ncu_targets.py masked_patch_loss"
else
  # no ncu (or the smoke run): the profiled script itself still runs, so it cannot fail on the GPU for Python
  step "i ncu" 35 bash -c "echo 'ncu not run ($( [ "$SMOKE" = 1 ] && echo smoke run || echo not installed)): the targets run without it'; \
    $PY bench/ncu_targets.py attention_bwd masked_patch_loss $SMOKE_FLAG"
fi

# ---- summary and decisions ---------------------------------------------------------------------------------
$PY bench/decide.py "$W" --write "$W/run.json" > "$W/decisions.txt" 2>&1 || echo "decide.py failed (see decisions.txt)"
cp "$W/run.json" "$OUT/run.json" 2>/dev/null
cp "$W/decisions.txt" "$OUT/decisions.txt"
pack
echo
echo "gpu_run: $(( $(date +%s) - T0 )) s in all (budget ${TOTAL} s$( [ "$SMOKE" = 1 ] && echo ', CPU smoke run'))"
cat "$OUT/summary.txt"
echo
cat "$W/decisions.txt"
exit $(( FAILED > 0 ))
