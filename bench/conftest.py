"""Shared benchmark harness (pytest-benchmark).

Each benchmark test calls the ``measure`` fixture with the function to time, its group (one op,
one case, one pass) and whether it is the baseline of that group.  ``measure`` records the peak
memory of one call beside the timing; the terminal summary prints, per group, the median time,
the speed-up over the group's baseline and the peak memory as a ratio of the baseline's.

Sizes: full by default (``pytest bench/ --benchmark-only``); ``KEYPOINTOPS_BENCH_SMALL=1`` shrinks
every case so that CI can smoke-run the suite (``--benchmark-disable``): sizes that still take
every code path (several programs and blocks, clip borders and interior windows), each function
called twice (the peak-memory call and the benchmark's own) without a warm-up.
Floors: a test that passes ``work=`` (a ``floors.Work``: the bytes its case must move and the FLOPs
it must do) gets its group's floors on this machine measured after the tests, in the same run and
at its thread count (a streaming copy of as many bytes, ``torch.matmul`` at the case's matrix
shapes; ``bench/floors.py``): the summary gives, per implementation, the fraction of the memory floor
and of the compute floor it reaches (floor seconds / its seconds) and which floor binds, and per
group the bytes, FLOPs and the two floors in a second table.
``--kp-results FILE.md`` also writes the summary table to FILE.md (and FILE.json).
``--kp-threads N`` sets torch's intra-op threads for the whole run (default: torch's default, one
per core).  On a machine shared with other work, use fewer threads than free cores: an OpenMP
thread that the OS has descheduled stalls every parallel region at its barrier, which slows every
implementation by a different, unrepeatable factor (docs/benchmarks.md).  The stamp of the summary
gives the thread count.
``--kp-interleave R``: after the tests, time every group again in R rounds that call each of its
functions once in turn (after a warm-up call of each), and report those medians and, as the
speed-up, the median over the rounds of the baseline's time over the function's in that round: the
load of a shared machine then weighs on every implementation of a group alike (run one after the
other, as pytest-benchmark does, their ratio moves with the load).  It keeps every function, with its model and inputs, alive until the
end of the run: for the small cases (``bench/test_models.py``).  On a shared machine, also
``--benchmark-timer time.process_time`` with ``--kp-threads 1``: the CPU time of the one thread,
not the time other jobs hold the core (these rounds use the benchmark's timer).
"""
from __future__ import annotations

import datetime
import functools
import json
import os
import time

import pytest
import torch

import floors
from interleave import interleaved
from machine import cpu_description

SMALL = os.environ.get("KEYPOINTOPS_BENCH_SMALL") == "1"

if not torch.cuda.is_available():
    # The Triton backend runs on CPU tensors only in the interpreter (correct, never fast).
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--kp-results", default=None,
                     help="also write the summary table to this markdown file (and .json beside it)")
    parser.addoption("--kp-threads", type=int, default=None,
                     help="torch intra-op threads for the run (default: torch's default)")
    parser.addoption("--kp-interleave", type=int, default=0,
                     help="also time each group in this many interleaved rounds; the summary uses them")


def pytest_configure(config):
    threads = config.getoption("--kp-threads")
    if threads is not None:
        torch.set_num_threads(threads)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return cpu_description()


