"""Ahead-of-time compilation of every Triton kernel for real GPUs, without a GPU.

The test suite runs the Triton kernels in Triton's interpreter, which accepts programs that the
GPU compiler rejects (e.g. a ``tl.dot`` below 16 x 16, an unsupported cast, a tile too large for
shared memory).  This script compiles each kernel through the full Triton pipeline (TTIR, TTGIR,
LLVM IR, PTX, cubin with ptxas) for the given CUDA architectures with
``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cc, 32))``:

- every dtype the launchers accept for the data tensors (float32, bfloat16, float16, float64),
  with the accumulation dtype and the pointer dtypes each launcher then passes;
- every combination of the boolean and dtype constexprs the launchers can choose;
- the tile sizes (``BLOCK_*``) each launcher can choose, at both ends of their range: the smallest
  (where ``tl.dot``'s 16 x 16 minimum and masking bite) and the largest (where registers and shared
  memory bite); the sizes between differ from these only in the tile shape.

Integer arguments are compiled as ``i32`` (what Triton passes below 2^31; above, it compiles an
``i64`` variant of the same code).  For each compiled kernel it prints registers per thread, spill
stores and stack frame (bytes per thread, from ptxas -v) and shared memory (bytes), and it exits 1
if any compilation fails.  Usage::

    python tools/triton_aot.py [--arch 80 90] [--dtypes float32 ...] [--jobs N] [--only SUBSTRING]
                               [--markdown FILE]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import multiprocessing
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, never the interpreter
os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # no cache hits: every variant runs ptxas and logs
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # ptxas -v output (registers, spills) on stdout
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # what a launch compiles with (fused multiply-add)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from keypointops.triton import keypoint_gather as kg  # noqa: E402
from keypointops.triton import msg_pass as mp  # noqa: E402
from keypointops.triton import part_pool as pp  # noqa: E402
from keypointops.triton import window_graph_conv as wgc  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
DATA_DTYPES = tuple(DTYPES.values())  # what the variants below are built for (see --dtypes)
POINTER = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16",
           torch.float64: "*fp64", torch.int64: "*i64", torch.bool: "*i1"}


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype every launcher uses for ``dtype`` data."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Variant:
    """One specialisation of one kernel: its runtime argument types and its constexpr values."""
    kernel: str            # "<module>.<kernel function>"
    label: str             # dtype and constexprs, for the report
    types: tuple           # (parameter, Triton type) of the runtime parameters
    constexprs: tuple      # (parameter, value) of the constexpr parameters
    num_warps: int = 4


def _variant(module, fn_name: str, label: str, pointers: dict, constexprs: dict,
             floats: dict | None = None, num_warps: int = 4) -> Variant:
    """A Variant of ``module.fn_name``: ``pointers`` maps pointer parameters to torch dtypes,
    ``floats`` scalar float parameters to Triton types, every other runtime parameter is ``i32``.
    Raises if a named parameter does not exist or a constexpr is left without a value, so the list
    below cannot silently drift from the kernels' signatures."""
    fn = getattr(module, fn_name)
    floats = floats or {}
    params = list(fn.arg_names)
    constexpr_params = {p.name for p in fn.params if p.is_constexpr}
    unknown = (set(pointers) | set(floats) | set(constexprs)) - set(params)
    missing = constexpr_params - set(constexprs)
    if unknown or missing:
        raise SystemExit(f"{module.__name__}.{fn_name}: unknown parameters {sorted(unknown)}, "
                         f"constexprs without a value {sorted(missing)}")
    types = tuple((p, POINTER[pointers[p]] if p in pointers else floats.get(p, "i32"))
                  for p in params if p not in constexpr_params)
    short = module.__name__.rsplit(".", 1)[1]
    return Variant(f"{short}.{fn_name}", label, types, tuple(sorted(constexprs.items())), num_warps)


def _pow2_range(low: int, high: int) -> tuple[int, ...]:
    """The two ends of a launcher's power-of-two tile range (one value when they coincide)."""
    return tuple(sorted({low, high}))


