"""Samplers: a registry of pure, scan-friendly solvers for the reverse diffusion process.

A sampler is a frozen dataclass of static options (eta, karras, exponential, s_noise, ...). It
turns a NoiseSchedule and a step count into a `Plan` (numpy, outside the loop: timesteps, sigmas
and every per-step scalar coefficient, in float64 before the cast), starts a state pytree with
`init`, and maps state -> state with `step(plan, denoise, state, i, keys)`. History of multistep
solvers lives in the state, so one `lax.scan` body (`sample`) drives every sampler.

Conventions. Noise level i of a plan is (sigmas[i], timesteps[i]); step i goes from level i to i+1.
Sigmas are k-diffusion's (variance-exploding) sigma = sqrt((1 - ab) / ab). Samplers of the
k-diffusion family keep x = x0 + sigma * eps ("ve" space); the DDPM family (ddpm, ddim, pndm,
dpm-solver, unipc) keeps diffusers' x = sqrt(ab) x0 + sqrt(1 - ab) eps ("vp" space). Either way the
model sees `x_in = x / sqrt(sigma^2 + 1)` (the VP latent) and a model timestep, which is fractional
for the k-diffusion family exactly as in diffusers. The model's parameterisation (epsilon,
v_prediction, sample) is handled once by `make_denoiser` (k-diffusion's D(x, sigma)).

Flow-matching samplers (`flow = True`: flow_euler, flow_euler_a, flow_heun, flow_dpmpp_2m,
flow_dpmpp_2m_sde, flow_unipc) take a FlowSchedule and keep x = (1 - sigma) x0 + sigma eps ("flow"
space); the model sees x itself and timestep sigma * num_train_timesteps, and returns the velocity
v = eps - x0 (prediction type "flow"), so D(x, sigma) = x - sigma v.

Stochastic samplers draw their noise from `step_noise(keys, i, ...)`: one key per image, folded with
the global step index, so a batch may be cut or sharded any way without changing any image.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from sdjax.diffusion.schedules import (SIGMA_SPACINGS, FlowSchedule, NoiseSchedule, flow_add_noise,
                                       sigma_to_t, spaced_timesteps)

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]   # (x_in, t) -> eps / v / x0 / flow velocity
Denoiser = Callable[..., jax.Array]   # (x_in, alpha, sigma_vp, t) -> x0
State = dict


@struct.dataclass
class Plan:
    """Everything a sampler needs per step, as arrays; built outside the loop by `Sampler.plan`."""

    timesteps: jax.Array          # (n + 1,) model timestep of each noise level (last may be unused)
    sigmas: jax.Array             # (n + 1,) sigma of each noise level; sigmas[n] is where sampling ends
    init_noise_sigma: jax.Array   # () std of x_T in the sampler's space
    coeffs: dict                  # per-step tables (leading axis n) specific to the sampler
    prediction_type: str = struct.field(pytree_node=False, default="epsilon")

    @property
    def num_steps(self) -> int:
        return self.sigmas.shape[0] - 1


def _plan(timesteps, sigmas, init_noise_sigma, prediction_type, **coeffs) -> Plan:
    f32 = lambda a: jnp.asarray(np.asarray(a, np.float64), jnp.float32)
    return Plan(timesteps=f32(timesteps), sigmas=f32(sigmas), init_noise_sigma=f32(init_noise_sigma),
                coeffs={k: f32(v) for k, v in coeffs.items()}, prediction_type=prediction_type)


def make_denoiser(model_fn: ModelFn, prediction_type: str) -> Denoiser:
    """k-diffusion's D(x, sigma) for a discrete VP model, written on the model's input
    x_in = alpha x0 + sigma_vp eps so that alpha = 0 (zero terminal SNR) stays finite:
    D(x_in, alpha, sigma_vp, t) -> x0. A flow model's x_in is (1 - sigma) x0 + sigma eps, so flow
    samplers pass alpha = 1 - sigma, sigma_vp = sigma; its output is v = eps - x0."""
    def denoise(x_in, alpha, sigma_vp, t):
        out = model_fn(x_in, t).astype(x_in.dtype)
        if prediction_type == "epsilon":
            return (x_in - sigma_vp * out) / alpha
        if prediction_type == "v_prediction":
            return alpha * x_in - sigma_vp * out
        if prediction_type == "sample":
            return out
        if prediction_type == "flow":
            return x_in - sigma_vp * out
        raise ValueError(f"prediction_type {prediction_type!r} is not epsilon, v_prediction, sample "
                         "or flow")
    return denoise


def _ve_x0(denoise, x, sigma, t):
    """D at VE sigma for a VE-space state: the model sees x / sqrt(sigma^2 + 1)."""
    alpha = lax.rsqrt(sigma**2 + 1)
    return denoise(x * alpha, alpha, sigma * alpha, t)


def step_noise(keys: jax.Array, i, shape, dtype=jnp.float32) -> jax.Array:
    """Standard normal noise for step `i`: image b gets normal(fold_in(keys[b], i), shape[1:])."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), shape[1:], dtype))(keys)


def _bcast(c, x):
    return jnp.reshape(c, jnp.shape(c) + (1,) * (x.ndim - jnp.ndim(c)))


def _push(hist, value):
    """Newest first; the oldest entry falls off."""
    return jnp.concatenate([value[None], hist[:-1]], axis=0)


def _combine(weights, hist):
    return jnp.tensordot(weights.astype(hist.dtype), hist, axes=1)


# --- registry -------------------------------------------------------------------------------------

_REGISTRY: dict[str, tuple[type, dict]] = {}


def register_sampler(name: str, **fixed: Any):
    """Class decorator: `@register_sampler("euler_a")`; `fixed` presets options for this name."""
    def wrap(cls):
        if name in _REGISTRY:
            raise ValueError(f"sampler {name!r} is registered twice")
        _REGISTRY[name] = (cls, fixed)
        return cls
    return wrap


def list_samplers() -> list[str]:
    return sorted(_REGISTRY)


def _options(name: str) -> set[str]:
    cls, fixed = _REGISTRY[name]
    return {f.name for f in dataclasses.fields(cls)} - set(fixed)


