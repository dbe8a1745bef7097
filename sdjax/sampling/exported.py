"""Lowered programs kept on disk (`jax.export`), next to JAX's persistent compilation cache.

JAX's persistent cache is keyed by the lowered module, so a launch that finds its XLA executable
there has still traced and lowered the Python program first, which for a Stable Diffusion sampling
program is most of a second launch's time. An `ExportedStore` keeps the lowered program itself,
keyed by everything that determines it, so that a later launch deserializes it instead of tracing;
XLA's compilation of it then hits the persistent cache as before.

Each entry is two files in the store's folder: `<key>.exported` (the serialized program) and
`<key>.json` (readable: what the key was made of, the payload's format, size and sha256). An entry
that cannot be read back is logged, removed and rebuilt by the caller; it never fails a run.

The payload is `jax.export`'s own serialization (it needs the `flatbuffers` package, a dependency
of sdjax); nothing is unpickled.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import json
import os
import sys
import time
from typing import Any, Optional

import jax
import numpy as np
from absl import logging

from sdjax import runs

SUBDIR = "sdjax_exported"
# Bump when the entry layout or the meaning of a key changes.
LAYOUT_VERSION = 1
# jax settings that change what tracing produces (random bits, dtypes, precision, partitioner).
_TRACING_CONFIG = ("jax_enable_x64", "jax_default_prng_impl", "jax_threefry_partitionable",
                   "jax_default_matmul_precision", "jax_numpy_dtype_promotion",
                   "jax_numpy_rank_promotion", "jax_use_shardy_partitioner",
                   "jax_export_calling_convention_version")
# Tuples longer than this (e.g. trained betas) appear in a sidecar as their digest.
_MAX_INLINE_SEQUENCE = 32


def default_directory() -> Optional[str]:
    """`<persistent compilation cache>/sdjax_exported`, or None when no persistent cache is on."""
    cache_dir = jax.config.jax_compilation_cache_dir
    if not cache_dir or not jax.config.jax_enable_compilation_cache:
        return None
    return os.path.join(cache_dir, SUBDIR)


# --- keys ------------------------------------------------------------------------------------------

def canonical(value: Any) -> Any:
    """A JSON-able, deterministic form of configs and specs: dataclasses by field, dtypes by name,
    arrays and long sequences by digest."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: canonical(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"__type__": type(value).__qualname__, **fields}
    if isinstance(value, enum.Enum):
        return f"{type(value).__qualname__}.{value.name}"
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (tuple, list)):
        items = [canonical(v) for v in value]
        if len(items) > _MAX_INLINE_SEQUENCE:
            return {"len": len(items), "sha256": _digest(items)}
        return items
    if isinstance(value, (np.ndarray, jax.Array)):
        array = np.asarray(value)
        return {"shape": list(array.shape), "dtype": str(array.dtype),
                "sha256": hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()}
    if isinstance(value, (np.dtype, type)) or _is_dtype_like(value):
        return str(np.dtype(value))
    # Anything else by repr: one that embeds an address never matches, so it misses (safe).
    return repr(value)


def _is_dtype_like(value: Any) -> bool:
    try:
        np.dtype(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, str)


def tree_signature(tree: Any) -> dict:
    """Structure, shapes and dtypes of a pytree (arrays or ShapeDtypeStructs), as a short digest."""
    leaves, treedef = jax.tree.flatten(tree)
    described = [str(treedef)] + [[list(np.shape(x)), str(np.dtype(x.dtype))] for x in leaves]
    return {"leaves": len(leaves), "elements": int(sum(int(np.prod(np.shape(x))) for x in leaves)),
            "sha256": _digest(described)}


def arrays_signature(arrays: dict) -> dict:
    """{name: "dtype[shape]"} of a flat dict of arrays (readable in a sidecar)."""
    return {k: f"{np.dtype(v.dtype)}{list(np.shape(v))}" for k, v in sorted(arrays.items())}


