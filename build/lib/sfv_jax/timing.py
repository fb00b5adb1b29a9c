"""The one timer of benchmarks and latency figures: warm-up calls, then the median of repeated calls, each
ended by ``jax.block_until_ready`` on what the call returned (asynchronous dispatch would otherwise time
only the launch). Optionally the median of per-stage seconds a call reports (the pipeline's
``last_timings``)."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class Timing:
    median_s: float
    times_s: tuple[float, ...]
    stages_s: dict[str, float]  # median of each stage's seconds over the repeats (empty without ``stages``)


def median_time(
    fn: Callable[[], Any], repeats: int, warmup: int = 1, stages: Callable[[], Mapping[str, float]] | None = None
) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls (compilation), then ``repeats`` timed ones (at least one).
    ``stages()``, read after each timed call, gives that call's per-stage seconds."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times, per_stage = [], []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
        if stages is not None:
            per_stage.append(dict(stages()))
    names = dict.fromkeys(k for s in per_stage for k in s)
    return Timing(
        statistics.median(times), tuple(times), {k: statistics.median(s.get(k, 0.0) for s in per_stage) for k in names}
    )
