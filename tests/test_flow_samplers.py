"""Flow-matching schedules and samplers against diffusers: the sigma/timestep tables of
FlowMatchEulerDiscreteScheduler as the SD3 pipelines (set_timesteps(N[, mu])) and the Flux
pipelines (sigmas=linspace(1, 1/N, N), mu=calculate_shift(...)) set them, the multistep
schedulers' own use_flow_sigmas grids, and whole trajectories of every flow sampler driven by the
same smooth stand-in velocity model (and, for stochastic samplers, the same injected noise)."""
import functools
import json
import types

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as flux_calculate_shift
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
    calculate_shift as sd3_calculate_shift)
from diffusers.schedulers import scheduling_dpmsolver_multistep, scheduling_flow_match_euler_discrete

from sdjax.diffusion import samplers as samplers_lib
from sdjax.diffusion.samplers import get_sampler, list_samplers, options_for, sample, start_index
from sdjax.diffusion.schedules import (FlowSchedule, NoiseSchedule, calculate_shift,
                                       compute_density_for_timestep_sampling,
                                       compute_loss_weighting_for_sd3, flow_add_noise,
                                       flow_training_levels, schedule_from_diffusers)
from tests.helpers import to_nchw, to_nhwc
from tests.test_samplers import fake_model, initial_noise, jax_model, rel_err, _keys, SHAPE

RTOL = 1e-5
FLUX_DEV = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
# name -> (FlowMatchEulerDiscreteScheduler config, how the pipeline sets timesteps, image tokens)
SETTINGS = {
    "sd3_shift1": (dict(shift=1.0), "scheduler", None),
    "sd3_shift3": (dict(shift=3.0), "scheduler", None),
    "sd3_dynamic_1024": (dict(FLUX_DEV, use_dynamic_shifting=True), "scheduler", 1024),
    "flux_dynamic_1024": (FLUX_DEV, "linspace", 1024),
    "flux_dynamic_4096": (FLUX_DEV, "linspace", 4096),
    "flux_static": (dict(shift=1.0), "linspace", None),        # schnell: dynamic shifting off
}
STEPS = (1, 4, 20)


def flow_schedule(setting) -> FlowSchedule:
    config, base, tokens = SETTINGS[setting]
    schedule = FlowSchedule.from_diffusers(config, base_sigmas=base)
    return schedule if tokens is None else schedule.for_image_tokens(tokens)


def pipeline_set_timesteps(scheduler, config, base, tokens, num_steps):
    """set_timesteps as StableDiffusion3Pipeline (base "scheduler") or FluxPipeline ("linspace")
    calls it, with its calculate_shift. mu's settings are the model's FlowMatch config (`config`):
    a DPMSolverMultistep / UniPCMultistep config lacks them, where the pipelines would fall back to
    defaults (the SD3 pipeline's max_shift default is 1.16, not the scheduler's 1.15)."""
    model = diffusers.FlowMatchEulerDiscreteScheduler(**config).config
    mu_settings = (model.base_image_seq_len, model.max_image_seq_len, model.base_shift, model.max_shift)
    kwargs = {}
    flow_sigmas = scheduler.config.get("use_flow_sigmas", False)
    if base == "linspace":
        if not flow_sigmas:                # Flux hands the multistep schedulers no sigmas
            kwargs["sigmas"] = np.linspace(1.0, 1 / num_steps, num_steps)
        # Flux passes mu always; DPMSolverMultistep asserts dynamic shifting when it gets one.
        if scheduler.config.get("use_dynamic_shifting") or not flow_sigmas:
            kwargs["mu"] = flux_calculate_shift(tokens or 256, *mu_settings)
    elif scheduler.config.get("use_dynamic_shifting", None):
        kwargs["mu"] = sd3_calculate_shift(tokens, *mu_settings)
    if "sigmas" in kwargs:
        scheduler.set_timesteps(sigmas=kwargs.pop("sigmas"), **kwargs)
    else:
        scheduler.set_timesteps(num_steps, **kwargs)
    return scheduler


def euler_reference(setting, num_steps, **extra):
    config, base, tokens = SETTINGS[setting]
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**config, **extra)
    return pipeline_set_timesteps(scheduler, config, base, tokens, num_steps)


# --- tables ---------------------------------------------------------------------------------------

