"""Training of the flow families (SD3 MMDiT, Flux): the rectified-flow loss against diffusers'
training scripts' formulas computed with diffusers' own pieces (its training_utils draws and
weights on the same numbers, its scheduler's table, its pipelines' prompt encoding and
transformers), caption dropout, steps that lower the loss, LoRA targets as peft places them and
the exported LoRA file read by diffusers' `load_lora_weights`; and, through the training loop
(`loop.train`) in subprocesses (slow), exact resume, 8 devices with fsdp=2 against 1, and exports
that load and sample (the full model) or load in diffusers (a LoRA).
"""
from __future__ import annotations

import json
import os
from unittest import mock

import jax
import numpy as np
import pytest

from configs import train_flow_tiny
from sdjax import parallel
from sdjax.models.layers import ADAPTERS_KEY
from sdjax.training import flow, loop, lora
from sdjax.training import step as step_lib
from sdjax.weights.architecture import Architecture
from sdjax.weights.pretrained import load_pretrained
from tests import flow_models
from tests.helpers import flat_params, run_python, to_nchw, to_nhwc

CAPTIONS = ["a red circle on the left", "a small blue square"]
LENGTH = 24          # T5 tokens per caption
LATENT = (8, 8, 16)  # 16x16 images through the tiny 2x VAE


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """{family: (diffusers folder, sdjax Pretrained read from it, diffusers pipeline)}."""
    out = {}
    for family in ("sd3", "flux"):
        folder = flow_models.save_folder(family, tmp_path_factory.mktemp(family))
        out[family] = (folder, load_pretrained(folder),
                       flow_models.reference_pipeline(family, folder))
    return out


def _batch(model, seed=0) -> dict:
    latents = np.random.default_rng(seed).standard_normal((len(CAPTIONS),) + LATENT)
    return {"latents": latents.astype(np.float32),
            **flow.flow_tokenizer(model.tokenizers, LENGTH)(CAPTIONS)}


def _diffusers_velocity(family, pipe, noisy, timesteps, embeds, pooled, guidance, text_ids=None):
    """diffusers' transformer called as its training script calls it, on NCHW latents."""
    import diffusers
    import torch

    with torch.no_grad():
        if family == "sd3":
            return pipe.transformer(hidden_states=noisy, timestep=timesteps,
                                    encoder_hidden_states=embeds, pooled_projections=pooled,
                                    return_dict=False)[0]
        b, c, h, w = noisy.shape
        image_ids = diffusers.FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu",
                                                                     torch.float32)
        text_ids = torch.zeros(embeds.shape[1], 3) if text_ids is None else text_ids
        packed = diffusers.FluxPipeline._pack_latents(noisy, b, c, h, w)
        pred = pipe.transformer(hidden_states=packed, timestep=timesteps / 1000,
                                guidance=torch.full((b,), float(guidance)),
                                pooled_projections=pooled, encoder_hidden_states=embeds,
                                txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
        factor = pipe.vae_scale_factor
        return diffusers.FluxPipeline._unpack_latents(pred, h * factor, w * factor, factor)


def _diffusers_loss(family, pipe, batch, key, weighting_scheme, logit_mean=0.0, logit_std=1.0,
                    mode_scale=1.29, guidance=3.5, caption_dropout=0.0) -> float:
    """train_dreambooth_sd3.py / train_dreambooth_flux.py's loss (precondition_outputs off) on the
    numbers the sdjax step draws from `key`: its noise, its standard normal / uniform draws fed to
    diffusers' compute_density_for_timestep_sampling in place of torch's, and its caption-dropout
    draw (a dropped caption is the empty one)."""
    import diffusers
    import torch
    from diffusers.training_utils import (compute_density_for_timestep_sampling,
                                          compute_loss_weighting_for_sd3)

    scheme = weighting_scheme
    _, drop_key, noise_key, time_key = jax.random.split(key, 4)  # FlowTask's key layout
    b = len(CAPTIONS)
    dropped = np.asarray(jax.random.uniform(drop_key, (b,)) < caption_dropout)
    captions = ["" if drop else c for c, drop in zip(CAPTIONS, dropped)]
    noise = to_nchw(jax.random.normal(noise_key, (b,) + LATENT))
    normal = torch.from_numpy(np.array(jax.random.normal(time_key, (b,))))
    uniform = torch.from_numpy(np.array(jax.random.uniform(time_key, (b,))))
    with mock.patch.object(torch, "normal", lambda mean, std, size, **_: mean + std * normal), \
            mock.patch.object(torch, "rand", lambda size, **_: uniform):
        u = compute_density_for_timestep_sampling(scheme, b, logit_mean, logit_std, mode_scale)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices]
    step_indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    sigmas = scheduler.sigmas[step_indices].flatten()[:, None, None, None]

    vae = pipe.vae.config
    model_input = (to_nchw(batch["latents"]) - vae.shift_factor) * vae.scaling_factor
    noisy = (1.0 - sigmas) * model_input + sigmas * noise
    with torch.no_grad():
        if family == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(captions, captions, captions,
                                                      do_classifier_free_guidance=False,
                                                      max_sequence_length=LENGTH)
            text_ids = None
        else:
            embeds, pooled, text_ids = pipe.encode_prompt(captions, captions,
                                                          max_sequence_length=LENGTH)
    pred = _diffusers_velocity(family, pipe, noisy, timesteps, embeds, pooled, guidance, text_ids)
    weighting = compute_loss_weighting_for_sd3(scheme, sigmas)
    target = noise - model_input
    loss = torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(b, -1), 1)
    return float(loss.mean())


