"""The builds of the CPU kernels per instruction set (``keypointops.cpu_capability()``): every build
that this CPU can run agrees with ``keypointops.reference``, forward and backward, in float32,
float64 and bfloat16; the library picks the widest supported build by default; ``KEYPOINTOPS_CPU_CAPABILITY``
overrides it and a bad value fails the import with one line.

Sizes are chosen for the vector widths: 37 channels are 2 full AVX-512 float vectors (4 AVX2 ones)
plus a partial one, so that every kernel runs its full-vector and its tail paths in each build.
"""
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

import keypointops
from keypointops import reference

from helpers import tolerances
from test_msg_pass import random_graph
from test_part_pool import random_groups

pytestmark = pytest.mark.skipif(not keypointops.has_ops(), reason="keypointops._C is not built")

CAPABILITIES = ["default", "avx2", "avx512"]
# The CPU features (/proc/cpuinfo names) that each build's compiler flags may use.
FEATURES = {"default": [], "avx2": ["avx2", "fma", "f16c"],
            "avx512": ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"]}
X86 = platform.machine() in ("x86_64", "AMD64")
CHANNELS = 37


def cpu_flags() -> set:
    with open("/proc/cpuinfo") as f:
        return set(re.search(r"^flags\s*:(.*)$", f.read(), re.M).group(1).split())


def missing_feature(capability: str) -> str | None:
    """The first feature of ``capability`` that this CPU lacks, or None."""
    if capability == "default":
        return None
    if not X86:
        return "x86-64"
    flags = cpu_flags()
    return next((feature for feature in FEATURES[capability] if feature not in flags), None)


def best_capability() -> str:
    """The widest capability that this CPU supports and PyTorch's own CPU kernels use."""
    supported = [c for c in CAPABILITIES if missing_feature(c) is None]
    aten = torch.backends.cpu.get_cpu_capability().lower()
    return supported[min(len(supported), CAPABILITIES.index(aten) + 1 if aten in CAPABILITIES else 1) - 1]


@pytest.fixture(params=CAPABILITIES)
def capability(request):
    """Runs the test with the CPU kernels of one capability (skipped where the CPU lacks it)."""
    missing = missing_feature(request.param)
    if missing is not None:
        pytest.skip(f"this CPU lacks {missing}, which the {request.param} build needs")
    before = keypointops.cpu_capability()
    torch.ops.keypointops._set_cpu_capability(request.param)
    yield request.param
    torch.ops.keypointops._set_cpu_capability(before)


def assert_matches_reference(fused, ref, inputs, dtype):
    """``fused(*inputs)`` in ``dtype`` against ``ref`` on the same values (float32 for bfloat16),
    and the gradients of every floating-point input for one random grad_out."""
    exact_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    low = [t.detach().to(dtype).requires_grad_() if t.is_floating_point() else t for t in inputs]
    exact = [t.detach().to(exact_dtype).requires_grad_() if t.is_floating_point() else t for t in low]
    out, expected = fused(*low), ref(*exact)
    assert out.dtype == dtype
    torch.testing.assert_close(out.to(exact_dtype), expected, **tolerances(dtype))
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3), dtype=exact_dtype)
    wants_grad = [t for t in low if t.is_floating_point()]
    got = torch.autograd.grad(out, wants_grad, grad.to(dtype))
    want = torch.autograd.grad(expected, [t for t in exact if t.is_floating_point()], grad)
    grad_tol = {torch.float64: dict(rtol=1e-8, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-4),
                torch.bfloat16: dict(rtol=5e-2, atol=1e-1)}[dtype]
    for g, w in zip(got, want):
        torch.testing.assert_close(g.to(exact_dtype), w, **grad_tol)


