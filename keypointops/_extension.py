"""Loading of the compiled kernels (``keypointops._C``).

The pure-Python parts of the package (reference implementations, graphs, Triton kernels) import
without the compiled library.  Asking for a compiled backend when it is missing raises
:class:`RuntimeError` with the build command; nothing falls back silently.
"""
from __future__ import annotations

import torch

BUILD_HINT = ("build it with `pip install --no-build-isolation -e .` in the keypointops checkout "
              "(see README.md)")


def _import_library() -> str | None:
    """Imports ``keypointops._C``; returns the import error message, or None on success.  A bad
    ``KEYPOINTOPS_CPU_CAPABILITY`` or ``KEYPOINTOPS_CPU_GEMM`` raises its one-line RuntimeError
    here, when the package loads."""
    try:
        from keypointops import _C  # noqa: F401  (registers torch.ops.keypointops.*)
    except ImportError as err:
        return str(err)
    torch.ops.keypointops._cpu_capability()
    torch.ops.keypointops._cpu_gemm_route()
    return None


_LOAD_ERROR = _import_library()


def has_ops() -> bool:
    """True when the compiled C++ kernels are importable."""
    return _LOAD_ERROR is None


def has_cuda_ops(op_name: str | None = None) -> bool:
    """True when the compiled library holds CUDA kernels (built with a CUDA toolkit): the kernel of
    op ``op_name`` (e.g. ``"keypoint_gather"``) when given, else that of any op."""
    if not has_ops():
        return False
    names = [f"keypointops::{op_name}"] if op_name else [
        name for name in torch._C._dispatch_get_all_op_names() if name.startswith("keypointops::")]
    return any(torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA") for name in names)


def cpu_capability() -> str:
    """The instruction set that the compiled CPU kernels run with: ``"avx512"``, ``"avx2"`` or
    ``"default"`` (no vector extension beyond the architecture's baseline).

    The library holds a build of every CPU kernel for each of them (x86-64; ``"default"`` only
    elsewhere) and picks one when it loads: the widest that the CPU supports and that PyTorch's own
    CPU kernels use (``ATEN_CPU_CAPABILITY`` narrows both), or the one named by the environment
    variable ``KEYPOINTOPS_CPU_CAPABILITY`` (``default``, ``avx2`` or ``avx512``).
    A name that is unknown, or that the CPU lacks, fails the import with a one-line RuntimeError.
    """
    require_ops()
    return torch.ops.keypointops._cpu_capability()


def cpu_gemm_route() -> str:
    """Where the compiled CPU kernels send work that is a matrix product: ``"library"`` (PyTorch's
    GEMMs, ``torch.bmm`` and ``torch.mm`` on strided views of the inputs) or ``"own"`` (the kernels'
    register-blocked loops).  It applies to ``window_graph_conv`` in float32 and float64 with
    dilation 1; every other case runs the kernels' loops.

    oneMKL, PyTorch's GEMM library on x86-64, picks its kernels by CPU vendor: on an Intel CPU its
    full-width kernels beat the loops, on other vendors' CPUs its kernels are slower than the loops.
    So by default the route is ``"library"`` where oneMKL runs its Intel kernels and ``"own"``
    everywhere else; the environment variable ``KEYPOINTOPS_CPU_GEMM`` (``library``, ``own`` or
    ``auto``) overrides it, and an unknown value fails the import with a one-line RuntimeError.
    The routes round differently; each is deterministic for a given thread count, and the loops
    for any thread count.
    """
    require_ops()
    return torch.ops.keypointops._cpu_gemm_route()


def require_ops(device_type: str = "cpu", op_name: str | None = None) -> None:
    """Raises RuntimeError unless compiled kernels for ``device_type`` (of ``op_name`` when given)
    are available."""
    if _LOAD_ERROR is not None:
        raise RuntimeError(f"keypointops: the compiled extension keypointops._C is not available "
                           f"({_LOAD_ERROR}); {BUILD_HINT}.")
    if device_type == "cuda" and not has_cuda_ops(op_name):
        what = f"a CUDA kernel for {op_name}" if op_name else "CUDA kernels"
        raise RuntimeError(f"keypointops: the compiled extension has no {what} (it was built "
                           "without a CUDA toolkit); rebuild with a CUDA build of torch and nvcc on "
                           "PATH, or FORCE_CUDA=1, or use backend='triton'.")