def keypoint_gather_variants():
    for dtype, aligned, adaptive, has_valid in itertools.product(
            DATA_DTYPES, (False, True), (False, True), (False, True)):
        acc_torch, acc = kg._accumulation(dtype)
        keypoints = acc_torch  # keypoints are float32 (float64 beside float64 features)
        valid = torch.bool if has_valid else keypoints  # without valid: keypoints as placeholder
        sizes = acc_torch  # box sides per keypoint, in the accumulation dtype
        for block_c in _pow2_range(kg._block_c(1), kg.MAX_BLOCK_C):
            constexprs = dict(ALIGNED=aligned, ADAPTIVE=adaptive, HAS_VALID=has_valid, ACC=acc,
                              EPS=kg._epsilon(acc), BLOCK_C=block_c)
            label = (f"{_name(dtype)} aligned={aligned} adaptive={adaptive} valid={has_valid} "
                     f"BLOCK_C={block_c}")
            scalars = dict(spatial_scale="fp64")
            yield _variant(kg, "_forward_kernel", label,
                           dict(features_ptr=dtype, keypoints_ptr=keypoints, valid_ptr=valid, sizes_ptr=sizes,
                                out_ptr=dtype),
                           constexprs, scalars)
            # backward: grad_out in the data dtype, the gradient buffer in the accumulation dtype
            yield _variant(kg, "_backward_kernel", label,
                           dict(grad_out_ptr=dtype, keypoints_ptr=keypoints, valid_ptr=valid, sizes_ptr=sizes,
                                grad_ptr=acc_torch), constexprs, scalars)


def msg_pass_variants():
    eps = 1e-7  # the op's default; another eps is one more specialisation of the same code
    for dtype in DATA_DTYPES:
        acc = _acc(dtype)
        for block_c in _pow2_range(1, mp.GPU_TILE["MAX_BLOCK_C"]):
            for has_edge in (False, True):
                tile = dict(mp.GPU_EDGE_TILE if has_edge else mp.GPU_TILE)
                num_warps = tile.pop("num_warps")
                tile.pop("MAX_BLOCK_C")
                blocks = dict(tile, BLOCK_C=block_c)
                label = f"{_name(dtype)} BLOCK_C={block_c} edge={has_edge}"
                # Without edge features the launcher passes x and col as the (unread) edge pointers.
                edge = dict(edge_attr_ptr=dtype, perm_ptr=torch.int64)
                yield _variant(mp, "_forward_kernel", label,
                               dict(x_ptr=dtype, rowptr_ptr=torch.int64, col_ptr=torch.int64, **edge, t_ptr=acc,
                                    out_ptr=dtype, row_max_ptr=acc, row_sum_ptr=acc),
                               dict(blocks, EPS=eps, HAS_EDGE=has_edge), num_warps=num_warps)
                # grad_t with the full softmax gradient, none with the semi-gradient one
                for grad_t, semi_grad in ((False, False), (True, False), (False, True)):
                    yield _variant(mp, "_backward_kernel", f"{label} grad_t={grad_t} semi_grad={semi_grad}",
                                   dict(grad_out_ptr=dtype, x_ptr=dtype, out_ptr=dtype, row_max_ptr=acc,
                                        row_sum_ptr=acc, rowptr_t_ptr=torch.int64, col_t_ptr=torch.int64,
                                        edge_attr_ptr=dtype, perm_t_ptr=torch.int64, t_ptr=acc,
                                        grad_x_ptr=dtype, grad_t_partial_ptr=acc, grad_edge_attr_ptr=dtype),
                                   dict(blocks, EPS=eps, COMPUTE_GRAD_T=grad_t, HAS_EDGE=has_edge,
                                        SEMI_GRAD=semi_grad),
                                   num_warps=num_warps)
                # The power mean (its default clamp bounds) and the mean; grad_p only for the power mean.
                bounds = dict(LO=1e-4, HI=100.0)
                for power in (False, True):
                    yield _variant(mp, "_power_mean_forward_kernel", f"{label} power={power}",
                                   dict(x_ptr=dtype, rowptr_ptr=torch.int64, col_ptr=torch.int64, **edge, p_ptr=acc,
                                        out_ptr=dtype, mean_ptr=acc, degree_ptr=acc),
                                   dict(blocks, EPS=eps, HAS_EDGE=has_edge, POWER=power, **bounds),
                                   num_warps=num_warps)
                    for grad_p in (False, True) if power else (False,):
                        yield _variant(mp, "_power_mean_backward_kernel", f"{label} power={power} grad_p={grad_p}",
                                       dict(grad_out_ptr=dtype, x_ptr=dtype, mean_ptr=acc, degree_ptr=acc,
                                            rowptr_t_ptr=torch.int64, col_t_ptr=torch.int64, edge_attr_ptr=dtype,
                                            perm_t_ptr=torch.int64, p_ptr=acc, grad_x_ptr=dtype,
                                            grad_p_partial_ptr=acc, grad_edge_attr_ptr=dtype),
                                       dict(blocks, EPS=eps, COMPUTE_GRAD_T=grad_p, HAS_EDGE=has_edge,
                                            POWER=power, **bounds),
                                       num_warps=num_warps)
            yield _variant(mp, "_sum_rows_kernel", f"{_name(acc)} BLOCK_C={block_c}",
                           dict(partial_ptr=acc, total_ptr=acc),
                           dict(BLOCK_R=mp.SUM_BLOCK_ROWS, BLOCK_C=block_c))


