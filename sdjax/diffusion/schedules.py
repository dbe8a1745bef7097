"""Discrete-time noise schedules: betas, alphas_cumprod, sigmas, timestep spacings, Karras and
exponential sigmas.

Everything here is numpy, computed once outside the sampling loop. The arithmetic follows
diffusers' dtype choices on purpose (betas and alphas_cumprod in float32, cumprod accumulated in
float64 as torch does on CPU, interpolation in float64 over the float32 sigma table), so the
tables agree with diffusers' schedulers to float32 rounding rather than to float64 truth.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Optional

import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def make_betas(beta_schedule: str, num_train_timesteps: int = 1000, beta_start: float = 0.0001,
               beta_end: float = 0.02) -> np.ndarray:
    """float32 betas of length `num_train_timesteps`, as diffusers' schedulers build them."""
    n = num_train_timesteps
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, n).astype(np.float32)
    if beta_schedule == "scaled_linear":
        root = np.linspace(beta_start**0.5, beta_end**0.5, n).astype(np.float32)
        return np.square(root)
    if beta_schedule == "squaredcos_cap_v2":
        # Nichol & Dhariwal 2021, cosine alpha_bar with s=0.008, each beta capped at 0.999.
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
        return np.asarray(betas, dtype=np.float32)
    raise ValueError(f"beta_schedule {beta_schedule!r} is not one of {BETA_SCHEDULES}")


def cumprod_alphas(betas: np.ndarray) -> np.ndarray:
    alphas = np.float32(1.0) - np.asarray(betas, np.float32)
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed"), Algorithm 1."""
    sqrt_ab = np.sqrt(cumprod_alphas(betas))
    first, last = sqrt_ab[0].copy(), sqrt_ab[-1].copy()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab**2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


