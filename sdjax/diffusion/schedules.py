"""Discrete-time noise schedules: betas, alphas_cumprod, sigmas, timestep spacings, Karras and
exponential sigmas; flow-matching schedules (FlowSchedule: static and dynamic shifts) and their
training helpers.

Everything here is numpy, computed once outside the sampling loop. The arithmetic follows
diffusers' dtype choices on purpose (betas and alphas_cumprod in float32, cumprod accumulated in
float64 as torch does on CPU, interpolation in float64 over the float32 sigma table), so the
tables agree with diffusers' schedulers to float32 rounding rather than to float64 truth.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar, Mapping, Optional

import jax
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


# --- flow matching (rectified flow: x = (1 - sigma) x0 + sigma noise) ------------------------------

TIME_SHIFT_TYPES = ("exponential", "linear")
# "scheduler": FlowMatchEulerDiscreteScheduler.set_timesteps(N) without sigmas (the SD3 pipelines);
# "linspace": sigmas=np.linspace(1, 1/N, N) handed to set_timesteps (the Flux pipelines).
FLOW_BASE_SIGMAS = ("scheduler", "linspace")
# diffusers' FlowMatchEulerDiscreteScheduler / FlowMatchHeunDiscreteScheduler config keys; those
# that sdjax reads only to refuse a value other than the one it implements are in _FLOW_FIXED.
_FLOW_KEYS = ("num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift",
              "base_image_seq_len", "max_image_seq_len", "shift_terminal", "time_shift_type")
_FLOW_FIXED = {"invert_sigmas": False, "use_karras_sigmas": False, "use_exponential_sigmas": False,
               "use_beta_sigmas": False, "stochastic_sampling": False}


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """mu of the resolution-dependent shift: linear in the image's token count (diffusers'
    pipeline_flux.calculate_shift, the same in the SD3 pipelines; float64 as there)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


