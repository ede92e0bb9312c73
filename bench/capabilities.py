"""The CPU kernels' instruction-set builds against each other on this machine: every case of the
op benchmarks (bench/test_*.py, the keypointops rows, full sizes), forward and forward+backward,
timed under each CPU capability the CPU runs (``default`` left out unless named), switched at run
time with ``torch.ops.keypointops._set_cpu_capability`` and interleaved round by round, so that
the VM's drift falls on every build alike.  Prints a markdown table: the median over rounds of each
build's per-round median, and the time of each build relative to the first.

    PYTHONPATH=. python bench/capabilities.py [--capabilities avx2 avx512] [--rounds 5] [--repeats 5]
                                              [--threads 2] [--only SUBSTRING]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import keypointops  # noqa: E402
import test_keypoint_gather as kg  # noqa: E402
import test_msg_pass as mp  # noqa: E402
import test_part_pool as pp  # noqa: E402
import test_window_graph_conv as wgc  # noqa: E402


def cases(backward: bool):
    """(name, timed function) of every keypointops case of the op benchmarks."""
    tag = "fwd+bwd" if backward else "fwd"
    for case in pp.CASES:
        yield f"part_pool {case} {tag}", pp.make_fn("keypointops", *pp.make_case(case, "cpu"), backward)
    for case in mp.CASES:
        x, graph = mp.make_case(case, "cpu")
        yield f"msg_pass {case} {tag}", mp.make_fn("keypointops", x, graph, "cpu", backward)
    for case, spec in kg.CASES.items():
        features, keypoints, scale = kg.make_case(case, "cpu")
        forward = kg.make_forward("keypointops", scale, spec)
        yield f"keypoint_gather {case} {tag}", kg.make_fn(forward, features, keypoints, backward)
        channels_last = features.contiguous(memory_format=torch.channels_last)
        yield f"keypoint_gather {case} channels_last {tag}", kg.make_fn(forward, channels_last, keypoints, backward)
    for case in wgc.CASES:
        for adj_kind in wgc.ADJ_KINDS:
            x, adj, window = wgc.make_case(case, adj_kind, "cpu")
            yield f"window_graph_conv {case} {adj_kind} {tag}", wgc.make_fn("keypointops", x, adj, window, backward)
    yield f"window_graph_conv msg3d stride 2 {tag}", wgc.make_msg3d_fn("keypointops", "cpu", backward)[0]


def runs(capability: str) -> bool:
    """Whether this CPU and build run ``capability`` (switching to it; the caller switches back)."""
    try:
        torch.ops.keypointops._set_cpu_capability(capability)
    except RuntimeError:
        return False
    return True


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--capabilities", nargs="+", default=None,
                        help="builds to compare, the first the reference (default: avx2 and avx512, those the CPU runs)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5, help="calls per build and round (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="", help="only the cases whose name contains this")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    default = keypointops.cpu_capability()
    caps = args.capabilities or [c for c in ("avx2", "avx512") if runs(c)]
    torch.ops.keypointops._set_cpu_capability(default)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    print(f"{platform.machine()}, lscpu model name {model!r}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} threads, {args.rounds} interleaved rounds x {args.repeats} calls per build; "
          f"default build here: {default}\n")
    print("| case | " + " | ".join(f"{c} ms" for c in caps) + " | "
          + " | ".join(f"{c} / {caps[0]}" for c in caps[1:]) + " |")
    print("|---|" + "---:|" * (2 * len(caps) - 1))
    try:
        for backward in (False, True):
            for name, fn in cases(backward):
                if args.only not in name:
                    continue
                rounds = {c: [] for c in caps}
                for c in caps:  # warm-up: allocations, thread pool, first-touch pages
                    torch.ops.keypointops._set_cpu_capability(c)
                    fn()
                for _ in range(args.rounds):
                    for c in caps:
                        torch.ops.keypointops._set_cpu_capability(c)
                        rounds[c].append(median_seconds(fn, args.repeats))
                ms = {c: 1e3 * statistics.median(rounds[c]) for c in caps}
                print(f"| {name} | " + " | ".join(f"{ms[c]:.2f}" for c in caps) + " | "
                      + " | ".join(f"{ms[c] / ms[caps[0]]:.2f}" for c in caps[1:]) + " |", flush=True)
    finally:
        torch.ops.keypointops._set_cpu_capability(default)


if __name__ == "__main__":
    main()
