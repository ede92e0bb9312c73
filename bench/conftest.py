"""Shared benchmark harness (pytest-benchmark).

Each benchmark test calls the ``measure`` fixture with the function to time, its group (one op,
one case, one pass) and whether it is the baseline of that group.  ``measure`` records the peak
memory of one call beside the timing; the terminal summary prints, per group, the median time,
the speed-up over the group's baseline and the peak memory as a ratio of the baseline's.

Sizes: full by default (``pytest bench/ --benchmark-only``); ``KEYPOINTOPS_BENCH_SMALL=1`` shrinks
every case so that CI can smoke-run the suite (``--benchmark-disable``): sizes that still take
every code path (several programs and blocks, clip borders and interior windows), each function
called twice (the peak-memory call and the benchmark's own) without a warm-up.
``--kp-results FILE.md`` also writes the summary table to FILE.md (and FILE.json).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import time

import pytest
import torch

SMALL = os.environ.get("KEYPOINTOPS_BENCH_SMALL") == "1"

if not torch.cuda.is_available():
    # The Triton backend runs on CPU tensors only in the interpreter (correct, never fast).
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--kp-results", default=None,
                     help="also write the summary table to this markdown file (and .json beside it)")


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def _status_bytes() -> dict:
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS")):
                key, value = line.split(":")
                values[key] = int(value.split()[0]) * 1024
    return values


def peak_memory_bytes(fn, device: str) -> int | None:
    """Peak memory allocated by one call of ``fn`` above what was allocated before it.

    CUDA: the caching allocator's peak.  CPU: the process's peak resident set (VmHWM, reset through
    /proc/self/clear_refs) minus the resident set before the call; None where /proc lacks it.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_bytes()["VmRSS"]
        fn()
        return max(0, _status_bytes()["VmHWM"] - before)
    except OSError:
        fn()
        return None


def timed_pass(forward, leaves, backward: bool):
    """The function to time for one pass: ``forward()`` under no_grad, or forward then backward of
    a ones gradient (the gradients of ``leaves`` cleared after each call)."""
    if not backward:
        def fn():
            with torch.no_grad():
                return forward()
        return fn

    def fn():
        out = forward()
        out.backward(torch.ones_like(out))
        for leaf in leaves:
            leaf.grad = None
    return fn


@pytest.fixture
def measure(benchmark):
    """``measure(fn, group=..., impl=..., device=..., baseline=False)`` times ``fn`` in ``group``."""

    def run(fn, *, group: str, impl: str, device: str, baseline: bool = False):
        if device == "cuda":
            def timed():
                fn()
                torch.cuda.synchronize()
        else:
            timed = fn
        start = time.perf_counter()
        if not SMALL:  # warm-up (compilation, caches); a smoke run times nothing
            timed()
        slow = time.perf_counter() - start > 1.0
        peak = peak_memory_bytes(fn, device)
        benchmark.group = group
        benchmark.extra_info.update(impl=impl, baseline=baseline, device=device_name(device),
                                    peak_mb=None if peak is None else peak / 2**20)
        rounds = 1 if SMALL else (3 if slow else 7)
        benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)

    return run


def _summary_rows(config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or session.disabled:
        return []
    groups: dict[str, list] = {}
    for bench in session.benchmarks:
        if bench.stats is not None and bench.stats.rounds:
            groups.setdefault(bench.group, []).append(bench)
    rows = []
    for group, benches in sorted(groups.items()):
        base = next((b for b in benches if b.extra_info.get("baseline")), None)
        for b in sorted(benches, key=lambda b: b.stats.median):
            median = b.stats.median
            peak = b.extra_info.get("peak_mb")
            base_peak = base.extra_info.get("peak_mb") if base else None
            rows.append({
                "group": group, "impl": b.extra_info.get("impl", b.name),
                "device": b.extra_info.get("device", ""),
                "median_ms": median * 1e3,
                "speedup": base.stats.median / median if base else None,
                "peak_mb": peak,
                # A baseline peak under 1 MiB is noise (freed memory reused): no ratio.
                "peak_ratio": peak / base_peak if peak is not None and base_peak and base_peak >= 1 else None,
            })
    return rows


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def pytest_terminal_summary(terminalreporter, config):
    rows = _summary_rows(config)
    if not rows:
        return
    header = ("| group | impl | median ms | speed-up vs baseline | peak MB | peak / baseline |\n"
              "|---|---|---:|---:|---:|---:|")
    lines = [header] + [
        f"| {r['group']} | {r['impl']} | {r['median_ms']:.2f} | {_fmt(r['speedup'], '.2f')}x | "
        f"{_fmt(r['peak_mb'], '.1f')} | {_fmt(r['peak_ratio'], '.2f')} |" for r in rows]
    stamp = (f"{datetime.date.today().isoformat()}, {rows[0]['device']}, torch {torch.__version__}, "
             f"{'small' if SMALL else 'full'} sizes")
    terminalreporter.write_sep("=", "keypointops benchmark summary")
    terminalreporter.write_line(stamp)
    for line in lines:
        terminalreporter.write_line(line)
    path = config.getoption("--kp-results")
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(f"{stamp}\n\n" + "\n".join(lines) + "\n")
        with open(os.path.splitext(path)[0] + ".json", "w") as f:
            json.dump({"stamp": stamp, "rows": rows}, f, indent=1)