@dataclasses.dataclass(frozen=True)
class FlowSchedule:
    """A flow-matching model's schedule: diffusers' FlowMatchEulerDiscreteScheduler settings, plus
    how a pipeline picks its base sigmas (`base_sigmas`) and, for dynamic shifting, the image's
    latent token count (`image_seq_len`, set with `for_image_tokens`).

    Arithmetic follows diffusers' dtypes: the "scheduler" sigmas are float64 until the float32
    cast, the "linspace" sigmas are float32 throughout (numpy keeps float32 arrays float32 under
    Python scalars), timesteps are float32 sigma times num_train_timesteps.
    """

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: Optional[float] = 0.5
    max_shift: Optional[float] = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    shift_terminal: Optional[float] = None
    time_shift_type: str = "exponential"
    base_sigmas: str = "scheduler"
    image_seq_len: Optional[int] = None

    prediction_type: ClassVar[str] = "flow"

    def __post_init__(self):
        if self.time_shift_type not in TIME_SHIFT_TYPES:
            raise ValueError(f"time_shift_type {self.time_shift_type!r} is not one of {TIME_SHIFT_TYPES}")
        if self.base_sigmas not in FLOW_BASE_SIGMAS:
            raise ValueError(f"base_sigmas {self.base_sigmas!r} is not one of {FLOW_BASE_SIGMAS}")
        if isinstance(self.num_train_timesteps, bool) or not isinstance(self.num_train_timesteps, int) \
                or self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps={self.num_train_timesteps!r} must be an int >= 1")
        if not self.shift > 0:
            raise ValueError(f"shift={self.shift!r} must be > 0")
        if self.shift_terminal and not 0 < self.shift_terminal < 1:
            raise ValueError(f"shift_terminal={self.shift_terminal!r} must be in (0, 1)")
        if self.image_seq_len is not None and (isinstance(self.image_seq_len, bool) or not
                                               isinstance(self.image_seq_len, int) or self.image_seq_len < 1):
            raise ValueError(f"image_seq_len={self.image_seq_len!r} must be an int >= 1")

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], base_sigmas: str = "scheduler") -> "FlowSchedule":
        """From a FlowMatchEulerDiscreteScheduler / FlowMatchHeunDiscreteScheduler config dict.

        base_sigmas is the pipeline's choice, not the config's: "scheduler" for SD3, "linspace" for
        Flux. Unknown keys, and settings sdjax does not implement, are errors naming the key.
        """
        where = f"scheduler config ({config.get('_class_name', 'unknown class')})"
        for key in config:
            if not key.startswith("_") and key not in _FLOW_KEYS and key not in _FLOW_FIXED:
                raise ValueError(f"{where}: unknown key {key!r} for a flow-matching schedule")
        for key, ok in _FLOW_FIXED.items():
            if config.get(key, ok) != ok:
                raise ValueError(f"{where}: {key}={config[key]!r} is not supported (only {ok!r})")
        kwargs = {key: config[key] for key in _FLOW_KEYS if key in config}
        try:
            return cls(**kwargs, base_sigmas=base_sigmas)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from None

    def for_image_tokens(self, image_seq_len: int) -> "FlowSchedule":
        """This schedule for an image of `image_seq_len` latent tokens ((h/2)*(w/2) for 2x2 patches)."""
        return dataclasses.replace(self, image_seq_len=image_seq_len)

    @property
    def mu(self) -> Optional[float]:
        """The dynamic shift's mu for `image_seq_len` (None without dynamic shifting)."""
        if not self.use_dynamic_shifting:
            return None
        if self.image_seq_len is None:
            raise ValueError("use_dynamic_shifting needs the image's token count: call "
                             "schedule.for_image_tokens(n) first")
        if self.base_shift is None or self.max_shift is None:
            raise ValueError("use_dynamic_shifting needs base_shift and max_shift (the config has None)")
        return calculate_shift(self.image_seq_len, self.base_image_seq_len, self.max_image_seq_len,
                               self.base_shift, self.max_shift)

    @functools.cached_property
    def training_sigmas(self) -> np.ndarray:
        """float32 (T,) descending: the scheduler's construction table (statically shifted; left
        unshifted under dynamic shifting, as diffusers' __init__ does), which training samples."""
        T = self.num_train_timesteps
        sigmas = np.linspace(1, T, T, dtype=np.float32)[::-1] / np.float32(T)
        if not self.use_dynamic_shifting:
            sigmas = self.shift * sigmas / (1 + (self.shift - 1) * sigmas)
        return sigmas.astype(np.float32)

    def shift_sigmas(self, sigmas: np.ndarray) -> np.ndarray:
        """set_timesteps' shift of base sigmas (static, or dynamic with mu), then the shift_terminal
        stretch; in the dtype of `sigmas`, as diffusers computes it."""
        if self.use_dynamic_shifting:
            mu = self.mu
            if self.time_shift_type == "exponential":
                sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
            else:
                sigmas = mu / (mu + (1 / sigmas - 1) ** 1.0)
        else:
            sigmas = self.shift * sigmas / (1 + (self.shift - 1) * sigmas)
        if self.shift_terminal:
            # LTX-Video's stretch: the last sigma becomes shift_terminal, the first stays.
            one_minus = 1 - sigmas
            if one_minus[-1] == 0:
                raise ValueError(f"shift_terminal={self.shift_terminal} cannot stretch sigmas that end "
                                 "at 1 (a single step): use more steps or no shift_terminal")
            sigmas = 1 - one_minus / (one_minus[-1] / (1 - self.shift_terminal))
        return sigmas

    def sigmas(self, num_steps: int) -> np.ndarray:
        """(N+1,) float64 sigmas of N steps, ending in 0: the values of diffusers' float32 table."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
            raise ValueError(f"num_steps={num_steps!r} must be an int >= 1")
        T = self.num_train_timesteps
        if self.base_sigmas == "scheduler":
            train = self.training_sigmas
            base = np.linspace(float(train[0]) * T, float(train[-1]) * T, num_steps) / T
        else:
            base = np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32)
        shifted = self.shift_sigmas(base).astype(np.float32)
        return np.append(shifted.astype(np.float64), 0.0)

    def timesteps(self, sigmas: np.ndarray) -> np.ndarray:
        """The model's timesteps of `sigmas`: float32 sigma * num_train_timesteps, in float32."""
        return np.asarray(sigmas, np.float32) * np.float32(self.num_train_timesteps)