TABLE_CASES = [(shift, dynamic, time_shift, tokens, terminal)
               for shift in (1.0, 3.0, 1.7)
               for dynamic, time_shift, tokens in ((False, "exponential", None),
                                                   (True, "exponential", 256),
                                                   (True, "exponential", 1369),
                                                   (True, "exponential", 4096),
                                                   (True, "linear", 2000))
               for terminal in (None, 0.1)
               if not (dynamic and shift != 3.0)]


@pytest.mark.parametrize("base", ["scheduler", "linspace"])
@pytest.mark.parametrize("shift,dynamic,time_shift,tokens,terminal", TABLE_CASES)
def test_sigmas_and_timesteps_equal_diffusers_tables(base, shift, dynamic, time_shift, tokens,
                                                     terminal):
    config = dict(FLUX_DEV, shift=shift, use_dynamic_shifting=dynamic, time_shift_type=time_shift,
                  shift_terminal=terminal)
    schedule = FlowSchedule.from_diffusers(config, base_sigmas=base)
    if tokens is not None:
        schedule = schedule.for_image_tokens(tokens)
    if terminal:     # one step's sigma is 1: diffusers stretches 0 / 0 into NaN
        with pytest.raises(ValueError, match="shift_terminal"):
            schedule.sigmas(1)
    for n in (1, 2, 4, 20, 28, 50)[1 if terminal else 0:]:
        ref = pipeline_set_timesteps(diffusers.FlowMatchEulerDiscreteScheduler(**config), config,
                                     base, tokens, n)
        sigmas = schedule.sigmas(n)
        assert sigmas.dtype == np.float64 and sigmas.shape == (n + 1,) and sigmas[-1] == 0
        np.testing.assert_array_equal(sigmas.astype(np.float32), ref.sigmas.numpy(), err_msg=f"N={n}")
        np.testing.assert_array_equal(schedule.timesteps(sigmas[:-1]), ref.timesteps.numpy())


def test_mu_is_the_pipelines_calculate_shift():
    for tokens in (16, 256, 1024, 1369, 4096, 9000):
        assert calculate_shift(tokens) == flux_calculate_shift(tokens)
        assert FlowSchedule(**FLUX_DEV).for_image_tokens(tokens).mu == flux_calculate_shift(tokens)
        assert calculate_shift(tokens, 256, 4096, 0.5, 1.16) == sd3_calculate_shift(
            tokens, 256, 4096, 0.5, 1.16)
    assert FlowSchedule(shift=3.0).mu is None


def test_training_table_is_the_schedulers_construction_table():
    for config in (dict(shift=3.0), dict(shift=1.7), FLUX_DEV):
        ref = diffusers.FlowMatchEulerDiscreteScheduler(**config)
        schedule = FlowSchedule.from_diffusers(config)
        np.testing.assert_array_equal(schedule.training_sigmas, ref.sigmas.numpy())
        np.testing.assert_array_equal(schedule.timesteps(schedule.training_sigmas), ref.timesteps.numpy())


def test_heun_scheduler_tables_are_the_euler_ones():
    for shift in (1.0, 3.0):
        for n in (1, 4, 20):
            ref = diffusers.FlowMatchHeunDiscreteScheduler(shift=shift)
            ref.set_timesteps(n)
            plan = get_sampler("flow_heun").plan(FlowSchedule(shift=shift), n)
            distinct = np.r_[0, np.arange(1, 2 * n - 1, 2)]       # [s0, s1, s1, s2, s2, ..., 0]
            np.testing.assert_array_equal(np.asarray(plan.sigmas[:-1]), ref.sigmas.numpy()[distinct])
            np.testing.assert_array_equal(np.asarray(plan.timesteps[:-1]), ref.timesteps.numpy()[distinct])


def multistep_reference(cls, setting, num_steps, **extra):
    """DPMSolverMultistep / UniPCMultistep configured for a flow model as users do, set by the pipeline."""
    config, base, tokens = SETTINGS[setting]
    kwargs = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=config["shift"],
                  use_dynamic_shifting=config.get("use_dynamic_shifting", False), **extra)
    return pipeline_set_timesteps(cls(**kwargs), config, base, tokens, num_steps)


@pytest.mark.parametrize("name,cls", [("flow_dpmpp_2m", diffusers.DPMSolverMultistepScheduler),
                                      ("flow_unipc", diffusers.UniPCMultistepScheduler)])
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_multistep_flow_grids_equal_diffusers_tables(name, cls, setting):
    for n in (1, 4, 20, 30):
        ref = multistep_reference(cls, setting, n)
        plan = get_sampler(name).plan(flow_schedule(setting), n)
        np.testing.assert_array_equal(np.asarray(plan.sigmas), ref.sigmas.numpy(), err_msg=f"N={n}")
        np.testing.assert_array_equal(np.asarray(plan.timesteps[:-1]), ref.timesteps.numpy())


