"""msg_pass forward: effective memory bandwidth against the device's copy bandwidth (GPU only).

The issue's GPU target: the fused forward reaches at least half of the device's copy bandwidth on
1,000,000 nodes x 5 random incoming edges x C = 64 channels.

- Copy bandwidth: ``dst.copy_(src)`` of a 1 GiB tensor, (bytes read + bytes written) / time.
- Forward bytes (each destination gathers its sources' rows once, one pass over the CSR):
  read  E*C*sizeof(x) (gathered rows) + E*8 (col) + (N+1)*8 (rowptr),
  write N*C*sizeof(x) (out) + 2*N*C*sizeof(acc) (row_max, row_sum saved for backward).
  float32, N = 1M, E = 5M, C = 64: 1.28 GB + 40 MB + 8 MB + 768 MB = 2.10 GB.
  Also printed: the ratio against the compulsory traffic, every row of x read once (x counted
  N*C*sizeof(x) instead of E*C*sizeof(x): 1.07 GB), which no gather from a random graph can reach
  when x (256 MB) does not fit in L2.
Times are the median of CUDA-event timings after warm-up, under ``torch.no_grad()``.

Run: ``PYTHONPATH=. python bench/msg_pass_bandwidth.py [--nodes 1000000 --degree 5 --channels 64
--dtype float32]``.  Without a GPU it prints that it needs CUDA and exits with status 0.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


def median_ms(fn, repeats: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(num_bytes: int = 2**30) -> float:
    """Bytes read + written per second by a device-to-device tensor copy."""
    src = torch.empty(num_bytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    return 2 * num_bytes / (median_ms(lambda: dst.copy_(src)) * 1e-3)


def forward_bytes(nodes: int, edges: int, channels: int, dtype: torch.dtype, gathered_rows: int) -> int:
    """Bytes the fused forward moves when ``gathered_rows`` rows of x are read."""
    x_size = torch.empty((), dtype=dtype).element_size()
    acc_size = 8 if dtype == torch.float64 else 4
    reads = gathered_rows * channels * x_size + edges * 8 + (nodes + 1) * 8
    writes = nodes * channels * (x_size + 2 * acc_size)
    return reads + writes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=1_000_000)
    parser.add_argument("--degree", type=int, default=5)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("msg_pass_bandwidth: needs a CUDA device; none found, nothing measured.")
        return 0

    import keypointops
    from keypointops.graphs import Graph

    dtype = DTYPES[args.dtype]
    n, e, c = args.nodes, args.nodes * args.degree, args.channels
    gen = torch.Generator().manual_seed(0)
    src = torch.randint(0, n, (e,), generator=gen)
    dst = torch.arange(n).repeat_interleave(args.degree)
    graph = Graph.from_edge_index(torch.stack([src, dst]).cuda(), n)
    x = torch.randn(n, c, generator=gen).to("cuda", dtype)
    t = torch.ones(c, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device="cuda")
    csr = (graph.rowptr, graph.col, graph.rowptr_t, graph.col_t)

    copy_bw = copy_bandwidth()
    one_pass = forward_bytes(n, e, c, dtype, gathered_rows=e)
    compulsory = forward_bytes(n, e, c, dtype, gathered_rows=n)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"case: {n} nodes x {args.degree} edges x C={c}, {args.dtype}")
    print(f"copy bandwidth: {copy_bw / 1e9:.0f} GB/s (read + write of a 1 GiB copy)")
    print(f"forward bytes: {one_pass / 1e9:.3f} GB one pass (rows gathered per edge), "
          f"{compulsory / 1e9:.3f} GB compulsory (each row of x once)")

    forwards = {}
    if keypointops.has_cuda_ops():
        forwards["cuda"] = torch.ops.keypointops.msg_pass.default
    try:
        from keypointops.triton import msg_pass as triton_msg_pass
        forwards["triton"] = triton_msg_pass.msg_pass_triton
    except ImportError as err:
        print(f"triton: not available ({err})")
    if not forwards:
        print("no GPU backend available (keypointops._C built without CUDA, triton missing)")
        return 1
    for name, forward in forwards.items():
        with torch.no_grad():
            ms = median_ms(lambda: forward(x, *csr, t, 1e-7))
        bandwidth = one_pass / (ms * 1e-3)
        print(f"{name:7s} forward {ms:.3f} ms: {bandwidth / 1e9:.0f} GB/s = {bandwidth / copy_bw:.2f} x copy "
              f"bandwidth (target >= 0.50); compulsory bytes: {compulsory / (ms * 1e-3) / copy_bw:.2f} x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
