"""LoRAs in sampling: what users name (a file of a LoRA folder, a path, a `<lora:...>` tag, an
in-memory `adapters.network.Weighted`), loaded once per file, and laid onto the params a sampling
program runs with, in one of two modes (`LORA_MODES`):

- `runtime`: the base params plus params["adapters"] (`network.runtime_variables`), which the
  models add to their layers' outputs. Weights are data: changing one, or switching between LoRAs
  of the same ranks and targets, runs the same compiled program. The stacked factors of an adapter
  set stay on the devices; a weight change uploads only the per-rank scale arrays.
- `merged`: the deltas added into copies of the targeted kernels (`network.merge`), from the base
  params kept on the host, so dropping the LoRAs gives back the base exactly. Same program as the
  base model; the merge is redone only when the adapters or their weights change.
"""
from __future__ import annotations

import collections
import math
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
from flax import traverse_util

from sdjax import runs
from sdjax.adapters import network
from sdjax.text.prompts import NamedLora

LORA_MODES = ("runtime", "merged")
# What a LoRA name finds in a LoRA folder: the WebUI's suffixes (`load_adapter` refuses pickles,
# with the command that converts them) and safetensors.
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
# Adapter sets whose stacked factors stay on the devices (runtime mode); the least recently
# used is dropped first.
RUNTIME_SETS_KEPT = 4


# --- naming LoRAs ----------------------------------------------------------------------------------

def parse_lora(text: str) -> NamedLora:
    """`NAME_OR_PATH[:UNET_WEIGHT[:TE_WEIGHT]]` (the --lora flag) -> NamedLora; the text-encoder
    weight defaults to the U-Net's, and both to 1. Only trailing numbers are weights, so a path
    with a drive letter (`C:\\loras\\x.safetensors:0.8`) keeps its colon."""
    parts = text.split(":")
    weights: list[float] = []
    while len(parts) > 1 and len(weights) < 2 and _is_number(parts[-1]):
        weights.insert(0, float(parts.pop()))
    name = ":".join(parts)
    if not name:
        raise ValueError(f"LoRA {text!r}: no name or path (write NAME[:UNET_WEIGHT[:TE_WEIGHT]])")
    if any(not math.isfinite(w) for w in weights):
        raise ValueError(f"LoRA {text!r}: weights must be finite")
    unet = weights[0] if weights else 1.0
    return NamedLora(name, unet=unet, text_encoder=weights[1] if len(weights) > 1 else unet)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def lora_entry(entry: Any) -> network.Weighted | NamedLora:
    """One entry of `Request.adapters`: a `Weighted` adapter, a `NamedLora`, or a tuple
    (name_or_path, unet_weight[, te_weight]) (the text-encoder weight defaults to the U-Net's)."""
    if isinstance(entry, (network.Weighted, NamedLora)):
        return entry
    if isinstance(entry, (tuple, list)) and 2 <= len(entry) <= 3 and isinstance(entry[0], str) \
            and all(_is_weight(w) for w in entry[1:]):
        unet = float(entry[1])
        te = float(entry[2]) if len(entry) > 2 else unet
        return NamedLora(entry[0], unet=unet, text_encoder=te)
    raise ValueError(f"adapters entry {entry!r}: expected a Weighted adapter or (name_or_path, "
                     f"unet_weight[, te_weight]) with finite weights")