def get_sampler(name: str, **options: Any) -> "Sampler":
    """The sampler registered as `name`, with static `options` (e.g. eta=0.5, karras=True)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown sampler {name!r}; valid names: {', '.join(list_samplers())}")
    cls, fixed = _REGISTRY[name]
    valid = _options(name)
    bad = set(options) - valid
    if bad:
        raise ValueError(f"sampler {name!r} has no option(s) {sorted(bad)}; valid: {sorted(valid)}")
    try:
        return cls(**fixed, **options)
    except ValueError as err:        # option values the sampler refuses (conflicts, ranges)
        raise ValueError(f"sampler {name!r}: {err}") from None


def parse_sampler(text: str) -> tuple[str, tuple[tuple[str, Any], ...]]:
    """`NAME` or `NAME:option=value,...` (e.g. `dpmpp_2m:karras=true`) -> (name, options)."""
    name, _, rest = text.strip().partition(":")
    options = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"sampler {text!r}: option {part!r} is not key=value")
        options[key.strip()] = _literal(value.strip())
    return name, tuple(sorted(options.items()))


def _is_neutral(option: str, value: Any) -> bool:
    """Off, or the one default that every sampler taking `option` has."""
    defaults = {f.default for n, (cls, _) in _REGISTRY.items() for f in dataclasses.fields(cls)
                if f.name == option and option in _options(n)}
    return not value or defaults == {value}


def _literal(value: str) -> Any:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def options_for(name: str, options) -> tuple[tuple[str, Any], ...]:
    """The subset of `options` (a mapping) that sampler `name` takes, as a sorted tuple.

    An option that is off (False, 0), or at the default of every sampler that has it
    (`s_noise=1.0`), means nothing to a sampler without it and is dropped, so one config
    (`karras=False`) serves every sampler; an option that is on but unknown is an error.
    """
    if name not in _REGISTRY:
        get_sampler(name)  # raises, listing the valid names
    valid = _options(name)
    kept = {k: v for k, v in dict(options).items() if k in valid or not _is_neutral(k, v)}
    get_sampler(name, **kept)  # unknown options that are on: the registry's error names them
    return tuple(sorted(kept.items()))


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Base: a hashable bundle of static options plus plan / init / step / add_noise."""

    default_spacing: ClassVar[str] = "linspace"
    space: ClassVar[str] = "ve"     # "ve": x0 + sigma eps; "vp": alpha x0 + sigma_vp eps; "flow"
    stochastic: ClassVar[bool] = False
    flow: ClassVar[bool] = False    # takes a FlowSchedule and a velocity model, not a NoiseSchedule

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # Every plan checks its schedule's kind once here, rather than failing deep inside.
        if "plan" in cls.__dict__:
            cls.plan = _checks_schedule(cls.__dict__["plan"])

    def plan(self, schedule: NoiseSchedule, num_steps: int) -> Plan:
        raise NotImplementedError

    def init(self, plan: Plan, noise: jax.Array, x0: Optional[jax.Array] = None,
             start: int = 0) -> State:
        """State at step `start`: pure noise scaled by init_noise_sigma, or x0 noised to level `start`."""
        x = noise * plan.init_noise_sigma if x0 is None else self.add_noise(plan, x0, noise, start)
        return {"x": x.astype(noise.dtype), "count": jnp.zeros((), jnp.int32), **self._extra_state(x)}

    def _extra_state(self, x) -> dict:
        return {}

    def add_noise(self, plan: Plan, x0: jax.Array, noise: jax.Array, start) -> jax.Array:
        """x0 noised to the level where step `start` begins, in this sampler's space (img2img)."""
        sigma = plan.sigmas[start]
        if self.space == "flow":
            return flow_add_noise(x0, noise, sigma)
        if self.space == "ve":
            return x0 + noise * sigma
        alpha = lax.rsqrt(sigma**2 + 1)
        return alpha * x0 + (sigma * alpha) * noise

    def step(self, plan: Plan, denoise: Denoiser, state: State, i, keys) -> State:
        raise NotImplementedError

    def _vp_x0(self, plan, denoise, x, i):
        """D at level i for a VP-space state (alpha, sigma_vp from the plan when it has them,
        which DDPM-family plans do so that alpha = 0 is exact)."""
        alpha, sigma_vp = self._vp_coefs(plan, i)
        return denoise(x, alpha, sigma_vp, plan.timesteps[i])

    def _vp_coefs(self, plan, i):
        if "alpha" in plan.coeffs:
            return plan.coeffs["alpha"][i], plan.coeffs["sigma_vp"][i]
        alpha = lax.rsqrt(plan.sigmas[i] ** 2 + 1)
        return alpha, plan.sigmas[i] * alpha


def _checks_schedule(plan_fn):
    @functools.wraps(plan_fn)
    def plan(self, schedule, num_steps):
        if isinstance(schedule, FlowSchedule) != self.flow:
            names = [n for n, (cls, fixed) in _REGISTRY.items() if cls is type(self) and
                     all(getattr(self, k) == v for k, v in fixed.items())] or [type(self).__name__]
            fitting = [n for n, (cls, _) in sorted(_REGISTRY.items()) if cls.flow != self.flow]
            raise ValueError(
                f"sampler {names[0]!r} takes a {'FlowSchedule' if self.flow else 'NoiseSchedule'} "
                f"(a {'flow-matching' if self.flow else 'noise-prediction'} model), not a "
                f"{type(schedule).__name__}; samplers for it: {', '.join(fitting)}")
        return plan_fn(self, schedule, num_steps)
    return plan


@dataclasses.dataclass(frozen=True)
class _SigmaSpacing(Sampler):
    """Respaced sigmas between the plan's end sigmas: Karras et al. 2022 eq. 5 (`karras`) or
    log-uniform (`exponential`), diffusers' use_karras_sigmas / use_exponential_sigmas."""

    karras: bool = False
    exponential: bool = False

    def __post_init__(self):
        if self.karras and self.exponential:
            raise ValueError("options karras=True and exponential=True conflict: pick one sigma "
                             "spacing")

    @property
    def sigma_spacing(self) -> Optional[str]:
        return "karras" if self.karras else "exponential" if self.exponential else None


def _check_nonnegative(sampler: Sampler, *names: str) -> None:
    for name in names:
        value = getattr(sampler, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"option {name}={value!r} must be a number >= 0")


def start_index(num_steps: int, strength: float, flow: bool = False) -> int:
    """First step of img2img at `strength` in [0, 1], as diffusers' img2img pipelines compute it.

    flow: the SD3 / Flux img2img and inpaint pipelines' rounding, int(N - N * strength), which is
    one step later than the SD pipelines' N - int(N * strength) when N * strength is fractional.
    """
    if flow:
        return int(max(num_steps - min(num_steps * strength, num_steps), 0))
    init = min(int(num_steps * strength), num_steps)
    return max(num_steps - init, 0)


