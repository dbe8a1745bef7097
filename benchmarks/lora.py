"""LoRA speed and memory: sdjax's figure and the reference's (diffusers + peft, PyTorch) from the
same run, on random weights of the preset's architecture written once as a diffusers folder.

    python -m benchmarks.lora --modes=forward   # U-Net step, rank-16 LoRA at run time vs merged
    python -m benchmarks.lora --modes=merge     # merging a rank-128 LoRA into U-Net + text encoder
    python -m benchmarks.lora --modes=train     # LoRA training step: time and peak memory
    python -m benchmarks.lora --preset=tiny     # all three in seconds; what CI runs

forward: SD 1.5 U-Net, batch 2, float32, latents 32² and 64²; a LoRA on kohya's default U-Net
targets (every Linear and 1x1 conv of the transformer blocks: attention q/k/v/out, feed-forward,
proj_in/out; `sdjax.training.lora.make_network`) with random factors. sdjax runs the base params, the
merged params (`adapters.network.merge`; the same compiled program) and the base params with the
LoRA at run time (`with_runtime_adapters`, one more program); diffusers runs its U-Net with the same
LoRA injected by peft (`add_adapter`), unfused and fused (`fuse_lora`). Run-time overhead = run
time / merged time - 1 (target for sdjax: <= 10%). A jitted float32 matmul timed in the same loop
gives the host's ceiling.

merge: a LoRA on every kohya default target of the U-Net and the text encoder (attention and MLP
layers); sdjax's `merge` on the host params (numpy) against diffusers' `fuse_lora` of the same
factors into its U-Net and text encoder, each side in a worker process of its own (peak RSS is the
worker's; "loaded" its RSS before the first merge). The first merge of a fresh process is reported
apart: it is what one merge costs a user. `merged Σw²` sums the squares of every merged kernel on
both sides: equal when both merged the same factors into the same weights. Target: <= 2 s.

train: one LoRA training step, as diffusers' examples/text_to_image/train_text_to_image_lora.py does
it (peft LoRA of rank r and alpha r on the U-Net's attention projections to_q/k/v/out, AdamW on the
LoRA params only) against sdjax's LoRA run on the same targets and settings (configs/
train_lora_sd15.py at 256 px / 32² latents, batch 1, float32, no remat; `--preset=tiny`:
configs/train_lora_tiny.py as it is), both through benchmarks/train_step.py's workers; and sdjax's
full fine-tune (benchmarks/train_step.py's own config) for its peak memory. Targets: the sdjax LoRA
step faster than diffusers'; its peak memory below the full fine-tune's by at least the fine-tuned
models' optimizer state (AdamW's two float32 moments per param).

Flags shared with benchmarks/train_step.py (whose workers this reuses): --preset, --workdir,
--repeats, --reference, --together (SD 1.5 workers run one after the other: two do not fit in
24 GiB together).
"""
from __future__ import annotations

import json
import os
import sys
import time
import zlib

from absl import app, flags

from benchmarks import timing
from benchmarks import train_step

flags.DEFINE_list("modes", ["forward", "merge", "train"], "what to measure: forward, merge, train")
flags.DEFINE_list("sizes", [], "forward: latent sizes (default: 32,64; tiny: 8,16)")
flags.DEFINE_integer("batch", 2, "forward: batch size (2: one image with guidance)")
flags.DEFINE_integer("rank", 16, "forward and train (SD 1.5): the LoRA's rank")
flags.DEFINE_integer("merge_rank", 128, "merge: the LoRA's rank")
flags.DEFINE_integer("matmul", 0, "matmul ceiling size n (default: 4096; tiny: 256)")
flags.DEFINE_bool("full_finetune", True, "train: also run sdjax's full fine-tune for its peak "
                  "memory (SD 1.5: ~19 GB)")
