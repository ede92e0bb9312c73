"""Build script for keypointops.

C++ CPU kernels are always built.  CUDA kernels are built when torch is a CUDA build and nvcc is
found, or when FORCE_CUDA=1.  Set KEYPOINTOPS_CPU_ARCH=generic to build the CPU kernels without
AVX2/FMA (default on x86-64: AVX2+FMA+F16C when the build host supports them).

The CUDA kernels are compiled for the architectures in TORCH_CUDA_ARCH_LIST (torch's variable,
e.g. "9.0" or "8.0;9.0+PTX"); by default for sm_80, sm_86, sm_89 and sm_90 (A100, A10/RTX 30xx,
L4/L40/RTX 40xx, H100/H200) plus PTX of sm_90, which newer GPUs compile at load time.  Naming only
the GPU at hand (e.g. TORCH_CUDA_ARCH_LIST=9.0) builds about four times faster.
"""
import glob
import os
import platform

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
# The default CUDA architectures; CMakeLists.txt has the same default.
DEFAULT_CUDA_ARCH_LIST = "8.0;8.6;8.9;9.0+PTX"


def _host_has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return " avx2" in flags and " fma" in flags and " f16c" in flags
    except OSError:
        return False


def _cpu_flags():
    arch = os.environ.get("KEYPOINTOPS_CPU_ARCH", "auto")
    if arch == "generic" or platform.machine() not in ("x86_64", "AMD64"):
        return [], "generic"
    if arch == "avx2" or (arch == "auto" and _host_has_avx2()):
        # at::vec::Vectorized picks its AVX2 specialisation (Sleef exp from libtorch_cpu); its
        # float16 conversions are F16C instructions (every AVX2 CPU has them).
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"], "avx2"
    return [], "generic"


def extensions():
    sources = [os.path.join("csrc", "keypointops.cpp")]
    sources += sorted(glob.glob(os.path.join("csrc", "ops", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "ops", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "ops", "cuda", "*.cu")))

    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    with_cuda = force_cuda or (torch.version.cuda is not None and CUDA_HOME is not None)
    cpu_flags, cpu_arch = _cpu_flags()
    # -fopenmp: at::parallel_for is inline over `#pragma omp parallel` (torch's OpenMP backend);
    # without the flag the pragma is dropped and every CPU kernel runs on one thread.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-Wno-unknown-pragmas", "-DKEYPOINTOPS_PYTHON_MODULE",
           "-DPy_LIMITED_API=0x030A0000"] + cpu_flags
    define_macros = []
    if with_cuda:
        # Without it, torch builds for the GPUs of the build machine only (all of them without one).
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
        sources += cuda_sources
        define_macros.append(("WITH_CUDA", None))
        ext_cls = CUDAExtension
        extra = {"cxx": cxx + ["-DWITH_CUDA"],
                 "nvcc": ["-O3", "-std=c++20", "-DWITH_CUDA", "--use_fast_math", "-lineinfo"]}
    else:
        ext_cls = CppExtension
        extra = {"cxx": cxx}
    print(f"keypointops: building C++ CPU kernels ({cpu_arch})"
          + (f" and {len(cuda_sources)} CUDA kernel file(s) for TORCH_CUDA_ARCH_LIST="
                f"{os.environ.get('TORCH_CUDA_ARCH_LIST')}" if with_cuda else "; CUDA kernels skipped "
             "(torch has no CUDA or nvcc not found; set FORCE_CUDA=1 to force)"))
    return [ext_cls("keypointops._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
                    define_macros=define_macros, extra_compile_args=extra,
                    extra_link_args=["-fopenmp"], py_limited_api=True)]


setup(
    packages=find_packages(include=["keypointops", "keypointops.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