def test_dpm_own_grid_refuses_what_the_scheduler_lacks():
    linear = FlowSchedule(**FLUX_DEV, time_shift_type="linear").for_image_tokens(1024)
    terminal = FlowSchedule(shift=3.0, shift_terminal=0.1)
    for schedule, word in ((linear, "time_shift_type"), (terminal, "shift_terminal")):
        with pytest.raises(ValueError, match=word):
            get_sampler("flow_dpmpp_2m").plan(schedule, 10)
        plan = get_sampler("flow_dpmpp_2m", schedule_sigmas=True).plan(schedule, 10)
        np.testing.assert_array_equal(np.asarray(plan.sigmas), schedule.sigmas(10).astype(np.float32))


# --- trajectories ---------------------------------------------------------------------------------

def torch_velocity(x, t):
    return fake_model(x, torch.as_tensor(float(t), dtype=torch.float64), torch)


@functools.lru_cache(maxsize=None)
def _compiled(sampler, start=0):
    return jax.jit(functools.partial(sample, sampler, jax_model, return_trajectory=True, start=start))


@functools.lru_cache(maxsize=None)
def _all_step_noise():
    """The noise sdjax draws at steps 0..max(STEPS)-1 (one key per image, folded with the step)."""
    noise = jax.vmap(lambda keys, i: samplers_lib.step_noise(keys, i, SHAPE), in_axes=(None, 0))
    return np.asarray(jax.jit(noise)(_keys(), jnp.arange(max(STEPS))))


def x0_image():
    return 0.5 * jnp.cos(jnp.arange(np.prod(SHAPE), dtype=jnp.float32)).reshape(SHAPE)


def run_sdjax(name, options, setting, num_steps, start=0):
    sampler = get_sampler(name, **dict(options))
    plan = sampler.plan(flow_schedule(setting), num_steps)
    x0 = x0_image() if start else None
    _, traj = _compiled(sampler, start)(initial_noise(), plan, _keys(), x0=x0)
    return np.asarray(traj, np.float64)


def install_levels(scheduler, timesteps, sigmas, order=1):
    """Drive a diffusers scheduler's own step maths through other tables (Heun's doubled layout)."""
    t, s = torch.as_tensor(timesteps, dtype=torch.float32), torch.as_tensor(sigmas, dtype=torch.float32)
    if order == 2:
        t = torch.cat([t[:1], t[1:].repeat_interleave(2)])
        s = torch.cat([s[:1], s[1:-1].repeat_interleave(2), s[-1:]])
    scheduler.timesteps, scheduler.sigmas = t, s
    return scheduler


def reference_scheduler(name, options, setting, num_steps):
    """The diffusers scheduler a user would configure for this sampler, set as the pipeline sets it."""
    options = dict(options)
    if name in ("flow_euler", "flow_euler_a"):
        return euler_reference(setting, num_steps, stochastic_sampling=name == "flow_euler_a")
    if name == "flow_heun":
        heun = diffusers.FlowMatchHeunDiscreteScheduler(shift=SETTINGS[setting][0]["shift"])
        heun.set_timesteps(num_steps)
        if SETTINGS[setting][1:] != ("scheduler", None):     # Heun takes no mu or sigmas
            euler = euler_reference(setting, num_steps)
            install_levels(heun, euler.timesteps, euler.sigmas, order=2)
        return heun
    if name.startswith("flow_dpmpp"):
        algorithm = "sde-dpmsolver++" if name.endswith("sde") else "dpmsolver++"
        dpm = multistep_reference(diffusers.DPMSolverMultistepScheduler, setting, num_steps,
                                  algorithm_type=algorithm, solver_order=2)
        if options.get("schedule_sigmas"):
            euler = euler_reference(setting, num_steps)
            install_levels(dpm, euler.timesteps, euler.sigmas)
        return dpm
    if name == "flow_unipc":
        return multistep_reference(diffusers.UniPCMultistepScheduler, setting, num_steps)
    raise AssertionError(name)


