"""Timing helper shared by the benchmark scripts."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Hashable


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls of fn, after one untimed call (allocator and kernel
    warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(runs: dict[Hashable, Callable[[], object]], repeats: int) -> dict:
    """``{name: median wall time}`` of each callable of ``runs`` (name → callable): one untimed
    warm-up call each, then ``repeats`` rounds in which every callable runs once, round-robin,
    the first one of a round rotating (so no contestant always follows the same neighbour)."""
    names = list(runs)
    for name in names:
        runs[name]()
    times = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
