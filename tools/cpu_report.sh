#!/usr/bin/env bash
# This machine's CPU benchmark report in one command, for bench/results/ (one full set per CPU kind):
#   bash tools/cpu_report.sh [OUT_DIR]        (default: bench/results)
# Run it on a quiet machine (nothing else running); it takes 20-30 minutes on 2 cores.  It writes,
# each file named after the CPU (bench/machine.py: model name, family, model) and the date:
#   cpu-ops-<cpu>-<date>.{md,json}    the four op benchmarks at full size, 2 threads, every
#                                     implementation but the reference: medians, speed-ups, peak
#                                     memory and the fractions of this machine's floors;
#                                     window_graph_conv on both CPU GEMM routes
#   cpu-capabilities-<cpu>-<date>.md  the avx2 and avx512 builds against each other in interleaved
#                                     rounds (bench/capabilities.py), where the CPU runs AVX-512
#   cpu-floor-gaps-<cpu>-<date>.md    what the floors leave out (bench/floor_gaps.py)
# Each file starts with the line that names the machine (with the kernels PyTorch's GEMMs run).
# KEYPOINTOPS_MKL_INTEL_KERNELS=1 runs it all with oneMKL made to run the kernels it runs on an Intel
# CPU (bench/mkl_intel_kernels.c; the files then end in -mkl-intel-kernels): on an AMD CPU, the
# fused ops against the GEMM baselines of an Intel one.  KEYPOINTOPS_BENCH_SMALL=1 runs everything
# at the benchmarks' small sizes (a check of this script, not a measurement).
# KEYPOINTOPS_BENCH_INTERLEAVE=N also times each op benchmark group in N interleaved rounds, which
# the tables then use (on a VM whose speed drifts, ratios from one timing each can be far off; the
# report then takes several times longer, most of it in the slowest baselines).  Exit status: non-zero
# when a stage failed; the later stages run anyway.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
OUT=${1:-bench/results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
name=$("$PY" bench/machine.py --slug)-$(date -u +%Y-%m-%d)
[ "${KEYPOINTOPS_BENCH_SMALL:-0}" = 1 ] && name=$name-small
if [ "${KEYPOINTOPS_MKL_INTEL_KERNELS:-0}" = 1 ]; then
  shim_dir=$(mktemp -d)
  trap 'rm -rf "$shim_dir"' EXIT
  "${CC:-cc}" -shared -fPIC -O2 -o "$shim_dir/libmkl_intel_kernels.so" bench/mkl_intel_kernels.c ||
    { echo "cpu_report.sh: could not build bench/mkl_intel_kernels.c" >&2; exit 1; }
  export LD_PRELOAD="$shim_dir/libmkl_intel_kernels.so${LD_PRELOAD:+ $LD_PRELOAD}"
  name=$name-mkl-intel-kernels
fi
machine=$("$PY" bench/machine.py) || exit 1
echo "$machine"
if [ "${KEYPOINTOPS_MKL_INTEL_KERNELS:-0}" = 1 ] && [[ $machine != *"its GEMMs: oneMKL, AVX"* ]]; then
  echo "cpu_report.sh: bench/mkl_intel_kernels.c did not give oneMKL's AVX kernels: $machine" >&2
  exit 1
fi
failed=0

echo "::: op benchmarks -> $OUT/cpu-ops-$name.md"
"$PY" -m pytest bench/test_part_pool.py bench/test_window_graph_conv.py bench/test_msg_pass.py \
  bench/test_keypoint_gather.py --benchmark-only --kp-threads 2 -k "not reference" -q -p no:cacheprovider \
  --kp-interleave "${KEYPOINTOPS_BENCH_INTERLEAVE:-0}" --kp-results "$OUT/cpu-ops-$name.md" || failed=1

# bench/capabilities.py's own test of whether this CPU and build run the avx512 kernels.
if "$PY" -c 'import sys; sys.path.insert(0, "bench"); from capabilities import runs; sys.exit(not runs("avx512"))'; then
  echo "::: instruction-set builds -> $OUT/cpu-capabilities-$name.md"
  "$PY" bench/capabilities.py --threads 2 > "$OUT/cpu-capabilities-$name.md" || failed=1
else
  echo "::: instruction-set builds: skipped (no AVX-512 here)"
fi

echo "::: floor gaps -> $OUT/cpu-floor-gaps-$name.md"
"$PY" bench/floor_gaps.py --threads 2 > "$OUT/cpu-floor-gaps-$name.md" || failed=1
exit $failed
