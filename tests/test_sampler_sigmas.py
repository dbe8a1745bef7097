"""Karras and exponential sigma spacings on every sampler that diffusers allows them on, and the
noise options of the ancestral and SDE samplers (eta, s_noise).

Spacings are checked against diffusers' schedulers (`use_karras_sigmas` / `use_exponential_sigmas`):
plan tables, then whole trajectories through tests/test_samplers.py's comparison (same fake model,
same injected noise). diffusers has no eta on Euler ancestral and no s_noise anywhere, so those are
checked against numpy transcriptions of k-diffusion's samplers, and s_noise also against diffusers
driven with noise scaled by s_noise (the one place each of its samplers uses the noise)."""
import functools

import diffusers
import jax
import numpy as np
import pytest

from sdjax.diffusion.samplers import get_sampler, options_for, parse_sampler, sample
from sdjax.diffusion.schedules import NoiseSchedule, exponential_sigmas, karras_sigmas
from tests import test_samplers as parity
from tests.test_schedules import CONFIGS

SPACINGS = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas"}
DPM = diffusers.DPMSolverMultistepScheduler
# sdjax name -> diffusers class and config: every sampler whose diffusers scheduler takes both.
RESPACEABLE = {
    "euler": (diffusers.EulerDiscreteScheduler, {}),
    "heun": (diffusers.HeunDiscreteScheduler, {}),
    "lms": (diffusers.LMSDiscreteScheduler, {}),
    "dpmpp_2m": (DPM, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_sde": (DPM, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "dpmpp_3m_sde": (DPM, {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
    "unipc": (diffusers.UniPCMultistepScheduler, {}),
}
# diffusers' schedulers of these have neither option.
NOT_RESPACEABLE = ("euler_a", "ddim", "ddpm", "pndm")


def _case(monkeypatch, name, options, extra=None):
    """Registers a case in tests/test_samplers.py's CASES for this test; returns its key."""
    cls, config = RESPACEABLE.get(name) or (diffusers.EulerAncestralDiscreteScheduler, {})
    key = f"{name}:{sorted(options.items())}"
    monkeypatch.setitem(parity.CASES, key, (name, options, cls, {**config, **(extra or {})}))
    return key


# --- tables ---------------------------------------------------------------------------------------

def test_exponential_sigmas_are_log_uniform_between_the_ends():
    s = exponential_sigmas(0.03, 14.6, 6)
    np.testing.assert_allclose(s[[0, -1]], [14.6, 0.03], rtol=1e-14)
    ratios = s[1:] / s[:-1]
    np.testing.assert_allclose(ratios, (0.03 / 14.6) ** (1 / 5), rtol=1e-13)


TABLE_CONFIGS = ("sd_scaled_linear", "linear", "cosine")


@pytest.mark.parametrize("config", TABLE_CONFIGS)
@pytest.mark.parametrize("timestep_spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("spacing", sorted(SPACINGS))
@pytest.mark.parametrize("name", ["euler", "heun", "lms", "dpmpp_2m", "unipc"])
def test_respaced_plan_tables_match_diffusers(name, spacing, timestep_spacing, config):
    cls, extra = RESPACEABLE[name]
    cfg = dict(CONFIGS[config], timestep_spacing=timestep_spacing, steps_offset=1)
    ref = cls(**cfg, **extra, **{SPACINGS[spacing]: True})
    ref.set_timesteps(30)
    plan = get_sampler(name, **{spacing: True}).plan(NoiseSchedule.from_diffusers(cfg), 30)
    sig, ts = ref.sigmas.numpy(), ref.timesteps.numpy().astype(np.float64)
    if name == "heun":      # diffusers interleaves the two evaluations of each step
        sig, ts = np.r_[sig[0], sig[1::2]], np.r_[ts[0], ts[1::2]]
    np.testing.assert_allclose(np.asarray(plan.sigmas), sig, rtol=1e-6)
    ours_ts = np.asarray(plan.timesteps[:-1], np.float64)
    if cls in (DPM, diffusers.UniPCMultistepScheduler):     # integer timesteps, rounded or cut
        np.testing.assert_array_equal(ours_ts, ts)
    else:                   # fractional, float32: 1e-4 is one float32 ulp at t ~ 1000
        np.testing.assert_allclose(ours_ts, ts, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(float(plan.init_noise_sigma), float(ref.init_noise_sigma), rtol=1e-6)


def test_karras_and_exponential_plans_share_the_end_sigmas():
    schedule = NoiseSchedule.from_diffusers(parity._sd_config())
    for name in RESPACEABLE:
        plain = np.asarray(get_sampler(name).plan(schedule, 20).sigmas)
        for spacing, fn in (("karras", karras_sigmas), ("exponential", exponential_sigmas)):
            s = np.asarray(get_sampler(name, **{spacing: True}).plan(schedule, 20).sigmas)
            if name.startswith(("dpmpp", "unipc")):     # these span the whole training table
                lo, hi = schedule.sigmas[0], schedule.sigmas[-1]
            else:
                lo, hi = plain[-2], plain[0]
            np.testing.assert_allclose(s[:-1], fn(float(lo), float(hi), 20), rtol=1e-6)
            assert s[-1] == 0.0


# --- trajectories ---------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction_type", parity.PREDICTION_TYPES)
@pytest.mark.parametrize("num_steps", [10, 25])
@pytest.mark.parametrize("spacing", sorted(SPACINGS))
@pytest.mark.parametrize("name", sorted(RESPACEABLE))
def test_respaced_trajectory_matches_diffusers(name, spacing, num_steps, prediction_type,
                                               monkeypatch, record_property):
    case = _case(monkeypatch, name, {spacing: True}, {SPACINGS[spacing]: True})
    ours = parity.run_sdjax(case, num_steps, prediction_type)
    ref = parity.run_diffusers(case, num_steps, prediction_type, monkeypatch)
    assert ours.shape == ref.shape
    err = parity.rel_err(ours, ref)
    record_property("rel_err", err)
    assert err <= parity.RTOL, f"{name} {spacing} {num_steps} steps {prediction_type}: {err:.2e}"


# --- eta and s_noise ------------------------------------------------------------------------------

def _k_denoiser(prediction_type):
    """k-diffusion's DiscreteEpsDDPMDenoiser / DiscreteVDDPMDenoiser on the fake model, float64."""
    def denoise(x, sigma, t):
        c_in = 1 / np.sqrt(sigma**2 + 1)
        out = parity.fake_model(x * c_in, np.float64(t), np)
        if prediction_type == "epsilon":
            return x - sigma * out
        return x / (sigma**2 + 1) - out * sigma * c_in
    return denoise


def k_euler_ancestral(denoise, x, sigmas, ts, noises, eta, s_noise):
    """k-diffusion sampling.py sample_euler_ancestral with get_ancestral_step, transcribed."""
    outs = []
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i], ts[i])
        s_from, s_to = sigmas[i], sigmas[i + 1]
        sigma_up = min(s_to, eta * (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** 0.5) if eta else 0.0
        sigma_down = (s_to**2 - sigma_up**2) ** 0.5
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noises[i] * s_noise * sigma_up
        outs.append(x)
    return np.stack(outs)


def k_dpmpp_2m_sde(denoise, x, sigmas, ts, noises, s_noise, eta=1.0):
    """k-diffusion sampling.py sample_dpmpp_2m_sde(eta, s_noise, solver_type='midpoint')."""
    outs, old_denoised, h_last = [], None, None
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i], ts[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -np.log(sigmas[i]), -np.log(sigmas[i + 1])
            h = s - t
            eta_h = eta * h
            x = sigmas[i + 1] / sigmas[i] * np.exp(-eta_h) * x + -np.expm1(-h - eta_h) * denoised
            if old_denoised is not None:
                r = h_last / h
                x = x + 0.5 * -np.expm1(-h - eta_h) * (1 / r) * (denoised - old_denoised)
            if eta:
                x = x + noises[i] * sigmas[i + 1] * np.sqrt(-np.expm1(-2 * eta_h)) * s_noise
            h_last = h
        old_denoised = denoised
        outs.append(x)
    return np.stack(outs)


def _sdjax_trajectory(name, options, num_steps, prediction_type):
    sampler = get_sampler(name, **options)
    config = {**parity._sd_config(), "prediction_type": prediction_type}
    schedule = NoiseSchedule.from_diffusers(config)
    plan = sampler.plan(schedule, num_steps)
    fn = jax.jit(functools.partial(sample, sampler, parity.jax_model, return_trajectory=True))
    _, traj = fn(parity.initial_noise(), plan, parity._keys() if sampler.stochastic else None)
    return np.asarray(traj, np.float64)


def _reference_levels(cls, extra, num_steps):
    sched = cls.from_config({**parity.SD_CONFIG, **extra})
    sched.set_timesteps(num_steps)
    return (sched.sigmas.numpy().astype(np.float64), sched.timesteps.numpy().astype(np.float64),
            float(sched.init_noise_sigma))


@pytest.mark.parametrize("prediction_type", parity.PREDICTION_TYPES)
@pytest.mark.parametrize("eta,s_noise", [(1.0, 1.0), (0.5, 1.0), (0.5, 0.7), (1.0, 0.0), (0.0, 1.0),
                                         (1.5, 1.0)])
def test_euler_ancestral_eta_and_s_noise_match_k_diffusion(eta, s_noise, prediction_type):
    n = 12
    sigmas, ts, init = _reference_levels(diffusers.EulerAncestralDiscreteScheduler, {}, n)
    noise = np.asarray(parity.initial_noise(), np.float64)
    step_noise = parity._all_step_noise(n).astype(np.float64)
    ref = k_euler_ancestral(_k_denoiser(prediction_type), noise * init, sigmas, ts, step_noise,
                            eta, s_noise)
    ours = _sdjax_trajectory("euler_a", {"eta": eta, "s_noise": s_noise}, n, prediction_type)
    assert parity.rel_err(ours, ref) <= parity.RTOL


@pytest.mark.parametrize("spacing", [None, "karras"])
@pytest.mark.parametrize("s_noise", [1.0, 0.5, 0.0])
def test_dpmpp_2m_sde_s_noise_matches_k_diffusion(s_noise, spacing):
    n = 12
    options = {"s_noise": s_noise, **({spacing: True} if spacing else {})}
    extra = {**RESPACEABLE["dpmpp_2m_sde"][1], **({SPACINGS[spacing]: True} if spacing else {})}
    sigmas, ts, _ = _reference_levels(DPM, extra, n)
    noise = np.asarray(parity.initial_noise(), np.float64)
    step_noise = parity._all_step_noise(n).astype(np.float64)
    # k-diffusion runs in VE space (x = x0 + sigma eps); sdjax's DPM-Solver in VP space, that x
    # over sqrt(sigma^2 + 1).
    ref = k_dpmpp_2m_sde(_k_denoiser("epsilon"), noise * np.sqrt(sigmas[0] ** 2 + 1), sigmas, ts,
                         step_noise, s_noise)
    ref = ref / np.sqrt(sigmas[1:] ** 2 + 1)[:, None, None, None, None]
    ours = _sdjax_trajectory("dpmpp_2m_sde", options, n, "epsilon")
    assert parity.rel_err(ours, ref) <= parity.RTOL


@pytest.mark.parametrize("name", ["euler_a", "dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_s_noise_is_diffusers_with_its_noise_scaled(name, monkeypatch):
    """Each of these adds its noise once per step, linearly: s_noise scales that draw."""
    unscaled = parity._all_step_noise
    monkeypatch.setattr(parity, "_all_step_noise", lambda calls: 0.6 * unscaled(calls))
    case = _case(monkeypatch, name, {"s_noise": 0.6})
    for n in (10, 25):
        ref = parity.run_diffusers(case, n, "epsilon", monkeypatch)
        assert parity.rel_err(parity.run_sdjax(case, n, "epsilon"), ref) <= parity.RTOL


def test_default_noise_options_keep_todays_numbers():
    schedule = NoiseSchedule.from_diffusers(parity._sd_config())
    plan = get_sampler("euler_a").plan(schedule, 20)
    s = np.asarray(plan.sigmas, np.float64)
    s_from, s_to = s[:-1], s[1:]
    sigma_up = np.sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2)     # diffusers' formula
    np.testing.assert_array_equal(np.asarray(plan.coeffs["noise"]), sigma_up.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(plan.coeffs["sigma_down"]),
                                  np.sqrt(s_to**2 - sigma_up**2).astype(np.float32))
    assert get_sampler("euler_a") == get_sampler("euler_a", eta=1.0, s_noise=1.0)
    assert get_sampler("dpmpp_2m_sde") == get_sampler("dpmpp_2m_sde", s_noise=1.0)
    assert get_sampler("euler_a").stochastic and get_sampler("dpmpp_3m_sde").stochastic


def test_euler_ancestral_without_noise_is_euler():
    a = _sdjax_trajectory("euler_a", {"eta": 0.0}, 10, "epsilon")
    b = _sdjax_trajectory("euler", {}, 10, "epsilon")
    assert not get_sampler("euler_a", eta=0.0).stochastic
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


# --- options and their errors ---------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(RESPACEABLE))
def test_karras_and_exponential_together_is_an_error_naming_both(name):
    with pytest.raises(ValueError) as info:
        get_sampler(name, karras=True, exponential=True)
    for word in (repr(name), "karras", "exponential"):
        assert word in str(info.value)


@pytest.mark.parametrize("option", ["karras", "exponential"])
@pytest.mark.parametrize("name", NOT_RESPACEABLE)
def test_spacing_on_a_sampler_without_it_is_an_error_naming_both(name, option):
    with pytest.raises(ValueError, match=rf"sampler '{name}' has no option\(s\) \['{option}'\]"):
        get_sampler(name, **{option: True})
    with pytest.raises(ValueError, match=rf"'{name}'.*'{option}'"):
        options_for(name, {option: True})


@pytest.mark.parametrize("name,options,words", [
    ("euler_a", {"eta": -0.5}, ["eta=-0.5"]),
    ("euler_a", {"s_noise": -1.0}, ["s_noise=-1.0"]),
    ("dpmpp_3m_sde", {"s_noise": "loud"}, ["s_noise='loud'"]),
    ("dpmpp_2m", {"s_noise": 0.5}, ["no option", "s_noise"]),      # an ODE: nothing to scale
    ("euler", {"eta": 0.5}, ["no option", "eta"]),
    ("unipc", {"s_noise": 0.5}, ["no option", "s_noise"]),
])
def test_bad_noise_options_are_errors_naming_sampler_and_option(name, options, words):
    with pytest.raises(ValueError) as info:
        get_sampler(name, **options)
    for word in [repr(name), *words]:
        assert word in str(info.value)


def test_options_for_drops_only_neutral_options_a_sampler_lacks():
    shared = {"karras": False, "exponential": False, "s_noise": 1.0}
    assert options_for("ddim", shared) == ()
    assert options_for("euler", shared) == (("exponential", False), ("karras", False))
    assert options_for("euler_a", shared) == (("s_noise", 1.0),)
    with pytest.raises(ValueError, match="'euler'.*s_noise"):
        options_for("euler", {"s_noise": 0.5})
    name, options = parse_sampler("dpmpp_2m_sde:exponential=true,s_noise=0.8")
    assert get_sampler(name, **dict(options)) == get_sampler(
        "dpmpp_2m_sde", exponential=True, s_noise=0.8)


def test_scheduler_configs_with_exponential_sigmas_are_read():
    base = dict(CONFIGS["sd_scaled_linear"], _class_name="EulerDiscreteScheduler")
    plain = NoiseSchedule.from_diffusers(base)
    assert NoiseSchedule.from_diffusers({**base, "use_exponential_sigmas": True}) == plain
    with pytest.raises(ValueError) as info:
        NoiseSchedule.from_diffusers({**base, "use_karras_sigmas": True,
                                      "use_exponential_sigmas": True})
    for word in ("EulerDiscreteScheduler", "use_karras_sigmas", "use_exponential_sigmas"):
        assert word in str(info.value)