def sample(sampler: Sampler, model_fn: ModelFn, x_T: jax.Array, plan: Plan,
           keys: Optional[jax.Array] = None, *, x0: Optional[jax.Array] = None, start: int = 0,
           return_trajectory: bool = False,
           after_step: Optional[Callable[[State, jax.Array], State]] = None,
           on_step: Optional[Callable[[jax.Array], None]] = None, model_takes_step: bool = False):
    """Run steps start..n-1 of `sampler` with one `lax.scan`; returns the final x (and, if asked,
    x after every step, stacked). jit with sampler, model_fn, start, return_trajectory static.

    x_T: unit-variance noise (batch first); x0: a clean latent for img2img, noised to level `start`.
    after_step(state, i) -> state edits the state after step i (inpainting's mask blending);
    on_step(i) is called for its effects (a progress callback) after step i.
    model_takes_step: call `model_fn(x, t, step=i)` with the index i of the step every evaluation
    belongs to (a higher-order step's extra evaluations too), for inputs scheduled by step
    (ControlNet guidance start / end).
    """
    state = sampler.init(plan, x_T, x0, start)
    if sampler.stochastic and keys is None:
        raise ValueError(f"{type(sampler).__name__} is stochastic: pass one PRNG key per image")

    def body(state, i):
        step_fn = (lambda x, t: model_fn(x, t, step=i)) if model_takes_step else model_fn
        denoise = make_denoiser(step_fn, plan.prediction_type)
        state = sampler.step(plan, denoise, state, i, keys)
        if after_step is not None:
            state = after_step(state, i)
        if on_step is not None:
            on_step(i)
        return state, (state["x"] if return_trajectory else None)

    state, traj = lax.scan(body, state, jnp.arange(start, plan.num_steps))
    return (state["x"], traj) if return_trajectory else state["x"]


# --- k-diffusion family (ve space, fractional model timesteps) -------------------------------------

def _k_levels(sampler, schedule: NoiseSchedule, num_steps: int,
              sigma_spacing: Optional[str] = None):
    """Timesteps/sigmas of diffusers' Euler/LMS/Heun schedulers (sigma 0 appended); respaced
    sigmas (`SIGMA_SPACINGS`) keep the end sigmas and take fractional timesteps from sigma_to_t."""
    ts = spaced_timesteps(num_steps, schedule.spacing(sampler.default_spacing),
                          schedule.num_train_timesteps, schedule.steps_offset, fractional=True)
    sigmas = schedule.sigmas_at(ts).astype(np.float32).astype(np.float64)
    if sigma_spacing is not None:
        sigmas = SIGMA_SPACINGS[sigma_spacing](float(sigmas[-1]), float(sigmas[0]), num_steps)
        ts = sigma_to_t(sigmas, np.log(schedule.sigmas))    # float32 log table, as diffusers
        sigmas = sigmas.astype(np.float32).astype(np.float64)
    ts = ts.astype(np.float32).astype(np.float64)
    sigmas = np.concatenate([sigmas, [0.0]])
    ts = np.concatenate([ts, [0.0]])
    smax = sigmas.max()
    spacing = schedule.spacing(sampler.default_spacing)
    init_sigma = smax if spacing in ("linspace", "trailing") else np.sqrt(smax**2 + 1)
    return ts, sigmas, init_sigma


@dataclasses.dataclass(frozen=True)
class _KarrasODE(_SigmaSpacing):
    """The plan shared by the deterministic k-diffusion ODE solvers: diffusers' Euler levels, with
    optional Karras or exponential sigmas."""

    def plan(self, schedule, num_steps):
        ts, sigmas, init = _k_levels(self, schedule, num_steps, self.sigma_spacing)
        return _plan(ts, sigmas, init, schedule.prediction_type)


@register_sampler("euler")
@dataclasses.dataclass(frozen=True)
class Euler(_KarrasODE):
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, Alg. 1 w/o churn)."""

    def step(self, plan, denoise, state, i, keys):
        x, sigma, sigma_next = state["x"], plan.sigmas[i], plan.sigmas[i + 1]
        d = (x - _ve_x0(denoise, x, sigma, plan.timesteps[i])) / sigma
        return {**state, "x": x + d * (sigma_next - sigma), "count": state["count"] + 1}


def _ancestral_step(sigma_from, sigma_to, eta):
    """k-diffusion get_ancestral_step: sigma_up = min(sigma_to, eta sqrt(sigma_to^2 (sigma_from^2 -
    sigma_to^2) / sigma_from^2)), sigma_down = sqrt(sigma_to^2 - sigma_up^2)."""
    sigma_up = np.minimum(sigma_to, eta * np.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2)
                                                  / sigma_from**2))
    return np.sqrt(sigma_to**2 - sigma_up**2), sigma_up


@register_sampler("euler_a")
@dataclasses.dataclass(frozen=True)
class EulerAncestral(Sampler):
    """Ancestral Euler (k-diffusion sample_euler_ancestral(eta, s_noise)): Euler to sigma_down, then
    add s_noise * sigma_up noise. eta=1 is diffusers' EulerAncestralDiscreteScheduler, eta=0 Euler.

    No Karras/exponential sigmas: diffusers' EulerAncestralDiscreteScheduler has none.
    """

    eta: float = 1.0
    s_noise: float = 1.0

    def __post_init__(self):
        _check_nonnegative(self, "eta", "s_noise")

    @property
    def stochastic(self):
        return self.eta > 0 and self.s_noise > 0

    def plan(self, schedule, num_steps):
        ts, s, init = _k_levels(self, schedule, num_steps)
        sigma_down, sigma_up = _ancestral_step(s[:-1], s[1:], self.eta)
        return _plan(ts, s, init, schedule.prediction_type, sigma_down=sigma_down,
                     noise=self.s_noise * sigma_up)

    def step(self, plan, denoise, state, i, keys):
        x, sigma = state["x"], plan.sigmas[i]
        d = (x - _ve_x0(denoise, x, sigma, plan.timesteps[i])) / sigma
        x = x + d * (plan.coeffs["sigma_down"][i] - sigma)
        if self.stochastic:
            x = x + step_noise(keys, i, x.shape, x.dtype) * plan.coeffs["noise"][i]
        return {**state, "x": x, "count": state["count"] + 1}


@register_sampler("heun")
@dataclasses.dataclass(frozen=True)
class Heun(_KarrasODE):
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1); the last step, to sigma=0, is Euler."""

    def step(self, plan, denoise, state, i, keys):
        x, sigma, sigma_next = state["x"], plan.sigmas[i], plan.sigmas[i + 1]
        dt = sigma_next - sigma
        d = (x - _ve_x0(denoise, x, sigma, plan.timesteps[i])) / sigma
        x_euler = x + d * dt

        def corrected(_):
            d2 = (x_euler - _ve_x0(denoise, x_euler, sigma_next, plan.timesteps[i + 1])) / sigma_next
            return x + (d + d2) / 2 * dt

        x_next = lax.cond(sigma_next > 0, corrected, lambda _: x_euler, None)
        return {**state, "x": x_next, "count": state["count"] + 1}


