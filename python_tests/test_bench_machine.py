"""bench/machine.py's machine line and bench/mkl_intel_kernels.c, the oneMKL shim of tools/cpu_report.sh."""
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import keypointops

ROOT = Path(__file__).resolve().parents[1]


def machine_line(env=None):
    return subprocess.run([sys.executable, str(ROOT / "bench" / "machine.py")], env=env, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_the_line_names_the_gemm_kernels():
    line = machine_line()
    expected = "its GEMMs: oneMKL, " if torch.backends.mkl.is_available() else "its GEMMs: not oneMKL"
    assert expected in line
    assert "kernels unknown" not in line
    if keypointops.has_ops() and os.environ.get("KEYPOINTOPS_CPU_GEMM", "auto") in ("", "auto"):
        # The default GEMM route: PyTorch's GEMMs exactly where oneMKL runs its Intel kernels.
        intel_kernels = "oneMKL, AVX" in line
        assert keypointops.cpu_gemm_route() == ("library" if intel_kernels else "own")
    if keypointops.has_ops():
        assert (f"keypointops: {keypointops.cpu_capability()} build, GEMM route "
                f"{keypointops.cpu_gemm_route()})") in line


@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64"
                    or not torch.backends.mkl.is_available() or shutil.which("cc") is None,
                    reason="the shim preloads into PyTorch's oneMKL on x86-64 Linux and needs cc")
def test_the_shim_gives_onemkl_its_intel_kernels(tmp_path):
    library = tmp_path / "libmkl_intel_kernels.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(library),
                    str(ROOT / "bench" / "mkl_intel_kernels.c")], check=True)
    line = machine_line(dict(os.environ, LD_PRELOAD=str(library)))
    assert "its GEMMs: oneMKL, AVX" in line  # AVX-512, AVX2 or AVX: the vector width the CPU has
    # keypointops' GEMM route follows the same vendor test: "library" under the shim.
    route = subprocess.run([sys.executable, "-c", "import keypointops; print(keypointops.cpu_gemm_route())"],
                           env=dict(os.environ, LD_PRELOAD=str(library), KEYPOINTOPS_CPU_GEMM="auto"),
                           check=True, capture_output=True, text=True).stdout.strip()
    assert route == "library"
    probe = ("import torch; g = torch.Generator().manual_seed(0); a = torch.randn(96, 80, generator=g);"
             "b = torch.randn(80, 72, generator=g); print(((a @ b) - (a.double() @ b.double()).float())"
             ".abs().max().item())")
    error = subprocess.run([sys.executable, "-c", probe], env=dict(os.environ, LD_PRELOAD=str(library)),
                           check=True, capture_output=True, text=True).stdout
    assert float(error) < 1e-4  # the same products, from other kernels