# The objective each family's train-step fixture trains with: non-default settings throughout, and
# at KEY the dropout draws drop the first caption and keep the second.
SETTINGS = {"sd3": dict(weighting_scheme="logit_normal", logit_mean=0.3, logit_std=0.8,
                        caption_dropout=0.5),
            "flux": dict(weighting_scheme="cosmap", guidance=4.0, caption_dropout=0.5)}
KEY = jax.random.key(3)
STEPS = 4


def _config(family, folder, **flow_settings):
    config = train_flow_tiny.get_config(family)
    config.init_from = str(folder)
    config.ema.use = True
    config.optimizer.groups.transformer.lr = 3e-4
    config.flow.max_sequence_length = LENGTH
    config.flow.update(flow_settings)
    return config


@pytest.fixture(scope="module")
def setups(families):
    """{family: the loop's Setup of a run from the saved model, with SETTINGS[family]}."""
    return {family: loop.build(_config(family, folder, **SETTINGS[family]))
            for family, (folder, _, _) in families.items()}


def test_the_fixed_key_drops_one_caption_of_two():
    _, drop_key, _, _ = jax.random.split(KEY, 4)
    assert list(np.asarray(jax.random.uniform(drop_key, (2,)) < 0.5)) == [True, False]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_loss_is_diffusers_rectified_flow_loss_on_the_same_draws(families, setups, family):
    """The run's loss at KEY is the loss of diffusers' training script on the same latents,
    noise, timestep draws and dropped captions: VAE shift and scale, int(u * T) into the
    scheduler's sigmas, the transformer's conditioning (SD3: sigma * 1000; Flux: sigma, training
    guidance), velocity target, SD3 loss weighting."""
    _, model, pipe = families[family]
    ours = float(jax.jit(setups[family].task.loss)(model.params, _batch(model), KEY)[0])
    theirs = _diffusers_loss(family, pipe, _batch(model), KEY, **SETTINGS[family])
    np.testing.assert_allclose(ours, theirs, rtol=2e-5)