flags.DEFINE_enum("lora_worker", None, ["merge_sdjax", "merge_diffusers", "train_sdjax",
                                        "train_diffusers"], "internal: be this worker")
flags.DEFINE_string("plan", "", "internal: the JSON file of the LoRA a worker builds")
FLAGS = flags.FLAGS

CONTEXT_LENGTH = 77
# diffusers' train_text_to_image_lora.py: LoraConfig(target_modules=["to_k", "to_q", "to_v",
# "to_out.0"]) on the U-Net, as a `lora.target_modules` pattern on the diffusers module names.
DIFFUSERS_SCRIPT_TARGETS = r"\.attn[12]\.to_(q|k|v|out\.0)$"
SEED = 14


def _tiny() -> bool:
    return FLAGS.preset == "tiny"


# --- the LoRA both sides build --------------------------------------------------------------------

def lora_plan(params, unet_config, rank: int, alpha: float, text_encoder: bool,
              target_modules: tuple[str, ...] = ()) -> list[dict]:
    """The layers a LoRA adapts (kohya's default targets, or `target_modules`), each with its sdjax
    path, reference module name and factor shapes: what every worker builds its factors from."""
    from sdjax.adapters.names import layer_names
    from sdjax.training import lora

    network = lora.make_network(params, unet_config, lora.LoRAConfig(
        network_dim=rank, network_alpha=alpha, train_text_encoder=text_encoder,
        target_modules=target_modules))
    names = layer_names(params, unet_config).reference
    return [{"model": m.model, "path": m.path, "name": names[m.model][m.path],
             "down_shape": list(m.down_shape), "up_shape": list(m.up_shape), "alpha": m.alpha}
            for m in network.modules]


def plan_factors(plan: list[dict]) -> list[tuple[dict, object, object]]:
    """(layer, down, up) for each layer of `plan`: random factors drawn from the layer's own
    stream, so every process gets the same ones. delta = down . up * alpha / rank changes the
    layer's output by a few percent."""
    import numpy as np

    out = []
    for layer in plan:
        rng = np.random.default_rng([SEED, zlib.crc32(f"{layer['model']}/{layer['path']}".encode())])
        fan_in = int(np.prod(layer["down_shape"][:-1]))
        down = rng.standard_normal(layer["down_shape"], np.float32) / np.float32(np.sqrt(fan_in))
        up = rng.standard_normal(layer["up_shape"], np.float32) * np.float32(0.02)
        out.append((layer, down, up))
    return out


def sdjax_adapter(plan: list[dict]):
    """The plan's factors as an `adapters.network.Adapter`."""
    from sdjax.adapters import network

    modules: dict[str, dict] = {}
    for layer, down, up in plan_factors(plan):
        modules.setdefault(layer["model"], {})[layer["path"]] = network.LowRank(down, up, layer["alpha"])
    return network.Adapter(name="benchmark", modules=modules)


def inject_plan(models: dict, plan: list[dict]) -> dict[str, dict]:
    """The plan's LoRA injected by peft into the torch `models` ({model name: module}), with its
    factors; returns {model name: {reference name: peft layer}}."""
    from benchmarks import peft_lora

    layers = {}
    by_model: dict[str, list] = {}
    for layer, down, up in plan_factors(plan):
        by_model.setdefault(layer["model"], []).append((layer, down, up))
    for model, entries in by_model.items():
        ranks = {(e[0]["up_shape"][0], e[0]["alpha"]) for e in entries}
        if len(ranks) != 1:
            raise ValueError(f"{model}: the reference benchmark takes one rank and alpha per model, "
                             f"the plan has {sorted(ranks)}")
        (rank, alpha), = ranks
        layers[model] = peft_lora.inject(models[model], [e[0]["name"] for e in entries], rank, alpha)
        peft_lora.set_factors(layers[model], {e[0]["name"]: (e[1], e[2]) for e in entries})
    return layers


