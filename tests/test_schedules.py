"""Golden tests of sdjax.diffusion.schedules against diffusers' schedulers' own tables."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import diffusers

from sdjax.diffusion.samplers import get_sampler
from sdjax.diffusion.schedules import NoiseSchedule, add_noise, karras_sigmas, spaced_timesteps

CONFIGS = {
    "sd_scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "linear": dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
    "sd_zero_snr": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        rescale_betas_zero_snr=True),
    "linear_500": dict(beta_schedule="linear", num_train_timesteps=500),
}
# Same float32 recipe as diffusers; torch.linspace differs from a correctly rounded linspace by up
# to a few ulp, which is what these tolerances allow (zero-SNR rescaling amplifies it at the tail).
RTOL = {"betas": 5e-7, "alphas_cumprod": 5e-7, "sigmas": 1e-6}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tables_match_diffusers(name):
    cfg = CONFIGS[name]
    ref = diffusers.EulerDiscreteScheduler(**cfg)
    ours = NoiseSchedule.from_diffusers(cfg)
    ddim = diffusers.DDIMScheduler(**cfg)
    if cfg.get("rescale_betas_zero_snr"):
        # Zero SNR: the float32 rescaling amplifies ulp differences of the input near t=T.
        np.testing.assert_allclose(ours.betas, ref.betas.numpy(), rtol=5e-4, atol=1e-7)
        np.testing.assert_allclose(ours.alphas_cumprod, ddim.alphas_cumprod.numpy(), rtol=1e-4, atol=1e-9)
        assert ours.alphas_cumprod[-1] == 0.0
    else:
        np.testing.assert_allclose(ours.betas, ref.betas.numpy(), rtol=RTOL["betas"])
        np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(),
                                   rtol=RTOL["alphas_cumprod"])
    np.testing.assert_allclose(ours.betas.sum(), ref.betas.numpy().sum(), rtol=1e-6)
    np.testing.assert_allclose(ours.alphas_cumprod.sum(), ddim.alphas_cumprod.numpy().sum(), rtol=1e-6)
    # EulerDiscreteScheduler's init table: sigmas descending with a trailing 0.
    rtol = 5e-5 if cfg.get("rescale_betas_zero_snr") else RTOL["sigmas"]
    np.testing.assert_allclose(ours.sigmas[::-1], ref.sigmas.numpy()[:-1], rtol=rtol)


def test_sd_schedule_sums_match_golden_values():
    """Numbers quoted from diffusers 0.42 for SD's schedule (T=1000, scaled_linear .00085-.012)."""
    s = NoiseSchedule.from_diffusers(CONFIGS["sd_scaled_linear"])
    ref = diffusers.DDIMScheduler(**CONFIGS["sd_scaled_linear"])
    assert s.betas.shape == (1000,) and s.betas.dtype == np.float32
    np.testing.assert_allclose(float(s.alphas_cumprod.sum()), float(ref.alphas_cumprod.sum()), rtol=1e-6)
    np.testing.assert_allclose(float(s.alphas_cumprod.sum()), 373.37646484375, rtol=1e-6)
    np.testing.assert_allclose(float(s.betas.sum()), 5.348992347717285, rtol=1e-6)
    np.testing.assert_allclose(s.sigmas[[0, -1]], [0.029167535, 14.614647], rtol=1e-6)


SPACING_CASES = [
    (diffusers.DDIMScheduler, {}, {}),
    (diffusers.EulerDiscreteScheduler, {"fractional": True}, {}),
    (diffusers.DPMSolverMultistepScheduler, {"drop_last_of": True}, {}),
    (diffusers.UniPCMultistepScheduler, {"drop_last_of": True}, {}),
]


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("num_steps", [1, 7, 10, 25, 50, 999])
@pytest.mark.parametrize("cls,kind,_", SPACING_CASES, ids=lambda c: getattr(c, "__name__", ""))
def test_timestep_spacings_match_diffusers(cls, kind, _, spacing, steps_offset, num_steps):
    if num_steps == 1 and cls in (diffusers.DPMSolverMultistepScheduler,):
        pytest.skip("diffusers' DPM-Solver needs >= 2 steps for its multistep grid")
    ref = cls(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=steps_offset)
    ref.set_timesteps(num_steps)
    ours = spaced_timesteps(num_steps, spacing, 1000, steps_offset, **kind)
    np.testing.assert_array_equal(ours, ref.timesteps.numpy().astype(np.float64))


