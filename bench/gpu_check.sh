#!/usr/bin/env bash
# The one GPU check: on a bare GPU machine holding this repository's source, install without network, run the
# GPU tests and every benchmark at its headline shape, and print a short table. Target: under 8 minutes on an
# H100. Usage: bash bench/gpu_check.sh [jobs...]   (default: every bench/bench_*.py with --quick)
# A job is NAME or "NAME:ARGS": bench/bench_NAME.py runs with --quick ARGS; any other bench/NAME.py (sweeps)
# runs with ARGS alone. Example: bash bench/gpu_check.sh masked_patch_loss "info_nce:--sweep 4096 262144"
# Environment: OUT (gets gpu_tests.log and gpu_check.tgz with every log and result; default /tmp/moca_gpu), SKIP_TESTS=1, SKIP_BENCH=1,
# TEST_TIMEOUT / BENCH_TIMEOUT (seconds), TEST_PATHS (default tests), PYTEST_ARGS (extra pytest arguments).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/moca_gpu}
W=/tmp/moca_gpu_work   # logs and results; $OUT gets one tarball of them plus the test log (few files come back)
rm -rf "$W"; mkdir -p "$W/results" "$OUT"
export PYTHONUNBUFFERED=1
t0=$(date +%s)
stamp() { echo "[gpu_check +$(( $(date +%s) - t0 ))s] $*"; }

# Peers (liger-kernel, cut-cross-entropy, inf-cl) travel as pure-Python wheels in .whl/ (see bench/NOTES.md).
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/moca_site .whl/*.whl \
    && export PYTHONPATH=/tmp/moca_site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv,noheader || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

stamp "building (archs ${MOCA_KERNELS_CUDA_ARCHS:-90a})"
MOCA_KERNELS_CUDA_ARCHS=${MOCA_KERNELS_CUDA_ARCHS:-90a} MOCA_KERNELS_REQUIRE_CUDA_BUILD=1 \
  python3 -m pip install -q --no-deps --no-build-isolation -e . > "$W/build.log" 2>&1 \
  || { stamp "build FAILED"; tail -40 "$W/build.log"; }
python3 -c "from moca_kernels import _ext; print('moca_kernels._C:', _ext.available() or _ext.unavailable_reason())"

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  stamp "GPU tests"
  timeout "${TEST_TIMEOUT:-180}" python3 -m pytest ${TEST_PATHS:-tests} -m gpu -q --maxfail=25 --durations=12 -p no:cacheprovider \
    ${PYTEST_ARGS:-} > "$OUT/gpu_tests.log" 2>&1
  echo "pytest exit $?"; grep -E "passed|failed|error" "$OUT/gpu_tests.log" | tail -3
  grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -20
fi

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  names=("$@")
  [ ${#names[@]} -eq 0 ] && names=($(ls bench/bench_*.py | sed 's#bench/bench_##; s#\.py##'))
  i=0
  for job in "${names[@]}"; do
    i=$((i + 1)); n=${job%%:*}; jargs=""; [ "$job" != "$n" ] && jargs=${job#*:}
    log="$W/bench_${i}_$n.log"
    stamp "bench $n $jargs"
    if [ -f "bench/bench_$n.py" ]; then
      timeout "${BENCH_TIMEOUT:-150}" python3 "bench/bench_$n.py" --quick --out "$W/results" $jargs > "$log" 2>&1
    elif [ -f "bench/$n.py" ]; then
      timeout "${BENCH_TIMEOUT:-150}" python3 "bench/$n.py" $jargs > "$log" 2>&1
    else
      echo "no bench/bench_$n.py or bench/$n.py" > "$log"; false
    fi
    rc=$?; [ $rc -ne 0 ] && { echo "bench $n exit $rc"; tail -15 "$log"; }
    tar czf "$OUT/gpu_check.tgz" -C "$W" . 2>/dev/null   # after every bench: a cut-off run still returns what it did
  done
  python3 bench/summary.py "$W/results"
fi
cp "$OUT/gpu_tests.log" "$W/" 2>/dev/null
tar czf "$OUT/gpu_check.tgz" -C "$W" . 2>/dev/null
stamp "done"
