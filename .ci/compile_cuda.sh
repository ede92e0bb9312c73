#!/usr/bin/env bash
# Compile-only check of CUDA sources with nvcc against the installed torch headers, for sm_80 and
# sm_90, with ptxas's resource report (-Xptxas -v: registers, spills, shared memory of every kernel
# and template instance) in the output, which tools/cuda_resources.py reads.  The code generation
# flags are setup.py's (-O3 --use_fast_math), so the report is the one of the built library.
# The CPU wheel of torch lacks c10/cuda/impl/cuda_cmake_macros.h: a one-line stand-in is supplied.
# The files compile in parallel (NVCC_JOBS at a time, default: the number of cores); each file's
# output is printed after all of them, in file order.  Exits non-zero if any file fails.
# nvcc hands the CUDA build's .cpp files (ops/cuda/register_cuda.cpp) to the host compiler.
# Usage: .ci/compile_cuda.sh [file.cu ...]   (default: every csrc/**/*.cu and csrc/ops/cuda/*.cpp)
set -euo pipefail
cd "$(dirname "$0")/.."
files=("$@")
if [ ${#files[@]} -eq 0 ]; then mapfile -t files < <(find csrc -name '*.cu' -o -path 'csrc/ops/cuda/*.cpp' | sort); fi
torch_dir=$(python -c "import os, torch; print(os.path.dirname(torch.__file__))")
py_include=$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/c10/cuda/impl"
echo '#define C10_CUDA_BUILD_SHARED_LIBS' > "$work/c10/cuda/impl/cuda_cmake_macros.h"

# compile FILE: nvcc -c of FILE, output in $work/N.log and exit status in $work/N.rc (N: the
# file's index, second argument).
compile() {
  local status=0
  nvcc -c -std=c++20 -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 -Xptxas -v -O3 \
    --use_fast_math -DWITH_CUDA --expt-relaxed-constexpr -Xcudafe --diag_suppress=20012 \
    -I csrc -I "$work" -I "$torch_dir/include" -I "$torch_dir/include/torch/csrc/api/include" \
    -I "$py_include" -o /dev/null "$1" > "$work/$2.log" 2>&1 || status=$?
  echo "$status" > "$work/$2.rc"
}
export -f compile
export work torch_dir py_include

# shellcheck disable=SC2016  # $0 and $1 expand in the inner bash
for i in "${!files[@]}"; do printf '%s\0%s\0' "${files[$i]}" "$i"; done |
  xargs -0 -n 2 -P "${NVCC_JOBS:-$(nproc)}" bash -c 'compile "$0" "$1"'

failed=0
echo "nvcc: $(nvcc --version | tail -n 1)"
for i in "${!files[@]}"; do
  echo "nvcc -c ${files[$i]}: exit $(cat "$work/$i.rc")"
  cat "$work/$i.log"
  [ "$(cat "$work/$i.rc")" = 0 ] || failed=$((failed + 1))
done
echo "compiled ${#files[@]} CUDA file(s), $failed failed"
[ "$failed" = 0 ]