def environment(mesh: jax.sharding.Mesh, sources: tuple[str, ...]) -> dict:
    """Versions, tracing-relevant jax settings and the devices a program is lowered for; `sources`
    are the sdjax files and folders (relative to the package) the program is traced from."""
    import flax
    import jaxlib

    import sdjax

    devices = mesh.devices.flat
    first = next(iter(devices))
    config = {}
    for name in _TRACING_CONFIG:
        try:
            config[name] = canonical(getattr(jax.config, name))
        except AttributeError:
            config[name] = None
    return {
        "versions": {"python": list(sys.version_info[:2]), "jax": jax.__version__,
                     "jaxlib": jaxlib.__version__, "flax": flax.__version__,
                     "numpy": np.__version__, "sdjax": sdjax.__version__,
                     # An editable install keeps its version string while the code changes.
                     "sdjax_sources_sha256": source_digest(tuple(sources))},
        "jax_config": config,
        "platform": first.platform, "device_kind": first.device_kind,
        "mesh": {name: int(size) for name, size in mesh.shape.items()},
        "device_count": jax.device_count(), "process_count": jax.process_count(),
    }


@functools.cache
def source_digest(sources: tuple[str, ...]) -> str:
    """sha256 over the named .py files and folders of the sdjax package (paths and contents)."""
    import sdjax

    root = os.path.dirname(os.path.abspath(sdjax.__file__))
    files = []
    for source in sources:
        path = os.path.join(root, source)
        if os.path.isdir(path):
            for folder, dirs, names in os.walk(path):
                dirs[:] = [d for d in dirs if d != "__pycache__"]
                files += [os.path.join(folder, n) for n in names if n.endswith(".py")]
        else:
            files.append(path)
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(os.path.relpath(path, root).encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(f.read())
        digest.update(b"\0")
    return digest.hexdigest()


def key_of(description: dict) -> str:
    return _digest({"layout": LAYOUT_VERSION, **description})[:32]


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


# --- payloads --------------------------------------------------------------------------------------

PAYLOAD_FORMAT = "jax.export"


def serialize(exported: jax.export.Exported) -> tuple[str, bytes]:
    """(format, bytes) in jax.export's own serialization."""
    return PAYLOAD_FORMAT, bytes(exported.serialize())


def deserialize(payload_format: str, payload: bytes) -> jax.export.Exported:
    if payload_format != PAYLOAD_FORMAT:
        raise ValueError(f"unknown payload format {payload_format!r}")
    return jax.export.deserialize(bytearray(payload))


# --- the store -------------------------------------------------------------------------------------

class ExportedStore:
    """A folder of exported programs by key. `load` never raises: a missing entry is a miss, an
    unreadable one is logged, removed and reported as corrupt, so the caller rebuilds it."""

    def __init__(self, directory: str):
        self.directory = directory

    def paths(self, key: str) -> tuple[str, str]:
        return (os.path.join(self.directory, f"{key}.exported"),
                os.path.join(self.directory, f"{key}.json"))

    def load(self, key: str, args: tuple) -> tuple[Optional[jax.export.Exported], str]:
        """(exported, "hit") or (None, "miss" | "corrupt"). `args` are the arguments it will be
        called with (arrays or ShapeDtypeStructs): an entry for other shapes counts as corrupt."""
        payload_path, sidecar_path = self.paths(key)
        if not os.path.exists(payload_path) and not os.path.exists(sidecar_path):
            return None, "miss"
        try:
            with open(sidecar_path) as f:
                sidecar = json.load(f)
            payload_info = sidecar["payload"]
            with open(payload_path, "rb") as f:
                payload = f.read()
            # Checked before deserializing: a truncated or overwritten payload never reaches the
            # (C++) module parser.
            if len(payload) != payload_info["bytes"] or \
                    hashlib.sha256(payload).hexdigest() != payload_info["sha256"]:
                raise ValueError(f"{payload_path}: {len(payload)} bytes whose sha256 does not match "
                                 f"the sidecar's ({payload_info['bytes']} bytes)")
            exported = deserialize(payload_info["format"], payload)
            _check_signature(exported, args)
        except Exception as error:  # noqa: BLE001 - any unreadable entry is rebuilt, never fatal
            logging.warning("exported program %s is unreadable (%s: %s); removing it and "
                            "tracing the program again", payload_path, type(error).__name__, error)
            self.remove(key)
            return None, "corrupt"
        return exported, "hit"

    def save(self, key: str, description: dict, exported: jax.export.Exported,
             export_seconds: float = 0.0) -> None:
        """Write the entry (payload first, then its sidecar, each to a temporary file renamed into
        place, so a reader sees whole files). A failed write is logged, not raised."""
        payload_path, sidecar_path = self.paths(key)
        try:
            payload_format, payload = serialize(exported)
            sidecar = {
                "key": key, "layout": LAYOUT_VERSION, "description": description,
                "payload": {"file": os.path.basename(payload_path), "format": payload_format,
                            "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()},
                "export_seconds": round(export_seconds, 3),
                "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            os.makedirs(self.directory, exist_ok=True)
            runs.write_atomically(payload_path, payload)
            runs.write_json_atomically(sidecar_path, sidecar, indent=1, sort_keys=True)
        except Exception as error:  # noqa: BLE001 - the program still runs, it is only not kept
            logging.warning("could not write exported program %s (%s: %s); the next launch will "
                            "trace it again", payload_path, type(error).__name__, error)

    def remove(self, key: str) -> None:
        for path in self.paths(key):
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            except OSError as error:
                logging.warning("could not remove %s: %s", path, error)


def _check_signature(exported: jax.export.Exported, args: tuple) -> None:
    leaves, treedef = jax.tree.flatten((args, {}))
    if exported.in_tree != treedef:
        raise ValueError("its argument structure differs from the call's")
    for index, (aval, leaf) in enumerate(zip(exported.in_avals, leaves)):
        if tuple(aval.shape) != tuple(np.shape(leaf)) or aval.dtype != np.dtype(leaf.dtype):
            raise ValueError(f"argument {index} is {aval.dtype}{list(aval.shape)}, the call passes "
                             f"{np.dtype(leaf.dtype)}{list(np.shape(leaf))}")


# --- compiling through the store -------------------------------------------------------------------

def enable_compilation_cache(path: str) -> None:
    """Keep compiled programs in `path` so a second launch loads instead of compiling; `Generator`
    also keeps its lowered programs there (`<path>/sdjax_exported`), so it need not trace them.
    An empty path leaves the cache off."""
    if not path:
        return
    path = os.path.expanduser(path)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def load_or_export(store: ExportedStore, description: dict, traced, args: tuple, in_shardings,
                   out_shardings, log: list):
    """The compiled program described by `description`: loaded from `store`, or exported from the
    jitted function `traced` and written there; either way compiled for `args` (XLA's persistent
    cache serves that). None where it cannot be exported. Appends one entry to `log`: key, outcome
    (hit / miss / rebuilt / unsupported) and the seconds of each stage."""
    key = key_of(description)
    entry = {"key": key, "directory": store.directory, "outcome": None, "seconds": {}}
    log.append(entry)

    def compile_(exported):
        runner = jax.jit(exported.call, in_shardings=in_shardings, out_shardings=out_shardings)
        start = time.perf_counter()
        lowered = runner.lower(*args)
        entry["seconds"]["lower"] = time.perf_counter() - start
        start = time.perf_counter()
        compiled = lowered.compile()
        entry["seconds"]["compile"] = time.perf_counter() - start
        return compiled

    start = time.perf_counter()
    exported, status = store.load(key, args)
    entry["seconds"]["load"] = time.perf_counter() - start
    if exported is not None:
        try:
            compiled = compile_(exported)
            entry["outcome"] = "hit"
            logging.info("sampling program %s loaded from %s", key, store.directory)
            return compiled
        except Exception as error:  # noqa: BLE001 - a bad entry is rebuilt, never fatal
            logging.warning("exported program %s in %s does not compile (%s: %s); tracing it "
                            "again", key, store.directory, type(error).__name__, error)
            store.remove(key)
            status = "corrupt"
    start = time.perf_counter()
    try:
        exported = jax.export.export(traced)(*args)
    except Exception as error:  # noqa: BLE001 - the traced path runs it (or raises) instead
        entry["outcome"] = "unsupported"
        logging.warning("cannot export the sampling program (%s: %s); it is traced on every "
                        "launch", type(error).__name__, error)
        return None
    entry["seconds"]["export"] = time.perf_counter() - start
    store.save(key, description, exported, entry["seconds"]["export"])
    entry["outcome"] = "miss" if status == "miss" else "rebuilt"
    logging.info("sampling program %s traced and written to %s", key, store.directory)
    return compile_(exported)
