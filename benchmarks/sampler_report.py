"""How closely each sdjax sampler follows the diffusers (PyTorch, float64) scheduler of the same
settings: the largest relative error of the whole trajectory, per step count and parameterisation.

    python -m benchmarks.sampler_report                       # every sampler, 10/25/50 steps
    python -m benchmarks.sampler_report --samplers=euler_a,heun --steps=10

The comparison is tests/test_samplers.py's (same fake model, same injected noise), which fails
above its tolerance; this prints the measured errors that the tests only bound.
"""
from __future__ import annotations

import pytest
from absl import app, flags

from benchmarks import timing
from tests import test_samplers as parity

flags.DEFINE_list("samplers", sorted(parity.CASES), "cases of tests/test_samplers.py CASES")
flags.DEFINE_list("steps", [str(n) for n in parity.STEP_COUNTS], "step counts")
FLAGS = flags.FLAGS


def rel_err(case: str, num_steps: int, prediction_type: str) -> float | None:
    if (case, prediction_type) in parity.NOT_COMPARED:
        return None
    with pytest.MonkeyPatch.context() as monkeypatch:   # run_diffusers injects the noise
        ref = parity.run_diffusers(case, num_steps, prediction_type, monkeypatch)
    return parity.rel_err(parity.run_sdjax(case, num_steps, prediction_type), ref)


def main(_):
    unknown = sorted(set(FLAGS.samplers) - set(parity.CASES))
    if unknown:
        raise app.UsageError(f"unknown samplers {unknown}; valid: {', '.join(sorted(parity.CASES))}")
    columns = [(int(n), p) for p in parity.PREDICTION_TYPES for n in FLAGS.steps]
    rows = []
    for case in FLAGS.samplers:
        errors = [rel_err(case, n, p) for n, p in columns]
        measured = [e for e in errors if e is not None]
        rows.append([case, *errors, max(measured)])
    print(f"max relative error of the trajectory vs diffusers (test tolerance {parity.RTOL:g}; "
          f"— where diffusers is no reference)")
    print(timing.table(["sampler", *(f"{n} {'eps' if p == 'epsilon' else 'v'}" for n, p in columns),
                        "max"], rows))


if __name__ == "__main__":
    app.run(main)