def _write_plan(plan: list | dict, name: str) -> str:
    path = os.path.join(FLAGS.workdir, f"lora_plan_{FLAGS.preset}_{name}.json")
    with open(path, "w") as f:
        json.dump(plan, f)
    return path


def _read_plan() -> list[dict]:
    with open(FLAGS.plan) as f:
        return json.load(f)


def _folder() -> str:
    from benchmarks.checkpoints import write_diffusers_folder

    return str(write_diffusers_folder(FLAGS.preset, os.path.join(FLAGS.workdir, FLAGS.preset)))


def _worker(kind: str, folder: str, plan_path: str = "") -> timing.StepWorker:
    return timing.StepWorker(sys.executable, "benchmarks.lora", f"--lora_worker={kind}",
                             f"--preset={FLAGS.preset}", f"--workdir={FLAGS.workdir}",
                             f"--plan={plan_path}", f"--folder={folder}")


def _run_workers(workers: dict, together: bool, extra: dict | None = None
                 ) -> tuple[dict[str, list[float]], dict[str, timing.StepWorker]]:
    """(times, closed workers) of workers started on demand ({name: () -> StepWorker}), all at
    once and interleaved or one after the other; `extra` runs (the matmul ceiling) join every
    loop."""
    times, started = {}, {}
    for names in ([list(workers)] if together else [[name] for name in workers]):
        running = {name: workers[name]() for name in names}
        result = timing.interleaved({**{n: w.run for n, w in running.items()}, **(extra or {})},
                                    FLAGS.repeats)
        for name, w in running.items():
            w.close()
            started[name] = w
        for name, values in result.items():
            times.setdefault(name, []).extend(values)
    return times, started


# --- forward ------------------------------------------------------------------------------------

