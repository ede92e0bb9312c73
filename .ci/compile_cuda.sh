#!/usr/bin/env bash
# Compile-only check of CUDA sources with nvcc against the installed torch headers (sm_90).
# The CPU wheel of torch lacks c10/cuda/impl/cuda_cmake_macros.h: a one-line stand-in is supplied.
# Usage: .ci/compile_cuda.sh [file.cu ...]   (default: every csrc/**/*.cu)
set -euo pipefail
cd "$(dirname "$0")/.."
files=("$@")
if [ ${#files[@]} -eq 0 ]; then mapfile -t files < <(find csrc -name '*.cu' | sort); fi
torch_dir=$(python -c "import os, torch; print(os.path.dirname(torch.__file__))")
py_include=$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
stub=$(mktemp -d)
trap 'rm -rf "$stub"' EXIT
mkdir -p "$stub/c10/cuda/impl"
echo '#define C10_CUDA_BUILD_SHARED_LIBS' > "$stub/c10/cuda/impl/cuda_cmake_macros.h"
for f in "${files[@]}"; do
  echo "nvcc -c $f"
  nvcc -c -std=c++20 -arch=sm_90 -O3 -DWITH_CUDA --expt-relaxed-constexpr -Xcudafe --diag_suppress=20012 \
    -I csrc -I "$stub" -I "$torch_dir/include" -I "$torch_dir/include/torch/csrc/api/include" \
    -I "$py_include" -o /dev/null "$f"
done
echo "compiled ${#files[@]} CUDA file(s)"
