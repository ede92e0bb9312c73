"""tools/cuda_resources.py: parsing of ptxas -v output and the check against a kernel file's header."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("cuda_resources", ROOT / "tools" / "cuda_resources.py")
cuda_resources = importlib.util.module_from_spec(spec)
sys.modules["cuda_resources"] = cuda_resources  # its dataclass looks its module up
spec.loader.exec_module(cuda_resources)

LOG = """nvcc -c {path}: exit 0
ptxas info    : Compiling entry function '_ZN11keypointops12_GLOBAL__N_16kernelIfEEvPT_' for 'sm_90'
ptxas info    : Function properties for _ZN11keypointops12_GLOBAL__N_16kernelIfEEvPT_
    {stack} bytes stack frame, {spills} bytes spill stores, {spills} bytes spill loads
ptxas info    : Used {registers} registers, used 1 barriers, 8320 bytes smem, 400 bytes cmem[0]
"""


def check(tmp_path, header: str, registers: int, spills: int = 0, stack: int = 0) -> list[str]:
    source = tmp_path / "kernel.cu"
    source.write_text(header + "#include <ATen/ATen.h>\n")
    kernels = cuda_resources.parse(LOG.format(path=source, registers=registers, spills=spills, stack=stack))
    assert [(k.name, k.arch, k.registers, k.spill_stores, k.stack, k.shared) for k in kernels] == [
        ("kernel<float>", 90, registers, spills, stack, 8320)]
    return cuda_resources.check(kernels)


def test_registers_within_the_claimed_occupancy(tmp_path):
    header = "// Occupancy: at most 64 registers per thread, so 4 blocks of 256 threads fit an SM.\n"
    assert check(tmp_path, header, registers=64) == []
    assert "more than the 64" in check(tmp_path, header, registers=72)[0]
    assert "claims no occupancy" in check(tmp_path, "// no claim\n", registers=32)[0]


def test_local_memory_needs_a_bound_and_a_reason(tmp_path):
    claim = "// Occupancy: at most 64 registers per thread.\n"
    assert "at most 0 bytes" in check(tmp_path, claim, registers=40, spills=8, stack=8)[0]
    bounded = claim + "// Local memory: at most 16 bytes per thread, a spilled index.\n"
    assert check(tmp_path, bounded, registers=40, spills=8, stack=16) == []
    assert "at most 16 bytes" in check(tmp_path, bounded, registers=40, spills=24, stack=24)[0]