def forward_mode(folder: str) -> None:
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel

    from benchmarks import peft_lora
    from sdjax.adapters import network
    from sdjax.models.layers import model_variables
    from sdjax.models.unet import UNet
    from sdjax.weights.unet import load_unet_folder

    cores = timing.num_cores()
    torch.set_num_threads(cores)
    sizes = [int(s) for s in FLAGS.sizes] or ([8, 16] if _tiny() else [32, 64])
    matmul_n = FLAGS.matmul or (256 if _tiny() else 4096)
    run_matmul, matmul_flops = timing.matmul_run(matmul_n)

    config, params = load_unet_folder(os.path.join(folder, "unet"))
    rank = FLAGS.rank
    plan = lora_plan({"unet": params}, config, rank, rank / 2, text_encoder=False)
    adapter = sdjax_adapter(plan)
    weighted = [network.Weighted(adapter)]
    with_lora = network.with_runtime_adapters({"unet": params}, weighted)
    variables = {
        "base": {"params": params},
        "merged": {"params": network.merge({"unet": params}, weighted)["unet"]},
        "run-time": model_variables(with_lora, "unet"),
    }
    variables = jax.device_put(variables)
    lora_params = sum(int(np.prod(l["down_shape"])) + int(np.prod(l["up_shape"])) for l in plan)

    reference = None
    if FLAGS.reference:
        reference = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
        inject_plan({"unet": reference}, plan)
        fused = [False]

        def set_fused(on: bool):
            if fused[0] != on:
                (peft_lora.fuse if on else peft_lora.unfuse)([reference])
                fused[0] = on

    model = UNet(config)
    forward = jax.jit(lambda v, x, t, c: model.apply(v, x, t, c))
    # FLOPs of the same maths with whole-matrix attention (XLA counts a loop body once).
    unblocked = UNet(dataclasses.replace(config, attention="reference"))
    flops_forward = jax.jit(lambda v, x, t, c: unblocked.apply(v, x, t, c))

    rows, overheads = [], []
    for size in sizes:
        rng = np.random.default_rng(size)
        latents = rng.standard_normal((FLAGS.batch, size, size, config.in_channels), np.float32)
        context = rng.standard_normal((FLAGS.batch, CONTEXT_LENGTH, config.cross_attention_dim),
                                      np.float32)
        t = np.full((FLAGS.batch,), 500.0, np.float32)
        x_j, t_j, c_j = jnp.asarray(latents), jnp.asarray(t), jnp.asarray(context)
        compiled, compile_s, flops = {}, {}, {}
        for name in ("base", "run-time"):
            start = time.perf_counter()
            compiled[name] = forward.lower(variables[name], x_j, t_j, c_j).compile()
            compile_s[name] = time.perf_counter() - start
            flops[name] = timing.xla_flops(flops_forward.lower(variables[name], x_j, t_j, c_j))
        compiled["merged"], compile_s["merged"], flops["merged"] = (
            compiled["base"], None, flops["base"])  # same program, other values
        outputs = {name: np.asarray(compiled[name](variables[name], x_j, t_j, c_j))
                   for name in variables}
        runs = {f"sdjax {name}": (lambda f=compiled[name], v=variables[name]:
                                  f(v, x_j, t_j, c_j).block_until_ready())
                for name in variables}
        runs["matmul"] = run_matmul
        prepare, expected = {}, {}
        if reference is not None:
            x_t = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy())
            c_t, t_t = torch.from_numpy(context), torch.from_numpy(t)

            def run_torch():
                with torch.inference_mode():
                    return reference(x_t, t_t, c_t).sample

            for name, on in (("unfused", False), ("fused", True)):
                set_fused(on)
                expected[name] = run_torch().numpy().transpose(0, 2, 3, 1)
                runs[f"diffusers {name}"] = run_torch
                prepare[f"diffusers {name}"] = lambda on=on: set_fused(on)
        times = timing.interleaved(runs, FLAGS.repeats, prepare)
        ceiling = matmul_flops / timing.median(times.pop("matmul")) / 1e9
        med = {name: timing.median(values) for name, values in times.items()}
        # What each row is compared with: sdjax's own merged step, and its output counterpart.
        counterpart = {"sdjax base": None, "sdjax merged": None, "sdjax run-time": None,
                       "diffusers unfused": "run-time", "diffusers fused": "merged"}
        for name, values in times.items():
            side, _, kind = name.partition(" ")
            merged_name = f"{side} {'fused' if side == 'diffusers' else 'merged'}"
            other = counterpart[name]
            if name == "sdjax run-time":
                delta = float(np.max(np.abs(outputs["run-time"] - outputs["merged"])))
            elif other:
                delta = float(np.max(np.abs(outputs[other] - expected[kind])))
            else:
                delta = None
            sdjax_kind = {"unfused": "run-time", "fused": "merged"}.get(kind, kind)
            gflops = flops[kind] / med[name] / 1e9 if side == "sdjax" else None
            rows.append([f"{size}x{size}", name, med[name], min(values),
                         med[name] / med[merged_name],
                         med[f"sdjax {sdjax_kind}"] / med[name] if side == "diffusers" else None,
                         gflops, ceiling if side == "sdjax" else None,
                         gflops / ceiling if gflops else None,
                         compile_s.get(kind) if side == "sdjax" else None, delta])
        lora_effect = float(np.max(np.abs(outputs["merged"] - outputs["base"])))
        overheads.append(
            f"{size}x{size}: run-time LoRA overhead sdjax {med['sdjax run-time'] / med['sdjax merged'] - 1:+.1%}"
            + (f", diffusers {med['diffusers unfused'] / med['diffusers fused'] - 1:+.1%}"
               if reference is not None else "")
            + f" (target for sdjax <= +10%); the LoRA adds {flops['run-time'] / flops['base'] - 1:.1%}"
            f" FLOPs and changes the output by up to {lora_effect:.3g}")
        print(f"done forward {size}x{size}", file=sys.stderr, flush=True)

    print(f"U-Net forward with a LoRA, preset {FLAGS.preset}, batch {FLAGS.batch}, float32, "
          f"rank {rank} alpha {rank / 2:g} on {len(plan)} layers ({lora_params / 1e6:.2f} M params), "
          f"{cores} cores (torch threads {torch.get_num_threads()}), jax {jax.__version__}, "
          f"median of {FLAGS.repeats}")
    print(f"matmul ceiling: a jitted {matmul_n}² float32 matmul, timed in turn with the others")
    print(timing.table(["latents", "implementation", "median s", "min s", "/ its merged",
                        "sdjax / this", "GFLOP/s", "ceiling GFLOP/s", "of ceiling", "compile s",
                        "max |Δ| vs sdjax"], rows))
    print("\n".join(overheads))
    print("max |Δ| vs sdjax: sdjax run-time vs sdjax merged; diffusers unfused vs sdjax run-time; "
          "diffusers fused vs sdjax merged")