def _lagrange_integral(nodes: np.ndarray, j: int, a: float, b: float) -> float:
    """Integral over [a, b] of the Lagrange basis polynomial of nodes[j]."""
    others = np.delete(nodes, j)
    poly = np.polynomial.Polynomial.fromroots(others) if len(others) else np.polynomial.Polynomial([1.0])
    poly = poly / np.prod(nodes[j] - others)
    anti = poly.integ()
    return float(anti(b) - anti(a))


@register_sampler("lms")
@dataclasses.dataclass(frozen=True)
class LMS(_SigmaSpacing):
    """Linear multistep (Adams-Bashforth in sigma, order up to 4; k-diffusion sample_lms / Crowson)."""

    order: int = 4

    def plan(self, schedule, num_steps):
        ts, s, init = _k_levels(self, schedule, num_steps, self.sigma_spacing)
        # weights[i, o - 1, j]: coefficient of the derivative j steps back, at order o (exact
        # integrals of the Lagrange basis; diffusers integrates the same polynomials numerically).
        w = np.zeros((num_steps, self.order, self.order))
        for i in range(num_steps):
            for o in range(1, min(i + 1, self.order) + 1):
                nodes = np.array([s[i - k] for k in range(o)])
                for j in range(o):
                    w[i, o - 1, j] = _lagrange_integral(nodes, j, s[i], s[i + 1])
        return _plan(ts, s, init, schedule.prediction_type, weights=w)

    def _extra_state(self, x):
        return {"hist": jnp.zeros((self.order,) + x.shape, x.dtype)}

    def step(self, plan, denoise, state, i, keys):
        x, sigma = state["x"], plan.sigmas[i]
        d = (x - _ve_x0(denoise, x, sigma, plan.timesteps[i])) / sigma
        hist = _push(state["hist"], d)
        order = jnp.minimum(state["count"] + 1, self.order)
        x = x + _combine(plan.coeffs["weights"][i, order - 1], hist)
        return {**state, "x": x, "hist": hist, "count": state["count"] + 1}


# --- DDPM family (vp space, integer model timesteps) ----------------------------------------------

def _vp_sigma(ab):
    ab = np.asarray(ab, np.float64)
    return np.sqrt((1 - ab) / ab)


def _final_alpha(schedule: NoiseSchedule, default: bool) -> float:
    one = schedule.set_alpha_to_one if schedule.set_alpha_to_one is not None else default
    return 1.0 if one else float(schedule.alphas_cumprod[0])


@register_sampler("ddpm")
@dataclasses.dataclass(frozen=True)
class DDPM(Sampler):
    """Ancestral sampling from the posterior q(x_{t-1} | x_t, x0) (Ho et al. 2020, eq. 6-7), fixed_small variance."""

    default_spacing: ClassVar[str] = "leading"
    space: ClassVar[str] = "vp"
    stochastic: ClassVar[bool] = True

    def plan(self, schedule, num_steps):
        ts = spaced_timesteps(num_steps, schedule.spacing(self.default_spacing),
                              schedule.num_train_timesteps, schedule.steps_offset)
        ac = schedule.alphas_cumprod.astype(np.float64)
        ab_t = ac[ts.astype(int)]
        prev = np.append(ts[1:], -1).astype(int)
        ab_p = np.where(prev >= 0, ac[np.maximum(prev, 0)], 1.0)
        beta = 1 - ab_t / ab_p
        c_x0 = np.sqrt(ab_p) * beta / (1 - ab_t)
        c_x = np.sqrt(ab_t / ab_p) * (1 - ab_p) / (1 - ab_t)
        std = np.where(ts > 0, np.sqrt(np.maximum((1 - ab_p) / (1 - ab_t) * beta, 1e-20)), 0.0)
        sigmas = np.append(_vp_sigma(ab_t), _vp_sigma(ab_p[-1]))
        return _plan(np.append(ts, 0), sigmas, 1.0, schedule.prediction_type,
                     c_x0=c_x0, c_x=c_x, std=std, alpha=np.sqrt(ab_t), sigma_vp=np.sqrt(1 - ab_t))

    def step(self, plan, denoise, state, i, keys):
        x, c = state["x"], plan.coeffs
        x0 = self._vp_x0(plan, denoise, x, i)
        x = c["c_x0"][i] * x0 + c["c_x"][i] * x + c["std"][i] * step_noise(keys, i, x.shape, x.dtype)
        return {**state, "x": x, "count": state["count"] + 1}