@pytest.mark.slow  # compiles a train step per family
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_steps_on_one_batch_lower_its_loss(families, setups, family):
    """STEPS train steps (the loop's compiled step) on one batch, each with KEY (the same noise,
    timesteps and dropout): every step lowers the loss."""
    setup = setups[family]
    mesh = parallel.make_mesh()
    shardings = step_lib.state_sharding(mesh, setup.state)
    fn = step_lib.make_train_step(setup.task, mesh, shardings)
    state = step_lib.place(setup.state, shardings)
    losses = []
    for _ in range(STEPS):
        state, metrics = fn(state, step_lib.device_batch(_batch(families[family][1]), mesh), KEY)
        losses.append(float(metrics["loss"]))
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_only_the_transformer_trains_and_the_ema_holds_it_alone(setups):
    state = setups["flux"].state
    assert state.optimizer.trainable == ("transformer",)
    assert set(state.ema_params) == {"transformer"}
    assert set(state.params) == {"transformer", "vae", "text_encoder", "text_encoder_2"}


OTHER_CASES = [("sd3", dict(weighting_scheme="mode", mode_scale=1.1)),
               ("sd3", dict(weighting_scheme="sigma_sqrt")),
               ("flux", dict(weighting_scheme="none", guidance=2.5)),
               ("flux", dict(weighting_scheme="uniform"))]


@pytest.mark.slow  # a compilation per case
@pytest.mark.parametrize("family,settings", OTHER_CASES,
                         ids=[f"{f}-{s['weighting_scheme']}" for f, s in OTHER_CASES])
def test_every_weighting_scheme_gives_diffusers_loss(families, family, settings):
    _, model, pipe = families[family]
    tokenize = flow.flow_tokenizer(model.tokenizers, LENGTH)
    task = flow.flow_task(Architecture.of(model), tokenize, settings)
    ours = float(jax.jit(task.loss)(model.params, _batch(model), KEY)[0])
    np.testing.assert_allclose(ours, _diffusers_loss(family, pipe, _batch(model), KEY, **settings),
                               rtol=2e-5)


def test_the_wrong_objective_for_a_family_is_an_error():
    config = train_flow_tiny.get_config("flux")
    config.objective = "ldm"
    with pytest.raises(ValueError, match="objective 'ldm' does not train this flux model.*'flow'"):
        loop.build(config)
    config = train_flow_tiny.get_config("sd3")
    with config.unlocked():
        config.preset = "tiny"
    with pytest.raises(ValueError, match="objective 'flow' does not train this sd1 model.*'ldm'"):
        loop.build(config)


def test_an_unknown_flow_setting_is_an_error():
    config = train_flow_tiny.get_config("flux")
    with config.unlocked():
        config.flow.weighting = "cosmap"
    with pytest.raises(ValueError, match=r"flow: unknown settings \['weighting'\]"):
        loop.build(config)


def test_the_data_pipeline_gives_clip_and_t5_ids(families, tmp_path):
    from sdjax.data.shapes_dataset import write_shapes_folder
    from sdjax.training.data import ImageCaptionDataset

    _, model, _ = families["sd3"]
    tokenize = flow.flow_tokenizer(model.tokenizers, LENGTH)
    with ImageCaptionDataset.from_folder(write_shapes_folder(tmp_path / "data", 4), batch_size=2,
                                         resolution=16, tokenizer=tokenize, prefetch=0) as data:
        batch = next(data)
    assert batch["input_ids"].shape == (2, 2, 1, 77) and batch["t5_ids"].shape == (2, LENGTH)
    np.testing.assert_array_equal(batch["t5_ids"],
                                  model.tokenizers[-1](batch["captions"], LENGTH))
    np.testing.assert_array_equal(batch["input_ids"][:, 1, 0],
                                  model.tokenizers[1](batch["captions"]))


# --- LoRA ------------------------------------------------------------------------------------------