# --- merge --------------------------------------------------------------------------------------

def merge_mode(folder: str) -> None:
    import numpy as np

    from sdjax.weights.presets import abstract_pretrained

    model = abstract_pretrained(FLAGS.preset)
    rank = FLAGS.merge_rank
    plan = lora_plan(model.params, model.unet_config, rank, rank / 2, text_encoder=True)
    plan_path = _write_plan(plan, f"merge_r{rank}")
    lora_params = sum(int(np.prod(l["down_shape"])) + int(np.prod(l["up_shape"])) for l in plan)
    kernel_params = sum(int(np.prod(l["down_shape"][:-1])) * l["up_shape"][-1] for l in plan)
    together = _tiny() if FLAGS.together is None else FLAGS.together
    workers = {"sdjax merge (numpy)": lambda: _worker("merge_sdjax", folder, plan_path)}
    if FLAGS.reference:
        workers["diffusers fuse_lora"] = lambda: _worker("merge_diffusers", folder, plan_path)
    run_matmul, matmul_flops = timing.matmul_run(FLAGS.matmul or (256 if _tiny() else 4096))
    times, started = _run_workers(workers, together, {"matmul": run_matmul})
    ceiling = matmul_flops / timing.median(times.pop("matmul")) / 1e9
    flops = 2.0 * rank * kernel_params  # down . up for every kernel
    ours = timing.median(times["sdjax merge (numpy)"][1:] or times["sdjax merge (numpy)"])
    rows = []
    for name, values in times.items():
        w = started[name]
        later = values[1:] or values
        t_med = timing.median(later)
        rows.append([name, values[0], t_med, min(later), ours / t_med if "diffusers" in name else None,
                     flops / t_med / 1e9, w.setup_s, float(w.info["loaded_rss_mib"]),
                     float(w.info["peak_rss_mib"]),
                     float(w.info["peak_rss_mib"]) - float(w.info["loaded_rss_mib"]),
                     f"{float(w.info['merged_sq']):.9g}"])
    print(f"merging a LoRA, preset {FLAGS.preset}: rank {rank} alpha {rank / 2:g} on {len(plan)} "
          f"layers of the U-Net and text encoder ({lora_params / 1e6:.1f} M LoRA params into "
          f"{kernel_params / 1e6:.3g} M kernel params), float32 on the host, {timing.num_cores()} "
          f"cores, {'interleaved' if together else 'one worker after the other'}, "
          f"{FLAGS.repeats} merges per worker")
    print(f"matmul ceiling: {ceiling:.0f} GFLOP/s (a jitted float32 matmul timed in turn with the "
          f"merges); a merge's GFLOP/s counts down . up only")
    print(timing.table(["implementation", "first merge s", "median s (later)", "min s",
                        "sdjax / this", "GFLOP/s", "setup s", "loaded RSS MiB", "peak RSS MiB",
                        "peak − loaded MiB", "merged Σw²"], rows))
    print(f"merged Σw²: the sum of squares of every merged kernel; before merging "
          f"{float(started['sdjax merge (numpy)'].info['base_sq']):.10g}")
    print(f"target: sdjax merge <= 2 s: first {times['sdjax merge (numpy)'][0]:.2f} s, "
          f"later {ours:.2f} s")