@register_sampler("ddim")
@dataclasses.dataclass(frozen=True)
class DDIM(Sampler):
    """DDIM (Song et al. 2021, eq. 12): x_prev = sqrt(ab_p) x0 + sqrt(1 - ab_p - s^2) eps + s z, s = eta * sigma_t."""

    eta: float = 0.0
    default_spacing: ClassVar[str] = "leading"
    space: ClassVar[str] = "vp"

    @property
    def stochastic(self):  # noqa: D401 - an instance property shadows the class flag
        return self.eta > 0

    def plan(self, schedule, num_steps):
        T = schedule.num_train_timesteps
        ts = spaced_timesteps(num_steps, schedule.spacing(self.default_spacing), T,
                              schedule.steps_offset)
        ac = schedule.alphas_cumprod.astype(np.float64)
        ab_t = ac[ts.astype(int)]
        # diffusers steps to t - T // n whatever the spacing; we follow it to stay comparable.
        prev = ts.astype(int) - T // num_steps
        ab_p = np.where(prev >= 0, ac[np.maximum(prev, 0)], _final_alpha(schedule, True))
        var = (1 - ab_p) / (1 - ab_t) * (1 - ab_t / ab_p)
        std = self.eta * np.sqrt(var)
        sigmas = np.append(_vp_sigma(ab_t), _vp_sigma(ab_p[-1]))
        return _plan(np.append(ts, max(prev[-1], 0)), sigmas, 1.0, schedule.prediction_type,
                     sqrt_ab=np.sqrt(ab_t), sqrt_1m_ab=np.sqrt(1 - ab_t), sqrt_ab_prev=np.sqrt(ab_p),
                     dir_coef=np.sqrt(np.maximum(1 - ab_p - std**2, 0.0)), std=std,
                     alpha=np.sqrt(ab_t), sigma_vp=np.sqrt(1 - ab_t))

    def step(self, plan, denoise, state, i, keys):
        x, c = state["x"], plan.coeffs
        x0 = self._vp_x0(plan, denoise, x, i)
        eps = (x - c["sqrt_ab"][i] * x0) / c["sqrt_1m_ab"][i]
        x = c["sqrt_ab_prev"][i] * x0 + c["dir_coef"][i] * eps
        if self.eta > 0:
            x = x + c["std"][i] * step_noise(keys, i, x.shape, x.dtype)
        return {**state, "x": x, "count": state["count"] + 1}


def _pndm_transfer(ab_t, ab_p):
    """PNDM's phi (Liu et al. 2022, eq. 11): x_prev = a x - b eps."""
    a = np.sqrt(ab_p / ab_t)
    b = (ab_p - ab_t) / (ab_t * np.sqrt(1 - ab_p) + np.sqrt(ab_t * (1 - ab_t) * ab_p))
    return a, b


