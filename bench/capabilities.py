"""The CPU kernels' instruction-set builds against each other on this machine: every case of
``bench/reduced_precision.py`` (the keypointops cases of bench/test_<op>.py at their sizes, in
float32), forward and forward+backward, the op's ``backend="cpu"`` under each CPU capability the
CPU runs (``default`` left out unless named), switched at run time with
``torch.ops.keypointops._set_cpu_capability`` (untimed) and interleaved round by round, so that the
VM's drift falls on every build alike.  The kernels' own loops run throughout (GEMM route "own":
work handed to PyTorch's GEMMs does not depend on the build).  Prints a markdown table: each build's
median time over the rounds, and its time relative to the first build.

    PYTHONPATH=. python bench/capabilities.py [--capabilities avx2 avx512] [--rounds 15]
                                              [--threads 2] [--only SUBSTRING]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import keypointops  # noqa: E402
import reduced_precision as cases  # noqa: E402  (the cases, from bench/)
from interleave import interleaved  # noqa: E402
from machine import cpu_description  # noqa: E402


def runs(capability: str) -> bool:
    """Whether this CPU and build run ``capability`` (switching to it; the caller switches back)."""
    try:
        torch.ops.keypointops._set_cpu_capability(capability)
    except RuntimeError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--capabilities", nargs="+", default=None,
                        help="builds to compare, the first the reference (default: avx2 and avx512, those the CPU runs)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="", help="only the cases whose name contains this")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    default, route = keypointops.cpu_capability(), keypointops.cpu_gemm_route()
    caps = args.capabilities or [c for c in ("avx2", "avx512") if runs(c)]
    torch.ops.keypointops._set_cpu_capability(default)
    torch.ops.keypointops._set_cpu_gemm_route("own")
    print(f"{cpu_description()}, torch {torch.__version__}, {args.threads} threads, "
          f"{args.rounds} interleaved rounds; default build here: {default}; GEMM route: own loops "
          f"(default here: {route})\n")
    print("| case | pass | " + " | ".join(f"{c} ms" for c in caps) + " | "
          + " | ".join(f"{c} / {caps[0]}" for c in caps[1:]) + " |")
    print("|---|---|" + "---:|" * (2 * len(caps) - 1))
    switch = {c: lambda c=c: torch.ops.keypointops._set_cpu_capability(c) for c in caps}
    try:
        for case_set in (cases.keypoint_gather_cases, cases.msg_pass_cases, cases.part_pool_cases,
                         cases.window_graph_conv_cases):
            for name, make in case_set():
                if args.only not in name:
                    continue
                for backward in (False, True):
                    fn = make(torch.float32, backward)
                    times = interleaved({c: fn for c in caps}, args.rounds, prepare=switch)
                    ms = {c: 1e3 * statistics.median(times[c]) for c in caps}
                    print(f"| {name} | {'fwd+bwd' if backward else 'fwd'} | " + " | ".join(f"{ms[c]:.2f}" for c in caps)
                          + " | " + " | ".join(f"{ms[c] / ms[caps[0]]:.2f}" for c in caps[1:]) + " |", flush=True)
    finally:
        torch.ops.keypointops._set_cpu_capability(default)
        torch.ops.keypointops._set_cpu_gemm_route(route)


if __name__ == "__main__":
    main()