@pytest.mark.parametrize("cls,name,options", [
    (diffusers.EulerDiscreteScheduler, "euler", {}),
    (diffusers.LMSDiscreteScheduler, "lms", {}),
    (diffusers.HeunDiscreteScheduler, "heun", {}),
    (diffusers.DPMSolverMultistepScheduler, "dpmpp_2m", {}),
    (diffusers.UniPCMultistepScheduler, "unipc", {}),
])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("karras", [False, True])
def test_plan_sigmas_and_timesteps_match_diffusers(cls, name, options, spacing, karras):
    cfg = dict(CONFIGS["sd_scaled_linear"], timestep_spacing=spacing, steps_offset=1)
    ref = cls(**cfg, use_karras_sigmas=karras)
    ref.set_timesteps(30)
    plan = get_sampler(name, karras=karras, **options).plan(NoiseSchedule.from_diffusers(cfg), 30)
    sig, ts = ref.sigmas.numpy(), ref.timesteps.numpy()
    if name == "heun":      # diffusers interleaves the two evaluations of each step
        sig, ts = np.r_[sig[0], sig[1::2]], np.r_[ts[0], ts[1::2]]
    np.testing.assert_allclose(np.asarray(plan.sigmas), sig, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(plan.timesteps[:-1]), ts.astype(np.float64), rtol=1e-6,
                               atol=1e-4)
    np.testing.assert_allclose(float(plan.init_noise_sigma), float(ref.init_noise_sigma), rtol=1e-6)


def test_karras_sigmas_follow_the_karras_formula():
    s = karras_sigmas(0.03, 14.6, 5)
    ramp = np.linspace(0, 1, 5)
    expect = (14.6 ** (1 / 7) + ramp * (0.03 ** (1 / 7) - 14.6 ** (1 / 7))) ** 7
    np.testing.assert_allclose(s, expect, rtol=1e-12)
    assert s[0] == pytest.approx(14.6) and s[-1] == pytest.approx(0.03)


def test_add_noise_matches_diffusers():
    cfg = CONFIGS["sd_scaled_linear"]
    ref = diffusers.DDIMScheduler(**cfg)
    ours = NoiseSchedule.from_diffusers(cfg)
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2, 4, 4, 3)).astype(np.float32), rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    t = np.array([10, 900])
    expect = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    got = add_noise(ours.alphas_cumprod, jnp.asarray(x0), jnp.asarray(noise), t)
    np.testing.assert_allclose(np.asarray(got), expect, rtol=1e-6, atol=1e-6)


def test_from_diffusers_reads_the_sd15_scheduler_config():
    cfg = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
           "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
           "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
           "steps_offset": 1, "trained_betas": None}
    s = NoiseSchedule.from_diffusers(cfg)
    assert (s.beta_schedule, s.steps_offset, s.set_alpha_to_one, s.timestep_spacing) == (
        "scaled_linear", 1, False, None)
    assert s.spacing("leading") == "leading" and s.spacing("linspace") == "linspace"
    assert hash(s) == hash(NoiseSchedule.from_diffusers(cfg))


@pytest.mark.parametrize("bad,match", [
    ({"beta_schedule": "cubic"}, "beta_schedule 'cubic'"),
    ({"timestep_spacing": "random"}, "timestep_spacing 'random'"),
    ({"prediction_type": "flow"}, "prediction_type 'flow'"),
    ({"thresholding": True}, "thresholding=True"),
    ({"clip_sample": True}, "clip_sample=True"),
    ({"variance_type": "learned_range"}, "variance_type='learned_range'"),
])
def test_from_diffusers_rejects_what_it_cannot_reproduce(bad, match):
    with pytest.raises(ValueError, match=match) as info:
        NoiseSchedule.from_diffusers({"_class_name": "DDIMScheduler", **bad})
    assert "DDIMScheduler" in str(info.value)