DTYPES = [torch.float32, torch.float64, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("aggr", ["softmax", "powermean"])
def test_msg_pass(capability, dtype, aggr):
    gen = torch.Generator().manual_seed(1)
    graph = random_graph(23, 80)
    x = torch.randn(23, CHANNELS, generator=gen, dtype=torch.float64)
    edge_attr = torch.randn(graph.col.numel(), CHANNELS, generator=gen, dtype=torch.float64) * 0.5
    kwargs = dict(aggr=aggr, p=1.7) if aggr == "powermean" else {}
    assert_matches_reference(
        lambda x, e: keypointops.msg_pass(x, graph, 0.8, edge_attr=e, backend="cpu", **kwargs),
        lambda x, e: reference.msg_pass(x, graph, 0.8, edge_attr=e, **kwargs), [x, edge_attr], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups", [None, "fewer_parts"])
def test_part_pool(capability, dtype, groups):
    gen = torch.Generator().manual_seed(2)
    features = torch.randn(2, CHANNELS, 5, 7, generator=gen, dtype=torch.float64)
    heatmaps = torch.randn(2, 6, 5, 7, generator=gen, dtype=torch.float64)
    inputs = [features, heatmaps] + ([random_groups(3, 6)(gen, torch.float64)] if groups else [])
    assert_matches_reference(lambda *t: keypointops.part_pool(*t, temperature=0.5, backend="cpu"),
                             lambda *t: reference.part_pool(*t, temperature=0.5), inputs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adj_kind", ["shared", "per_window"])
def test_window_graph_conv(capability, dtype, adj_kind):
    gen = torch.Generator().manual_seed(3)
    window, nodes, frames = 3, 5, 6
    x = torch.randn(2, frames, nodes, CHANNELS, generator=gen, dtype=torch.float64)
    adj_shape = (2, frames, window * nodes, window * nodes) if adj_kind == "per_window" else (window * nodes,) * 2
    adj = torch.randn(adj_shape, generator=gen, dtype=torch.float64) / 4
    assert_matches_reference(lambda x, a: keypointops.window_graph_conv(x, a, window, backend="cpu"),
                             lambda x, a: reference.window_graph_conv(x, a, window), [x, adj], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("output_size", [None, 2])
def test_keypoint_gather(capability, dtype, layout, output_size):
    gen = torch.Generator().manual_seed(4)
    features = torch.randn(2, CHANNELS, 7, 5, generator=gen, dtype=torch.float64)
    if layout == "channels_last":
        features = features.to(memory_format=torch.channels_last)
    keypoints = torch.rand(2, 9, 2, generator=gen, dtype=torch.float64) * torch.tensor([12.0, 16.0]) - 1
    kwargs = dict(roi_size=5.3, sampling_ratio=2, output_size=output_size)
    # Keypoints in the op's dtype for both sides: the sampling grid follows their rounding.
    keypoints = keypoints.to(dtype).to(torch.float32 if dtype == torch.bfloat16 else dtype)
    assert_matches_reference(
        lambda f: keypointops.keypoint_gather(f, keypoints.to(f.dtype), 0.5, backend="cpu", **kwargs),
        lambda f: reference.keypoint_gather(f, keypoints.to(f.dtype), 0.5, **kwargs), [features], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_stats(capability, dtype):
    gen = torch.Generator().manual_seed(5)
    dist = torch.rand(6, CHANNELS, generator=gen).to(dtype)
    q_pids, g_pids = torch.randint(0, 4, (6,), generator=gen), torch.randint(-1, 4, (CHANNELS,), generator=gen)
    q_cams, g_cams = torch.randint(0, 2, (6,), generator=gen), torch.randint(0, 2, (CHANNELS,), generator=gen)
    got = torch.ops.keypointops.rank_stats(dist, q_pids, q_cams, g_pids, g_cams)
    want = reference.rank_stats(dist, q_pids, q_cams, g_pids, g_cams)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_the_builds_differ():
    """The switch changes the machine code that runs: part_pool's float32 sums, contracted to
    fused multiply-adds in the AVX2 build only, differ in their last bits from the DEFAULT build's."""
    if missing_feature("avx2") is not None:
        pytest.skip(f"this CPU lacks {missing_feature('avx2')}")
    gen = torch.Generator().manual_seed(6)
    features, heatmaps = torch.randn(2, 64, 9, 11, generator=gen), torch.randn(2, 6, 9, 11, generator=gen)
    before = keypointops.cpu_capability()
    outputs = {}
    try:
        for name in ("default", "avx2"):
            torch.ops.keypointops._set_cpu_capability(name)
            outputs[name] = keypointops.part_pool(features, heatmaps, backend="cpu")
    finally:
        torch.ops.keypointops._set_cpu_capability(before)
    torch.testing.assert_close(outputs["default"], outputs["avx2"])
    assert not torch.equal(outputs["default"], outputs["avx2"])


def test_default_is_the_widest_supported():
    if os.environ.get("KEYPOINTOPS_CPU_CAPABILITY") or os.environ.get("ATEN_CPU_CAPABILITY"):
        pytest.skip("the capability is set in the environment")
    assert keypointops.cpu_capability() == best_capability()


def test_switch_refuses_bad_names():
    before = keypointops.cpu_capability()
    with pytest.raises(RuntimeError, match=r"^keypointops: 'sse9' is not a CPU capability \(expected default, avx2 or avx512\)$"):
        torch.ops.keypointops._set_cpu_capability("sse9")
    unsupported = [c for c in CAPABILITIES if missing_feature(c) is not None]
    if unsupported:
        with pytest.raises(RuntimeError, match=f"^keypointops: CPU capability {unsupported[0]} needs a CPU with "
                                               f"{missing_feature(unsupported[0])}, which this CPU lacks$"):
            torch.ops.keypointops._set_cpu_capability(unsupported[0])
    assert keypointops.cpu_capability() == before


def unsupported_capability() -> str | None:
    return next((c for c in CAPABILITIES if missing_feature(c) is not None), None)


@pytest.fixture(scope="module")
def imports():
    """``import keypointops`` in fresh interpreters, all at once, one per environment: name ->
    (exit code, stdout, last line of stderr)."""
    environments = {"override": {"KEYPOINTOPS_CPU_CAPABILITY": "default"},
                    "aten": {"ATEN_CPU_CAPABILITY": "default", "KEYPOINTOPS_CPU_CAPABILITY": ""},
                    "unknown": {"KEYPOINTOPS_CPU_CAPABILITY": "sse9"}}
    if unsupported_capability() is not None:
        environments["unsupported"] = {"KEYPOINTOPS_CPU_CAPABILITY": unsupported_capability()}
    script = "import keypointops; print(keypointops.cpu_capability())"
    processes = {name: subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
                 for name, env in environments.items()}
    results = {}
    for name, process in processes.items():
        out, err = process.communicate()
        results[name] = (process.returncode, out.strip(), (err.strip().splitlines() or [""])[-1])
    return results


def test_environment_overrides(imports):
    """KEYPOINTOPS_CPU_CAPABILITY picks the build; ATEN_CPU_CAPABILITY narrows the default."""
    assert imports["override"][:2] == (0, "default"), imports["override"][2]
    assert imports["aten"][:2] == (0, "default"), imports["aten"][2]


@pytest.mark.parametrize("kind", ["unknown", "unsupported"])
def test_bad_environment_fails_the_import_with_one_line(imports, kind):
    if kind == "unsupported" and unsupported_capability() is None:
        pytest.skip("this CPU supports every capability")
    value = unsupported_capability() if kind == "unsupported" else "'sse9'"
    reason = (f"needs a CPU with {missing_feature(unsupported_capability())}, which this CPU lacks"
              if kind == "unsupported" else "is not a CPU capability (expected default, avx2 or avx512)")
    code, _, last = imports[kind]
    assert code != 0 and last == f"RuntimeError: keypointops: KEYPOINTOPS_CPU_CAPABILITY={value} {reason}", last


def functions_with_wide_instructions(library: str) -> list:
    """The global functions of ``library`` outside a build's namespace (keypointops::AVX2 or
    keypointops::AVX512, mangled 4AVX2 / 6AVX512) that use AVX2 or AVX-512 registers or FMA.  A
    function local to one object file (a clone such as ``f.isra.0``) is only called from that file,
    except the files' static initialisers (``_GLOBAL__sub_I_*``, compiled with each build's flags),
    which run when the library loads, on every CPU: they are checked too."""
    symbols = subprocess.run(["nm", "--defined-only", library], capture_output=True, text=True, check=True).stdout
    local = {line.split()[2] for line in symbols.splitlines() if len(line.split()) == 3 and line.split()[1] in "tb"
             and not line.split()[2].startswith("_GLOBAL__sub_I")}
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", library], capture_output=True,
                             text=True, check=True).stdout
    offenders, function = set(), None
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            function = None if header.group(1) in local else header.group(1)
            if function is not None:
                avx512 = "AVX512" in function
                avx2 = avx512 or "4AVX2" in function
        elif function is not None and (("%zmm" in line and not avx512)
                                       or (("%ymm" in line or "vfmadd" in line) and not avx2)):
            offenders.add(function)
    return sorted(offenders)


@pytest.mark.skipif(not X86 or shutil.which("objdump") is None or shutil.which("nm") is None,
                    reason="needs x86-64, objdump and nm")
def test_wide_instructions_only_in_their_builds():
    """Every build compiles the inline functions of the headers it includes; of their copies the
    linker must keep those without instruction-set flags, so that the DEFAULT build (and the code
    that picks the build) runs on any x86-64 CPU."""
    assert functions_with_wide_instructions(keypointops._C.__file__) == []


def test_gemm_route_switch():
    """keypointops.cpu_gemm_route() and its switch: "library" and "own" are kept, "auto" resolves
    to one of them, anything else raises one line."""
    before = keypointops.cpu_gemm_route()
    try:
        for name in ("library", "own"):
            torch.ops.keypointops._set_cpu_gemm_route(name)
            assert keypointops.cpu_gemm_route() == name
        torch.ops.keypointops._set_cpu_gemm_route("auto")
        assert keypointops.cpu_gemm_route() in ("library", "own")
        with pytest.raises(RuntimeError, match=r"^keypointops: 'blas' is not a GEMM route \(expected library, own or auto\)$"):
            torch.ops.keypointops._set_cpu_gemm_route("blas")
    finally:
        torch.ops.keypointops._set_cpu_gemm_route(before)


def test_gemm_route_environment():
    """KEYPOINTOPS_CPU_GEMM chooses the route when the library loads; an unknown value fails the
    import with one line."""
    script = "import keypointops; print(keypointops.cpu_gemm_route())"
    results = {}
    for value in ("library", "own", "blas"):
        process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                 env={**os.environ, "KEYPOINTOPS_CPU_GEMM": value})
        results[value] = (process.returncode, process.stdout.strip(), (process.stderr.strip().splitlines() or [""])[-1])
    assert results["library"][:2] == (0, "library"), results["library"]
    assert results["own"][:2] == (0, "own"), results["own"]
    code, _, last = results["blas"]
    assert code != 0 and last == ("RuntimeError: keypointops: KEYPOINTOPS_CPU_GEMM='blas' is not a GEMM route "
                                  "(expected library, own or auto)"), last

