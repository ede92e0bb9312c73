"""What the floors of bench/floors.py leave out for the two ops that run far from them.

The op benchmarks hold ``keypoint_gather`` and ``msg_pass`` to a memory or compute floor that
counts only the bytes they must move and the FLOPs they must do.  Two costs their implementations
pay are not in those counts; this script measures each, in the same run and at the same threads as
the op's forward+backward, and reports how far the op runs from the floor with that cost added:

- **fresh gradient pages** (``keypoint_gather``): backward returns a new ``[B, C, H, W]`` gradient.
  PyTorch's CPU allocator hands a buffer of that size back to the OS when it is freed, so every
  call's gradient is fresh memory, whose pages the OS zeroes on their first touch; the memory
  floor assumes resident memory written at a streaming copy's bandwidth.  Measured: mapping a fresh
  anonymous region of the gradient's size (advised onto huge pages, as the op's own buffer is),
  touching every 4 KiB page of it (one ``fill_`` over a strided view, on torch's threads), and
  unmapping it.
- **exponentials** (``msg_pass``): the softmax takes one ``exp`` per edge and channel in forward
  and again in backward; the compute floor counts each as one FLOP at a matmul's rate.  Measured:
  ``torch.exp`` (PyTorch's vectorised exp) over ``E x C`` resident float32 elements, twice.

The bound reported beside each op is conservative: for ``keypoint_gather`` the larger of the
floors and the fresh pages' cost (the OS's zeroing is the gradient's write, so the two are not
added), for ``msg_pass`` the larger of the memory floor and the compute floor plus the
exponentials (both on the same vector units).  Each figure is the median of ``--rounds`` calls;
the floors are measured as the op benchmarks measure them.  Usage (repository root):
``PYTHONPATH=. python bench/floor_gaps.py --threads 2 --rounds 9``
"""
from __future__ import annotations

import argparse
import mmap
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import floors  # noqa: E402
from interleave import interleaved  # noqa: E402
import test_keypoint_gather as gather_bench  # noqa: E402
import test_msg_pass as msg_pass_bench  # noqa: E402
from machine import cpu_description  # noqa: E402

PAGE = 4096


def touch_fresh_pages(nbytes: int) -> None:
    """Map ``nbytes`` of fresh private anonymous memory, advise it onto huge pages, write one byte
    of every 4 KiB page (the OS zeroes each page on that first write) and unmap it.  Private: a
    shared anonymous mapping (mmap's default) is not given transparent huge pages."""
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        region.madvise(mmap.MADV_HUGEPAGE)
    pages = torch.frombuffer(region, dtype=torch.uint8)[::PAGE]
    pages.fill_(1)
    del pages
    region.close()


def medians(fns: dict, rounds: int) -> dict:
    """Median seconds of each function over ``rounds`` calls in a row after a warm-up call
    (``interleaved`` of one function at a time, not of all together: the op benchmarks time warm
    repeated calls, and a left-out cost that streams a large buffer would evict a small case's
    inputs between them)."""
    return {name: statistics.median(interleaved({name: fn}, rounds)[name]) for name, fn in fns.items()}


def gather_rows(rounds: int) -> list[dict]:
    rows = []
    for case in ("stage1", "stage1_kmpnet", "stage4"):
        spec = gather_bench.CASES[case]
        for layout in ("NCHW", "channels_last"):
            features, keypoints, scale = gather_bench.make_case(case, "cpu")
            if layout == "channels_last":
                features = features.contiguous(memory_format=torch.channels_last)
            forward = gather_bench.make_forward("keypointops", scale, spec)
            op = gather_bench.make_fn(forward, features, keypoints, backward=True)
            work = gather_bench.gather_work(spec, features, keypoints, spec["roi_size"], backward=True)
            measured = medians({"op": op, "extra": lambda: touch_fresh_pages(features.nbytes)}, rounds)
            floor = max(floors.measure_floors(work).values())
            rows.append(dict(case=f"keypoint_gather {case} {layout}", left_out="fresh gradient pages",
                             floor=floor, bound=max(floor, measured["extra"]), **measured))
    return rows


def msg_pass_rows(rounds: int) -> list[dict]:
    rows = []
    for case in ("kmpnet", "large"):
        x, graph = msg_pass_bench.make_case(case, "cpu")
        op = msg_pass_bench.make_fn("keypointops", x, graph, "cpu", backward=True)
        work = floors.msg_pass(graph.num_nodes, graph.num_edges, x.size(1), backward=True)
        exponents = torch.rand(graph.num_edges, x.size(1))
        values = torch.empty_like(exponents)

        def two_exps():
            torch.exp(exponents, out=values)
            torch.exp(exponents, out=values)

        measured = medians({"op": op, "extra": two_exps}, rounds)
        floor = floors.measure_floors(work)
        rows.append(dict(case=f"msg_pass {case}", left_out="exp per edge and channel, twice",
                         floor=max(floor.values()),
                         bound=max(floor["memory_s"], floor["compute_s"] + measured["extra"]), **measured))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| op: case (forward+backward) | measured ms | binding floor ms (of it) | left out | its ms "
             "| bound with it, ms (of measured) |", "|---|---:|---:|---|---:|---:|"]
    for row in rows:
        floor, bound = row["floor"], row["bound"]
        lines.append(f"| {row['case']} | {1e3 * row['op']:.2f} | {1e3 * floor:.2f} ({floor / row['op']:.0%}) "
                     f"| {row['left_out']} | {1e3 * row['extra']:.2f} | {1e3 * bound:.2f} ({bound / row['op']:.0%}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{cpu_description()}, torch {torch.__version__}, {args.threads} threads, median of {args.rounds} calls\n")
    print(table(gather_rows(args.rounds) + msg_pass_rows(args.rounds)))


if __name__ == "__main__":
    main()