@functools.cache
def _start_profiler_once() -> None:
    """The first profile of a process sets the profiler up, which must not count in the first
    measured call."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True):
        torch.zeros(1)


def _status_bytes() -> dict:
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS")):
                key, value = line.split(":")
                values[key] = int(value.split()[0]) * 1024
    return values


def _cpu_peak_bytes(fn) -> int:
    """The larger of two lower bounds of the CPU memory peak while ``fn()`` runs: the peak of the
    running sum of the allocations and frees in the profiler's memory events (torch's CPU allocator
    and the fresh-page buffers the keypointops kernels map and report; counts memory reused from
    the heap), and the growth of the resident set (VmHWM reset through /proc/self/clear_refs;
    counts memory the profiler does not see, such as numpy's)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    _start_profiler_once()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        rss_before = _status_bytes()["VmRSS"]
    except OSError:
        rss_before = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    resident = max(0, _status_bytes()["VmHWM"] - rss_before) if rss_before is not None else 0
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
    running = peak = 0
    for _, size in sorted(events):
        running += size
        peak = max(peak, running)
    return max(peak, resident)


def peak_memory_bytes(fn, device: str) -> int:
    """Peak bytes of memory allocated by one call of ``fn`` and alive at the same time.

    CUDA: the caching allocator's peak above what was allocated before the call.  CPU: the larger of
    the peak of the running sum of the allocations and frees made during the call (the profiler's
    memory events; memory freed that was allocated before the call is subtracted, as on CUDA), which
    counts memory the call reuses from the heap, and the growth of the resident set, which counts
    allocations the profiler does not see (numpy's).
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return _cpu_peak_bytes(fn)


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


# group -> [(impl, timed function, baseline)], kept for --kp-interleave
_KEPT: dict[str, list] = {}


@pytest.fixture
def measure(benchmark, request):
    """``measure(fn, group=..., impl=..., device=..., baseline=False, work=None)`` times ``fn`` in
    ``group``; ``work`` (what the case must do) gives the group its floors in the summary."""

    def run(fn, *, group: str, impl: str, device: str, baseline: bool = False, work: floors.Work | None = None):
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
                                    peak_mb=peak / 2**20)
        if work is not None:
            benchmark.extra_info["work"] = work.as_dict()
        rounds = 1 if SMALL else (3 if slow else 7)
        benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)
        if request.config.getoption("--kp-interleave") > 0:
            _KEPT.setdefault(group, []).append((impl, timed, baseline))

    return run


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _interleaved(rounds: int, timer) -> tuple[dict, dict]:
    """``rounds`` interleaved rounds per group (``bench/interleave.py``) of the functions kept by
    ``measure``, released afterwards.  Returns (group, impl) -> the median seconds of ``timer``, and
    (group, impl) -> the median over the rounds of the baseline's seconds over the function's in
    the same round (groups with a baseline)."""
    medians, speedups = {}, {}
    for group, entries in _KEPT.items():
        times = interleaved({impl: timed for impl, timed, _ in entries}, rounds, timer)
        base = next((times[impl] for impl, _, baseline in entries if baseline), None)
        for impl, t in times.items():
            medians[group, impl] = _median(t)
            if base is not None:
                speedups[group, impl] = _median([b / x for b, x in zip(base, t)])
    _KEPT.clear()
    return medians, speedups


def _summary_rows(config):
    """(rows, floors): a row per timed function; the floors of each group given its work (CPU)."""
    session = getattr(config, "_benchmarksession", None)
    if session is None or session.disabled:
        return [], {}
    round_medians, paired = _interleaved(config.getoption("--kp-interleave"), session.options["timer"].target)
    groups: dict[str, list] = {}
    for bench in session.benchmarks:
        if bench.stats is not None and bench.stats.rounds:
            groups.setdefault(bench.group, []).append(bench)
    rows, group_floors = [], {}
    for group, benches in sorted(groups.items()):
        work = next((b.extra_info["work"] for b in benches if "work" in b.extra_info), None)
        floor = None
        if work is not None and benches[0].extra_info.get("device") != "cuda":
            floor = group_floors[group] = dict(work, **floors.measure_floors(floors.Work.from_dict(work)))
        median_of = {b: round_medians.get((group, b.extra_info.get("impl")), b.stats.median) for b in benches}
        base = next((b for b in benches if b.extra_info.get("baseline")), None)
        for b in sorted(benches, key=median_of.get):
            median = median_of[b]
            peak = b.extra_info.get("peak_mb")
            base_peak = base.extra_info.get("peak_mb") if base else None
            rows.append({
                "group": group, "impl": b.extra_info.get("impl", b.name),
                "device": b.extra_info.get("device", ""),
                "median_ms": median * 1e3,
                "speedup": paired.get((group, b.extra_info.get("impl")),
                                      median_of[base] / median if base else None),
                "peak_mb": peak,
                "peak_ratio": peak / base_peak if peak is not None and base_peak else None,
                "memory_floor": floor["memory_s"] / median if floor else None,
                "compute_floor": floor["compute_s"] / median if floor else None,
            })
    return rows, group_floors


def _binds(floor: dict) -> str:
    return "memory" if floor["memory_s"] >= floor["compute_s"] else "compute"


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def pytest_collection_modifyitems(config, items):
    """A smoke run (``KEYPOINTOPS_BENCH_SMALL=1``) leaves out the forward-only variant of each case:
    its forward+backward variant runs the same forward, and every forward-only path is tested in
    ``python_tests/``."""
    if not SMALL:
        return
    kept, forward_only = [], []
    for item in items:
        params = item.callspec.params if hasattr(item, "callspec") else {}
        (forward_only if params.get("backward") is False else kept).append(item)
    if forward_only:
        config.hook.pytest_deselected(items=forward_only)
        items[:] = kept


def pytest_terminal_summary(terminalreporter, config):
    rows, group_floors = _summary_rows(config)
    if not rows:
        return
    header = ("| group | impl | median ms | speed-up vs baseline | peak MB | peak / baseline "
              "| of memory floor | of compute floor | binds |\n"
              "|---|---|---:|---:|---:|---:|---:|---:|---|")
    lines = [header] + [
        f"| {r['group']} | {r['impl']} | {r['median_ms']:.2f} | {_fmt(r['speedup'], '.2f')}x | "
        f"{_fmt(r['peak_mb'], '.1f')} | {_fmt(r['peak_ratio'], '.2f')} | {_fmt(r['memory_floor'], '.0%')} | "
        f"{_fmt(r['compute_floor'], '.0%')} | "
        f"{_binds(group_floors[r['group']]) if r['group'] in group_floors else '-'} |" for r in rows]
    if group_floors:
        lines += ["", "| group | MB moved | copy GB/s at its footprint | GFLOP | of which GEMM | memory floor ms "
                  "| compute floor ms | binds |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"] + [
            f"| {group} | {f['bytes'] / 1e6:.4g} | {f['bytes'] / f['memory_s'] / 1e9:.3g} | {f['flops'] / 1e9:.4g} | "
            f"{sum(floors.Gemm(**g).flops for g in f['gemms']) / 1e9:.4g} | {f['memory_s'] * 1e3:.3g} | "
            f"{f['compute_s'] * 1e3:.3g} | {_binds(f)} |" for group, f in sorted(group_floors.items())]
    rounds = config.getoption("--kp-interleave")
    timer = config._benchmarksession.options["timer"].target
    stamp = (f"{datetime.date.today().isoformat()}, {rows[0]['device']}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, {'small' if SMALL else 'full'} sizes, "
             f"timer {getattr(timer, '__name__', timer)}"
             + (f", medians of {rounds} interleaved rounds (speed-up: of the per-round ratios)" if rounds else "")
             + (f"; floors: streaming copy {floors.copy_bandwidth(floors.COPY_CAP_BYTES) / 1e9:.1f} GB/s"
                f" ({floors.COPY_CAP_BYTES // 2**21} MiB copied), matmul {floors.square_gemm_rate() / 1e9:.0f} GFLOP/s"
                f" ({floors.SQUARE_GEMM}^3)" if group_floors else "")
             + f"; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
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
            json.dump({"stamp": stamp, "rows": rows, "floors": group_floors}, f, indent=1)