def _is_weight(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(float(value))


def describe(lora: network.Weighted | NamedLora) -> str:
    """How messages and PNG parameters name a LoRA and its weights."""
    name = lora.adapter.name if isinstance(lora, network.Weighted) else lora.name
    return f"{name} (unet {lora.unet:g}, te {lora.text_encoder:g})"


# --- files -----------------------------------------------------------------------------------------

class LoraLibrary:
    """LoRAs for one model, by name (a file of `lora_dir` or any folder below it whose stem is the
    name, as the WebUI finds them) or by path (a file, or a diffusers LoRA folder), each file loaded
    once (again when it changes on disk)."""

    def __init__(self, model, lora_dir: Optional[str | os.PathLike] = None):
        self.model = model
        self.lora_dir = os.path.expanduser(os.fspath(lora_dir)) if lora_dir else None
        self._index: Optional[dict[str, list[str]]] = None
        # (file, name) -> ((mtime, size) when loaded, adapter)
        self._loaded: dict[tuple, tuple] = {}

    def weighted(self, lora: network.Weighted | NamedLora) -> network.Weighted:
        """`lora` loaded (a `Weighted` is returned as it is)."""
        if isinstance(lora, network.Weighted):
            return lora
        return network.Weighted(self.adapter(lora.name), unet=float(lora.unet),
                                text_encoder=float(lora.text_encoder))

    def adapter(self, name: str) -> network.Adapter:
        """The adapter `name` denotes: a name in `lora_dir`, else an existing file or folder. The
        folder comes first, so that a `<lora:NAME>` tag never picks up a same-named file or
        folder that happens to lie in the working directory."""
        from sdjax.adapters.formats import load_adapter

        in_folder = len(self._matches(name)) == 1
        is_path = not in_folder and os.path.exists(os.path.expanduser(name))
        path = os.path.expanduser(name) if is_path else self.path_of(name)
        stat = os.stat(path)
        key = (os.path.realpath(path), None if is_path else name)
        stamp = (stat.st_mtime_ns, stat.st_size)
        if key not in self._loaded or self._loaded[key][0] != stamp:
            self._loaded[key] = (stamp, load_adapter(path, self.model,
                                                     name=None if is_path else name))
        return self._loaded[key][1]

    def path_of(self, name: str) -> str:
        """The file of `lora_dir` whose stem is `name` (a name may also be a relative path without
        suffix, `style/ink`); ValueError when there is none or more than one."""
        if not self.lora_dir:
            raise ValueError(f"LoRA {name!r}: no such file or folder, and no LoRA folder is set "
                             f"to look it up in (--lora_dir)")
        if not os.path.isdir(self.lora_dir):
            raise FileNotFoundError(f"LoRA folder {self.lora_dir!r} does not exist")
        found = self._matches(name)
        if not found:
            raise ValueError(f"LoRA {name!r}: no {'/'.join(LORA_SUFFIXES)} file of that name in "
                             f"{self.lora_dir} or its subfolders")
        if len(found) > 1:
            raise ValueError(f"LoRA {name!r} is ambiguous: {', '.join(sorted(found))}; name one "
                             f"by its path")
        return found[0]

    def _matches(self, name: str) -> list[str]:
        """The files of `lora_dir` that `name` denotes (none without a folder)."""
        if not self.lora_dir or not os.path.isdir(self.lora_dir):
            return []
        found = self._find(name)
        if not found:
            self._index = None  # a file added since the folder was listed
            found = self._find(name)
        return found

    def _find(self, name: str) -> list[str]:
        if self._index is None:
            index: dict[str, list[str]] = collections.defaultdict(list)
            for folder, dirs, files in os.walk(self.lora_dir, followlinks=True):
                dirs.sort()
                for file in sorted(files):
                    stem, suffix = os.path.splitext(file)
                    if suffix.lower() in LORA_SUFFIXES:
                        path = os.path.join(folder, file)
                        index[stem].append(path)
                        index[os.path.splitext(os.path.relpath(path, self.lora_dir))[0]
                              .replace(os.sep, "/")].append(path)
            self._index = {k: sorted(set(v)) for k, v in index.items()}
        return self._index.get(name.replace(os.sep, "/"), [])


def short_hash(adapter: network.Adapter) -> Optional[str]:
    """The WebUI's short hash of the file an adapter came from (its "Lora hashes" in PNG
    parameters): the first 12 hex digits of the sha256 of a safetensors file's tensor bytes (the
    "addnet" hash, which ignores the header's metadata) or of any other file; None without a file."""
    path = adapter.source
    if not path or not os.path.isfile(path):
        return None
    return runs.file_sha256(path, tensors_only=True)[:12]


def parameters(adapters: Sequence[network.Weighted], mode: str) -> dict:
    """PNG `parameters` settings for the LoRAs a picture was drawn with: every LoRA with its
    weights, its file's short hash where it has a file (the WebUI's "Lora hashes"), and the mode."""
    if not adapters:
        return {}
    # The WebUI drops ':' and ',' from names in these lists, and quotes values holding them.
    names = [w.adapter.name.replace(":", "").replace(",", "") for w in adapters]
    settings = {"Lora weights": '"' + ", ".join(
        f"{n}: unet={w.unet:g} te={w.text_encoder:g}" for n, w in zip(names, adapters)) + '"'}
    hashes = [f"{n}: {h}" for n, w in zip(names, adapters) if (h := short_hash(w.adapter))]
    if hashes:
        settings["Lora hashes"] = '"' + ", ".join(hashes) + '"'
    settings["Lora mode"] = mode
    return settings


# --- params ----------------------------------------------------------------------------------------

class AdaptedParams:
    """The params a sampling program runs with under a set of weighted adapters (see the module
    docstring for the two modes). `host` is the base params on the host, `placed` the same placed
    as the program takes them, and `place` places a host pytree the same way (by shape)."""

    def __init__(self, host: Mapping, placed: Mapping, place: Callable[[Any], Any], mode: str):
        if mode not in LORA_MODES:
            raise ValueError(f"adapter mode {mode!r} is not one of {', '.join(LORA_MODES)}")
        self.host, self.placed, self.place, self.mode = host, placed, place, mode
        # Runtime: adapter set (ids) -> [adapters (kept alive, so ids stay theirs), weights, tree].
        self._runtime: collections.OrderedDict = collections.OrderedDict()
        self._merged: Optional[tuple] = None  # (key, adapters, placed params)

    def __call__(self, adapters: Sequence[network.Weighted]) -> dict:
        if not adapters:
            return self.placed
        if self.mode == "runtime":
            return self._runtime_params(adapters)
        return self._merged_params(adapters)

    def _runtime_params(self, adapters: Sequence[network.Weighted]) -> dict:
        key = tuple(id(w.adapter) for w in adapters)
        weights = tuple((float(w.unet), float(w.text_encoder)) for w in adapters)
        entry = self._runtime.pop(key, None)
        if entry is None:
            variables = network.runtime_variables(adapters, self.host)
            entry = [tuple(w.adapter for w in adapters), weights, self.place(variables)]
        elif entry[1] != weights:
            # Only the (R,) scale arrays depend on the weights: the factors stay where they are.
            flat = traverse_util.flatten_dict(entry[2])
            flat.update(traverse_util.flatten_dict(self.place(traverse_util.unflatten_dict(
                network.runtime_scales(adapters, self.host)))))
            entry[1], entry[2] = weights, traverse_util.unflatten_dict(flat)
        self._runtime[key] = entry
        while len(self._runtime) > RUNTIME_SETS_KEPT:
            self._runtime.popitem(last=False)
        return {**self.placed, network.ADAPTERS_KEY: entry[2]}

    def _merged_params(self, adapters: Sequence[network.Weighted]) -> dict:
        key = tuple((id(w.adapter), float(w.unet), float(w.text_encoder)) for w in adapters)
        if self._merged is None or self._merged[0] != key:
            self._merged = None  # release the previous merge before making the next
            merged = traverse_util.flatten_dict(network.merge(self.host, adapters))
            host = traverse_util.flatten_dict(self.host)
            # merge shares the leaves it leaves alone: only the changed kernels are placed anew.
            changed = {k: v for k, v in merged.items() if v is not host[k]}
            flat = traverse_util.flatten_dict(self.placed)
            placed = self.place(traverse_util.unflatten_dict(changed))
            flat.update(traverse_util.flatten_dict(placed))
            self._merged = (key, tuple(w.adapter for w in adapters),
                            traverse_util.unflatten_dict(flat))
        return self._merged[2]