def part_pool_variants():
    for dtype in DATA_DTYPES:
        acc = _acc(dtype)
        fp64 = dtype == torch.float64
        # parts/joints: the smallest tile (16) and the tile of the largest skeleton (25 joints)
        for parts_joints in (1, 25):
            blocks = pp._blocks(parts_joints, parts_joints, dtype)
            for identity in (False, True):
                groups = dtype  # identity: the heatmaps stand in for the groups pointer
                label = f"{_name(dtype)} identity={identity} " + " ".join(f"{k}={v}" for k, v in blocks.items())
                common = dict(f_ptr=dtype, hm_ptr=dtype, g_ptr=groups, t_ptr=acc)
                yield _variant(pp, "_part_pool_fwd_kernel", label, dict(common, out_ptr=dtype),
                               dict(blocks, IDENTITY=identity, FP64=fp64))
                tiles = {k: blocks[k] for k in ("BLOCK_P", "BLOCK_J", "BLOCK_S")}
                stats = dict(row_max_ptr=acc, row_sum_ptr=acc)
                yield _variant(pp, "_part_pool_row_stats_kernel", label,
                               dict(hm_ptr=dtype, g_ptr=groups, t_ptr=acc, **stats),
                               dict(tiles, IDENTITY=identity, FP64=fp64))
                for need_f, need_logits in itertools.product((False, True), repeat=2):
                    if not (need_f or need_logits):
                        continue  # the launcher never asks for neither
                    yield _variant(
                        pp, "_part_pool_bwd_kernel", f"{label} features={int(need_f)} logits={int(need_logits)}",
                        dict(common, dout_ptr=dtype, **stats, grad_f_ptr=dtype, grad_p_ptr=acc, delta_ptr=acc),
                        dict(blocks, IDENTITY=identity, FP64=fp64, NEED_FEATURES=need_f, NEED_LOGITS=need_logits))
                for need_hm, need_g in itertools.product((False, True), repeat=2):
                    if identity and need_g or not (need_hm or need_g):
                        continue  # the launcher never asks for either
                    yield _variant(
                        pp, "_part_pool_logits_bwd_kernel", f"{label} grads(hm,g)={int(need_hm)}{int(need_g)}",
                        dict(hm_ptr=dtype, g_ptr=groups, t_ptr=acc, **stats, grad_p_ptr=acc, delta_ptr=acc,
                             grad_hm_ptr=dtype, grad_g_ptr=acc),
                        dict(tiles, IDENTITY=identity, FP64=fp64, NEED_HEATMAPS=need_hm, NEED_GROUPS=need_g))