def run_diffusers(name, options, setting, num_steps, monkeypatch, strength=None):
    """The scheduler loop in float64 tensors; x after each sdjax-equivalent step. With strength,
    img2img as StableDiffusion3Img2ImgPipeline: its get_timesteps, then scale_noise (add_noise for
    the multistep schedulers) of the init latents at the first timestep."""
    scheduler = reference_scheduler(name, options, setting, num_steps)
    noise = to_nchw(initial_noise(), np.float64)
    timesteps, first_step = scheduler.timesteps, 0
    if strength is not None:
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_img2img import (
            StableDiffusion3Img2ImgPipeline)
        timesteps, _ = StableDiffusion3Img2ImgPipeline.get_timesteps(
            types.SimpleNamespace(scheduler=scheduler), num_steps, strength, "cpu")
        first_step = start_index(num_steps, strength, flow=True)
        x0, start_t = to_nchw(x0_image(), np.float64), timesteps[:1].repeat(SHAPE[0])
        noise_fn = scheduler.scale_noise if hasattr(scheduler, "scale_noise") else (
            lambda x, t, z: scheduler.add_noise(x, z, t))
        x = noise_fn(x0, start_t, noise).to(torch.float64)
    else:
        x = noise * scheduler.init_noise_sigma if hasattr(scheduler, "init_noise_sigma") else noise
    stochastic = get_sampler(name, **dict(options)).stochastic
    current = {}

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(current["noise"].shape) == tuple(shape)
        return current["noise"].to(dtype or torch.float64)

    for module in (scheduling_flow_match_euler_discrete, scheduling_dpmsolver_multistep):
        monkeypatch.setattr(module, "randn_tensor", fake_randn)
    outs = []
    for call, t in enumerate(timesteps):
        if stochastic:
            current["noise"] = to_nchw(_all_step_noise()[first_step + call], np.float64)
        x = scheduler.step(torch_velocity(x, t), t, x).prev_sample.to(torch.float64)
        outs.append(to_nhwc(x).copy())
    outs = np.stack(outs)
    if name == "flow_heun":      # two calls per step, the last step one
        outs = outs[np.r_[np.arange(1, len(outs) - 1, 2), len(outs) - 1]]
    return outs


SAMPLER_CASES = {
    "flow_euler": ("flow_euler", ()),
    "flow_euler_a": ("flow_euler_a", ()),
    "flow_heun": ("flow_heun", ()),
    "flow_dpmpp_2m": ("flow_dpmpp_2m", ()),
    "flow_dpmpp_2m_schedule_sigmas": ("flow_dpmpp_2m", (("schedule_sigmas", True),)),
    "flow_dpmpp_2m_sde": ("flow_dpmpp_2m_sde", ()),
    "flow_unipc": ("flow_unipc", ()),
}
TRAJECTORY_SETTINGS = ("sd3_shift1", "sd3_shift3", "flux_dynamic_1024", "flux_dynamic_4096",
                       "sd3_dynamic_1024")


@pytest.mark.parametrize("case", sorted(SAMPLER_CASES))
def test_trajectory_matches_diffusers(case, monkeypatch):
    name, options = SAMPLER_CASES[case]
    for setting in TRAJECTORY_SETTINGS:
        for n in STEPS:
            ours = run_sdjax(name, options, setting, n)
            ref = run_diffusers(name, options, setting, n, monkeypatch)
            assert ours.shape == ref.shape == (n,) + SHAPE
            err = rel_err(ours, ref)
            assert err <= RTOL, f"{case} {setting} {n} steps: rel err {err:.2e}"


@pytest.mark.parametrize("case", ["flow_euler", "flow_heun", "flow_dpmpp_2m", "flow_unipc"])
@pytest.mark.parametrize("setting", ["sd3_shift3", "flux_dynamic_1024"])
def test_img2img_start_matches_the_sd3_img2img_pipeline(case, setting, monkeypatch):
    name, options = SAMPLER_CASES[case]
    n, strength = 20, 0.525
    k = start_index(n, strength, flow=True)
    assert k == 9 and start_index(n, strength) == 10   # int(20 - 10.5) vs 20 - int(10.5)
    ours = run_sdjax(name, options, setting, n, start=k)
    ref = run_diffusers(name, options, setting, n, monkeypatch, strength=strength)
    assert ours.shape == ref.shape == (n - k,) + SHAPE
    assert rel_err(ours, ref) <= RTOL