# The default targets of diffusers' train_dreambooth_lora_sd3.py and train_dreambooth_lora_flux.py,
# and their CLIP text encoders' (train_text_encoder).
DIFFUSERS_TARGETS = {
    "sd3": ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
            "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"],
    "flux": ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
             "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
             "ff_context.net.0.proj", "ff_context.net.2"]}
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _peft_targets(module, targets) -> set[str]:
    """The modules peft adapts in `module` for `targets` (module names ending in one)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    inject_adapter_in_model(LoraConfig(r=4, target_modules=targets), module)
    return {name for name, m in module.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_default_lora_targets_are_the_layers_peft_adapts_for_diffusers_scripts(families, family):
    import copy

    _, model, pipe = families[family]
    network = lora.make_network(model.params, None, lora.LoRAConfig(), model.family)
    names = {m.model: {} for m in network.modules}
    from sdjax.adapters.names import layer_names
    reference = layer_names(model.params, None, model.family).reference
    for m in network.modules:
        names[m.model][reference[m.model][m.path]] = m
    assert set(names["transformer"]) == _peft_targets(copy.deepcopy(pipe.transformer),
                                                      DIFFUSERS_TARGETS[family])
    clip = ["text_encoder", "text_encoder_2"] if family == "sd3" else ["text_encoder"]
    assert sorted(set(names) - {"transformer"}) == clip  # Flux's T5 is never adapted
    # transformers 5's CLIPTextModel names its modules without `text_model.`.
    plain = lambda modules: {m.removeprefix("text_model.") for m in modules}
    for name in clip:
        assert plain(names[name]) == plain(_peft_targets(copy.deepcopy(getattr(pipe, name)),
                                                         TEXT_TARGETS))


def _random_lora(network, seed=0) -> dict:
    """The network's factors with random (non-zero) up factors: a LoRA that changes the model."""
    rng = np.random.default_rng(seed)
    factors = network.init(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: (rng.standard_normal(x.shape).astype(np.float32) * 0.3
                         if jax.tree_util.keystr(path).endswith("['up']") else x), factors)


def _assert_diffusers_lora_reproduces_sdjax(family, folder, model, params, lora_file):
    """diffusers' pipeline of `folder` with `lora_file` loaded gives the transformer and CLIP
    outputs sdjax gives with `params` (the model's with a run-time LoRA), to 1e-5 relative, and
    the LoRA changes them far beyond that."""
    import torch

    from sdjax.models.clip import CLIPTextModel
    from sdjax.models.layers import model_variables
    from sdjax.sampling.program import transformer_fn

    pipe = flow_models.reference_pipeline(family, folder)
    arch = Architecture.of(model)
    rng = np.random.default_rng(1)
    config = arch.transformer
    x = rng.standard_normal((2,) + LATENT).astype(np.float32)
    context = rng.standard_normal((2, 12, config.joint_attention_dim)).astype(np.float32)
    pooled = rng.standard_normal((2, config.pooled_projection_dim)).astype(np.float32)
    t = np.array([250.0, 800.0], np.float32)
    ids = model.tokenizers[0](CAPTIONS)
    encoders = [name for name in ("text_encoder", "text_encoder_2")
                if name in params[ADAPTERS_KEY]]

    def diffusers_outputs():
        velocity = to_nhwc(_diffusers_velocity(
            family, pipe, to_nchw(x), torch.from_numpy(t), torch.from_numpy(context),
            torch.from_numpy(pooled), 3.5))
        with torch.no_grad():
            hidden = [getattr(pipe, name)(torch.from_numpy(np.asarray(ids, np.int64)))
                      .last_hidden_state.numpy() for name in encoders]
        return velocity, hidden

    base_velocity, base_hidden = diffusers_outputs()
    pipe.load_lora_weights(os.path.dirname(lora_file), weight_name=os.path.basename(lora_file))
    velocity, hidden = diffusers_outputs()

    relative = lambda a, b: float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
    cond = {"context": context, "pooled": pooled, "guidance": np.full((2,), 3.5, np.float32)}
    ours = np.asarray(jax.jit(transformer_fn(arch, params))(x, t, cond))
    assert relative(ours, velocity) <= 1e-5
    assert relative(base_velocity, velocity) > 1e-3
    for index, name in enumerate(encoders):
        text = CLIPTextModel(arch.text_encoders[index])
        ours = text.apply(model_variables(params, name), ids).last_hidden_state
        assert relative(np.asarray(ours), hidden[index]) <= 1e-5
        assert relative(base_hidden[index], hidden[index]) > 1e-3


