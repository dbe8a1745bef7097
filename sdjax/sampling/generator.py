"""`Generator`: a loaded model bound to a device mesh, running `Request`s through the compiled
sampling program (`program.generate_images`), with that program kept by static settings."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import jax
import numpy as np

from sdjax import parallel
from sdjax.adapters import network
from sdjax.sampling import controls as controls_lib
from sdjax.sampling import exported as exported_lib
from sdjax.sampling import loras as loras_lib
from sdjax.sampling.program import PROGRAM_SOURCES, generate_images
from sdjax.sampling.requests import Request, image_seeds, pad_batch, prepare_batch, request_loras
from sdjax.sampling.spec import SamplingSpec
from sdjax.weights.architecture import Architecture


class NonFiniteLatentsError(RuntimeError):
    """Sampling produced NaN or infinite latents for some images; nothing was decoded into files."""


def device_memory_bytes(device) -> Optional[int]:
    """What one device can hold: its allocator's limit on accelerators, the host's RAM on CPU."""
    if device.platform == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        return (device.memory_stats() or {}).get("bytes_limit")
    except Exception:  # noqa: BLE001 - a backend without memory stats: no check
        return None


def check_fits_memory(arch: Architecture, spec: SamplingSpec, device) -> None:
    """Refuse an image size whose VAE decode cannot fit the device, before anything compiles (XLA
    would abort the process instead). The decoder's last level holds about three full-resolution
    maps of its widest channel count per image of a micro-batch."""
    itemsize = np.dtype(arch.dtype).itemsize
    needed = 3 * spec.microbatch * spec.height * spec.width * arch.vae.block_out_channels[0] * itemsize
    available = device_memory_bytes(device)
    if available and needed > available:
        raise ValueError(
            f"{spec.width}x{spec.height} needs about {needed / 2 ** 30:,.0f} GiB for the VAE decode "
            f"alone, more than this {device.platform} device's {available / 2 ** 30:,.0f} GiB: "
            f"draw smaller images")


class Generator:
    """A thin convenience: the params stay a pytree, the program is `generate_images`.

    exported_programs: with the default True, when JAX's persistent compilation cache is enabled
    (`exported.enable_compilation_cache`), each lowered program is also kept there (`jax.export`)
    and a later launch loads it instead of tracing; a path keeps them in that folder whether or not
    the cache is on; False always traces. Only the jit mode without a progress bar is exported (see
    `program_for`); the others trace on every launch.

    adapter_mode: how a request's LoRAs (`Request.adapters`, `<lora:...>` tags) are applied:
    "runtime" (weights are data: no recompilation when they change) or "merged" into a copy of the
    kernels (see `sampling.loras`). lora_dir: the folder LoRA names are looked up in.
    controlnet_dir: the folder ControlNet names (`Control.controlnet`) are looked up in.
    """

    def __init__(self, model, *, dtype: Any = None, parallel_mode: str = "jit", fsdp: int = 1,
                 mesh: Optional[jax.sharding.Mesh] = None, exported_programs: bool | str = True,
                 adapter_mode: str = "runtime", lora_dir: Optional[str | os.PathLike] = None,
                 controlnet_dir: Optional[str | os.PathLike] = None):
        if parallel_mode not in parallel.PARALLEL_MODES:
            raise ValueError(f"parallel mode {parallel_mode!r} is not one of "
                             f"{', '.join(parallel.PARALLEL_MODES)}")
        if adapter_mode not in loras_lib.LORA_MODES:
            raise ValueError(f"adapter_mode {adapter_mode!r} is not one of "
                             f"{', '.join(loras_lib.LORA_MODES)}")
        self.model = model
        self.arch = Architecture.of(model, dtype)
        self.parallel_mode = parallel_mode
        self.adapter_mode = adapter_mode
        self.mesh = mesh or parallel.make_mesh(fsdp=fsdp)
        params = model.params
        if dtype is not None:
            params = jax.tree.map(lambda x: np.asarray(x, dtype=dtype), params)
        self.params = self._place(params)  # the base model's, as every program call takes them
        self.loras = loras_lib.LoraLibrary(model, lora_dir)
        self._adapted = loras_lib.AdaptedParams(params, self.params, self._place, adapter_mode)
        self.controlnets = controls_lib.ControlNetLibrary(
            self.arch.unet, directory=controlnet_dir, place=self._place, dtype=dtype)
        self.exported_programs = exported_programs
        self._programs: dict = {}
        self._exported: dict = {}
        self.traces = 0  # how many times a program was traced (compiles), for tests and logs
        # One entry per exported program looked up (see exported.load_or_export).
        self.program_log: list[dict] = []

    @property
    def num_devices(self) -> int:
        return self.mesh.size if self.parallel_mode == "jit" else jax.local_device_count()

    def _place(self, tree):
        """Host arrays placed as the programs take params: by `parallel.param_sharding` (by shape,
        so a subtree is placed as it is within the whole) under jit; as they are under pmap."""
        if self.parallel_mode == "jit":
            return jax.device_put(tree, parallel.param_sharding(self.mesh, tree))
        return tree

    def adapters_for(self, request: Request) -> tuple[network.Weighted, ...]:
        """The LoRAs `request` applies (`Request.adapters`, then its prompts' tags), loaded."""
        return tuple(self.loras.weighted(lora) for lora in request_loras(request))

    def params_for(self, adapters: tuple[network.Weighted, ...] = (),
                   controlnets: tuple = ()) -> dict:
        """The params to call a program with under `adapters` (the base params without any) and
        with the placed params of `controlnets` (`controlled`'s) as params["controlnets"]."""
        params = self._adapted(adapters) if adapters else self.params
        return {**params, "controlnets": tuple(controlnets)} if controlnets else params

    def _program(self, spec: SamplingSpec, structure, params: Optional[dict] = None):
        # The params' structure and adapter shapes: LoRAs of other ranks or targets are another
        # program; other weights or another LoRA of the same shapes are not.
        params = self.params if params is None else params
        key = (spec, structure, _params_key(params))
        if key not in self._programs:
            def counted(params, batch):
                self.traces += 1
                return generate_images(self.arch, spec, params, batch)

            if self.parallel_mode == "jit":
                self._programs[key] = parallel.jit_over_batch(
                    counted, self.mesh, parallel.param_sharding(self.mesh, params))
            else:
                self._programs[key] = parallel.pmap_over_batch(counted)
        return self._programs[key]

    def program_for(self, spec: SamplingSpec, batch: dict, params: Optional[dict] = None):
        """The program to run on `batch` (padded to the device count; placed by
        `parallel.shard_batch` in jit mode) with `params` (`params_for`; default the base
        params): the compiled exported program where one is kept on disk (loaded, or traced and
        written now), else the traced program."""
        params = self.params if params is None else params
        store = self._exported_store()
        # jax.export serializes jit programs only, and no host callbacks: pmap and the progress
        # bar (a jax.debug.callback in the scan) trace on every launch. Multi-process runs too:
        # untested with exported programs.
        if (store is None or self.parallel_mode != "jit" or spec.progress
                or jax.process_count() > 1):
            return self._program(spec, tuple(sorted(batch)), params)
        signature = tuple((k, np.shape(v), str(np.dtype(v.dtype))) for k, v in sorted(batch.items()))
        key = (spec, signature, _params_key(params))
        if key not in self._exported:
            data = parallel.batch_sharding(self.mesh)
            self._exported[key] = exported_lib.load_or_export(
                store, self.program_description(spec, batch, params),
                self._program(spec, tuple(sorted(batch)), params), (params, batch),
                # Same shardings as the traced program: the call runs on the same placed arrays.
                in_shardings=(parallel.param_sharding(self.mesh, params), data),
                out_shardings=data, log=self.program_log,
            ) or self._program(spec, tuple(sorted(batch)), params)
        return self._exported[key]

    def _exported_store(self) -> Optional[exported_lib.ExportedStore]:
        if self.exported_programs is False:
            return None
        if isinstance(self.exported_programs, (str, os.PathLike)):
            return exported_lib.ExportedStore(os.fspath(self.exported_programs))
        directory = exported_lib.default_directory()
        return exported_lib.ExportedStore(directory) if directory else None

    def program_description(self, spec: SamplingSpec, batch: dict,
                            params: Optional[dict] = None) -> dict:
        """Everything an exported program depends on, JSON-able; its digest is the entry's key."""
        params = self.params if params is None else params
        return {
            "program": "sdjax.sampling.program.generate_images", "parallel_mode": self.parallel_mode,
            "architecture": exported_lib.canonical(self.arch),
            "spec": exported_lib.canonical(spec),
            "batch": exported_lib.arrays_signature(batch),
            "params": exported_lib.tree_signature(params),
            "environment": exported_lib.environment(self.mesh, PROGRAM_SOURCES),
        }

    def controlled(self, request: Request, spec: SamplingSpec) -> tuple[SamplingSpec, tuple]:
        """(spec with the configs of the ControlNets `request.controls` name, their placed params),
        loading each ControlNet once."""
        if isinstance(request.controls, (str, bytes)) or not isinstance(request.controls,
                                                                        (tuple, list)):
            raise ValueError(f"Request.controls must be a list of sampling.Control, got "
                             f"{request.controls!r}")
        loaded = []
        for k, control in enumerate(request.controls):
            controls_lib.check_control(control, k)
            loaded.append(self.controlnets.get(control.controlnet))
        configs = tuple(weights.config for weights, _ in loaded)
        if spec.controlnets and spec.controlnets != configs:
            raise ValueError("spec.controlnets differs from the ControlNets the request's controls "
                             "name (leave it empty: the Generator fills it)")
        return dataclasses.replace(spec, controlnets=configs), tuple(p for _, p in loaded)

    def prepare(self, request: Request, spec: SamplingSpec) -> dict:
        """Host-side: validate, tokenize and lay out the batch arrays for `request` (and load its
        LoRAs and ControlNets, so a bad one is an error here)."""
        return self._prepare(request, spec)[0]

    def _prepare(self, request: Request, spec: SamplingSpec):
        spec, controlnet_params = self.controlled(request, spec)
        batch = prepare_batch(self.arch, self.model.tokenizers, request, spec)
        check_fits_memory(self.arch, spec, self.mesh.devices.flat[0])
        return batch, self.adapters_for(request), spec, controlnet_params

    def __call__(self, request: Request, spec: SamplingSpec, *, check_finite: bool = True) -> dict:
        """Run a request: returns {"images": float32 (B, H, W, 3) in [-1, 1], "finite": (B,), "seeds"}.

        The batch is padded up to a multiple of the device count (`requests.pad_batch`)."""
        batch, adapters, spec, controlnet_params = self._prepare(request, spec)
        params = self.params_for(adapters, controlnet_params)
        n = request.num_images
        padded = -(-n // self.num_devices) * self.num_devices
        if padded != n:
            batch = pad_batch(batch, padded, request.seed)
        if self.parallel_mode == "jit":
            batch = parallel.shard_batch(batch, self.mesh)
        out = self.program_for(spec, batch, params)(params, batch)
        out = jax.tree.map(lambda x: np.asarray(x)[:n], out)
        out["seeds"] = image_seeds(request.seed, n)
        if check_finite and not out["finite"].all():
            bad = [int(s) for s, ok in zip(out["seeds"], out["finite"]) if not ok]
            raise NonFiniteLatentsError(
                f"sampling produced NaN/inf latents for seed(s) {bad}; lower the guidance scale, "
                f"use float32, or check the checkpoint")
        return out


def _params_key(params: dict):
    """What a program depends on in its params beyond the model: the tree's structure and the
    shapes of its adapter leaves (the model's own leaves are the same for every call)."""
    adapters = jax.tree.leaves(params.get(network.ADAPTERS_KEY, {}))
    return jax.tree.structure(params), tuple((np.shape(x), str(x.dtype)) for x in adapters)