def merge_sdjax_worker(folder: str) -> None:
    import numpy as np
    from flax import traverse_util

    from sdjax.adapters import network
    from sdjax.weights.pretrained import load_pretrained

    start = time.perf_counter()
    plan = _read_plan()
    params = load_pretrained(folder).params
    weighted = [network.Weighted(sdjax_adapter(plan))]

    def squares(tree) -> float:
        flat = {m: traverse_util.flatten_dict(tree[m]) for m in ("unet", "text_encoder")}
        return sum(float(np.sum(np.square(flat[l["model"]][tuple(l["path"].split("/")) + ("kernel",)],
                                          dtype=np.float64))) for l in plan)

    print(f"base_sq {squares(params):.10g}", flush=True)
    print(f"loaded_rss_mib {timing.rss_mib():.0f}", flush=True)
    merged, sums = {}, []

    def step():
        merged["params"] = network.merge(params, weighted)

    def after():
        sums.append(squares(merged.pop("params")))

    timing.serve_runs(step, time.perf_counter() - start, after)
    print(f"merged_sq {sums[-1]:.10g}", flush=True)


def merge_diffusers_worker(folder: str) -> None:
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from benchmarks import peft_lora

    start = time.perf_counter()
    torch.set_num_threads(timing.num_cores())
    plan = _read_plan()
    models = {"unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
              "text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")}
    layers = inject_plan(models, plan)
    with torch.no_grad():  # read every weight once: loaded lazily, they are not resident before
        for model in models.values():
            for p in model.parameters():
                p.sum()
    print(f"loaded_rss_mib {timing.rss_mib():.0f}", flush=True)
    sums = []

    def after():
        with torch.no_grad():
            sums.append(sum(float(torch.sum(layer.base_layer.weight.double() ** 2))
                            for model_layers in layers.values() for layer in model_layers.values()))
        peft_lora.unfuse(models.values())

    timing.serve_runs(lambda: peft_lora.fuse(models.values()), time.perf_counter() - start, after)
    print(f"merged_sq {sums[-1]:.10g}", flush=True)


# --- train --------------------------------------------------------------------------------------

def lora_training_config(preset_name: str):
    """The LoRA run both sides follow (see the module docstring)."""
    config = train_step.benchmark_config(preset_name, lora=True)
    if preset_name == "sd15":
        with config.unlocked():
            config.lora.network_dim = FLAGS.rank
            config.lora.network_alpha = float(FLAGS.rank)
            config.lora.train_text_encoder = False
            config.lora.target_modules = (DIFFUSERS_SCRIPT_TARGETS,)
    return config