@register_sampler("pndm")
@dataclasses.dataclass(frozen=True)
class PLMS(Sampler):
    """PLMS (Liu et al. 2022, PNDM without Runge-Kutta warm-up): 4th-order Adams-Bashforth on eps + phi.

    The first step makes a second model call (a Heun-like correction), as diffusers' skip_prk_steps.
    Unlike diffusers, eps is formed from each model output at its own point, also for v-prediction.
    """

    default_spacing: ClassVar[str] = "leading"
    space: ClassVar[str] = "vp"

    def plan(self, schedule, num_steps):
        T = schedule.num_train_timesteps
        ts = spaced_timesteps(num_steps, schedule.spacing(self.default_spacing), T,
                              schedule.steps_offset)
        ac = schedule.alphas_cumprod.astype(np.float64)
        final = _final_alpha(schedule, False)
        ab = lambda t: np.where(t >= 0, ac[np.maximum(t, 0).astype(int)], final)
        prev = ts - T // num_steps
        a, b = _pndm_transfer(ab(ts), ab(prev))
        # a first step makes its second evaluation at the next listed timestep and then applies
        # phi from that + T//n down to it (diffusers' counter == 1 call); one row per start step.
        mid = np.append(ts[1:], np.maximum(prev[-1], 0))
        a1, b1 = _pndm_transfer(ab(np.minimum(mid + T // num_steps, T - 1)), ab(mid))
        sigmas = np.append(_vp_sigma(ab(ts)), _vp_sigma(ab(prev[-1])))
        return _plan(np.append(ts, max(prev[-1], 0)), sigmas, 1.0, schedule.prediction_type,
                     a=a, b=b, alpha=np.sqrt(ab(ts)), sigma_vp=np.sqrt(1 - ab(ts)),
                     first=np.stack([a1, b1, mid, np.sqrt(ab(mid)), np.sqrt(1 - ab(mid))], axis=1))

    def _extra_state(self, x):
        return {"hist": jnp.zeros((4,) + x.shape, x.dtype)}

    def _eps(self, denoise, x, alpha, sigma_vp, t):
        return (x - alpha * denoise(x, alpha, sigma_vp, t)) / sigma_vp

    def step(self, plan, denoise, state, i, keys):
        x, c, count = state["x"], plan.coeffs, state["count"]
        e = self._eps(denoise, x, *self._vp_coefs(plan, i), plan.timesteps[i])
        hist = _push(state["hist"], e)

        def first(_):
            a1, b1, t_mid, alpha_mid, sigma_mid = (c["first"][i, k] for k in range(5))
            x_tmp = c["a"][i] * x - c["b"][i] * e
            e_mid = self._eps(denoise, x_tmp, alpha_mid, sigma_mid, t_mid)
            return a1 * x - b1 * (e + e_mid) / 2

        def multistep(_):
            w = jnp.array([[1.0, 0, 0, 0], [1.5, -0.5, 0, 0], [23 / 12, -16 / 12, 5 / 12, 0],
                           [55 / 24, -59 / 24, 37 / 24, -9 / 24]], x.dtype)
            e_comb = _combine(w[jnp.minimum(count, 3)], hist)
            return c["a"][i] * x - c["b"][i] * e_comb

        x_next = lax.cond(count == 0, first, multistep, None)
        return {**state, "x": x_next, "hist": hist, "count": count + 1}


# --- exponential-integrator multistep solvers on x0 (vp space) -------------------------------------

def _dpm_levels(schedule: NoiseSchedule, num_steps: int, sigma_spacing: Optional[str],
                round_karras: bool):
    """Timesteps/sigmas of diffusers' DPMSolverMultistep/UniPC schedulers (final sigma 0).

    Respaced sigmas span the whole training table. Their timesteps are integers as diffusers makes
    them: rounded for Karras sigmas where `round_karras`, otherwise cut by its int64 cast (toward 0).
    """
    ts = spaced_timesteps(num_steps, schedule.spacing("linspace"), schedule.num_train_timesteps,
                          schedule.steps_offset, drop_last_of=True)
    train = schedule.sigmas.astype(np.float64)
    if sigma_spacing is not None:
        sigmas = SIGMA_SPACINGS[sigma_spacing](train[0], train[-1], num_steps)
        ts = sigma_to_t(sigmas, np.log(schedule.sigmas))    # float32 log table, as diffusers
        ts = ts.round() if sigma_spacing == "karras" and round_karras else np.trunc(ts)
    else:
        sigmas = schedule.sigmas_at(ts)
    sigmas = np.append(sigmas.astype(np.float32).astype(np.float64), 0.0)
    return np.append(ts, 0.0), sigmas


def _alpha_sigma_lambda(sigma):
    """VP (alpha_t, sigma_t) and half-log-SNR lambda_t of a VE sigma; lambda is +inf at sigma=0."""
    alpha = 1 / np.sqrt(sigma**2 + 1)
    sig = sigma * alpha
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sig)
    return alpha, sig, lam


def _flow_alpha_sigma_lambda(sigma):
    """The same for a flow sigma (x = (1 - sigma) x0 + sigma eps); lambda is -inf at sigma=1."""
    alpha = 1.0 - sigma
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)
    return alpha, sigma, lam


def _dpmpp_weights(s, i, order, sde, levels=_alpha_sigma_lambda):
    """DPM-Solver++(2M/3M) (Lu et al. 2022) and its SDE variant: x_{i+1} = a x + sum_j w_j m_j + c z,
    m_j the x0 prediction j steps back; the derivative estimates D1, D2 expanded into the m_j.
    levels(sigma) -> (alpha, sigma_t, lambda) says what the sigmas mean (VE or flow)."""
    if s[i + 1] == 0:           # the last step lands on sigma=0: x = x0 (order 1 by construction)
        return 0.0, np.array([1.0, 0.0, 0.0]), 0.0
    alpha_t, sigma_t, lam_t = levels(s[i + 1])
    _, sigma_s0, lam_s0 = levels(s[i])
    h = lam_t - lam_s0
    w = np.zeros(3)
    if sde:
        a = sigma_t / sigma_s0 * np.exp(-h)
        k0 = alpha_t * (-np.expm1(-2.0 * h))
        k1 = alpha_t * ((-np.expm1(-2.0 * h)) / (-2.0 * h) + 1.0) if order == 3 else 0.5 * k0
        noise = sigma_t * np.sqrt(-np.expm1(-2.0 * h))
    else:
        a = sigma_t / sigma_s0
        k0 = -alpha_t * np.expm1(-h)
        k1 = -0.5 * alpha_t * np.expm1(-h) if order == 2 else alpha_t * (np.expm1(-h) / h + 1.0)
        noise = 0.0
    w[0] += k0
    if order >= 2:
        h0 = lam_s0 - levels(s[i - 1])[2]
        r0 = h0 / h
    if order == 2:               # D1 = (m0 - m1) / r0
        w[0] += k1 / r0
        w[1] -= k1 / r0
    if order == 3:
        h1 = levels(s[i - 1])[2] - levels(s[i - 2])[2]
        r1 = h1 / h
        d10 = np.array([1.0, -1.0, 0.0]) / r0
        d11 = np.array([0.0, 1.0, -1.0]) / r1
        d1 = d10 + r0 / (r0 + r1) * (d10 - d11)
        d2 = (d10 - d11) / (r0 + r1)
        # k2 only at order 3: at sigma = 1 (a flow plan's first level) h is inf and k2 NaN
        k2 = (alpha_t * (((-np.expm1(-2.0 * h)) - 2.0 * h) / (2.0 * h) ** 2 - 0.5) if sde
              else -alpha_t * ((np.expm1(-h) + h) / h**2 - 0.5))
        w += k1 * d1 + k2 * d2
    return a, w, noise


@register_sampler("dpmpp_2m", order=2, sde=False, s_noise=1.0)
@register_sampler("dpmpp_2m_sde", order=2, sde=True)
@register_sampler("dpmpp_3m_sde", order=3, sde=True)
@dataclasses.dataclass(frozen=True)
class DPMSolverPP(_SigmaSpacing):
    """DPM-Solver++ multistep on x0 predictions (Lu et al. 2022), ODE or SDE; midpoint 2nd order.

    s_noise scales the SDE's injected noise (k-diffusion sample_dpmpp_2m_sde / 3m_sde(s_noise)).
    """

    order: int = 2
    sde: bool = False
    lower_order_final: bool = True
    s_noise: float = 1.0
    space: ClassVar[str] = "vp"

    def __post_init__(self):
        super().__post_init__()
        _check_nonnegative(self, "s_noise")

    @property
    def stochastic(self):
        return self.sde and self.s_noise > 0

    def plan(self, schedule, num_steps):
        if self.order == 3 and not self.sde:
            raise ValueError("dpmpp order 3 is registered only as the SDE variant (dpmpp_3m_sde)")
        round_ts = schedule.beta_schedule != "squaredcos_cap_v2" or schedule.trained_betas is not None
        ts, s = _dpm_levels(schedule, num_steps, self.sigma_spacing, round_ts)
        return self._multistep_plan(ts, s, schedule.prediction_type)

    def _multistep_plan(self, ts, s, prediction_type, levels=_alpha_sigma_lambda, **extra):
        n = len(s) - 1
        cap = np.full(n, self.order)
        few = self.lower_order_final and n < 15
        cap[-1] = 1                     # final sigma 0: always first order, as diffusers
        if n >= 2 and few:
            cap[-2] = min(cap[-2], 2)
        a = np.zeros((n, self.order))
        w = np.zeros((n, self.order, 3))
        noise = np.zeros((n, self.order))
        for i in range(n):
            for o in range(1, min(i + 1, self.order) + 1):
                a[i, o - 1], w[i, o - 1], noise[i, o - 1] = _dpmpp_weights(s, i, o, self.sde, levels)
        return _plan(ts, s, 1.0, prediction_type, a=a, w=w, noise=self.s_noise * noise, cap=cap,
                     **extra)

    def _extra_state(self, x):
        return {"hist": jnp.zeros((3,) + x.shape, x.dtype)}

    def step(self, plan, denoise, state, i, keys):
        x, c, count = state["x"], plan.coeffs, state["count"]
        hist = _push(state["hist"], self._vp_x0(plan, denoise, x, i))
        o = jnp.minimum(c["cap"][i].astype(jnp.int32), jnp.minimum(count + 1, self.order)) - 1
        x_next = c["a"][i, o] * x + _combine(c["w"][i, o], hist)
        if self.stochastic:
            x_next = x_next + c["noise"][i, o] * step_noise(keys, i, x.shape, x.dtype)
        return {**state, "x": x_next, "hist": hist, "count": count + 1}


def _unipc_weights(s, i, order, corrector, levels=_alpha_sigma_lambda):
    """UniPC-bh2 (Zhao et al. 2023) on x0 predictions, as weights on [x, m_0, m_1, m_2, (m_t)];
    levels as in _dpmpp_weights.

    Predictor from level i to i+1 (m_k at level i - k). Corrector of level i (m_t its fresh output)
    from level i-1 (m_k at level i - 1 - k), applied before the next predictor.
    """
    tgt, src = (i + 1, i) if not corrector else (i, i - 1)
    out = np.zeros(5)
    if s[tgt] == 0:              # landing on sigma=0 at order 1: x = x0
        out[1] = 1.0
        return out
    alpha_t, sigma_t, lam_t = levels(s[tgt])
    _, sigma_s0, lam_s0 = levels(s[src])
    h = lam_t - lam_s0
    hh = -h
    h_phi_1 = np.expm1(hh)
    b_h = np.expm1(hh)
    rks = [(levels(s[src - k])[2] - lam_s0) / h for k in range(1, order)] + [1.0]
    rks = np.array(rks)
    R, b = [], []
    h_phi_k, fact = h_phi_1 / hh - 1, 1
    for k in range(1, order + 1):
        R.append(rks ** (k - 1))
        b.append(h_phi_k * fact / b_h)
        fact *= k + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    R, b = np.array(R), np.array(b)
    out[0] = sigma_t / sigma_s0
    out[1] = -alpha_t * h_phi_1
    if corrector:
        rhos = np.array([0.5]) if order == 1 else np.linalg.solve(R, b)
        d_rhos, rho_t = rhos[:-1], rhos[-1]
        out[4] += -alpha_t * b_h * rho_t             # rho_t (m_t - m0)
        out[1] -= -alpha_t * b_h * rho_t
    else:
        d_rhos = np.array([]) if order == 1 else (
            np.array([0.5]) if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1]))
    for k, rho in enumerate(d_rhos, start=1):       # rho_k (m_k - m0) / r_k
        out[1 + k] += -alpha_t * b_h * rho / rks[k - 1]
        out[1] -= -alpha_t * b_h * rho / rks[k - 1]
    return out


