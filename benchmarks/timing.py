"""What the speed benchmarks share: interleaved median timing, the matmul ceiling, thread counts and
plain-text tables.

Machines are shared and noisy, so sdjax and the references are timed in turn within one loop (a
slow spell hits both) and each figure is a median of several runs.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Mapping, Sequence


# The diffusers 0.39 Flax reference's venv (benchmarks/setup_references.sh makes it).
FLAX_VENV = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         ".venv-flax-ref")


def flax_python(venv: str) -> str | None:
    """The reference venv's interpreter, or None when it is not set up."""
    python = os.path.join(venv, "bin", "python") if venv else ""
    return python if python and os.path.exists(python) else None


def num_cores() -> int:
    """Cores this process may run on: what XLA's CPU thread pool uses, and what torch gets too."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def interleaved(runs: Mapping[str, Callable[[], object]], repeats: int,
                prepare: Mapping[str, Callable[[], object]] | None = None) -> dict[str, list[float]]:
    """Seconds of each callable (which must block until its result is ready), `repeats` rounds of
    one call each, in turn; `prepare[name]`, untimed, just before each call of `runs[name]` (e.g.
    putting a model into the state that run times)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            if prepare and name in prepare:
                prepare[name]()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


class StepWorker:
    """A benchmark worker in a process of its own (another venv, or memory that cannot be shared
    with the other side), stepped one timed run at a time so that its timings interleave with the
    parent's. Protocol on the worker's stdout: `ready <setup seconds>` once set up, then one
    `seconds <s>` per `run` line read on stdin; any other `<tag> <value>` line is kept in `info`."""

    def __init__(self, python: str, module: str, *args: str, env: Mapping[str, str] | None = None):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.info: dict[str, str] = {}
        self._proc = subprocess.Popen([python, "-m", module, *args], cwd=root,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                      env={**os.environ, "PYTHONPATH": root, **(env or {})})
        self.setup_s = float(self._read("ready"))

    def _read(self, tag: str | None) -> str | None:
        """The value of the next `tag` line, keeping the lines before it in `info`; tag None reads
        to the end of the worker's output."""
        for line in self._proc.stdout:
            key, _, value = line.strip().partition(" ")
            if key == tag:
                return value
            if key:
                self.info[key] = value
        if tag is None:
            return None
        raise RuntimeError(f"benchmark worker {self._proc.args[2:]} exited (code "
                           f"{self._proc.wait()}) before {tag!r}")

    def run(self) -> float:
        self._proc.stdin.write("run\n")
        self._proc.stdin.flush()
        return float(self._read("seconds"))

    def close(self) -> dict[str, str]:
        """Ends the worker; what it printed after its last run (e.g. its peak memory) is returned
        in `info`."""
        self._proc.stdin.close()
        self._read(None)
        if self._proc.wait() != 0:
            raise RuntimeError(f"benchmark worker {self._proc.args[2:]} failed (code "
                               f"{self._proc.returncode})")
        return self.info


def serve_runs(step: Callable[[], object], setup_s: float,
               after: Callable[[], object] | None = None) -> None:
    """The worker side of `StepWorker`: announce readiness, then time `step` (which must block
    until done) once per `run` line on stdin, calling `after` untimed after each (e.g. undoing what
    the step did); at end of input print the peak RSS."""
    print(f"ready {setup_s:.3f}", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            continue
        start = time.perf_counter()
        step()
        print(f"seconds {time.perf_counter() - start:.6f}", flush=True)
        if after is not None:
            after()
    print(f"peak_rss_mib {peak_rss_mib():.0f}", flush=True)


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM; not inherited from a parent across exec)."""
    return _status_mib("VmHWM")


def rss_mib() -> float:
    """This process's resident set now (VmRSS)."""
    return _status_mib("VmRSS")


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def relative_difference(ours, expected) -> float:
    """max |ours - expected| / max |expected|: how far two implementations' outputs are apart."""
    import numpy as np

    ours, expected = np.asarray(ours, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(ours - expected)) / np.max(np.abs(expected)))


def load_average() -> str:
    """The host's 1, 5 and 15 minute load averages: how busy a shared machine was around a timing."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


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
