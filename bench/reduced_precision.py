"""The compiled CPU kernels in bfloat16 (or float16) against float32, at the benchmark sizes.

Every keypointops case of ``bench/test_<op>.py`` (keypoint_gather's points and its 3 x 3 patches
with one box size or a box per keypoint, each also with channels_last features; msg_pass, also
with edge features (``bench/test_msg_pass_edge.py``, when PyG is installed); window_graph_conv
with both adjacency kinds and MS-G3D's strided multi-scale windows), forward and
forward+backward, the op's ``backend="cpu"`` with the same values in float32 and in the reduced
dtype (cast beforehand; the timed call is the op itself, as ``timed_pass`` of the pytest
benchmarks times it).  The two dtypes run in interleaved rounds (one call of each per round, after
a warm-up call), so that the load of a shared machine weighs on both alike; the table gives the
median time of each and the median over the rounds of the per-round ratio float32 time / reduced
time (> 1: the reduced dtype is faster).  ``--timer cpu`` times the CPU time of the process
(``time.process_time``), which with ``--threads 1`` excludes the time other jobs hold the core.

Run: ``PYTHONPATH=. python bench/reduced_precision.py [--threads 2] [--rounds 7] [--dtype bfloat16]
[--timer wall|cpu] [--only SUBSTRING] [--out FILE.md]``; ``KEYPOINTOPS_BENCH_SMALL=1`` runs the
smoke sizes.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import test_keypoint_gather as kg  # noqa: E402  (the benchmark cases, from bench/)
import test_msg_pass as mp  # noqa: E402
import test_part_pool as pp  # noqa: E402
import test_window_graph_conv as wg  # noqa: E402
from conftest import timed_pass  # noqa: E402
from interleave import interleaved  # noqa: E402
from machine import cpu_description  # noqa: E402

import keypointops  # noqa: E402
from keypointops.graphs import Graph  # noqa: E402

try:
    import test_msg_pass_edge as mpe  # noqa: E402  (skips itself without PyG)
except pytest.skip.Exception:
    mpe = None

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def keypoint_gather_cases():
    for case in kg.CASES:
        for channels_last in (False, True):
            spec = kg.CASES[case]
            features, keypoints, scale = kg.make_case(case, "cpu")
            if channels_last:
                features = features.contiguous(memory_format=torch.channels_last)

            def make(dtype, backward, features=features, keypoints=keypoints, scale=scale, spec=spec):
                f = features.to(dtype).detach().requires_grad_(backward)
                return timed_pass(lambda: keypointops.keypoint_gather(
                    f, keypoints, scale, roi_size=spec["roi_size"], sampling_ratio=spec["sampling_ratio"],
                    aligned=spec["aligned"], backend="cpu"), [f], backward)
            yield f"keypoint_gather {case}{' channels_last' if channels_last else ''}", make
    for case, spec in kg.PATCH_CASES.items():
        for channels_last in (False, True):
            features, keypoints, scale = kg.make_patch_case(case, "cpu")
            if channels_last:
                features = features.contiguous(memory_format=torch.channels_last)
            roi_size = kg.patch_sizes(spec, keypoints) if spec["per_keypoint"] else spec["roi_size"]

            def make(dtype, backward, features=features, keypoints=keypoints, scale=scale, spec=spec,
                     roi_size=roi_size):
                f = features.to(dtype).detach().requires_grad_(backward)
                return timed_pass(lambda: keypointops.keypoint_gather(
                    f, keypoints, scale, roi_size=roi_size, sampling_ratio=spec["sampling_ratio"],
                    aligned=spec["aligned"], output_size=spec["output_size"], backend="cpu"), [f], backward)
            yield f"keypoint_gather {case}{' channels_last' if channels_last else ''}", make


def msg_pass_cases():
    for case in mp.CASES:
        x, graph = mp.make_case(case, "cpu")

        def make(dtype, backward, x=x, graph=graph):
            xr = x.to(dtype).detach().requires_grad_(backward)
            t = torch.ones(1, requires_grad=backward)
            return timed_pass(lambda: keypointops.msg_pass(xr, graph, t, mp.EPS, backend="cpu"), [xr, t], backward)
        yield f"msg_pass {case}", make
    if mpe is None:
        return
    x, edge_index, edge_attr = mpe.make_message_passing_case("cpu")
    graph = Graph.from_edge_index(edge_index, mpe.NODES)

    def make(dtype, backward):
        xr = x.to(dtype).detach().requires_grad_(backward)
        er = edge_attr.to(dtype).detach().requires_grad_(backward)
        t = torch.ones(1, requires_grad=backward)
        return timed_pass(lambda: keypointops.msg_pass(xr, graph, t, mp.EPS, edge_attr=er, backend="cpu"),
                          [xr, er, t], backward)
    yield f"msg_pass edge_attr C={mpe.CHANNELS}", make


def part_pool_cases():
    for case in pp.CASES:
        features, heatmaps, groups = pp.make_case(case, "cpu")

        def make(dtype, backward, features=features, heatmaps=heatmaps, groups=groups):
            f = features.to(dtype).detach().requires_grad_(backward)
            h = heatmaps.to(dtype).detach().requires_grad_(backward)
            g = None if groups is None else groups.to(dtype)
            return timed_pass(lambda: keypointops.part_pool(f, h, g, backend="cpu"), [f, h], backward)
        yield f"part_pool {case}", make


def window_graph_conv_cases():
    for case in wg.CASES:
        for adj_kind in wg.ADJ_KINDS:
            x, adj, window = wg.make_case(case, adj_kind, "cpu")

            def make(dtype, backward, x=x, adj=adj, window=window):
                xr = x.to(dtype).detach().requires_grad_(backward)
                ar = adj.to(dtype).detach().requires_grad_(backward)
                return timed_pass(lambda: keypointops.window_graph_conv(xr, ar, window, backend="cpu"),
                                  [xr, ar], backward)
            yield f"window_graph_conv {case} {adj_kind}", make
    x, _, adj = wg.make_msg3d_case("cpu")

    def make(dtype, backward):
        xr = x.to(dtype).detach().requires_grad_(backward)
        ar = adj.to(dtype).detach().requires_grad_(backward)
        return timed_pass(lambda: keypointops.window_graph_conv(
            xr, ar, wg.MSG3D["window"], stride=wg.MSG3D["stride"], backend="cpu"), [xr, ar], backward)
    yield f"window_graph_conv msg3d stride {wg.MSG3D['stride']} {wg.MSG3D['scales']} scales", make


TIMERS = {"wall": time.perf_counter, "cpu": time.process_time}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--timer", choices=sorted(TIMERS), default="wall",
                        help="wall: elapsed time; cpu: CPU time of the process (use with --threads 1)")
    parser.add_argument("--only", default="", help="run only the cases whose name contains this")
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reduced = DTYPES[args.dtype]
    header = (f"{cpu_description()}, {args.threads} threads, torch {torch.__version__}, "
              f"{args.rounds} interleaved rounds, {args.timer} time, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    lines = [header, "", f"| case | pass | float32 ms | {args.dtype} ms | float32 / {args.dtype} |",
             "|---|---|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for cases in (keypoint_gather_cases, msg_pass_cases, part_pool_cases, window_graph_conv_cases):
        for name, make in cases():
            if args.only not in name:
                continue
            for backward in (False, True):
                times = interleaved({"float32": make(torch.float32, backward), "reduced": make(reduced, backward)},
                                    args.rounds, TIMERS[args.timer])
                ratio = statistics.median(a / b for a, b in zip(times["float32"], times["reduced"]))
                line = (f"| {name} | {'fwd+bwd' if backward else 'fwd'} | "
                        f"{1e3 * statistics.median(times['float32']):.2f} | "
                        f"{1e3 * statistics.median(times['reduced']):.2f} | {ratio:.2f}x |")
                lines.append(line)
                print(line, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
