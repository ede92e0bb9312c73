"""Interleaved timing rounds: each round calls every function once in turn, so that the load of a
shared machine weighs on all of them alike.  The one implementation that the benchmark harness
(``bench/conftest.py``'s ``--kp-interleave``), the bench scripts and the tests' timing comparisons
(``python_tests/helpers.py``'s ``best_cpu_times``) use; it imports nothing heavy, so the tests can
import it from ``bench/``."""
from __future__ import annotations

import time
from typing import Callable


def interleaved(fns: dict, rounds: int, timer: Callable[[], float] = time.perf_counter,
                prepare: dict | None = None) -> dict:
    """{name: [seconds per round]}: a warm-up call of each of ``fns``, then ``rounds`` rounds calling
    each once, timed by ``timer``; ``prepare[name]()``, when given, runs untimed before each of
    ``name``'s calls (e.g. a switch of the CPU kernels' build, bench/capabilities.py)."""
    prepare = prepare or {}
    for name, fn in fns.items():
        prepare.get(name, lambda: None)()
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            prepare.get(name, lambda: None)()
            start = timer()
            fn()
            times[name].append(timer() - start)
    return times