@pytest.mark.slow  # compiles both frameworks' LoRA paths
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_exported_lora_loads_in_diffusers_and_gives_sdjax_runtime_lora_outputs(families, family,
                                                                             tmp_path):
    folder, model, _ = families[family]
    # alpha != rank: diffusers reads it from the file's peft metadata.
    network = lora.make_network(model.params, None, lora.LoRAConfig(
        network_dim=4, network_alpha=2.0, init="gaussian"), model.family)
    factors = _random_lora(network)
    paths = lora.export_files(network, factors, model, str(tmp_path), "lora")
    assert set(paths) == {"diffusers"}
    params = network.inference_params({**model.params, **factors})
    assert set(params[ADAPTERS_KEY]) == {"transformer", "text_encoder"} | (
        {"text_encoder_2"} if family == "sd3" else set())
    _assert_diffusers_lora_reproduces_sdjax(family, folder, model, params, paths["diffusers"])


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_inverse_key_maps_name_every_diffusers_parameter(families, family):
    from flax import traverse_util

    from sdjax.weights import flux as flux_weights
    from sdjax.weights import mmdit as mmdit_weights

    _, model, pipe = families[family]
    inverse = mmdit_weights.diffusers_key if family == "sd3" else flux_weights.diffusers_key
    keys = {inverse("/".join(k)) for k in traverse_util.flatten_dict(model.params["transformer"])}
    assert keys == set(pipe.transformer.state_dict())
    # A path the forward map cannot produce (only RMS norms have scales) has no diffusers name.
    with pytest.raises(ValueError, match="no diffusers .*name for the params path proj_out/scale"):
        inverse("proj_out/scale")


# --- runs through the training loop (subprocesses) -------------------------------------------------

