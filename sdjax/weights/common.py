"""What every checkpoint reader shares: lazy tensor sources, the error type, and the one routine
that turns a reference state dict into sdjax params by a renaming table, checked against the
shapes the sdjax module expects."""
from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence

import jax
import ml_dtypes
import numpy as np
from flax import traverse_util


class WeightsError(ValueError):
    """A checkpoint cannot be read as asked; the message names the file and what is wrong."""


class TensorSource(Mapping[str, np.ndarray]):
    """A read-only mapping of tensor name -> numpy array, loaded one tensor at a time.

    `name` (a path, usually) is what error messages cite.
    """

    name: str = "<tensors>"

    def shape(self, key: str) -> tuple[int, ...]:
        """A tensor's shape; sources over files tell it from the header, without reading it."""
        return tuple(self[key].shape)


class DictSource(TensorSource):
    """A TensorSource over tensors already in memory (tests, renamed views)."""

    def __init__(self, tensors: Mapping[str, np.ndarray], name: str = "<in-memory>"):
        self._tensors = tensors
        self.name = name

    def __getitem__(self, key: str) -> np.ndarray:
        return np.asarray(self._tensors[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


class RenamedSource(TensorSource):
    """A lazy view of `source` under new names: `mapping` is new name -> (old name, transform)."""

    def __init__(self, source: TensorSource,
                 mapping: Mapping[str, tuple[str, Optional[Callable[[np.ndarray], np.ndarray]]]]):
        self._source = source
        self._mapping = dict(mapping)
        self.name = source.name

    def __getitem__(self, key: str) -> np.ndarray:
        old, transform = self._mapping[key]
        value = self._source[old]
        return value if transform is None else transform(value)

    def shape(self, key: str) -> tuple[int, ...]:
        old, transform = self._mapping[key]
        return self._source.shape(old) if transform is None else super().shape(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._mapping)

    def __len__(self) -> int:
        return len(self._mapping)


_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


class SafetensorsFile(TensorSource):
    """One `.safetensors` file, read lazily into numpy (no torch).

    The header is parsed here and each tensor is read with a plain file read rather than through a
    memory map: mapped pages stay resident while the file is open, which would hold a second copy of
    the weights in memory during conversion.
    """

    def __init__(self, path: str | os.PathLike):
        self.name = os.fspath(path)
        if not os.path.isfile(self.name):
            raise WeightsError(f"{self.name}: no such file")
        size = os.path.getsize(self.name)
        with open(self.name, "rb") as f:
            head = f.read(8)
            header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 2 <= header_len <= min(size - 8, 100_000_000):
                raise WeightsError(f"{self.name}: not a safetensors file (bad header length)")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise WeightsError(f"{self.name}: not a safetensors file (header is not JSON)") from None
        self._metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for key, info in header.items():
            try:
                dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise WeightsError(f"{self.name}: tensor {key!r} has an unreadable header entry "
                                   f"{info!r}") from None
            if end - begin != int(np.prod(shape)) * dtype.itemsize:
                raise WeightsError(f"{self.name}: tensor {key!r}: {end - begin} bytes do not hold "
                                   f"shape {shape} of {info['dtype']}")
            if self._data_start + end > size:
                raise WeightsError(f"{self.name}: truncated: tensor {key!r} ends at byte "
                                   f"{self._data_start + end} but the file has {size}")
            self._entries[key] = (dtype, shape, begin, end)

    def __getitem__(self, key: str) -> np.ndarray:
        dtype, shape, begin, end = self._entries[key]
        buffer = bytearray(end - begin)
        with open(self.name, "rb") as f:
            f.seek(self._data_start + begin)
            if f.readinto(buffer) != len(buffer):
                raise WeightsError(f"{self.name}: truncated while reading tensor {key!r}")
        return np.frombuffer(buffer, dtype=dtype).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        """A tensor's shape without reading it."""
        return self._entries[key][1]

    def metadata(self) -> dict:
        return dict(self._metadata)


class MergedSource(TensorSource):
    """Several sources seen as one (sharded checkpoints: `*-00001-of-00002.safetensors`)."""

    def __init__(self, sources: Sequence[TensorSource], name: str):
        self._where: dict[str, TensorSource] = {}
        for source in sources:
            for key in source:
                if key in self._where:
                    raise WeightsError(f"{name}: tensor {key!r} appears in both "
                                       f"{self._where[key].name} and {source.name}")
                self._where[key] = source
        self.name = name

    def __getitem__(self, key: str) -> np.ndarray:
        return self._where[key][key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def to_sdjax_layout(reference: np.ndarray, expected_shape: tuple[int, ...], leaf: str) -> np.ndarray:
    """PyTorch layouts -> sdjax layouts: conv OIHW -> HWIO, linear (out, in) -> (in, out).

    A 1x1 conv stored where sdjax has a dense layer (or the reverse) is reshaped, since
    checkpoints differ there (SD 2.x `proj_in`, the original VAE's attention).
    """
    array = reference
    if leaf == "kernel":
        if array.ndim == 4 and len(expected_shape) == 4:
            array = array.transpose(2, 3, 1, 0)
        elif array.ndim == 4 and len(expected_shape) == 2 and array.shape[2:] == (1, 1):
            array = array[:, :, 0, 0].T
        elif array.ndim == 2 and len(expected_shape) == 4 and expected_shape[:2] == (1, 1):
            array = array.T[None, None]
        elif array.ndim == 2:
            array = array.T
    return array


# XLA's CPU client adopts a host array as a device buffer without copying it when the data is
# 64-byte aligned (numpy's allocator aligns to 16): loaded params placed on a CPU device then cost
# no second copy of the weights.
_HOST_ALIGNMENT = 64


def aligned_array(array: np.ndarray, dtype, shape: tuple[int, ...]) -> np.ndarray:
    """`array` as a C-contiguous `dtype` array of `shape` (same size; 0-d to (1,) too) whose data is
    `_HOST_ALIGNMENT`-aligned: `array` itself when it already is, else one aligned copy."""
    dtype = np.dtype(dtype)
    if (array.dtype == dtype and array.flags.c_contiguous and tuple(array.shape) == tuple(shape)
            and array.ctypes.data % _HOST_ALIGNMENT == 0):
        return array
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + _HOST_ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % _HOST_ALIGNMENT
    out = raw[start:start + nbytes].view(dtype).reshape(shape)
    out[...] = np.reshape(array, shape)
    return out


def convert_state_dict(
    source: TensorSource,
    rename: Callable[[str], Optional[str]],
    expected: Mapping,
    *,
    what: str,
    dtype=None,
    ignore: Iterable[str] = (),
    reference_layout: bool = True,
) -> dict:
    """Build a params tree from a reference state dict.

    `rename(key)` gives the sdjax path ("down_blocks_0/resnets_1/conv1/kernel") of a reference key,
    or None for keys that carry no parameter (buffers such as `position_ids`). `expected` is the
    sdjax params tree (or its `jax.eval_shape`) to fill: every expected leaf must be supplied exactly
    once with the right shape. `ignore` are regexes of reference keys to skip silently.
    `reference_layout=False` takes tensors as they are (sdjax's own layouts, native checkpoints). Tensors are
    read, converted and cast one at a time, so peak memory stays near one copy of the params.
    """
    ignore_patterns = [re.compile(p) for p in ignore]
    flat_expected = {"/".join(k): v for k, v in traverse_util.flatten_dict(
        expected, keep_empty_nodes=False).items()}
    out: dict[str, np.ndarray] = {}
    unexpected = []
    for key in source:
        if any(p.fullmatch(key) for p in ignore_patterns):
            continue
        path = rename(key)
        if path is None:
            continue
        if path not in flat_expected:
            unexpected.append(f"{key} (-> {path})")
            continue
        if path in out:
            raise WeightsError(f"{source.name}: {what}: two tensors map to {path} (second: {key})")
        want = tuple(flat_expected[path].shape)
        array = source[key]
        if reference_layout:
            array = to_sdjax_layout(array, want, path.rsplit("/", 1)[-1])
        if tuple(array.shape) != want:
            raise WeightsError(
                f"{source.name}: {what}: shape mismatch for {key}: expected "
                f"{want} (as {path}), got {tuple(source[key].shape)}")
        out[path] = aligned_array(array, dtype or flat_expected[path].dtype, want)
        _check_finite(out[path], f"{source.name}: {what}: {key}")
    missing = sorted(set(flat_expected) - set(out))
    if unexpected:
        raise WeightsError(f"{source.name}: {what}: unexpected keys: "
                           + short_list(sorted(unexpected)))
    if missing:
        raise WeightsError(f"{source.name}: {what}: missing keys for: " + short_list(missing))
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in out.items()})


def _check_finite(array: np.ndarray, where: str) -> None:
    """NaN/inf weights make every output NaN: refuse them at load, naming the tensor. A float32
    sum is the cheap test (one pass, no temporary); only a non-finite sum is looked at closely."""
    if array.dtype.kind in "iub":
        return
    with np.errstate(over="ignore"):  # a huge but finite sum is looked at closely below
        if np.isfinite(np.sum(array, dtype=np.float32)):
            return
    bad = int(np.count_nonzero(~np.isfinite(array.astype(np.float32))))
    if bad:
        raise WeightsError(f"{where}: {bad} of {array.size} values are NaN or infinite")


def regex_renamer(rules: Sequence[tuple[str, str]]) -> Callable[[str], Optional[str]]:
    """A `rename` from an ordered table of (regex, replacement) rules; first full match wins.
    A replacement of "" means "carries no parameter". Keys that match no rule are returned
    unchanged with dots as slashes, so they surface as unexpected keys if wrong."""
    compiled = [(re.compile(p), r) for p, r in rules]

    def rename(key: str) -> Optional[str]:
        for pattern, replacement in compiled:
            if pattern.fullmatch(key):
                result = pattern.sub(replacement, key)
                return result or None
        return key.replace(".", "/")

    return rename


def inverse_key(path: str, rename: Callable[[str], Optional[str]], module_rules, what: str, *,
                module_of: Optional[Callable[[list[str]], str]] = None) -> str:
    """The reference state-dict key of an sdjax params path, the inverse of `rename` and checked
    against it: modules joined by dots (or by `module_of`), then `module_rules` ((regex,
    replacement) pairs) turn sdjax's module names into the reference's, and the leaf becomes
    `bias` or `weight`."""
    *modules, leaf = path.split("/")
    module = ".".join(modules) if module_of is None else module_of(modules)
    for pattern, replacement in module_rules:
        module = pattern.sub(replacement, module)
    key = f"{module}.{'bias' if leaf == 'bias' else 'weight'}"
    if rename(key) != path:
        raise ValueError(f"no {what} name for the params path {path} ({key} reads back as "
                         f"{rename(key)})")
    return key


def read_model_config(folder: str | os.PathLike, class_name: str) -> dict:
    """A diffusers model folder's config.json: a JSON object whose `_class_name`, when present, is
    `class_name`; anything else is a WeightsError naming the file."""
    path = pathlib.Path(folder) / "config.json"
    if not path.is_file():
        raise WeightsError(f"{path}: no such file (expected a diffusers {class_name} folder)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightsError(f"{path}: unreadable JSON ({err})") from None
    if not isinstance(raw, dict):
        raise WeightsError(f"{path}: not a JSON object")
    if raw.get("_class_name", class_name) != class_name:
        raise WeightsError(f"{path}: _class_name is {raw['_class_name']!r}, not {class_name!r}")
    return raw


def abstract_params(module, *args, **kwargs):
    """Shapes and dtypes of `module`'s params without allocating them."""
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
    return variables["params"]


def short_list(items: Sequence[str], limit: int = 8) -> str:
    """The first `limit` items, comma-separated, and how many there are in all."""
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def save_params_tree(folder: pathlib.Path, params: dict) -> None:
    """A params pytree of host arrays into `folder` (orbax), written by the calling process alone
    in multi-host runs (no barrier with the other hosts)."""
    import orbax.checkpoint as ocp

    options = ocp.options.MultiprocessingOptions()
    if jax.process_count() > 1:
        me = jax.process_index()
        options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me},
                                                     barrier_sync_key_prefix=f"save_params_{me}")
    checkpointer = ocp.StandardCheckpointer(multiprocessing_options=options)
    checkpointer.save(folder.absolute(), jax.tree.map(np.asarray, params))
    checkpointer.wait_until_finished()