@register_sampler("unipc")
@dataclasses.dataclass(frozen=True)
class UniPC(_SigmaSpacing):
    """UniPC multistep predictor-corrector, bh2, on x0 predictions (Zhao et al. 2023)."""

    order: int = 2
    space: ClassVar[str] = "vp"

    def plan(self, schedule, num_steps):
        ts, s = _dpm_levels(schedule, num_steps, self.sigma_spacing, True)
        return self._multistep_plan(ts, s, schedule.prediction_type)

    def _multistep_plan(self, ts, s, prediction_type, levels=_alpha_sigma_lambda, **extra):
        n = len(s) - 1
        cap = np.minimum(self.order, n - np.arange(n))     # lower_order_final
        pred = np.zeros((n, self.order, 5))
        corr = np.zeros((n, self.order, 5))
        for i in range(n):
            for o in range(1, min(i + 1, self.order) + 1):
                pred[i, o - 1] = _unipc_weights(s, i, o, False, levels)
                if i >= o:
                    corr[i, o - 1] = _unipc_weights(s, i, o, True, levels)
        return _plan(ts, s, 1.0, prediction_type, pred=pred, corr=corr, cap=cap, **extra)

    def _extra_state(self, x):
        return {"hist": jnp.zeros((3,) + x.shape, x.dtype), "last_x": x,
                "last_order": jnp.ones((), jnp.int32)}

    def step(self, plan, denoise, state, i, keys):
        x, c, count, hist = state["x"], plan.coeffs, state["count"], state["hist"]
        m_t = self._vp_x0(plan, denoise, x, i)
        wc = c["corr"][i, state["last_order"] - 1]
        x_corr = wc[0] * state["last_x"] + _combine(wc[1:4], hist) + wc[4] * m_t
        x = jnp.where(count > 0, x_corr, x)
        hist = _push(hist, m_t)
        order = jnp.minimum(c["cap"][i].astype(jnp.int32), jnp.minimum(count + 1, self.order))
        wp = c["pred"][i, order - 1]
        x_next = wp[0] * x + _combine(wp[1:4], hist)
        return {**state, "x": x_next, "hist": hist, "last_x": x, "last_order": order,
                "count": count + 1}


# --- flow matching (flow space: x = (1 - sigma) x0 + sigma eps, the model returns v = eps - x0) ----

def _flow_coeffs(sigmas) -> dict:
    """The denoiser's (alpha, sigma_vp) at every level of a flow plan: (1 - sigma, sigma)."""
    return {"alpha": 1 - sigmas, "sigma_vp": sigmas}


def _schedule_levels(schedule: FlowSchedule, num_steps: int):
    """(timesteps, sigmas) of the schedule itself: FlowMatchEulerDiscreteScheduler's tables."""
    sigmas = schedule.sigmas(num_steps)
    return schedule.timesteps(sigmas).astype(np.float64), sigmas


def _integer_levels(schedule: FlowSchedule, sigmas: np.ndarray):
    """The multistep schedulers' flow tables: int64 timesteps cut from the float64 sigmas, float32
    sigmas, a final sigma 0 (DPMSolverMultistep / UniPCMultistep set_timesteps, use_flow_sigmas)."""
    ts = (sigmas * schedule.num_train_timesteps).astype(np.int64).astype(np.float64)
    return np.append(ts, 0.0), np.append(sigmas, 0.0).astype(np.float32).astype(np.float64)


def _dpm_flow_levels(schedule: FlowSchedule, num_steps: int):
    """DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift).set_timesteps(N[, mu]):
    linspace(1 - 1/T, 0, N + 1) without its last point, statically shifted by flow_shift (exp(mu)
    under dynamic shifting, which it takes as its flow_shift)."""
    where = "flow_dpmpp_2m's own sigmas (DPMSolverMultistepScheduler use_flow_sigmas)"
    if schedule.shift_terminal:
        raise ValueError(f"{where} have no shift_terminal; pass schedule_sigmas=True")
    if schedule.use_dynamic_shifting and schedule.time_shift_type != "exponential":
        raise ValueError(f"{where} shift only exponentially, not time_shift_type="
                         f"{schedule.time_shift_type!r}; pass schedule_sigmas=True")
    shift = np.exp(schedule.mu) if schedule.use_dynamic_shifting else schedule.shift
    T = schedule.num_train_timesteps
    sigmas = 1.0 - np.linspace(1, 1 / T, num_steps + 1)
    sigmas = np.flip(shift * sigmas / (1 + (shift - 1) * sigmas))[:-1].copy()
    return _integer_levels(schedule, sigmas)


