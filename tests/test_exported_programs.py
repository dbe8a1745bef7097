"""Lowered sampling programs kept next to the persistent compilation cache (`sdjax.sampling.exported`): a
second launch loads the program instead of tracing it, gives bit-identical images, and anything
that changes the program (spec, batch size) misses; an unreadable entry is rebuilt, never fatal."""
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from sdjax.sampling import exported as exported_lib
from sdjax import parallel
from sdjax.weights.presets import random_pretrained
from sdjax.sampling import Generator, Request, SamplingSpec
from sdjax.sampling.program import PROGRAM_SOURCES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = dict(sampler="euler", steps=2, height=32, width=32)
REQUEST = dict(prompt="a red circle", negative_prompt="blurry", seed=7, cfg_scale=6.0)

# One launch of a program that uses the persistent cache: each call in argv[3] (JSON) runs in
# turn; per call it reports the outcome of the exported-program lookup, the traces, and JAX's
# compilation-cache events, and saves the images into argv[2] (npz, one array per call).
_LAUNCH = """
import json, sys
import jax
events = []
jax.monitoring.register_event_listener(lambda name, **kwargs: events.append(name))
import numpy as np
from sdjax.weights.presets import random_pretrained
from sdjax.sampling.exported import enable_compilation_cache
from sdjax.sampling.generator import Generator
from sdjax.sampling.requests import Request
from sdjax.sampling.spec import SamplingSpec

enable_compilation_cache(sys.argv[1])
generator = Generator(random_pretrained("tiny"))
results, images = [], {}
for index, call in enumerate(json.loads(sys.argv[3])):
    events.clear()
    traces = generator.traces
    out = generator(Request(**call["request"]), SamplingSpec(**call["spec"]))
    images[str(index)] = out["images"]
    results.append({"traces": generator.traces - traces, "log": generator.program_log[-1],
                    "cache_hits": events.count("/jax/compilation_cache/cache_hits"),
                    "cache_misses": events.count("/jax/compilation_cache/cache_misses")})
np.savez(sys.argv[2], **images)
print(json.dumps(results))
"""