def test_flow_add_noise_is_scale_noise_with_a_sigma_per_example():
    scheduler = euler_reference("sd3_shift3", 10)
    x0, noise = x0_image(), initial_noise()
    for index in (0, 3, 9):
        ref = scheduler.scale_noise(to_nchw(x0, np.float32), scheduler.timesteps[index:index + 1],
                                    to_nchw(noise, np.float32))
        ours = flow_add_noise(x0, noise, scheduler.sigmas[index].item())
        np.testing.assert_allclose(np.asarray(ours), to_nhwc(ref), rtol=1e-6, atol=1e-7)
    sigmas = jnp.array([0.25, 0.9])
    both = flow_add_noise(x0.astype(jnp.bfloat16), noise, sigmas)
    assert both.dtype == jnp.bfloat16
    for b in range(2):
        np.testing.assert_allclose(np.asarray(both[b], np.float32), np.asarray(
            (1 - sigmas[b]) * x0[b].astype(jnp.bfloat16).astype(jnp.float32) + sigmas[b] * noise[b]),
            rtol=1e-2)


def test_batch_split_does_not_change_images():
    sampler = get_sampler("flow_euler_a")
    plan = sampler.plan(flow_schedule("flux_dynamic_1024"), 6)
    fn = jax.jit(functools.partial(sample, sampler, jax_model))
    noise, keys = initial_noise(), _keys()
    whole = fn(noise, plan, keys)
    halves = jnp.concatenate([fn(noise[:1], plan, keys[:1]), fn(noise[1:], plan, keys[1:])])
    np.testing.assert_allclose(np.asarray(whole), np.asarray(halves), rtol=1e-6, atol=1e-6)


# --- registry, schedules, errors ------------------------------------------------------------------

FLOW_NAMES = ("flow_euler", "flow_euler_a", "flow_heun", "flow_dpmpp_2m", "flow_dpmpp_2m_sde",
              "flow_unipc")


def test_registry_lists_flow_samplers_and_only_they_are_flow():
    names = list_samplers()
    for name in FLOW_NAMES:
        assert name in names and get_sampler(name).flow
    for name in set(names) - set(FLOW_NAMES):
        assert get_sampler(name).flow is False
    assert get_sampler("flow_euler_a").stochastic and not get_sampler("flow_dpmpp_2m").stochastic


def test_samplers_refuse_the_other_kind_of_schedule():
    flow, noise = FlowSchedule(shift=3.0), NoiseSchedule()
    for name in ("euler", "ddim", "dpmpp_2m", "unipc", "pndm"):
        with pytest.raises(ValueError, match=f"sampler '{name}'.*FlowSchedule.*flow_euler"):
            get_sampler(name).plan(flow, 10)
    for name in FLOW_NAMES:
        with pytest.raises(ValueError, match=f"sampler '{name}'.*NoiseSchedule.*euler"):
            get_sampler(name).plan(noise, 10)


def test_existing_options_are_unchanged_by_flow_samplers():
    with pytest.raises(ValueError, match="karras"):
        get_sampler("flow_dpmpp_2m", karras=True)
    with pytest.raises(ValueError, match="schedule_sigmas"):
        get_sampler("dpmpp_2m", schedule_sigmas=True)
    assert options_for("dpmpp_2m", {"schedule_sigmas": False, "karras": True}) == (("karras", True),)
    assert options_for("flow_dpmpp_2m", {"schedule_sigmas": True, "karras": False}) == (
        ("schedule_sigmas", True),)


def test_the_denoiser_of_a_velocity_model_is_x_minus_sigma_v():
    denoise = samplers_lib.make_denoiser(lambda x, t: 2.0 * x + t, "flow")
    x = jnp.full((1, 2), 3.0)
    np.testing.assert_allclose(np.asarray(denoise(x, 0.75, 0.25, 1.0)), 3.0 - 0.25 * 7.0)


def saved_config(scheduler, folder) -> dict:
    """The scheduler_config.json diffusers writes (with _class_name), read back."""
    scheduler.save_config(folder)
    return json.loads((folder / "scheduler_config.json").read_text())


