#!/usr/bin/env bash
# The GPU check: one command that builds, tests and benchmarks the package on a CUDA machine, offline.
usage() {
  cat <<'EOF'
usage: tools/gpu_check.sh [OUT_DIR] [--quick]

Builds fused_hourglass._C in place for sm_90 only against this machine's python and torch (FH_FORCE_CUDA=1,
TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS from nproc; no network, no pip install), then, each step under its own
time limit inside one overall budget (so one hang cannot take the whole run):
  kernels    registers, spills, shared memory and wgmma of every kernel for sm_90 (fused_hourglass.kernel_report)
  tests      pytest -m "gpu or interp_gpu_tiles" tests (the latter launch every autotune configuration for real)
  sanitizer  compute-sanitizer --tool memcheck on the upsample_add GPU test, when the tool is there
  bench      tools/gpu_bench.py bench: ceilings, CUDA ops, residual block and hourglass level, full model,
             largest batch in 16 GiB (skipped with --quick)
and writes OUT_DIR/results.json and OUT_DIR/report.md (machine, driver, torch and triton versions, the tables),
with one log per step beside them (at most 8 files in all), then prints the report.

  OUT_DIR   default: ./gpu-report
  --quick   build, kernels and tests only
Budget: the whole run 470 s (--quick 230 s), FH_GPU_CHECK_BUDGET overrides; PYTHON picks the interpreter
(default python3). Exit status: 0 all steps passed, 1 a step failed or timed out, 2 bad arguments,
3 no CUDA device (the report says so).
EOF
}

set -uo pipefail
OUT=gpu-report
QUICK=0
out_given=0
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --quick) QUICK=1 ;;
    -*) echo "gpu_check.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    *)
      if [ $out_given = 1 ]; then echo "gpu_check.sh: one OUT_DIR only, got another: $1" >&2; exit 2; fi
      OUT=$1; out_given=1 ;;
  esac
  shift
done

mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
if [ $QUICK = 1 ]; then BUDGET=${FH_GPU_CHECK_BUDGET:-230}; else BUDGET=${FH_GPU_CHECK_BUDGET:-470}; fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
STEPS=$WORK/steps.tsv
: > "$STEPS"
rm -f "$OUT/results.json" "$OUT/report.md"
start=$(date +%s)
failed=0
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

elapsed() { echo $(( $(date +%s) - start )); }

# step NAME LIMIT_S LOG CMD...: run CMD under `timeout`, its output in OUT/LOG, within what is left of the budget
# (10 s kept for the report); record name, status, seconds, log and exit code.
step() {
  local name=$1 limit=$2 log=$3 left rc status t0
  shift 3
  left=$(( BUDGET - $(elapsed) - 10 ))
  if [ "$left" -lt 15 ]; then
    printf '%s\tskipped (budget spent)\t0\t-\t\n' "$name" >> "$STEPS"
    echo "== $(elapsed)s: $name skipped: the ${BUDGET} s budget is spent"
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $(elapsed)s: $name (limit ${limit} s, log $log)"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$log" 2>&1
  rc=$?
  if [ $rc = 0 ]; then status=ok; elif [ $rc = 124 ] || [ $rc = 137 ]; then status=timeout; else status=failed; fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" "$log" "$rc" >> "$STEPS"
  if [ $status != ok ]; then
    failed=1
    echo "   $name: $status (exit $rc); last lines of $log:"
    tail -n 40 "$OUT/$log" | sed 's/^/   | /'
  fi
  return $rc
}

finish() {
  local code=$1 args=(--steps "$STEPS")
  [ -f "$WORK/kernels.json" ] && args+=(--kernels "$WORK/kernels.json")
  [ -f "$WORK/tests.xml" ] && args+=(--junit "$WORK/tests.xml")
  [ $QUICK = 1 ] && args+=(--quick)
  echo "== $(elapsed)s: report"
  "$PY" tools/gpu_bench.py report "$OUT" "${args[@]}" || code=1
  echo "== $(elapsed)s in all; results in $OUT/results.json and $OUT/report.md"
  exit "$code"
}

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" > "$WORK/cuda.txt" 2>&1; then
  echo "gpu_check.sh: no CUDA device visible to $PY ($("$PY" -c 'import torch; print("torch", torch.__version__)' \
    2>&1 | tail -n 1)): nothing to build or run; see $OUT/report.md"
  printf 'cuda device\tskipped (no CUDA device)\t0\t-\t3\n' >> "$STEPS"
  finish 3
fi

JOBS=$(nproc 2>/dev/null || echo 4)
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export CUDA_HOME
if ! step build 300 build.log env FH_FORCE_CUDA=1 FH_PTXAS_VERBOSE=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$JOBS" \
    "$PY" setup.py build_ext --inplace; then
  echo "gpu_check.sh: the build failed; nothing else runs"
  finish 1
fi

step kernels 90 kernels.log "$PY" -m fused_hourglass.kernel_report --arch 90 --build-log "$OUT/build.log" \
  --jobs "$JOBS" --json "$WORK/kernels.json"

step tests 150 tests.log env FH_REQUIRE_EXTENSION=1 "$PY" -m pytest -q -p no:cacheprovider -rfEs \
  --benchmark-disable -m "gpu or interp_gpu_tiles" --junitxml="$WORK/tests.xml" tests

if [ $QUICK = 0 ]; then
  SANITIZER=$(command -v compute-sanitizer || ls "$CUDA_HOME"/bin/compute-sanitizer 2>/dev/null || true)
  if [ -n "$SANITIZER" ]; then
    step sanitizer 90 sanitizer.log "$SANITIZER" --tool memcheck --error-exitcode 9 --target-processes all \
      "$PY" -m pytest -q -p no:cacheprovider --benchmark-disable -m gpu tests/test_upsample_add.py
  else
    printf 'sanitizer\tskipped (compute-sanitizer not found)\t0\t-\t\n' >> "$STEPS"
  fi
  # The sections start no new measurement after their share of this; the step's own limit is 30 s more.
  left=$(( BUDGET - $(elapsed) - 40 ))
  [ "$left" -gt 270 ] && left=270
  step bench 300 bench.log "$PY" tools/gpu_bench.py bench --out "$OUT/results.json" --budget-s "$(( left > 1 ? left : 1 ))"
fi
finish $failed