RUN_STEPS, EVERY = 8, 4
# loop.train in a fresh process, with the fsdp threshold lowered so that the tiny transformer's
# larger kernels are split too; prints which params ended up split.
TRAIN = """
import json, sys
from sdjax import parallel
parallel.FSDP_MIN_SIZE = 1024
import jax
from configs import train_flow_tiny
from sdjax.training import loop
config = train_flow_tiny.get_config(sys.argv[1])
config.update_from_flattened_dict(json.loads(sys.argv[3]))
result = loop.train(config, sys.argv[2], progress=False)
split = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(
    result["state"].params) if not x.sharding.is_fully_replicated]
print(json.dumps({"step": result["step"], "split": split}))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory, families):
    from sdjax.data.shapes_dataset import write_shapes_folder

    root = tmp_path_factory.mktemp("flow_runs")
    settings = {"data.folder": str(write_shapes_folder(root / "data", 16)),
                "data.batch_size": 8, "data.num_workers": 1, "checkpoint.every": EVERY,
                "checkpoint.keep": 10, "log_every": 1, "sample.every": 0,
                "flow.max_sequence_length": LENGTH, "total_steps": RUN_STEPS}
    env = {"JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(root / "xla_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}

    def train(workdir, variant="flux", devices=None, **overrides):
        with mock.patch.dict(os.environ, env):
            out = run_python("-c", TRAIN, variant, str(workdir),
                             json.dumps({**settings, **overrides}), devices=devices)
        assert out.returncode == 0, out.stderr[-4000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    reference = root / "reference"
    train(reference)
    return {"root": root, "settings": settings, "train": train, "reference": reference,
            "families": families}


def _restored(runs, workdir, step, variant="flux", **overrides):
    """Checkpoint `step` of a run and its Setup, restored here on one device (host arrays)."""
    from sdjax.training.checkpoints import Checkpoints

    config = train_flow_tiny.get_config(variant)
    config.update_from_flattened_dict({**runs["settings"], **overrides})
    setup = loop.build(config)
    state = step_lib.place(setup.state, step_lib.state_sharding(parallel.make_mesh(), setup.state))
    ckpt = Checkpoints(os.path.join(workdir, "checkpoints"))
    restored, meta = ckpt.restore(state, step)
    ckpt.close()
    return setup, jax.device_get(restored.replace(rng=jax.random.key_data(restored.rng))), meta


def _losses(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"]
            for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow  # two more training runs
def test_resume_is_bit_identical(runs):
    workdir = runs["root"] / "resumed"
    runs["train"](workdir, total_steps=EVERY)
    runs["train"](workdir)
    _, ours, meta = _restored(runs, workdir, RUN_STEPS)
    _, theirs, their_meta = _restored(runs, runs["reference"], RUN_STEPS)
    assert meta == their_meta
    expected = flat_params(theirs)
    for name, value in flat_params(ours).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)
    assert _losses(workdir) == _losses(runs["reference"])


@pytest.mark.slow  # a training run on 8 simulated devices (compiles)
def test_eight_devices_with_fsdp_train_like_one(runs):
    workdir = runs["root"] / "eight"
    result = runs["train"](workdir, devices=8, fsdp=2)
    assert any("transformer" in name for name in result["split"]), result  # fsdp did split
    ours, theirs = _losses(workdir), _losses(runs["reference"])
    np.testing.assert_allclose([ours[s] for s in sorted(theirs)], [theirs[s] for s in sorted(theirs)],
                               rtol=1e-5)
    # Same training up to float rounding (the batch mean sums in another order, which Adam's
    # m / sqrt(v) magnifies on weights with tiny gradients).
    mine = flat_params(_restored(runs, workdir, RUN_STEPS)[1].params)
    expected = flat_params(_restored(runs, runs["reference"], RUN_STEPS)[1].params)
    diff = sum(np.sum(np.square(mine[k] - v)) for k, v in expected.items())
    norm = sum(np.sum(np.square(v)) for v in expected.values())
    assert np.sqrt(diff / norm) < 2e-5


@pytest.mark.slow  # compiles the sampling program
def test_the_export_is_the_ema_model_and_samples(runs):
    from sdjax.sampling import Generator, Request, SamplingSpec

    _, restored, _ = _restored(runs, runs["reference"], RUN_STEPS)
    model = load_pretrained(runs["reference"] / "export")
    assert model.family == "flux" and model.transformer_config.guidance_embeds
    exported = flat_params(model.params["transformer"])
    for name, value in flat_params(restored.ema_params["transformer"]).items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    out = Generator(model)(Request(prompt=CAPTIONS, num_images=2, seed=1, cfg_scale=1.0),
                           SamplingSpec(sampler="flow_euler", steps=4, height=32, width=32,
                                        max_sequence_length=LENGTH))
    assert out["images"].shape == (2, 32, 32, 3) and np.all(np.isfinite(out["images"]))
    assert np.std(out["images"]) > 0


@pytest.mark.slow  # a LoRA training run with a preview grid (compiles both)
def test_a_lora_run_exports_a_diffusers_file_that_reproduces_sdjax(runs):
    folder, model, _ = runs["families"]["sd3"]
    overrides = {"init_from": str(folder), "total_steps": EVERY, "sample.every": EVERY,
                 "optimizer.groups.lora_transformer.lr": 1e-2}
    workdir = runs["root"] / "lora"
    runs["train"](workdir, "sd3,lora", **overrides)
    assert (workdir / "samples" / f"step_{EVERY:07d}.png").is_file()
    setup, restored, _ = _restored(runs, workdir, EVERY, "sd3,lora", **overrides)
    assert restored.optimizer.trainable == ("lora_transformer",)
    lora_file = workdir / "export" / "lora.safetensors"
    params = setup.network.inference_params({**model.params, **restored.params})
    _assert_diffusers_lora_reproduces_sdjax("sd3", folder, model, params, str(lora_file))
