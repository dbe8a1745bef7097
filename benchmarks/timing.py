"""What the speed benchmarks share: interleaved median timing, the matmul ceiling, thread counts and
plain-text tables.

Machines are shared and noisy, so sdjax and the references are timed in turn within one loop (a
slow spell hits both) and each figure is a median of several runs.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Mapping, Sequence


def num_cores() -> int:
    """Cores this process may run on: what XLA's CPU thread pool uses, and what torch gets too."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def interleaved(runs: Mapping[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each callable (which must block until its result is ready), `repeats` rounds of
    one call each, in turn."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def matmul_run(n: int = 4096) -> tuple[Callable[[], object], float]:
    """(one blocking run of a jitted n x n float32 matmul, its FLOPs): time it among the others
    so that the ceiling is read under the same load."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    return (lambda: matmul(a, b).block_until_ready()), 2.0 * n ** 3


def xla_flops(program) -> float:
    """FLOPs of a lowered or compiled XLA program by its cost analysis (0 where none is given).
    XLA counts a loop's body once, not once per trip: count loop-free programs."""
    analysis = program.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per device program
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", 0.0))


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-markdown table (readable as plain text too)."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return "—" if value is None else str(value)
