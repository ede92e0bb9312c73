"""Build script for keypointops.

C++ CPU kernels are always built.  CUDA kernels are built when torch is a CUDA build and nvcc is
found, or when FORCE_CUDA=1.

The CPU kernels (csrc/ops/cpu/*_kernel.cpp) are compiled once per CPU capability, as ATen compiles
its own: DEFAULT (no instruction-set flags: runs on any CPU of the architecture) and, on x86-64,
AVX2 (-mavx2 -mfma -mf16c) and AVX512 (-mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c,
ATen's set), each with -DCPU_CAPABILITY=<name> -DCPU_CAPABILITY_<name>.  The library picks one
when it loads, from the CPU's features (csrc/ops/cpu/cpu_capability.h), so a build from any host
runs at full vector width on every CPU.  The instruction-set flags must apply to the whole
translation unit (at::vec::Vectorized chooses its width and intrinsics from the preprocessor, which
`#pragma GCC target` and `__attribute__((target))` leave unchanged), and setuptools compiles all of
an extension's sources with one set of flags: CpuCapabilityBuildExt compiles the kernel sources
itself, once per capability into its own object folder, and links those objects after the other
sources (the first copy of each inline function the linker meets is the one without
instruction-set flags).  Set KEYPOINTOPS_CPU_CAPABILITIES (e.g. "default,avx2") to build fewer.

The CUDA kernels are compiled for the architectures in TORCH_CUDA_ARCH_LIST (torch's variable,
e.g. "9.0" or "8.0;9.0+PTX"); by default for sm_80, sm_86, sm_89 and sm_90 (A100, A10/RTX 30xx,
L4/L40/RTX 40xx, H100/H200) plus PTX of sm_90, which newer GPUs compile at load time.  Naming only
the GPU at hand (e.g. TORCH_CUDA_ARCH_LIST=9.0) compiles the kernels for one architecture instead
of four.
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


# Compiler flags of each CPU capability's build of the kernels (ATen's, cmake/Codegen.cmake);
# CMakeLists.txt has the same table.  at::vec's float16 conversions are F16C instructions.
CPU_CAPABILITY_FLAGS = {
    "default": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               # GCC 12 warns about its own AVX-512 conversion intrinsics (c10::Half's conversion
               # in at::vec) by the thousand; the same code is checked in the other builds.
               "-Wno-uninitialized", "-Wno-maybe-uninitialized"],
}


def _cpu_capabilities():
    """The capabilities to build: all of CPU_CAPABILITY_FLAGS on x86-64, DEFAULT elsewhere."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return ["default"]
    names = os.environ.get("KEYPOINTOPS_CPU_CAPABILITIES", ",".join(CPU_CAPABILITY_FLAGS)).split(",")
    unknown = sorted(set(names) - set(CPU_CAPABILITY_FLAGS))
    if unknown or "default" not in names:
        raise SystemExit(f"KEYPOINTOPS_CPU_CAPABILITIES={','.join(names)}: expected 'default' and any of "
                         f"{', '.join(CPU_CAPABILITY_FLAGS)}, comma-separated")
    return [name for name in CPU_CAPABILITY_FLAGS if name in names]


class CpuCapabilityBuildExt(BuildExtension):
    """torch's BuildExtension that also compiles each extension's ``cpu_capability_sources`` once
    per CPU capability (own flags, own object folder) and links them after its other sources."""

    def build_extension(self, ext):
        capability_objects = []
        for name in getattr(ext, "cpu_capabilities", []):
            flags = CPU_CAPABILITY_FLAGS[name] + [f"-DCPU_CAPABILITY={name.upper()}",
                                                  f"-DCPU_CAPABILITY_{name.upper()}"]
            postargs = dict(ext.extra_compile_args)
            postargs["cxx"] = list(ext.extra_compile_args["cxx"]) + flags
            capability_objects += self.compiler.compile(
                ext.cpu_capability_sources, output_dir=os.path.join(self.build_temp, f"cpu_{name}"),
                macros=ext.define_macros, include_dirs=ext.include_dirs, debug=self.debug,
                extra_postargs=postargs, depends=ext.depends)
        others = [obj for obj in ext.extra_objects or [] if obj not in capability_objects]
        ext.extra_objects = capability_objects + others
        super().build_extension(ext)


def extensions():
    sources = [os.path.join("csrc", "keypointops.cpp")]
    sources += sorted(glob.glob(os.path.join("csrc", "ops", "*.cpp")))
    kernel_sources = sorted(glob.glob(os.path.join("csrc", "ops", "cpu", "*_kernel.cpp")))
    sources += sorted(set(glob.glob(os.path.join("csrc", "ops", "cpu", "*.cpp"))) - set(kernel_sources))
    # The kernel sources are compiled by CpuCapabilityBuildExt: setuptools only sees them (and the
    # headers) as files whose change rebuilds the extension.
    depends = kernel_sources + sorted(glob.glob(os.path.join("csrc", "**", "*.h"), recursive=True))
    # The kernels (.cu) and their registration with the dispatcher (a .cpp, see register_cuda.cpp).
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "ops", "cuda", "*.cu"))
                          + glob.glob(os.path.join("csrc", "ops", "cuda", "*.cpp")))

    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    with_cuda = force_cuda or (torch.version.cuda is not None and CUDA_HOME is not None)
    cpu_capabilities = _cpu_capabilities()
    # -fopenmp: at::parallel_for is inline over `#pragma omp parallel` (torch's OpenMP backend);
    # without the flag the pragma is dropped and every CPU kernel runs on one thread.
    # -g0 overrides Python's -g: debug information costs a third of the compile time of each of
    # the kernels' three builds.
    cxx = ["-O3", "-g0", "-std=c++20", "-fopenmp", "-Wno-unknown-pragmas", "-DKEYPOINTOPS_PYTHON_MODULE",
           "-DPy_LIMITED_API=0x030A0000"]
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
    print(f"keypointops: building C++ CPU kernels ({', '.join(cpu_capabilities)})"
          + (f" and {len(cuda_sources)} CUDA source file(s) for TORCH_CUDA_ARCH_LIST="
                f"{os.environ.get('TORCH_CUDA_ARCH_LIST')}" if with_cuda else "; CUDA kernels skipped "
             "(torch has no CUDA or nvcc not found; set FORCE_CUDA=1 to force)"))
    ext = ext_cls("keypointops._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
                  define_macros=define_macros, extra_compile_args=extra, depends=depends,
                  extra_link_args=["-fopenmp"], py_limited_api=True)
    ext.cpu_capability_sources = kernel_sources
    ext.cpu_capabilities = cpu_capabilities
    return [ext]


setup(
    packages=find_packages(include=["keypointops", "keypointops.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": CpuCapabilityBuildExt},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