def _unipc_flow_levels(schedule: FlowSchedule, num_steps: int):
    """UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift, ...).set_timesteps(N[, mu]):
    linspace(1, 1/T, N + 1) without its last point, shifted as the schedule shifts, the first
    sigma kept 1e-6 below 1 (lambda is -inf at 1)."""
    T = schedule.num_train_timesteps
    sigmas = schedule.shift_sigmas(np.linspace(1, 1 / T, num_steps + 1)[:-1])
    if np.fabs(sigmas[0] - 1) < 1e-6:
        sigmas[0] -= 1e-6
    return _integer_levels(schedule, sigmas)


@dataclasses.dataclass(frozen=True)
class _FlowShift:
    """The flow samplers' `shift` option: sample with this static timestep shift instead of the
    model's own (static or resolution-dependent) one, an ablation knob; 0 keeps the model's."""

    shift: float = 0.0

    def __post_init__(self):
        if isinstance(self.shift, bool) or not isinstance(self.shift, (int, float)) \
                or not self.shift >= 0:
            raise ValueError(f"option shift={self.shift!r} must be a number > 0 (0: the model's)")
        if hasattr(super(), "__post_init__"):
            super().__post_init__()

    def _shifted(self, schedule: FlowSchedule) -> FlowSchedule:
        if not self.shift:
            return schedule
        return dataclasses.replace(schedule, shift=float(self.shift), use_dynamic_shifting=False)


@dataclasses.dataclass(frozen=True)
class _FlowODE(_FlowShift, Sampler):
    """Steps through the FlowSchedule's own sigmas (FlowMatchEulerDiscreteScheduler's tables)."""

    space: ClassVar[str] = "flow"
    flow: ClassVar[bool] = True

    def plan(self, schedule, num_steps):
        ts, sigmas = _schedule_levels(self._shifted(schedule), num_steps)
        return _plan(ts, sigmas, 1.0, schedule.prediction_type, **_flow_coeffs(sigmas))

    def _velocity(self, plan, denoise, x, i):
        """dx/dsigma = (x - D) / sigma, which is the model's v."""
        return (x - self._vp_x0(plan, denoise, x, i)) / plan.sigmas[i]


@register_sampler("flow_euler")
@dataclasses.dataclass(frozen=True)
class FlowEuler(_FlowODE):
    """Euler on the rectified-flow ODE: x += (sigma_next - sigma) v (FlowMatchEulerDiscreteScheduler)."""

    def step(self, plan, denoise, state, i, keys):
        x = state["x"]
        v = self._velocity(plan, denoise, x, i)
        return {**state, "x": x + (plan.sigmas[i + 1] - plan.sigmas[i]) * v,
                "count": state["count"] + 1}


@register_sampler("flow_euler_a")
@dataclasses.dataclass(frozen=True)
class FlowEulerStochastic(_FlowODE):
    """Re-noised flow sampling: x = (1 - sigma_next) D(x) + sigma_next z, z fresh noise each step
    (FlowMatchEulerDiscreteScheduler with stochastic_sampling=True)."""

    stochastic: ClassVar[bool] = True

    def step(self, plan, denoise, state, i, keys):
        x0 = self._vp_x0(plan, denoise, state["x"], i)
        noise = step_noise(keys, i, x0.shape, x0.dtype)
        return {**state, "x": flow_add_noise(x0, noise, plan.sigmas[i + 1]),
                "count": state["count"] + 1}


@register_sampler("flow_heun")
@dataclasses.dataclass(frozen=True)
class FlowHeun(_FlowODE):
    """Heun's 2nd-order method on the rectified-flow ODE; the last step, to sigma=0, is Euler
    (FlowMatchHeunDiscreteScheduler)."""

    def step(self, plan, denoise, state, i, keys):
        x, sigma_next = state["x"], plan.sigmas[i + 1]
        dt = sigma_next - plan.sigmas[i]
        v = self._velocity(plan, denoise, x, i)
        x_euler = x + v * dt

        def corrected(_):
            return x + (v + self._velocity(plan, denoise, x_euler, i + 1)) / 2 * dt

        x_next = lax.cond(sigma_next > 0, corrected, lambda _: x_euler, None)
        return {**state, "x": x_next, "count": state["count"] + 1}


@register_sampler("flow_dpmpp_2m", order=2, sde=False, s_noise=1.0, karras=False, exponential=False)
@register_sampler("flow_dpmpp_2m_sde", order=2, sde=True, karras=False, exponential=False)
@dataclasses.dataclass(frozen=True)
class FlowDPMSolverPP(_FlowShift, DPMSolverPP):
    """DPM-Solver++ on a flow model: DPMSolverMultistepScheduler(use_flow_sigmas=True,
    prediction_type="flow_prediction", flow_shift=the schedule's shift) with set_timesteps(N), and
    mu under dynamic shifting, as the SD3 and Flux pipelines call it: its own sigma grid and integer
    timesteps. schedule_sigmas: the FlowSchedule's sigmas and timesteps instead (flow_euler's)."""

    schedule_sigmas: bool = False
    space: ClassVar[str] = "flow"
    flow: ClassVar[bool] = True

    def plan(self, schedule, num_steps):
        levels = _schedule_levels if self.schedule_sigmas else _dpm_flow_levels
        ts, sigmas = levels(self._shifted(schedule), num_steps)
        return self._multistep_plan(ts, sigmas, schedule.prediction_type, _flow_alpha_sigma_lambda,
                                    **_flow_coeffs(sigmas))


@register_sampler("flow_unipc", karras=False, exponential=False)
@dataclasses.dataclass(frozen=True)
class FlowUniPC(_FlowShift, UniPC):
    """UniPC on a flow model: UniPCMultistepScheduler(use_flow_sigmas=True,
    prediction_type="flow_prediction", flow_shift, use_dynamic_shifting, time_shift_type,
    shift_terminal from the schedule) with set_timesteps(N[, mu]), as the pipelines call it."""

    space: ClassVar[str] = "flow"
    flow: ClassVar[bool] = True

    def plan(self, schedule, num_steps):
        ts, sigmas = _unipc_flow_levels(self._shifted(schedule), num_steps)
        return self._multistep_plan(ts, sigmas, schedule.prediction_type, _flow_alpha_sigma_lambda,
                                    **_flow_coeffs(sigmas))