def test_schedule_from_diffusers_reads_flow_configs_and_refuses_what_it_lacks(tmp_path):
    sd3 = saved_config(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), tmp_path / "sd3")
    schedule = schedule_from_diffusers(sd3)
    assert isinstance(schedule, FlowSchedule) and schedule.shift == 3.0
    assert schedule.prediction_type == "flow" and schedule.base_sigmas == "scheduler"
    flux = schedule_from_diffusers(saved_config(diffusers.FlowMatchEulerDiscreteScheduler(**FLUX_DEV),
                                                tmp_path / "flux"), base_sigmas="linspace")
    assert flux.use_dynamic_shifting and flux.base_sigmas == "linspace"
    heun = schedule_from_diffusers(saved_config(diffusers.FlowMatchHeunDiscreteScheduler(shift=2.0),
                                                tmp_path / "heun"))
    assert isinstance(heun, FlowSchedule) and heun.shift == 2.0
    euler = saved_config(diffusers.EulerDiscreteScheduler(), tmp_path / "euler")
    assert isinstance(schedule_from_diffusers(euler), NoiseSchedule)
    for key, value in (("stochastic_sampling", True), ("invert_sigmas", True),
                       ("use_karras_sigmas", True), ("sigma_schedule", "x")):
        with pytest.raises(ValueError, match=f"FlowMatchEulerDiscreteScheduler.*{key}"):
            schedule_from_diffusers({**sd3, key: value})
    with pytest.raises(ValueError, match="time_shift_type"):
        schedule_from_diffusers({**sd3, "time_shift_type": "cubic"})
    with pytest.raises(ValueError, match="flow"):
        schedule_from_diffusers({"_class_name": "DPMSolverMultistepScheduler", "use_flow_sigmas": True})
    with pytest.raises(ValueError, match="for_image_tokens"):
        flux.sigmas(10)


# --- training helpers -----------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["sigma_sqrt", "cosmap", "none", "logit_normal"])
def test_loss_weighting_matches_diffusers(scheme):
    from diffusers.training_utils import compute_loss_weighting_for_sd3 as reference

    sigmas = np.linspace(0.05, 1.0, 7, dtype=np.float32)
    np.testing.assert_allclose(np.asarray(compute_loss_weighting_for_sd3(scheme, jnp.asarray(sigmas))),
                               reference(scheme, torch.from_numpy(sigmas)).numpy(), rtol=1e-6)


@pytest.mark.parametrize("scheme,kwargs", [("logit_normal", dict(logit_mean=0.3, logit_std=1.5)),
                                           ("mode", dict(mode_scale=1.29)), ("uniform", {}),
                                           ("cosmap", {})])
def test_density_matches_diffusers_given_the_same_base_draws(scheme, kwargs, monkeypatch):
    """diffusers draws with torch; fed the same standard normal / uniform numbers it must give ours."""
    from diffusers import training_utils

    key = jax.random.key(3)
    ours = np.asarray(compute_density_for_timestep_sampling(key, scheme, 64, **kwargs))
    normal = np.array(jax.random.normal(key, (64,)))
    uniform = np.array(jax.random.uniform(key, (64,)))
    monkeypatch.setattr(training_utils.torch, "normal", lambda mean, std, size, **_: torch.from_numpy(
        mean + std * normal))
    monkeypatch.setattr(training_utils.torch, "rand", lambda size, **_: torch.from_numpy(uniform))
    ref = training_utils.compute_density_for_timestep_sampling(scheme, 64, **kwargs).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)
    assert ours.shape == (64,) and np.all((ours >= 0) & (ours <= 1))
    with pytest.raises(ValueError, match="weighting_scheme"):
        compute_density_for_timestep_sampling(key, "logit", 4)


def test_training_levels_index_the_construction_table_as_the_scripts_do():
    """train_dreambooth_sd3.py / _flux.py: indices = (u * T).long(); timesteps[indices]; sigmas
    looked up at those timesteps."""
    u = np.array([0.0, 0.1234, 0.5, 0.999, 0.99999], np.float32)
    for config in (dict(shift=3.0), FLUX_DEV):
        ref = diffusers.FlowMatchEulerDiscreteScheduler(**config)
        indices = (torch.from_numpy(u) * ref.config.num_train_timesteps).long()
        ts, sigmas = flow_training_levels(FlowSchedule.from_diffusers(config), jnp.asarray(u))
        np.testing.assert_array_equal(np.asarray(ts), ref.timesteps[indices].numpy())
        np.testing.assert_array_equal(np.asarray(sigmas), ref.sigmas[indices].numpy())


@pytest.mark.parametrize("name", ["flow_euler", "flow_heun", "flow_dpmpp_2m", "flow_unipc"])
def test_shift_option_samples_as_a_model_with_that_static_shift(name):
    dynamic = FlowSchedule(shift=3.0, use_dynamic_shifting=True).for_image_tokens(1024)
    plan = get_sampler(name, shift=1.5).plan(dynamic, 6)
    same = get_sampler(name).plan(FlowSchedule(shift=1.5), 6)
    np.testing.assert_array_equal(plan.sigmas, same.sigmas)
    assert not np.array_equal(plan.sigmas, get_sampler(name).plan(dynamic, 6).sigmas)
    with pytest.raises(ValueError, match="shift=-1"):
        get_sampler(name, shift=-1)