def window_graph_conv_variants():
    for dtype in DATA_DTYPES:
        acc = wgc._acc_dtype(dtype)
        for size in (1, 10**6):  # every _block(size, cap) at its minimum and at its cap
            bi, bj, bc = wgc._block(size, 64), wgc._block(size, 32), wgc._block(size, 64)
            yield _variant(wgc, "_forward_kernel", f"{_name(dtype)} BLOCK_I={bi} BLOCK_J={bj} BLOCK_C={bc}",
                           dict(x_ptr=dtype, adj_ptr=dtype, out_ptr=dtype),
                           dict(BLOCK_I=bi, BLOCK_J=bj, BLOCK_C=bc, ACC_DTYPE=acc))
            bn, bi, bc = wgc._block(size, 32), wgc._block(size, 32), wgc._block(size, 64)
            yield _variant(wgc, "_grad_x_kernel", f"{_name(dtype)} BLOCK_N={bn} BLOCK_I={bi} BLOCK_C={bc}",
                           dict(grad_out_ptr=dtype, adj_ptr=dtype, grad_x_ptr=dtype),
                           dict(BLOCK_N=bn, BLOCK_I=bi, BLOCK_C=bc, ACC_DTYPE=acc))
            bi, bj, bc = wgc._block(size, 32), wgc._block(size, 32), wgc._block(size, 64)
            yield _variant(wgc, "_grad_adj_kernel", f"{_name(dtype)} BLOCK_I={bi} BLOCK_J={bj} BLOCK_C={bc}",
                           dict(grad_out_ptr=dtype, x_ptr=dtype, target_ptr=_acc(dtype)),
                           dict(BLOCK_I=bi, BLOCK_J=bj, BLOCK_C=bc, ACC_DTYPE=acc))


def all_variants() -> list[Variant]:
    variants = [*keypoint_gather_variants(), *msg_pass_variants(), *part_pool_variants(),
                *window_graph_conv_variants()]
    return list(dict.fromkeys(variants))  # drop repeats (e.g. ranges whose two ends coincide)


_KERNELS = {"keypoint_gather": kg, "msg_pass": mp, "part_pool": pp, "window_graph_conv": wgc}


def compile_variant(job: tuple[Variant, int]) -> dict:
    """Compiles one variant for one architecture; returns its resources (from the ``ptxas -v`` log
    that Triton prints under TRITON_DUMP_PTXAS_LOG=1) or its error."""
    variant, arch = job
    module_name, fn_name = variant.kernel.split(".")
    fn = getattr(_KERNELS[module_name], fn_name)
    constexprs = dict(variant.constexprs)
    signature = dict(variant.types) | {name: "constexpr" for name in constexprs}
    signature = {p: signature[p] for p in fn.arg_names}
    result = dict(kernel=variant.kernel, label=variant.label, arch=arch)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, signature, constexprs),
                                      target=GPUTarget("cuda", arch, 32),
                                      options=dict(num_warps=variant.num_warps))
    except Exception as error:  # noqa: BLE001  every compile error is reported, then fails the run
        lines = str(error).strip().splitlines() or [""]
        result["error"] = f"{type(error).__name__}: {lines[0][:300]}"
        return result
    text = log.getvalue()
    result.update(registers=int(re.search(r"Used (\d+) registers", text).group(1)),
                  spills=sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", text)),
                  stack=sum(int(n) for n in re.findall(r"(\d+) bytes stack frame", text)),
                  shared=compiled.metadata.shared)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="parallel compilations")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES),
                        help="data dtypes to compile for (default: all four)")
    parser.add_argument("--only", default="", help="only kernels whose name contains this")
    parser.add_argument("--markdown", help="also write the resource table (markdown) to this file")
    args = parser.parse_args(argv)
    global DATA_DTYPES
    DATA_DTYPES = tuple(DTYPES[name] for name in args.dtypes)
    variants = [v for v in all_variants() if args.only in v.kernel]
    jobs = [(variant, arch) for variant in variants for arch in args.arch]
    start = time.perf_counter()
    # fork: the workers inherit DATA_DTYPES and the imported kernels
    with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=multiprocessing.get_context("fork")) as pool:
        results = list(pool.map(compile_variant, jobs))
    failed = [r for r in results if "error" in r]
    lines = ["| kernel | specialisation | sm | registers | spill stores (B) | stack frame (B) | shared (B) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['label']} | {r['arch']} | FAILED: {r['error']} | | | |")
        else:
            lines.append(f"| {r['kernel']} | {r['label']} | {r['arch']} | {r['registers']} | "
                         f"{r['spills']} | {r['stack']} | {r['shared']} |")
    table = "\n".join(lines)
    print(table)
    summary = (f"triton {triton.__version__}: compiled {len(results) - len(failed)} of {len(results)} "
               f"kernel specialisations ({len(variants)} x sm_{', sm_'.join(map(str, args.arch))}; "
               f"{', '.join(args.dtypes)}) in {time.perf_counter() - start:.0f} s with {args.jobs} job(s); "
               f"{len(failed)} failed")
    print(summary)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n\n" + summary + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
