#!/usr/bin/env bash
# One-call validation on a GPU machine (H100/H200: about 10 minutes per call, no network; torch with
# CUDA, triton, nvcc, ninja and compute-sanitizer preinstalled).  Run from anywhere:
#   OUT=/some/empty/dir bash tools/gpu_check.sh
# Stages, in this order, each stopped by `timeout` at its own budget and at the call's deadline
# (GPU_CHECK_DEADLINE seconds after the start, default 510), each run even when an earlier one failed:
#   build          the extension in place with its CUDA kernels (FORCE_CUDA=1,
#                  TORCH_CUDA_ARCH_LIST=9.0, ninja with MAX_JOBS = all cores)
#   tests          the CUDA and Triton tests (pytest -k "cuda or triton"): every op, and a training
#                  step of every model under CUDA bf16 and fp16 autocast, fused ops against the
#                  reference ops (test_models_*.py::test_training_step_under_autocast_matches_reference)
#   sanitizer      compute-sanitizer memcheck on a small case of each op's CUDA kernels, racecheck
#                  on those with shared memory (tools/sanitize_case.py OP)
#   bandwidth      bench/msg_pass_bandwidth.py
#   bench_ops      the op benchmarks on CUDA at full size (bench/test_<op>.py)
#   bench_models   bench/test_models.py on CUDA at full size, when that file exists
# Files under $OUT (8 at most): summary.tsv (stage, status, seconds, and the machine), build.log,
# checks.log (tests + sanitizer), bench.log (bandwidth + benchmark output), bench_ops.{md,json},
# bench_models.{md,json}.  Exit status: 0 when every stage that ran passed.
# Without a GPU (or with GPU_CHECK_DRY=1) it runs a dry run that checks this script's plumbing:
# a CPU-only build, the same test selection (Triton in its interpreter), the sanitizer drivers on
# the CPU kernels without compute-sanitizer, the benchmarks at small sizes on CPU; every GPU-only
# step is reported as skipped.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

OUT=${OUT:-$PWD/gpu_check_out}
PY=${PYTHON:-python3}
DEADLINE=${GPU_CHECK_DEADLINE:-510}
mkdir -p "$OUT"
start=$(date +%s)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
summary=$OUT/summary.tsv
failed=0

if [ "${GPU_CHECK_DRY:-0}" != 1 ] && "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  gpu=1
else
  gpu=0
fi

{
  echo "# tools/gpu_check.sh $(date -u +%Y-%m-%dT%H:%M:%SZ), mode: $([ $gpu = 1 ] && echo GPU || echo 'dry (no GPU: GPU-only steps skipped)')"
  echo "# $("$PY" -c 'import torch; print("torch", torch.__version__, "| gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")' 2>&1)"
  echo "# $("$PY" -c 'import triton; print("triton", triton.__version__)' 2>&1 | tail -1) | $( (nvcc --version 2>/dev/null | tail -1) || echo 'no nvcc') | $(nproc) cores"
  printf 'stage\tstatus\tseconds\n'
} > "$summary"

# run_stage NAME BUDGET_S LOG COMMAND: runs COMMAND (a bash string) under `timeout`, appends its
# output to LOG and a line to the summary.
run_stage() {
  local name=$1 budget=$2 log=$3 command=$4
  local left=$((DEADLINE - ($(date +%s) - start) - 15))
  local limit=$((budget < left ? budget : left))
  if [ "$limit" -lt 20 ]; then
    printf '%s\tskipped (%s s left of the %s s deadline)\t0\n' "$name" "$left" "$DEADLINE" >> "$summary"
    return
  fi
  echo "::: $name (limit ${limit} s): $command" >> "$log"
  local t0 rc status
  t0=$(date +%s)
  timeout -k 10 "$limit" bash -c "$command" >> "$log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="timeout (${limit} s)"; failed=1 ;;
    *) status="failed (exit $rc)"; failed=1 ;;
  esac
  printf '\n::: %s: %s\n' "$name" "$status" >> "$log"
  printf '%s\t%s\t%s\n' "$name" "$status" "$(($(date +%s) - t0))" >> "$summary"
}