def spaced_timesteps(num_steps: int, spacing: str, num_train_timesteps: int = 1000,
                     steps_offset: int = 0, *, fractional: bool = False,
                     drop_last_of: bool = False) -> np.ndarray:
    """Descending inference timesteps (float64 array), following diffusers' three spacings.

    fractional: linspace is left unrounded (the Euler/LMS/Heun family) instead of rounded to ints.
    drop_last_of: the DPM-Solver/UniPC grid, `num_steps + 1` points of which the last is dropped.
    """
    n, T = num_steps, num_train_timesteps
    if n < 1 or n > T:
        raise ValueError(f"num_steps={n} must be in [1, num_train_timesteps={T}]")
    m = n + 1 if drop_last_of else n
    if spacing == "linspace":
        if fractional:
            ts = np.linspace(0, T - 1, m, dtype=np.float32)[::-1].astype(np.float64)
        else:
            ts = np.linspace(0, T - 1, m).round()[::-1]
    elif spacing == "leading":
        ts = (np.arange(0, m) * (T // m)).round()[::-1].astype(np.float64) + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / n)) - 1.0
        return ts.astype(np.float64)
    else:
        raise ValueError(f"timestep_spacing {spacing!r} is not one of {TIMESTEP_SPACINGS}")
    return (ts[:-1] if drop_last_of else ts).copy()


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 (EDM) eq. 5: sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho."""
    ramp = np.linspace(0, 1, num_steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, num_steps: int) -> np.ndarray:
    """Log-uniform sigmas, exp(linspace(log max, log min, n)) (k-diffusion get_sigmas_exponential;
    diffusers' use_exponential_sigmas, whose numpy float64 arithmetic this is)."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_steps))


SIGMA_SPACINGS = {"karras": karras_sigmas, "exponential": exponential_sigmas}


def sigma_to_t(sigmas: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timesteps of `sigmas` by linear interpolation in log-sigma (diffusers' _sigma_to_t)."""
    sigmas = np.asarray(sigmas, np.float64)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma[None, :] - log_train_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_train_sigmas.shape[0] - 2)
    lo, hi = log_train_sigmas[low], log_train_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """The training noise schedule of a checkpoint plus the inference settings its config carries.

    `timestep_spacing` and `set_alpha_to_one` may be None: each sampler then uses the default of its
    diffusers counterpart, which is what diffusers does when a config lacks the key.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: Optional[tuple[float, ...]] = None
    prediction_type: str = "epsilon"
    rescale_betas_zero_snr: bool = False
    timestep_spacing: Optional[str] = None
    steps_offset: int = 0
    set_alpha_to_one: Optional[bool] = None

    def __post_init__(self):
        if self.trained_betas is None and self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule {self.beta_schedule!r} is not one of {BETA_SCHEDULES}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {self.prediction_type!r} is not one of {PREDICTION_TYPES}")
        if self.timestep_spacing is not None and self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(
                f"timestep_spacing {self.timestep_spacing!r} is not one of {TIMESTEP_SPACINGS}")
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            raise ValueError(f"trained_betas has {len(self.trained_betas)} entries, "
                             f"num_train_timesteps is {self.num_train_timesteps}")

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> "NoiseSchedule":
        """From a diffusers `scheduler_config.json` dict (any scheduler class).

        Keys that would change the numbers but that sdjax does not implement are errors. Like the
        class name, `use_karras_sigmas` / `use_exponential_sigmas` choose how a sampler spaces its
        sigmas, not the training schedule: sdjax takes them from the sampler's options
        (`karras=True`, `exponential=True`), and only checks here that they do not conflict.
        """
        where = f"scheduler config ({config.get('_class_name', 'unknown class')})"
        if config.get("use_karras_sigmas") and config.get("use_exponential_sigmas"):
            raise ValueError(f"{where}: use_karras_sigmas and use_exponential_sigmas are both true; "
                             "at most one sigma spacing can be used")
        for key, ok in (("thresholding", False), ("clip_sample", False), ("use_beta_sigmas", False),
                        ("timestep_type", "discrete"), ("interpolation_type", "linear"),
                        ("final_sigmas_type", "zero"), ("variance_type", None)):
            value = config.get(key, ok)
            if key == "variance_type" and value in (None, "fixed_small"):
                continue
            if value != ok:
                raise ValueError(f"{where}: {key}={value!r} is not supported (only {ok!r})")
        trained = config.get("trained_betas")
        kwargs = dict(
            num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
            beta_start=float(config.get("beta_start", 0.0001)),
            beta_end=float(config.get("beta_end", 0.02)),
            beta_schedule=str(config.get("beta_schedule", "linear")),
            trained_betas=None if trained is None else tuple(float(b) for b in trained),
            prediction_type=str(config.get("prediction_type", "epsilon")),
            rescale_betas_zero_snr=bool(config.get("rescale_betas_zero_snr", False)),
            timestep_spacing=config.get("timestep_spacing"),
            steps_offset=int(config.get("steps_offset", 0)),
            set_alpha_to_one=config.get("set_alpha_to_one"),
        )
        try:
            return cls(**kwargs)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None

    @functools.cached_property
    def betas(self) -> np.ndarray:
        if self.trained_betas is not None:
            betas = np.asarray(self.trained_betas, np.float32)
        else:
            betas = make_betas(self.beta_schedule, self.num_train_timesteps, self.beta_start,
                               self.beta_end)
        return rescale_zero_terminal_snr(betas) if self.rescale_betas_zero_snr else betas

    @functools.cached_property
    def alphas_cumprod(self) -> np.ndarray:
        """float32 alpha-bar_t, t = 0..T-1 (exactly 0 at T-1 under zero-terminal-SNR)."""
        return cumprod_alphas(self.betas)

    @functools.cached_property
    def alphas_cumprod_for_sigmas(self) -> np.ndarray:
        # A zero terminal SNR makes sigma_T infinite; diffusers' sigma-space schedulers use 2^-24.
        ab = self.alphas_cumprod.copy()
        if self.rescale_betas_zero_snr:
            ab[-1] = 2.0**-24
        return ab

    @functools.cached_property
    def sigmas(self) -> np.ndarray:
        """float32 sigma_t = sqrt((1 - alpha-bar_t) / alpha-bar_t), ascending in t."""
        ab = self.alphas_cumprod_for_sigmas
        return np.sqrt((np.float32(1) - ab) / ab)

    def spacing(self, default: str) -> str:
        return self.timestep_spacing if self.timestep_spacing is not None else default

    def sigmas_at(self, timesteps: np.ndarray) -> np.ndarray:
        """Sigmas at (possibly fractional) timesteps, linearly interpolated in t as diffusers does."""
        return np.interp(np.asarray(timesteps, np.float64), np.arange(len(self.sigmas)),
                         self.sigmas.astype(np.float64))


def add_noise(alphas_cumprod, x0: jnp.ndarray, noise: jnp.ndarray, t) -> jnp.ndarray:
    """Forward process q(x_t | x_0) = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise, t an int (or per-image ints)."""
    ab = jnp.asarray(alphas_cumprod, jnp.float32)[jnp.asarray(t)]
    ab = jnp.reshape(ab, jnp.shape(ab) + (1,) * (x0.ndim - jnp.ndim(ab)))
    # float32 arithmetic whatever the storage dtype (bf16 training), returned in x0's dtype.
    noisy = jnp.sqrt(ab) * x0.astype(jnp.float32) + jnp.sqrt(1 - ab) * noise.astype(jnp.float32)
    return noisy.astype(x0.dtype)