def write_native_folder(path: str | os.PathLike, manifest_name: str, manifest: dict,
                        write_entries: Callable[[pathlib.Path], None], entry_names: Sequence[str],
                        *, overwrite: bool = False) -> pathlib.Path:
    """Write a native folder: `write_entries(staging)` writes `entry_names` (params/, tokenizer/,
    ...) into a staging folder, then they replace the folder's own entries and the manifest lands
    last. Nothing else in the folder is touched.

    A folder that already holds `manifest_name` is updated in place; a non-empty folder that does
    not is refused unless `overwrite` (then the entries are added beside what is there). The
    entries replaced stay in `.sdjax-previous` until the new manifest is written, so a crash never
    leaves a loadable mix of two models and never loses the previous one."""
    import shutil

    path = pathlib.Path(path).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise WeightsError(f"{path}: exists and is not a folder; a native model is a folder")
    ours = (manifest_name, *entry_names)
    if path.is_dir() and not (path / manifest_name).is_file() and not overwrite:
        others = sorted(p.name for p in path.iterdir() if not p.name.startswith(".sdjax-"))
        if others:
            raise WeightsError(
                f"{path}: not empty and not an sdjax model (holds {', '.join(others[:5])}"
                f"{', ...' if len(others) > 5 else ''}); pick an empty or new folder, or pass "
                f"overwrite=True to add the model's files beside them")
    staging, previous = path / ".sdjax-partial", path / ".sdjax-previous"
    path.mkdir(parents=True, exist_ok=True)
    for leftover in (staging, previous):  # from an earlier save that crashed
        if leftover.exists():
            shutil.rmtree(leftover)
    staging.mkdir()
    write_entries(staging)
    (staging / manifest_name).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    previous.mkdir()
    # The old manifest leaves first: until the new one lands the folder is no model at all.
    for name in ours:
        if (path / name).exists():
            (path / name).rename(previous / name)
    for name in entry_names:
        if (staging / name).exists():
            (staging / name).rename(path / name)
    os.replace(staging / manifest_name, path / manifest_name)
    shutil.rmtree(previous)
    staging.rmdir()
    return path
