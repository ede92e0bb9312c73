"""Loading of the compiled library: present here, and a clear error (never a silent fallback) when missing."""
import subprocess
import sys
import textwrap

import pytest
import torch

import keypointops
from keypointops import _extension


def test_compiled_library_is_built_here():
    # CI builds the extension (README install); a missing build must fail loudly here.
    assert keypointops.has_ops(), _extension._LOAD_ERROR


def test_missing_build_raises_a_clear_error():
    """Import the package with keypointops._C hidden: pure-Python parts work, compiled backends raise."""
    script = textwrap.dedent("""
        import sys, torch
        class HideC:
            def find_spec(self, name, path=None, target=None):
                if name == "keypointops._C":
                    raise ImportError("hidden for the test")
        sys.meta_path.insert(0, HideC())
        import keypointops
        assert not keypointops.has_ops()
        x = torch.randn(4, 3)
        g = keypointops.Graph.from_edge_index(torch.tensor([[0, 1], [1, 2]]), 4)
        keypointops.msg_pass(x, g, backend="reference")   # the reference needs no build
        try:
            keypointops.msg_pass(x, g)
        except RuntimeError as err:
            print(err)
        else:
            raise SystemExit("no error without the compiled library")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "keypointops._C is not available" in result.stdout
    assert "pip install --no-build-isolation -e ." in result.stdout


def test_cuda_backend_without_cuda_kernels_raises():
    if keypointops.has_cuda_ops():
        pytest.skip("CUDA kernels are built")
    x = torch.randn(4, 3)
    g = keypointops.Graph.from_edge_index(torch.tensor([[0, 1], [1, 2]]), 4)
    with pytest.raises(ValueError, match="backend='cuda' needs cuda tensors"):
        keypointops.msg_pass(x, g, backend="cuda")


def test_op_modules_depend_one_way():
    """ops/<op>.py imports triton/<op>.py (lazily) and both import _opdefs/<op>.py; neither the Triton
    modules nor _opdefs import keypointops.ops, and _opdefs imports no Triton module."""
    import ast
    import pathlib

    root = pathlib.Path(keypointops.__file__).parent
    forbidden = {"triton": ("keypointops.ops",), "_opdefs": ("keypointops.ops", "keypointops.triton")}
    for package, prefixes in forbidden.items():
        for path in sorted((root / package).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                         else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
                for name in names:
                    assert not name.startswith(prefixes), f"{package}/{path.name} imports {name}"


def test_sources_hold_no_control_characters():
    """A backslash sequence written into a non-raw string (``"\\frac"``, ``"\\rfloor"``, ``"\\bmod"``)
    becomes a control character that breaks the rendered docstring and the line numbering."""
    import pathlib

    repo = pathlib.Path(keypointops.__file__).parents[1]
    paths = [p for folder in ("keypointops", "bench", "tools", "python_tests") for p in (repo / folder).rglob("*.py")]
    assert paths
    for path in paths:
        data = path.read_bytes()
        for byte in (b"\x08", b"\x0b", b"\x0c", b"\r"):
            assert byte not in data, f"{path.relative_to(repo)} holds {byte!r} at byte {data.index(byte)}"


def test_cmake_builds_each_capability_with_setup_py_flags():
    """CMakeLists.txt's per-capability compiler flags are setup.py's: CI compiles every capability
    through setup.py and only DEFAULT through CMake, which is a check of the AVX2 / AVX-512 builds of
    both only while the flags agree."""
    import ast
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    setup_py = ast.parse((root / "setup.py").read_text())
    setup_flags = next(ast.literal_eval(node.value) for node in setup_py.body if isinstance(node, ast.Assign)
                       and getattr(node.targets[0], "id", None) == "CPU_CAPABILITY_FLAGS")
    cmake_flags = {name.lower(): flags.split() for name, flags in re.findall(
        r'^set\(KEYPOINTOPS_CPU_FLAGS_(\w+) ?"?([^")]*)"?\)$', (root / "CMakeLists.txt").read_text(), re.M)}
    assert cmake_flags == setup_flags