def train_mode(folder: str) -> None:
    import jax
    import numpy as np

    from sdjax.training import lora
    from sdjax.weights.presets import abstract_pretrained

    config = lora_training_config(FLAGS.preset)
    model = abstract_pretrained(FLAGS.preset)
    c = config.lora
    plan = lora_plan(model.params, model.unet_config, c.network_dim, c.network_alpha,
                     c.train_text_encoder, tuple(c.target_modules))
    targets = {}
    for layer in plan:
        target = targets.setdefault(lora.group_name(layer["model"]), {
            "model": layer["model"], "modules": [], "rank": layer["up_shape"][0],
            "alpha": layer["alpha"]})
        target["modules"].append(layer["name"])
    targets_path = _write_plan(targets, "train")
    lora_params = sum(int(np.prod(l["down_shape"])) + int(np.prod(l["up_shape"])) for l in plan)

    workers = {"sdjax LoRA": lambda: _worker("train_sdjax", folder)}
    if FLAGS.reference:
        workers["diffusers LoRA (PyTorch, peft)"] = lambda: _worker("train_diffusers", folder,
                                                                    targets_path)
    if FLAGS.full_finetune:
        workers["sdjax full fine-tune"] = lambda: timing.StepWorker(
            sys.executable, "benchmarks.train_step", "--worker=sdjax", f"--preset={FLAGS.preset}",
            f"--folder={folder}")
    together = _tiny() if FLAGS.together is None else FLAGS.together
    times, started = _run_workers(workers, together)

    batch = config.data.batch_size
    ours = timing.median(times["sdjax LoRA"])
    rows = []
    for name, values in times.items():
        t_med, w = timing.median(values), started[name]
        rows.append([name, t_med, min(values), batch / t_med,
                     ours / t_med if name != "sdjax LoRA" else None, w.setup_s,
                     float(w.info["peak_rss_mib"]), float(w.info["first_loss"])])
    print(f"LoRA training step, preset {FLAGS.preset}, batch {batch}, {config.data.resolution} px, "
          f"{config.compute_dtype}, remat {'on' if config.remat else 'off'}: rank "
          f"{c.network_dim} alpha {c.network_alpha:g} on {len(plan)} layers of "
          f"{'+'.join(sorted({l['model'] for l in plan}))} ({lora_params / 1e6:.2f} M params); "
          f"{timing.num_cores()} cores, {'interleaved' if together else 'one worker after the other'}, "
          f"median of {FLAGS.repeats}")
    print(timing.table(["implementation", "median s / step", "min s", "examples / s",
                        "sdjax LoRA / this (time)", "setup s (load + first step)", "peak RSS MiB",
                        "first loss"], rows))
    if FLAGS.reference:
        print(f"target: sdjax LoRA step faster than diffusers': "
              f"{ours / timing.median(times['diffusers LoRA (PyTorch, peft)']):.3g}x its time")
    if FLAGS.full_finetune:
        full_config = train_step.benchmark_config(FLAGS.preset)
        trained = [n for n, g in full_config.optimizer.groups.to_dict().items()
                   if not g.get("frozen", False)]
        moments_mib = 2 * 4 * sum(int(np.prod(s.shape)) for n in trained
                                  for s in jax.tree_util.tree_leaves(model.params[n])) / 2 ** 20
        saved = (float(started["sdjax full fine-tune"].info["peak_rss_mib"])
                 - float(started["sdjax LoRA"].info["peak_rss_mib"]))
        print(f"target: peak memory below the full fine-tune's by at least its optimizer state "
              f"(AdamW moments of {'+'.join(trained)}: {moments_mib:.0f} MiB): {saved:.0f} MiB less")


# --- entry --------------------------------------------------------------------------------------

def main(_):
    if FLAGS.lora_worker == "merge_sdjax":
        return merge_sdjax_worker(FLAGS.folder)
    if FLAGS.lora_worker == "merge_diffusers":
        return merge_diffusers_worker(FLAGS.folder)
    if FLAGS.lora_worker == "train_sdjax":
        return train_step.sdjax_worker(FLAGS.folder, lora_training_config(FLAGS.preset))
    if FLAGS.lora_worker == "train_diffusers":
        return train_step.diffusers_worker(FLAGS.folder, lora_training_config(FLAGS.preset),
                                           lora_targets=_read_plan())
    unknown = sorted(set(FLAGS.modes) - {"forward", "merge", "train"})
    if unknown:
        raise app.UsageError(f"--modes: unknown {unknown}; choose from forward, merge, train")
    os.makedirs(FLAGS.workdir, exist_ok=True)
    folder = _folder()
    for mode, run in (("forward", forward_mode), ("merge", merge_mode), ("train", train_mode)):
        if mode in FLAGS.modes:
            run(folder)
            train_step.release_free_heap()
            print(flush=True)


if __name__ == "__main__":
    app.run(main)