def schedule_from_diffusers(config: Mapping[str, Any], base_sigmas: str = "scheduler"):
    """FlowSchedule for FlowMatch* scheduler configs, NoiseSchedule for the others."""
    name = str(config.get("_class_name", ""))
    if name.startswith("FlowMatch"):
        return FlowSchedule.from_diffusers(config, base_sigmas)
    if config.get("use_flow_sigmas") or config.get("prediction_type") == "flow_prediction":
        raise ValueError(f"scheduler config ({name or 'unknown class'}): flow sigmas / flow_prediction "
                         "are read from FlowMatch* scheduler configs only; use "
                         "FlowMatchEulerDiscreteScheduler's config with the model's shift")
    return NoiseSchedule.from_diffusers(config)


def flow_add_noise(x0: jax.Array, noise: jax.Array, sigma) -> jax.Array:
    """Rectified flow's forward process (1 - sigma) x0 + sigma noise (diffusers' scale_noise),
    sigma a scalar or one per example; float32 arithmetic, returned in x0's dtype."""
    sigma = jnp.asarray(sigma, jnp.float32)
    sigma = jnp.reshape(sigma, jnp.shape(sigma) + (1,) * (x0.ndim - jnp.ndim(sigma)))
    noisy = (1.0 - sigma) * x0.astype(jnp.float32) + sigma * noise.astype(jnp.float32)
    return noisy.astype(x0.dtype)


def flow_training_levels(schedule: FlowSchedule, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(timesteps, sigmas) of training draws u in [0, 1): the diffusers SD3/Flux training scripts'
    indices = (u * T).long() into the scheduler's construction table (`training_sigmas`)."""
    T = schedule.num_train_timesteps
    sigmas = jnp.asarray(schedule.training_sigmas)
    index = jnp.clip((jnp.asarray(u, jnp.float32) * T).astype(jnp.int32), 0, T - 1)
    sigma = sigmas[index]
    return sigma * jnp.float32(T), sigma


DENSITY_SCHEMES = ("logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap", "none")


def compute_density_for_timestep_sampling(key: jax.Array, weighting_scheme: str, batch_size: int,
                                          logit_mean: float = 0.0, logit_std: float = 1.0,
                                          mode_scale: float = 1.29) -> jax.Array:
    """(batch_size,) training draws u in [0, 1] (Esser et al. 2024, SD3, sec. 3.1; diffusers'
    training_utils function of this name): sigmoid of a normal(logit_mean, logit_std)
    ("logit_normal"), the mode-centred density ("mode", mode_scale), or uniform. As in diffusers'
    scripts, the loss-weighting names ("sigma_sqrt", "cosmap", "none") sample uniformly."""
    if weighting_scheme not in DENSITY_SCHEMES:
        raise ValueError(f"weighting_scheme {weighting_scheme!r} is not one of {DENSITY_SCHEMES}")
    if weighting_scheme == "logit_normal":
        return jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(key, (batch_size,)))
    u = jax.random.uniform(key, (batch_size,))
    if weighting_scheme == "mode":
        return 1 - u - mode_scale * (jnp.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def compute_loss_weighting_for_sd3(weighting_scheme: str, sigmas: jax.Array) -> jax.Array:
    """Per-example loss weights of SD3 training (diffusers' training_utils function of this name):
    sigma^-2 ("sigma_sqrt"), 2 / (pi (1 - 2 sigma + 2 sigma^2)) ("cosmap"), else ones."""
    if weighting_scheme not in DENSITY_SCHEMES:
        raise ValueError(f"weighting_scheme {weighting_scheme!r} is not one of {DENSITY_SCHEMES}")
    sigmas = jnp.asarray(sigmas, jnp.float32)
    if weighting_scheme == "sigma_sqrt":
        return sigmas**-2.0
    if weighting_scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    return jnp.ones_like(sigmas)
