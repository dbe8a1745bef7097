"""Compile time of the whole sampling program (text encoders, the denoising scan, VAE decode) at
several step counts, each in a fresh process, and a second launch that finds the program in the
persistent compilation cache: its lowered form (`jax.export`, `sdjax.sampling.exported`) and its XLA
executable.

    python -m benchmarks.compile_time                  # SD 1.5, 512 px, dpmpp_2m with guidance
    python -m benchmarks.compile_time --preset=tiny    # seconds; what CI runs

Params are abstract (shapes only): compiling does not need their values, so a launch measures
tracing + lowering (or loading the exported program) and XLA compilation, not weight loading. The
program is the one `Generator` builds (jit over the batch on the device mesh); the cached launches
go through `Generator.program_for`, as a real launch with the persistent cache does. A second
pair of launches with exported programs off shows what the executable cache alone saves.
With the diffusers-Flax venv (benchmarks/setup_references.sh), the same step counts are compiled
by diffusers 0.39's `FlaxStableDiffusionPipeline` as `jit=True` does it (its pmapped `_p_generate`,
benchmarks/flax_pipeline_compile.py), each in a fresh process of that venv, cache off, abstract
params too; 'sdjax / this' is sdjax's no-cache launch of the same step count over it.
Targets: 50 steps <= 1.2x 1 step (the scan body is compiled once, whatever the step count); the
second launch <= 10% of the first.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from benchmarks import timing

flags.DEFINE_string("preset", "sd15", "architecture preset (sdjax.weights.presets)")
flags.DEFINE_list("steps", ["1", "10", "50"], "step counts, each compiled in a fresh process "
                  "with the persistent cache disabled")
flags.DEFINE_integer("size", 0, "image height and width in pixels (default: 512; tiny: 32)")
flags.DEFINE_integer("cache_steps", 50, "step count of the two launches sharing a persistent cache")
flags.DEFINE_string("launch", None, "internal: compile once in this process, print JSON "
                    "('' = no persistent cache, else its folder)")
flags.DEFINE_string("flax_venv", timing.FLAX_VENV, "venv with diffusers 0.39 "
                    "(benchmarks/setup_references.sh); skipped if absent or ''")
flags.DEFINE_bool("exported", True, "internal: with --launch, keep/load the lowered program "
                  "next to the persistent cache")
FLAGS = flags.FLAGS


def launch(preset_name: str, steps: int, size: int, cache_dir: str, exported: bool = True) -> dict:
    """Trace, lower and compile the program once in this process (with a persistent cache: through
    `Generator.program_for`, which loads or writes the exported program); seconds and cache events."""
    import jax

    events = []
    jax.monitoring.register_event_listener(lambda name, **kwargs: events.append(name))
    from sdjax import parallel
    from sdjax.sampling import Generator, Request, SamplingSpec, enable_compilation_cache
    from sdjax.weights.architecture import Architecture
    from sdjax.weights.presets import abstract_pretrained

    class AbstractGenerator(Generator):
        """Generator's program and batch layout, over abstract params (nothing placed)."""

        def __init__(self, model):  # noqa: super().__init__ would place the params
            self.model, self.arch, self.parallel_mode = model, Architecture.of(model), "jit"
            self.mesh = parallel.make_mesh()
            self.params, self._programs, self.traces = model.params, {}, 0
            self.exported_programs, self._exported, self.program_log = exported, {}, []

    if cache_dir:
        enable_compilation_cache(cache_dir)
    generator = AbstractGenerator(abstract_pretrained(preset_name))
    spec = SamplingSpec(sampler="dpmpp_2m", steps=steps, height=size, width=size)
    batch = parallel.shard_batch(generator.prepare(Request(prompt="a cat"), spec), generator.mesh)
    result = {"exported": "—"}
    if cache_dir and exported:
        start = time.perf_counter()
        generator.program_for(spec, batch)
        total_s = time.perf_counter() - start
        log = generator.program_log[-1]
        if log["outcome"] == "unsupported":
            raise RuntimeError("the sampling program could not be exported (see the warning above)")
        seconds = log["seconds"]
        # Everything before XLA's compile: the key, loading or exporting (trace + lower), and
        # lowering the jit around the exported call.
        result.update(lower_s=total_s - seconds["compile"], compile_s=seconds["compile"],
                      exported=log["outcome"], traces=generator.traces)
    else:
        program = generator._program(spec, tuple(sorted(batch)))
        start = time.perf_counter()
        lowered = program.lower(generator.params, batch)
        result["lower_s"] = time.perf_counter() - start
        start = time.perf_counter()
        lowered.compile()
        result["compile_s"] = time.perf_counter() - start
        result["traces"] = generator.traces
    result.update(hits=events.count("/jax/compilation_cache/cache_hits"),
                  misses=events.count("/jax/compilation_cache/cache_misses"))
    return result


