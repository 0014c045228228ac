"""One way to time a call, for every engine slimgraph measures (TVM, PyTorch, ONNX Runtime).

A short pause first lets threads another engine left spinning (PyTorch's OpenMP pool spins for a
while after each call and would halve a TVM run right after it) go idle; then warm-up calls,
then ``repeat`` timed calls (fewer, but at least 3, when ``max_seconds`` runs out). The result
has the median, mean, min, max, p10 and p90 in ms and the number of runs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

SETTLE_S = 0.5  # quiet period before timing


def time_callable(fn: Callable[[], object], repeat: int = 20, warmup: int = 3,
                  max_seconds: float = 30.0, settle_s: float = SETTLE_S) -> dict[str, float]:
    time.sleep(settle_s)
    for _ in range(warmup):
        fn()
    times, start = [], time.perf_counter()
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 3 and time.perf_counter() - start > max_seconds:
            break
    ordered = sorted(times)
    return {"median_ms": statistics.median(times), "mean_ms": statistics.fmean(times),
            "min_ms": ordered[0], "max_ms": ordered[-1], "p10_ms": _quantile(ordered, 0.1),
            "p90_ms": _quantile(ordered, 0.9), "repeat": len(times), "warmup": warmup}


def _quantile(ordered: list[float], q: float) -> float:
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