skip_stage() {
  printf '%s\tskipped (%s)\t0\n' "$1" "$2" >> "$summary"
}

# build
if [ $gpu = 1 ]; then
  run_stage build 240 "$OUT/build.log" \
    "FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$(nproc) '$PY' setup.py build_ext --inplace &&
     '$PY' -c 'import keypointops as k; assert k.has_cuda_ops(), \"no CUDA kernels\"; print(\"CUDA kernels: ok\")'"
else
  run_stage build 240 "$OUT/build.log" \
    "FORCE_CUDA=0 MAX_JOBS=$(nproc) '$PY' setup.py build_ext --inplace && '$PY' -c 'import keypointops as k; assert k.has_ops()'"
fi

# tests: every op's CUDA and Triton tests (ids hold the device and the backend)
xdist=$("$PY" -c 'import xdist' 2>/dev/null && echo "-n 4")
run_stage tests 110 "$OUT/checks.log" \
  "'$PY' -m pytest python_tests -q -p no:cacheprovider -k 'cuda or triton' $xdist -rfE"

# sanitizer
ops="keypoint_gather msg_pass part_pool window_graph_conv"
shared_memory_ops="keypoint_gather msg_pass part_pool"   # kernels with __shared__: racecheck too
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
if [ $gpu = 1 ] && [ -n "$sanitizer" ]; then
  # One process per (tool, op), all at once; each prints its own section of checks.log.
  cat > "$scratch/sanitize.sh" <<EOF
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
pids=()
for op in $ops; do
  '$sanitizer' --tool memcheck --error-exitcode 1 --print-limit 20 '$PY' tools/sanitize_case.py \$op > '$scratch'/memcheck.\$op.log 2>&1 & pids+=(\$!)
done
for op in $shared_memory_ops; do
  '$sanitizer' --tool racecheck --error-exitcode 1 --print-limit 20 '$PY' tools/sanitize_case.py \$op > '$scratch'/racecheck.\$op.log 2>&1 & pids+=(\$!)
done
rc=0
for pid in "\${pids[@]}"; do wait \$pid || rc=1; done
for f in '$scratch'/*check.*.log; do echo "--- \$(basename \$f)"; cat \$f; done
exit \$rc
EOF
  run_stage sanitizer 90 "$OUT/checks.log" "bash '$scratch/sanitize.sh'"
elif [ $gpu = 1 ]; then
  skip_stage sanitizer "compute-sanitizer not found"; failed=1
else
  run_stage sanitizer_drivers_cpu 60 "$OUT/checks.log" \
    "for op in $ops; do SANITIZE_CASE_DEVICE=cpu '$PY' tools/sanitize_case.py \$op || exit 1; done"
  skip_stage sanitizer "no GPU: compute-sanitizer not run"
fi

# bandwidth (prints that it needs CUDA and exits 0 without a GPU)
run_stage bandwidth 40 "$OUT/bench.log" "'$PY' bench/msg_pass_bandwidth.py"

# benchmarks: full size on the GPU; small sizes on CPU in a dry run (the same plumbing)
if [ $gpu = 1 ]; then bench_env="" bench_k=cuda; else bench_env="KEYPOINTOPS_BENCH_SMALL=1" bench_k=cpu; fi
run_stage bench_ops 130 "$OUT/bench.log" \
  "$bench_env '$PY' -m pytest bench --ignore=bench/test_models.py --benchmark-only -q -p no:cacheprovider -k $bench_k --kp-results '$OUT/bench_ops.md'"
if [ -f bench/test_models.py ]; then
  run_stage bench_models 120 "$OUT/bench.log" \
    "$bench_env '$PY' -m pytest bench/test_models.py --benchmark-only -q -p no:cacheprovider -k $bench_k --kp-results '$OUT/bench_models.md'"
else
  skip_stage bench_models "bench/test_models.py does not exist yet"
fi

files=$(find "$OUT" -type f | wc -l)
printf 'total\t%s (%s files in OUT)\t%s\n' "$([ $failed = 0 ] && echo ok || echo 'FAILED stage(s) above')" \
  "$files" "$(($(date +%s) - start))" >> "$summary"
cat "$summary"
exit $failed