def _fresh_process(steps: int, size: int, cache_dir: str, exported: bool = True) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "benchmarks.compile_time",
                          f"--preset={FLAGS.preset}", f"--size={size}", f"--steps={steps}",
                          f"--launch={cache_dir}", f"--exported={exported}"],
                         cwd=root, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"compile launch (steps={steps}) failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _flax_launch(python: str, steps: int, size: int, tokenizer_dir: str) -> dict:
    """diffusers-Flax's compile of its pipeline in a fresh process of the reference venv."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([python, "-m", "benchmarks.flax_pipeline_compile",
                          f"--preset={FLAGS.preset}", f"--steps={steps}", f"--size={size}",
                          f"--tokenizer={tokenizer_dir}"],
                         cwd=root, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": root})
    if out.returncode:
        raise RuntimeError(f"diffusers-Flax compile launch (steps={steps}) failed:\n"
                           f"{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _flax_rows(python: str, size: int, sdjax_totals: dict[int, float]) -> list[list]:
    from sdjax.text.tokenizer import CLIPTokenizer

    rows, totals = [], {}
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        # The same vocabulary, written as the tokenizer folder transformers reads.
        CLIPTokenizer.default().save_pretrained(tokenizer_dir)
        for steps in map(int, FLAGS.steps):
            r = _flax_launch(python, steps, size, tokenizer_dir)
            print(f"done diffusers-Flax {steps} steps", file=sys.stderr, flush=True)
            totals[steps] = r["lower_s"] + r["compile_s"]
            rows.append([f"diffusers 0.39 (Flax) {steps} steps", r["lower_s"], r["compile_s"],
                         totals[steps], totals[steps] / totals[min(totals)], "—", "—",
                         sdjax_totals[steps] / totals[steps]])
    return rows


def main(_):
    size = FLAGS.size or (32 if FLAGS.preset == "tiny" else 512)
    if FLAGS.launch is not None:
        print(json.dumps(launch(FLAGS.preset, int(FLAGS.steps[0]), size, FLAGS.launch,
                                FLAGS.exported)))
        return
    import jax

    rows = []
    by_steps = {}
    for steps in map(int, FLAGS.steps):
        r = _fresh_process(steps, size, "")
        by_steps[steps] = r["lower_s"] + r["compile_s"]
        rows.append([f"{steps} steps, no persistent cache", r["lower_s"], r["compile_s"],
                     by_steps[steps], by_steps[steps] / by_steps[min(by_steps)], "—", "—", "—"])
        print(f"done {steps} steps", file=sys.stderr, flush=True)
    flax_py = timing.flax_python(FLAGS.flax_venv)
    flax_rows = _flax_rows(flax_py, size, by_steps) if flax_py else []
    labelled = []
    for exported, labels in ((True, ("first launch, empty cache", "second launch, cache filled")),
                             (False, ("empty cache, exported programs off",
                                      "filled cache, exported programs off"))):
        with tempfile.TemporaryDirectory() as cache:
            pair = [_fresh_process(FLAGS.cache_steps, size, cache, exported) for _ in range(2)]
        labelled += [(label, r, pair[0]) for label, r in zip(labels, pair)]
    cache_rows = []
    for label, r, first_of_pair in labelled:
        total = r["lower_s"] + r["compile_s"]
        first = first_of_pair["lower_s"] + first_of_pair["compile_s"]
        cache_rows.append([f"{FLAGS.cache_steps} steps, {label}", r["lower_s"], r["compile_s"],
                           total, total / first, f"{r['hits']} hit / {r['misses']} miss",
                           r["exported"], "—"])
    print(f"compile time of the sampling program, preset {FLAGS.preset}, {size}x{size} px, "
          f"dpmpp_2m with guidance, {timing.num_cores()} cores, jax {jax.__version__}; each row a "
          f"fresh process; 'ratio' is to the fewest steps of the same program (no-cache and "
          f"diffusers-Flax rows) or to the first launch of the pair sharing a cache; "
          f"'sdjax / this' is sdjax's no-cache total at the same step count over this row's; "
          f"'trace+lower s' of a launch that loads the exported program is the load and lowering "
          f"of the call to it")
    if not flax_py:
        print(f"diffusers 0.39 (Flax): not run (no venv at {FLAGS.flax_venv!r}; "
              f"benchmarks/setup_references.sh makes it)")
    print(timing.table(["launch", "trace+lower s", "compile s", "total s", "ratio",
                        "persistent cache", "exported program", "sdjax / this"],
                       rows + cache_rows + flax_rows))
    ratios = [r[4] for r in cache_rows]
    print(f"second launch / first launch: {ratios[1]:.3f} (target <= 0.10); with exported "
          f"programs off: {ratios[3]:.3f}")


if __name__ == "__main__":
    app.run(main)
