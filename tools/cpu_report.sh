#!/usr/bin/env bash
# This machine's CPU benchmark report in one command, for bench/results/ (one full set per CPU kind):
#   bash tools/cpu_report.sh [OUT_DIR]        (default: bench/results)
# Run it on a quiet machine (nothing else running); it takes 20-30 minutes on 2 cores.  It writes,
# each file named after the CPU (bench/machine.py: model name, family, model) and the date:
#   cpu-ops-<cpu>-<date>.{md,json}    the four op benchmarks at full size, 2 threads, every
#                                     implementation but the reference: medians, speed-ups, peak
#                                     memory and the fractions of this machine's floors
#   cpu-capabilities-<cpu>-<date>.md  the avx2 and avx512 builds against each other in interleaved
#                                     rounds (bench/capabilities.py), where the CPU runs AVX-512
#   cpu-floor-gaps-<cpu>-<date>.md    what the floors leave out (bench/floor_gaps.py)
# Each file starts with the line that names the machine.  KEYPOINTOPS_BENCH_SMALL=1 runs everything
# at the benchmarks' small sizes (a check of this script, not a measurement).  Exit status: non-zero
# when a stage failed; the later stages run anyway.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
OUT=${1:-bench/results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
name=$("$PY" bench/machine.py --slug)-$(date -u +%Y-%m-%d)
[ "${KEYPOINTOPS_BENCH_SMALL:-0}" = 1 ] && name=$name-small
"$PY" bench/machine.py
failed=0

echo "::: op benchmarks -> $OUT/cpu-ops-$name.md"
"$PY" -m pytest bench/test_part_pool.py bench/test_window_graph_conv.py bench/test_msg_pass.py \
  bench/test_keypoint_gather.py --benchmark-only --kp-threads 2 -k "not reference" -q -p no:cacheprovider \
  --kp-results "$OUT/cpu-ops-$name.md" || failed=1

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
