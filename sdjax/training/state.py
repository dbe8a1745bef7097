"""Train state, per-model optimizers, EMA and mixed-precision casts; model-agnostic.

Params are a dict keyed by model name ({"unet": ..., "text_encoder": ...}); each model is one param
group with its own learning rate and schedule, or frozen. Master params are float32; the forward
pass may run on `cast_for_compute(params, jnp.bfloat16)`, whose gradients come back float32.

Counting: `TrainState.step` counts calls of `apply_gradients` (micro-steps). With gradient
accumulation over k micro-steps the params, the schedules and the EMA move once every k calls;
`total_steps` and `warmup_steps` count those optimizer updates, as diffusers' `max_train_steps` does.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional, Union

import flax
import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "cosine", "linear")
EMA_WARMUPS = ("default", "power", "none")
FROZEN = "frozen"
TRAINABLE = "trainable"


@dataclasses.dataclass(frozen=True)
class ParamGroup:
    """Optimizer settings of one model. AdamW betas/eps default to diffusers' training scripts."""
    lr: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    frozen: bool = False
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8


FLOAT32_MAX = 3.4028234663852886e38


def _check_group(name: str, group: ParamGroup) -> None:
    """Settings that would make the params non-finite (or train nothing) are refused up front."""
    def bad(field, rule):
        return ValueError(f"param group {name!r}: {field} must be {rule}, got {getattr(group, field)!r}")

    for field in ("lr", "weight_decay", "b1", "b2", "eps"):
        value = getattr(group, field)
        # Finite as the float32 the optimizer computes in, not only as a Python float.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value) or abs(value) > FLOAT32_MAX:
            raise bad(field, "a finite number")
    if not group.frozen and group.lr <= 0:
        raise ValueError(f"param group {name!r}: lr must be > 0 for a trainable model "
                         f"(got {group.lr}); set frozen=True to train nothing")
    if group.weight_decay < 0:
        raise bad("weight_decay", ">= 0")
    if not (0 <= group.b1 < 1 and 0 <= group.b2 < 1):
        raise bad("b1" if not 0 <= group.b1 < 1 else "b2", "in [0, 1)")
    if group.eps <= 0:
        raise bad("eps", "> 0")
    if not isinstance(group.warmup_steps, int) or group.warmup_steps < 0:
        raise bad("warmup_steps", "an integer >= 0")


def _schedule(name: str, group: ParamGroup, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 over `warmup_steps` updates, then constant / cosine to 0 / linear to 0
    at `total_steps` (diffusers' get_scheduler shapes)."""
    if group.frozen:
        return optax.constant_schedule(0.0)
    if group.schedule not in SCHEDULES:
        raise ValueError(f"param group {name!r}: schedule {group.schedule!r} is not one of {SCHEDULES}")
    decay_steps = max(total_steps - group.warmup_steps, 1)
    if group.schedule == "constant":
        main = optax.constant_schedule(group.lr)
    elif group.schedule == "cosine":
        main = optax.cosine_decay_schedule(group.lr, decay_steps)
    else:
        main = optax.linear_schedule(group.lr, 0.0, decay_steps)
    if group.warmup_steps <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, group.lr, group.warmup_steps), main],
                                [group.warmup_steps])


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: static data of a jitted state
class Optimizer:
    """An optax transformation over {model name: params} plus what metrics need to know of it."""
    tx: optax.GradientTransformation
    groups: Mapping[str, ParamGroup]
    schedules: Mapping[str, optax.Schedule]
    accumulate_steps: int = 1

    @property
    def trainable(self) -> tuple[str, ...]:
        return tuple(name for name, group in self.groups.items() if not group.frozen)

    def check_params(self, params: Mapping[str, Any]) -> None:
        if not isinstance(params, Mapping):
            raise ValueError(f"params must be a dict keyed by model name, got {type(params).__name__}")
        missing = sorted(set(self.groups) - set(params))
        unexpected = sorted(set(params) - set(self.groups))
        if missing or unexpected:
            raise ValueError(f"params models {sorted(params)} do not match the optimizer's param "
                             f"groups {sorted(self.groups)} (missing {missing}, no group for "
                             f"{unexpected})")

    def init(self, params):
        self.check_params(params)
        return self.tx.init(params)

    def update(self, grads, opt_state, params, finite: Optional[jax.Array] = None):
        """`finite` (the train step's flag) reaches the guarded Adam, which then keeps its moments
        on a non-finite step (without gradient accumulation; optax.MultiSteps does not pass it on)."""
        if finite is None:
            return self.tx.update(grads, opt_state, params)
        return self.tx.update(grads, opt_state, params, finite=finite)

    def keep_if_finite(self, finite: jax.Array, new_state, old_state):
        """`new_state` where `finite`, else `old_state`, except the Adam moments that the guarded
        Adam already kept (every step without accumulation): selecting those again would make XLA
        copy the old moments (see `scale_by_adam_guarded`)."""
        def select(path, new, old):
            kept = self.accumulate_steps == 1 and any(
                isinstance(k, jax.tree_util.GetAttrKey) and k.name in ("mu", "nu") for k in path)
            return new if kept else jnp.where(finite, new, old)

        return jax.tree_util.tree_map_with_path(select, new_state, old_state)


