"""The machine a benchmark ran on, in one line, for the head of every result it writes.

CPU results differ by CPU kind, and the model name alone does not tell the kinds apart (every AMD
VM here reports "AMD EPYC", Zen 3 and Zen 5 alike): the line also gives the CPU family and model
numbers, the vector extensions the kernels and PyTorch's baselines dispatch on, and the kernels
PyTorch's GEMMs run: oneMKL chooses them by CPU vendor as well as by instruction set (on an AMD CPU
it runs its kernels for other vendors' CPUs, which reach less than half the matmul rate of its
AVX-512 kernels on the same cores), so the baselines built on matmul / bmm / einsum are faster on an
Intel CPU of the same vector width.
"""
from __future__ import annotations

import functools
import os
import platform
import re
import subprocess
import sys

import torch

# (cpuinfo flag, name in the line), in the order printed.
VECTOR_FLAGS = [("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"),
                ("avx512_vnni", "AVX512-VNNI"), ("amx_tile", "AMX")]


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty off Linux)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def _model_name(info: dict[str, str]) -> str:
    return info.get("model name") or platform.processor() or platform.machine()


def _family_model(info: dict[str, str]) -> tuple[str, str] | None:
    """The CPU family and model numbers, where /proc/cpuinfo gives them."""
    if "cpu family" in info and "model" in info:
        return info["cpu family"], info["model"]
    return None


@functools.lru_cache(maxsize=None)
def gemm_description() -> str:
    """The kernels PyTorch's float32 GEMMs run here, e.g. "oneMKL, AVX-512 kernels" or "oneMKL,
    non-Intel kernels": read from oneMKL's verbose banner (MKL_VERBOSE) in a
    child process, which inherits this one's environment (LD_PRELOAD included)."""
    if not torch.backends.mkl.is_available():
        return "not oneMKL"
    code = "import torch; a = torch.ones(64, 64); a @ a"
    env = dict(os.environ, MKL_VERBOSE="1")
    try:
        banner = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return "oneMKL, kernels unknown"
    # "... for Intel(R) 64 architecture <kernels>, Lnx ..." on the first MKL_VERBOSE line
    match = re.search(r"architecture (.*?), Lnx", banner)
    kernels = match.group(1) if match else ""
    for text, label in (("AVX-512", "AVX-512"), ("AVX2", "AVX2"), ("AVX", "AVX")):
        if text in kernels:
            return f"oneMKL, {label} kernels"
    if "Architecture processors" in kernels:  # the path oneMKL takes on other vendors' CPUs
        return "oneMKL, non-Intel kernels"
    return "oneMKL, kernels unknown"


def keypointops_description() -> str:
    """The CPU kernels keypointops runs here: "avx512 build, GEMM route own" (keypointops.cpu_capability
    and keypointops.cpu_gemm_route), or why it runs none."""
    try:
        import keypointops
    except Exception as error:  # the line still names the machine; the benchmarks then fail on their own
        return f"not importable ({type(error).__name__})"
    if not keypointops.has_ops():
        return "no compiled ops"
    return f"{keypointops.cpu_capability()} build, GEMM route {keypointops.cpu_gemm_route()}"


def cpu_description() -> str:
    """E.g. "AMD EPYC (family 26, model 2; AVX2, AVX-512, AVX512-BF16, AVX512-VNNI; 2 cores;
    PyTorch's kernels: AVX512; its GEMMs: oneMKL, non-Intel kernels; keypointops: avx512 build, GEMM
    route own)"."""
    info = _cpuinfo()
    details = []
    if family_model := _family_model(info):
        details.append("family {}, model {}".format(*family_model))
    flags = set(info.get("flags", "").split())
    if flags:
        present = [label for flag, label in VECTOR_FLAGS if flag in flags]
        details.append(", ".join(present) if present else "no AVX2")
    details.append(f"{os.cpu_count()} cores")
    details.append(f"PyTorch's kernels: {torch.backends.cpu.get_cpu_capability()}")
    details.append(f"its GEMMs: {gemm_description()}")
    details.append(f"keypointops: {keypointops_description()}")
    return f"{_model_name(info)} ({'; '.join(details)})"


def cpu_slug() -> str:
    """The CPU in a file name, e.g. "amd-epyc-family26-model2" (results are kept per CPU kind)."""
    info = _cpuinfo()
    name = _model_name(info).split("@")[0].lower()
    words = "".join(ch if ch.isalnum() else " " for ch in name).split()
    words = [w for w in words if w not in ("r", "tm", "cpu", "processor")]
    if family_model := _family_model(info):
        words += ["family{}".format(family_model[0]), "model{}".format(family_model[1])]
    return "-".join(words)


if __name__ == "__main__":
    import sys
    print(cpu_slug() if sys.argv[1:] == ["--slug"] else cpu_description())