def _launch(cache_dir, out_file, calls):
    out = subprocess.run([sys.executable, "-c", _LAUNCH, str(cache_dir), str(out_file), json.dumps(calls)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    with np.load(out_file) as images:
        return [dict(r, images=images[str(i)]) for i, r in enumerate(results)]


def _entries(directory):
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """Two launches on one cache folder: the first writes the program, the second loads it and
    then asks for a batch of 2 images."""
    root = tmp_path_factory.mktemp("exported")
    cache = root / "cache"
    base = {"request": REQUEST, "spec": SPEC}
    first = _launch(cache, root / "first.npz", [base])
    entries_after_first = _entries(cache / exported_lib.SUBDIR)
    second = _launch(cache, root / "second.npz",
                     [base, {"request": dict(REQUEST, num_images=2), "spec": SPEC}])
    return {"cache": cache, "store": cache / exported_lib.SUBDIR, "first": first[0],
            "entries_after_first": entries_after_first, "second": second}


@pytest.fixture(scope="module")
def model():
    return random_pretrained("tiny")


@pytest.fixture(scope="module")
def traced(model):
    return Generator(model, exported_programs=False)


def _batch(generator, spec, **request):
    return parallel.shard_batch(generator.prepare(Request(**dict(REQUEST, **request)), spec),
                                generator.mesh)


def test_first_launch_traces_and_writes_one_entry(launches):
    first = launches["first"]
    assert first["log"]["outcome"] == "miss" and first["traces"] == 1
    key = first["log"]["key"]
    assert launches["entries_after_first"] == [f"{key}.exported", f"{key}.json"]
    with open(launches["store"] / f"{key}.json") as f:
        sidecar = json.load(f)
    assert sidecar["key"] == key
    assert sidecar["description"]["spec"]["steps"] == SPEC["steps"]
    assert sidecar["description"]["batch"]["seeds"] == "uint32[1]"
    assert sidecar["payload"]["bytes"] == os.path.getsize(launches["store"] / f"{key}.exported")


def test_second_launch_loads_the_program_without_tracing(launches):
    first, second = launches["first"], launches["second"][0]
    assert second["log"]["outcome"] == "hit", second["log"]
    assert second["log"]["key"] == first["log"]["key"]
    assert second["traces"] == 0
    assert "export" not in second["log"]["seconds"]
    # ... and XLA's compilation of the loaded program comes from the persistent cache.
    assert second["cache_misses"] == 0 and second["cache_hits"] >= 1
    np.testing.assert_array_equal(second["images"], first["images"])


def test_a_new_batch_size_misses_and_adds_an_entry(launches):
    bigger = launches["second"][1]
    assert bigger["log"]["outcome"] == "miss" and bigger["traces"] == 1
    assert bigger["log"]["key"] != launches["first"]["log"]["key"]
    assert len(_entries(launches["store"])) == 4
    # Image 0 of seed 7 is the same alone or in a batch of 2.
    np.testing.assert_array_equal(bigger["images"][:1], launches["first"]["images"])


def test_exported_images_are_bit_identical_to_the_traced_program(launches, traced):
    out = traced(Request(**REQUEST), SamplingSpec(**SPEC))
    assert traced.program_log == []
    np.testing.assert_array_equal(out["images"], launches["first"]["images"])


def test_key_is_stable_across_processes_and_changes_with_the_program(launches, traced):
    spec = SamplingSpec(**SPEC)
    batch = _batch(traced, spec)
    base = exported_lib.key_of(traced.program_description(spec, batch))
    assert base == launches["first"]["log"]["key"]
    variants = {
        "steps": (SamplingSpec(**dict(SPEC, steps=3)), batch),
        "sampler": (SamplingSpec(**dict(SPEC, sampler="ddim")), batch),
        "guidance": (SamplingSpec(**dict(SPEC, guidance=False)), batch),
        "size": (SamplingSpec(**dict(SPEC, height=48)), batch),
        "batch size": (spec, _batch(traced, spec, num_images=3)),
        "prompt chunks": (spec, _batch(traced, spec, prompt="a red circle " * 40)),
    }
    keys = {name: exported_lib.key_of(traced.program_description(s, b)) for name, (s, b) in variants.items()}
    assert len(set(keys.values()) | {base}) == len(keys) + 1, keys
    store = exported_lib.ExportedStore(str(launches["store"]))
    for name, key in keys.items():
        if name == "batch size":
            continue
        assert store.load(key, (traced.params, variants[name][1])) == (None, "miss"), name
    # What is data for the program (prompt text, seed, guidance scale) keeps the key.
    same = _batch(traced, spec, prompt="a dog", seed=99, cfg_scale=2.0)
    assert exported_lib.key_of(traced.program_description(spec, same)) == base


def test_a_corrupt_entry_is_logged_and_rebuilt(launches, model, tmp_path, caplog):
    store_dir = tmp_path / "store"
    shutil.copytree(launches["store"], store_dir)
    key = launches["first"]["log"]["key"]
    payload = store_dir / f"{key}.exported"
    data = bytearray(payload.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = b"\x00" * 64
    payload.write_bytes(bytes(data))

    generator = Generator(model, exported_programs=str(store_dir))
    with caplog.at_level(logging.WARNING):
        out = generator(Request(**REQUEST), SamplingSpec(**SPEC))
    assert generator.program_log[-1]["outcome"] == "rebuilt" and generator.traces == 1
    assert any(str(payload) in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(out["images"], launches["first"]["images"])
    batch = _batch(generator, SamplingSpec(**SPEC))
    exported, status = exported_lib.ExportedStore(str(store_dir)).load(key, (generator.params, batch))
    assert status == "hit" and exported is not None


@pytest.mark.parametrize("damage", ["sidecar not json", "payload missing", "payload truncated",
                                    "unknown format", "other shapes"])
def test_unreadable_entries_are_misses_never_errors(launches, traced, tmp_path, damage):
    store_dir = tmp_path / "store"
    shutil.copytree(launches["store"], store_dir)
    key = launches["first"]["log"]["key"]
    payload, sidecar = store_dir / f"{key}.exported", store_dir / f"{key}.json"
    spec = SamplingSpec(**SPEC)
    args = (traced.params, _batch(traced, spec))
    if damage == "sidecar not json":
        sidecar.write_text("{not json")
    elif damage == "payload missing":
        payload.unlink()
    elif damage == "payload truncated":
        payload.write_bytes(payload.read_bytes()[:1000])
    elif damage == "unknown format":
        info = json.loads(sidecar.read_text())
        info["payload"]["format"] = "tarball"
        sidecar.write_text(json.dumps(info))
    else:
        args = (traced.params, _batch(traced, spec, num_images=2))
    store = exported_lib.ExportedStore(str(store_dir))
    assert store.load(key, args) == (None, "corrupt")
    assert not any(name.startswith(key) for name in os.listdir(store_dir))


def test_modes_that_cannot_be_exported_trace_instead(model, tmp_path):
    store_dir = tmp_path / "store"
    spec = SamplingSpec(**SPEC)
    with_progress = SamplingSpec(**dict(SPEC, progress=True))
    jitted = Generator(model, exported_programs=str(store_dir))
    batch = _batch(jitted, spec)
    # A progress bar is a host callback inside the program, which jax.export cannot serialize.
    assert jitted.program_for(with_progress, batch) is jitted._program(with_progress, tuple(sorted(batch)))
    pmapped = Generator(model, parallel_mode="pmap", exported_programs=str(store_dir))
    host_batch = pmapped.prepare(Request(**REQUEST), spec)
    assert pmapped.program_for(spec, host_batch) is pmapped._program(spec, tuple(sorted(host_batch)))
    assert jitted.program_log == [] and pmapped.program_log == []
    assert _entries(store_dir) == []


def test_without_a_persistent_cache_nothing_is_exported(model):
    import jax

    previous = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        generator = Generator(model)
        spec = SamplingSpec(**SPEC)
        batch = _batch(generator, spec)
        assert generator.program_for(spec, batch) is generator._program(spec, tuple(sorted(batch)))
        assert generator.program_log == []
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)


def test_program_sources_cover_every_sdjax_module_the_program_imports():
    code = ("import sys, json, sdjax.sampling.program; "
            "print(json.dumps(sorted(m.__file__ for n, m in sys.modules.items() "
            "if n.split('.')[0] == 'sdjax')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    package = os.path.dirname(os.path.abspath(sys.modules["sdjax"].__file__))
    for path in json.loads(out.stdout.strip().splitlines()[-1]):
        relative = os.path.relpath(path, package)
        assert any(relative == s or relative.startswith(s + os.sep) for s in PROGRAM_SOURCES), (
            f"{relative} is imported by sdjax.sampling.program but not in its PROGRAM_SOURCES")