def _model_labels(label_of: Callable[[str], str]) -> Callable[[Any], Any]:
    # Label every leaf by its top-level model name; subtrees that an outer mask replaced by
    # optax.MaskedNode have no leaves, so they get no label.
    return lambda tree: {name: jax.tree.map(lambda _: label_of(name), sub)
                         for name, sub in tree.items()}


def scale_by_adam_guarded(b1: float, b2: float, eps: float) -> optax.GradientTransformationExtraArgs:
    """`optax.scale_by_adam` (same state, same values) that takes the train step's `finite` flag:
    a non-finite step leaves the moments and count as they were, decided here rather than by a
    select over the whole state afterwards. The new moments are materialised
    (`optimization_barrier`) before the update reads them, so XLA updates them in place over the
    donated old ones; otherwise it recomputes them from the old moments for the parameter update
    and must copy those first (SD 1.5 U-Net: 3.9 GiB of temporaries, measured with
    `compiled.memory_analysis()`)."""
    adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)

    def update(updates, state, params=None, *, finite=True, **extra_args):
        del params, extra_args
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        mu = keep(optax.tree.update_moment(updates, state.mu, b1, 1), state.mu)
        nu = keep(optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2), state.nu)
        mu, nu = jax.lax.optimization_barrier((mu, nu))
        count = optax.safe_increment(state.count)
        mu_hat = optax.tree.bias_correction(mu, b1, count)
        nu_hat = optax.tree.bias_correction(nu, b2, count)
        updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu_hat, nu_hat)
        return updates, state._replace(count=jnp.where(finite, count, state.count), mu=mu, nu=nu)

    return optax.GradientTransformationExtraArgs(adam.init, update)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm` (same empty state) that scales by one scalar factor: XLA treats
    the reference's per-element division as expensive and materialises the divided gradients for
    the two moments that read them (SD 1.5 U-Net: 3.1 GiB); a multiplication it recomputes in each."""
    def update(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformation(optax.clip_by_global_norm(max_norm).init, update)


def adamw(learning_rate, b1: float, b2: float, eps: float, weight_decay: float):
    """`optax.adamw`'s chain (same state tree, so checkpoints are unchanged) on the guarded Adam."""
    return optax.chain(scale_by_adam_guarded(b1, b2, eps), optax.add_decayed_weights(weight_decay),
                       optax.scale_by_learning_rate(learning_rate))


def make_optimizer(param_groups: Mapping[str, Union[ParamGroup, Mapping[str, Any]]],
                   total_steps: int, grad_clip_norm: Optional[float] = None,
                   accumulate_steps: int = 1) -> Optimizer:
    """AdamW with a learning rate and schedule per model, frozen models untouched.

    param_groups: {model name: ParamGroup or dict of its fields (lr, schedule, warmup_steps,
    weight_decay, frozen, b1, b2, eps)}. Gradients are averaged over `accumulate_steps` micro-steps
    (optax.MultiSteps), then clipped to `grad_clip_norm` in global norm over the trainable models,
    then each model's AdamW applies. Frozen models get zero updates and hold no optimizer state.
    """
    groups: dict[str, ParamGroup] = {}
    fields = {f.name for f in dataclasses.fields(ParamGroup)}
    for name, group in param_groups.items():
        if not isinstance(group, ParamGroup):
            unknown = sorted(set(group) - fields)
            if unknown:
                raise ValueError(f"param group {name!r}: unknown settings {unknown}; known: "
                                 f"{sorted(fields)}")
            group = ParamGroup(**dict(group))
        _check_group(name, group)
        groups[name] = group
    if not groups:
        raise ValueError("make_optimizer needs at least one param group")
    if accumulate_steps < 1:
        raise ValueError(f"accumulate_steps must be >= 1, got {accumulate_steps}")
    if grad_clip_norm is not None and not (math.isfinite(grad_clip_norm) and grad_clip_norm > 0):
        raise ValueError(f"grad_clip_norm must be a finite number > 0 (or None), got {grad_clip_norm!r}")
    schedules = {name: _schedule(name, g, total_steps) for name, g in groups.items()}
    trainable = [name for name, g in groups.items() if not g.frozen]

    transforms: dict[str, optax.GradientTransformation] = {}
    if trainable:
        per_model = optax.multi_transform(
            {name: adamw(schedules[name], b1=groups[name].b1, b2=groups[name].b2,
                         eps=groups[name].eps, weight_decay=groups[name].weight_decay)
             for name in trainable},
            _model_labels(lambda name: name))
        inner = per_model
        if grad_clip_norm is not None:
            inner = optax.chain(clip_by_global_norm(grad_clip_norm), per_model)
        if accumulate_steps > 1:
            inner = optax.MultiSteps(inner, every_k_schedule=accumulate_steps).gradient_transformation()
        transforms[TRAINABLE] = inner
    if len(trainable) < len(groups):
        transforms[FROZEN] = optax.set_to_zero()
    tx = optax.multi_transform(
        transforms, _model_labels(lambda name: FROZEN if groups[name].frozen else TRAINABLE))
    return Optimizer(tx=tx, groups=groups, schedules=schedules, accumulate_steps=accumulate_steps)


@dataclasses.dataclass(frozen=True)
class EMAConfig:
    """EMA decay per optimizer update n, as diffusers' EMAModel.get_decay:
    s = n - update_after_step - 1; decay 0 (copy the params) while s <= 0, else
    "default": (1 + s) / (10 + s), "power": 1 - (1 + s / inv_gamma) ** -power (use_ema_warmup),
    capped at `decay` and floored at `min_decay`; "none": the fixed `decay` from the first update.
    """
    decay: float = 0.9999
    warmup: str = "default"
    min_decay: float = 0.0
    update_after_step: int = 0
    inv_gamma: float = 1.0
    power: float = 2.0 / 3.0

    def __post_init__(self):
        if self.warmup not in EMA_WARMUPS:
            raise ValueError(f"EMA warmup {self.warmup!r} is not one of {EMA_WARMUPS}")
        for field in ("decay", "min_decay"):
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise ValueError(f"EMA {field} must be in [0, 1], got {value!r}")


def ema_decay(optimization_step: jax.Array, config: EMAConfig) -> jax.Array:
    """The decay applied at the `optimization_step`-th optimizer update (1-based)."""
    if config.warmup == "none":
        return jnp.float32(config.decay)
    s = jnp.maximum(jnp.asarray(optimization_step, jnp.float32) - config.update_after_step - 1, 0.0)
    if config.warmup == "power":
        value = 1.0 - (1.0 + s / config.inv_gamma) ** -config.power
    else:
        value = (1.0 + s) / (10.0 + s)
    value = jnp.maximum(jnp.minimum(value, config.decay), config.min_decay)
    return jnp.where(s <= 0, 0.0, value).astype(jnp.float32)


# Polyak averaging ema <- decay * ema + (1 - decay) * params, written as diffusers' in-place form.
def ema_update(ema_params, params, decay: jax.Array):
    return jax.tree.map(lambda e, p: e - (1.0 - decay) * (e - p.astype(e.dtype)), ema_params, params)


def cast_for_compute(params, dtype):
    """Floating leaves to `dtype` (e.g. bfloat16) for the forward pass; integer leaves untouched.
    Differentiable: gradients w.r.t. the float32 master params come back float32."""
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, params)


def _to_float32(tree):
    return jax.tree.map(
        lambda x: jnp.asarray(x, jnp.float32) if jnp.issubdtype(jnp.result_type(x), jnp.floating)
        else jnp.asarray(x), tree)


@flax.struct.dataclass
class TrainState:
    step: jax.Array                 # int32 scalar: apply_gradients calls (micro-steps)
    params: dict                    # {model name: params}; trainable models float32
    opt_state: Any
    ema_params: Optional[dict]      # {trainable model name: params} or None
    rng: jax.Array                  # run key; a step's key is fold_in(rng, step), so resume is exact
    optimizer: Optimizer = flax.struct.field(pytree_node=False)
    ema: Optional[EMAConfig] = flax.struct.field(pytree_node=False, default=None)

    def step_key(self) -> jax.Array:
        return jax.random.fold_in(self.rng, self.step)

    def apply_gradients(self, grads, finite: Optional[jax.Array] = None) -> "TrainState":
        """One micro-step: optimizer update (real every accumulate_steps calls), then the EMA of
        the trainable models when the params moved. `finite`: see `Optimizer.update`."""
        updates, opt_state = self.optimizer.update(grads, self.opt_state, self.params, finite)
        # Frozen models pass through as they are (no `+ 0` over a whole frozen base per step).
        trainable = set(self.optimizer.trainable)
        params = {name: optax.apply_updates(sub, updates[name]) if name in trainable else sub
                  for name, sub in self.params.items()}
        step = self.step + 1
        ema_params = self.ema_params
        if ema_params is not None:
            k = self.optimizer.accumulate_steps
            moved = (step % k) == 0
            # decay 1 leaves the EMA exactly as it was on micro-steps that only accumulate.
            decay = jnp.where(moved, ema_decay(step // k, self.ema), 1.0)
            ema_params = ema_update(ema_params, {name: params[name] for name in ema_params}, decay)
        return self.replace(step=step, params=params, opt_state=opt_state, ema_params=ema_params)


def optimizer_steps(state: TrainState) -> jax.Array:
    """Optimizer updates done so far (micro-steps // accumulate_steps)."""
    return state.step // state.optimizer.accumulate_steps


def learning_rates(state: TrainState) -> dict[str, jax.Array]:
    """{model name: learning rate the next optimizer update applies} (0 for frozen models);
    called in a train step before apply_gradients, this is the rate that step uses."""
    count = optimizer_steps(state)
    return {name: jnp.asarray(schedule(count), jnp.float32)
            for name, schedule in state.optimizer.schedules.items()}


def init_train_state(params: Mapping[str, Any], optimizer: Optimizer, key: jax.Array,
                     use_ema: bool = False, ema: Optional[EMAConfig] = None) -> TrainState:
    """Trainable models' params become float32 masters (frozen ones stay in their dtype, e.g. a
    bfloat16 text encoder); the EMA copies only the trainable models."""
    optimizer.check_params(params)
    trainable = set(optimizer.trainable)
    params = {name: _to_float32(sub) if name in trainable else sub for name, sub in params.items()}
    opt_state = optimizer.init(params)
    ema_params = None
    if use_ema:
        ema = ema or EMAConfig()
        # A copy, not an alias: the state is donated, and one buffer cannot be donated twice.
        ema_params = {name: jax.tree.map(jnp.copy, params[name]) for name in optimizer.trainable}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                      ema_params=ema_params, rng=key, optimizer=optimizer,
                      ema=ema if use_ema else None)
