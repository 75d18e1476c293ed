#!/usr/bin/env bash
# One-command GPU check of the Triton backend (docs/triton.md): CUDA tests, kernel table, model table, profile,
# launch-knob sweep and the sm_90 compile check, each part time-boxed and guarded, in well under 10 minutes on one
# H100/H200. Runs from a source checkout on a machine without a package index (torch, triton, timm installed):
#
#     OUT=/some/dir bash benchmarks/gpu_check.sh        # results in $OUT/gpu_check (default benchmarks/results/gpu)
#
# Every part writes its own log and results; a failing or timed-out part is recorded in summary.md and the next
# part runs anyway. The whole check stops starting parts after TOTAL_BUDGET seconds (default 480); BUDGET_SCALE=2
# doubles every part's own limit. SMOKE=1 checks the script itself at tiny sizes (on a CPU: Triton interpreter).
set -u
cd "$(dirname "$0")/.."
RESULTS="${OUT:+$OUT/gpu_check}"
RESULTS="${RESULTS:-benchmarks/results/gpu}"
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" MAMBAZOO_DISABLE_NATIVE=1 PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/mambazoo_triton_cache}"  # shared by the parts
PY="${PYTHON:-$(command -v python || command -v python3)}"
SCALE="${BUDGET_SCALE:-1}"
TOTAL="${TOTAL_BUDGET:-480}"
# Parallel test workers when pytest-xdist is installed: the CUDA tests spend most of their time compiling kernels.
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 6")
SIZES=""
if [ "${SMOKE:-0}" = 1 ]; then
  SIZES="--smoke --rounds 1 --model-rounds 1 --model-iters 1"
  "$PY" -c "import torch, sys; sys.exit(torch.cuda.is_available())" && export TRITON_INTERPRET=1
fi
SUMMARY="$RESULTS/summary.md"
START=$(date +%s)

{
  echo "# GPU check $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  echo "| part | exit | seconds | limit | output |"
  echo "|---|---|---|---|---|"
} > "$SUMMARY"

# part NAME LIMIT_SECONDS COMMAND...: run COMMAND under a time limit, log to NAME.log, record the outcome.
part() {
  local name=$1 limit=$(( $2 * SCALE )) began rc left
  shift 2
  began=$(date +%s)
  left=$(( TOTAL - (began - START) ))
  if [ "$left" -lt 20 ]; then
    echo "| $name | skipped (total budget of ${TOTAL}s used) | 0 | $limit | |" >> "$SUMMARY"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s, $(( began - START ))s elapsed)"
  timeout --signal=INT --kill-after=30 "$limit" "$@" > "$RESULTS/$name.log" 2>&1
  rc=$?
  tail -n 3 "$RESULTS/$name.log"
  echo "| $name | $rc$([ $rc -eq 124 ] && echo ' (time limit)') | $(( $(date +%s) - began )) | $limit | $name.log |" \
    >> "$SUMMARY"
}

part environment 60 "$PY" -c "
import torch, triton, timm
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'timm', timm.__version__)
print(torch.cuda.get_device_properties(0) if torch.cuda.is_available() else 'no CUDA device')
import mambazoo.ops as ops
print({op: ops.capabilities.backend_status(op) for op in ops.capabilities.CAPABILITIES})
"
# Correctness first: every CUDA test of the Triton kernels (67k-token N=1 sequence, determinism, torch.compile).
# shellcheck disable=SC2086  # $XDIST and $SIZES are lists of options
part tests 150 "$PY" -m pytest -q -x $XDIST -p no:cacheprovider tests/test_triton.py tests/test_triton_state_scan.py -k "not under_the_interpreter"
part kernels 100 "$PY" benchmarks/scan_gpu.py kernels --out "$RESULTS" $SIZES
part models 120 "$PY" benchmarks/scan_gpu.py models --out "$RESULTS" $SIZES
part profile 40 "$PY" benchmarks/scan_gpu.py profile --out "$RESULTS" $SIZES
part tune 60 "$PY" benchmarks/scan_gpu.py tune --out "$RESULTS" --rounds 5 $SIZES
part compile_check 60 env -u TRITON_INTERPRET "$PY" benchmarks/triton_compile_check.py --out "$RESULTS/compile_sm90.md"

echo >> "$SUMMARY"
echo "Total: $(( $(date +%s) - START )) s. Logs and tables in this folder (kernels.md, models.md, profile.md," \
     "tune.md, compile_sm90.md)." >> "$SUMMARY"
cat "$SUMMARY"
