"""TrainState, per-model optimizers, EMA and mixed-precision casts."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from sdjax.training import state as S


def _params():
    # Distinct shapes per model, so a leaf in the optimizer state can be traced to its model.
    rng = np.random.RandomState(0)
    return {"unet": {"conv": {"kernel": jnp.asarray(rng.randn(3, 3, 2, 4), jnp.float32),
                              "bias": jnp.zeros((4,), jnp.float32)}},
            "text_encoder": {"embed": jnp.asarray(rng.randn(7, 5), jnp.float32)},
            "vae": {"kernel": jnp.asarray(rng.randn(11, 13), jnp.float32)}}


def _grads_like(params, seed, scale=1.0):
    rng = np.random.RandomState(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.randn(*x.shape) * scale, jnp.float32), params)


def _size(tree):
    return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


def _global_norm(tree):
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                             for x in jax.tree.leaves(tree))))


@pytest.fixture(scope="module")
def apply_fn():
    traces = []

    def apply(state, grads):
        traces.append(1)
        return state.apply_gradients(grads)

    fn = jax.jit(apply, donate_argnums=0)
    fn.traces = traces
    return fn


def test_per_model_learning_rates_give_update_ratio(apply_fn):
    opt = S.make_optimizer({"unet": {"lr": 1e-2}, "text_encoder": {"lr": 1e-4},
                            "vae": {"frozen": True}}, total_steps=10)
    params = _params()
    before = jax.tree.map(np.asarray, params)
    state = S.init_train_state(params, opt, jax.random.PRNGKey(0))
    grads = _grads_like(params, 1)
    state = apply_fn(state, grads)
    # Adam's first step is lr * g / (|g| + eps) = lr * sign(g): the update magnitude is the lr.
    du = np.abs(np.asarray(state.params["unet"]["conv"]["kernel"]) - before["unet"]["conv"]["kernel"])
    dt = np.abs(np.asarray(state.params["text_encoder"]["embed"]) - before["text_encoder"]["embed"])
    np.testing.assert_allclose(du, 1e-2, rtol=1e-3)
    np.testing.assert_allclose(dt, 1e-4, rtol=1e-3)
    np.testing.assert_allclose(du.mean() / dt.mean(), 100.0, rtol=1e-3)
    np.testing.assert_array_equal(np.sign(np.asarray(state.params["unet"]["conv"]["kernel"])
                                          - before["unet"]["conv"]["kernel"]),
                                  -np.sign(np.asarray(grads["unet"]["conv"]["kernel"])))


def test_frozen_model_unchanged_and_holds_no_optimizer_state(apply_fn):
    opt = S.make_optimizer({"unet": {"lr": 1e-2, "weight_decay": 0.1},
                            "text_encoder": {"lr": 1e-3}, "vae": {"frozen": True}}, total_steps=10)
    params = _params()
    vae_before = np.asarray(params["vae"]["kernel"])
    state = S.init_train_state(params, opt, jax.random.PRNGKey(0))
    for i in range(3):
        state = apply_fn(state, _grads_like(state.params, i, scale=10.0))
    np.testing.assert_array_equal(np.asarray(state.params["vae"]["kernel"]), vae_before)
    shapes = [np.shape(x) for x in jax.tree.leaves(state.opt_state)]
    assert (11, 13) not in shapes
    trainable = _size(state.params["unet"]) + _size(state.params["text_encoder"])
    scalars = sum(1 for s in shapes if s == ())
    # Adam's two moments for the trainable models, plus step counters, nothing else.
    assert _size(state.opt_state) == 2 * trainable + scalars
    assert S.learning_rates(state)["vae"] == 0.0


def test_clipping_bounds_global_norm_over_trainable_models():
    clip = 0.5
    opt = S.make_optimizer({"unet": {"lr": 1e-3}, "text_encoder": {"lr": 1e-3},
                            "vae": {"frozen": True}}, total_steps=10, grad_clip_norm=clip)
    b1 = opt.groups["unet"].b1

    def first_moment_grads(grads):
        state = S.init_train_state(_params(), opt, jax.random.PRNGKey(0))
        state = state.apply_gradients(grads)
        # mu after one step is (1 - b1) * (the gradient Adam saw), per trainable leaf.
        adam_states = [s for s in jax.tree.leaves(
            state.opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")]
        seen = [jax.tree.map(lambda m: np.asarray(m) / (1 - b1), s.mu) for s in adam_states]
        return _global_norm(seen)

    big = _grads_like(_params(), 2, scale=100.0)
    trainable_norm = _global_norm({k: big[k] for k in ("unet", "text_encoder")})
    assert trainable_norm > 100 * clip
    np.testing.assert_allclose(first_moment_grads(big), clip, rtol=1e-4)
    # Small trainable grads pass unclipped even when the frozen model's grads are huge.
    small = _grads_like(_params(), 3, scale=0.001)
    small["vae"] = big["vae"]
    small_norm = _global_norm({k: small[k] for k in ("unet", "text_encoder")})
    assert small_norm < clip
    np.testing.assert_allclose(first_moment_grads(small), small_norm, rtol=1e-4)


def test_accumulation_equals_one_step_on_mean_gradient(apply_fn):
    k = 3
    groups = {"unet": {"lr": 1e-2, "weight_decay": 0.01, "schedule": "cosine", "warmup_steps": 1},
              "text_encoder": {"lr": 3e-3}, "vae": {"frozen": True}}
    accumulating = S.make_optimizer(groups, total_steps=4, grad_clip_norm=1.0, accumulate_steps=k)
    plain = S.make_optimizer(groups, total_steps=4, grad_clip_norm=1.0)
    a = S.init_train_state(_params(), accumulating, jax.random.PRNGKey(0), use_ema=True)
    p = S.init_train_state(_params(), plain, jax.random.PRNGKey(0), use_ema=True)
    for update in range(3):
        micro = [_grads_like(_params(), 10 * update + i) for i in range(k)]
        start = jax.tree.map(np.asarray, a.params)
        for i, g in enumerate(micro):
            a = apply_fn(a, g)
            if i < k - 1:  # nothing moves on the accumulating micro-steps
                chex.assert_trees_all_equal(jax.tree.map(np.asarray, a.params), start)
        p = apply_fn(p, jax.tree.map(lambda *g: sum(g) / k, *micro))
        chex.assert_trees_all_close(a.params, p.params, rtol=1e-5, atol=1e-7)
        chex.assert_trees_all_close(a.ema_params, p.ema_params, rtol=1e-5, atol=1e-7)
        assert int(S.optimizer_steps(a)) == int(S.optimizer_steps(p)) == update + 1
        assert S.learning_rates(a) == S.learning_rates(p)
    assert int(a.step) == 3 * k


@pytest.mark.parametrize("kwargs", [dict(), dict(decay=0.99), dict(use_ema_warmup=True, power=0.75),
                                    dict(update_after_step=3, min_decay=0.5, decay=0.95)])
def test_ema_decay_matches_diffusers(kwargs):
    reference = EMAModel([torch.nn.Parameter(torch.zeros(1))], **kwargs)
    config = S.EMAConfig(decay=kwargs.get("decay", 0.9999),
                         warmup="power" if kwargs.get("use_ema_warmup") else "default",
                         min_decay=kwargs.get("min_decay", 0.0),
                         update_after_step=kwargs.get("update_after_step", 0),
                         power=kwargs.get("power", 2 / 3))
    for n in [1, 2, 3, 4, 5, 10, 100, 10000, 10 ** 6]:
        np.testing.assert_allclose(float(S.ema_decay(n, config)), reference.get_decay(n),
                                   rtol=1e-6, err_msg=f"optimization step {n}")


def test_ema_matches_numpy_recurrence(apply_fn):
    config = S.EMAConfig(decay=0.9)
    opt = S.make_optimizer({"unet": {"lr": 0.05}, "text_encoder": {"lr": 0.02},
                            "vae": {"frozen": True}}, total_steps=20)
    state = S.init_train_state(_params(), opt, jax.random.PRNGKey(0), use_ema=True, ema=config)
    assert set(state.ema_params) == {"unet", "text_encoder"}
    ema = jax.tree.map(lambda x: np.asarray(x, np.float64), state.ema_params)
    for n in range(1, 16):
        state = apply_fn(state, _grads_like(state.params, n))
        s = n - 1  # diffusers: decay 0 on the first update, then (1 + s) / (10 + s) capped
        d = 0.0 if s <= 0 else min((1 + s) / (10 + s), 0.9)
        params = {k: state.params[k] for k in ema}
        ema = jax.tree.map(lambda e, p: d * e + (1 - d) * np.asarray(p, np.float64), ema, params)
    chex.assert_trees_all_close(jax.tree.map(np.asarray, state.ema_params), ema, rtol=1e-5, atol=1e-6)
    # The EMA lags the params: it is neither equal to them nor to the initial params.
    assert not np.allclose(np.asarray(state.ema_params["unet"]["conv"]["kernel"]),
                           np.asarray(state.params["unet"]["conv"]["kernel"]))


def test_fixed_ema_decay_applies_without_warmup():
    config = S.EMAConfig(decay=0.5, warmup="none")
    ema = {"w": jnp.zeros(3)}
    for n in (1, 2, 3):
        ema = S.ema_update(ema, {"w": jnp.ones(3)}, S.ema_decay(n, config))
    np.testing.assert_allclose(np.asarray(ema["w"]), 1 - 0.5 ** 3, rtol=1e-6)


def test_state_is_a_pytree_that_jits_and_donates(apply_fn):
    opt = S.make_optimizer({"unet": {"lr": 1e-3}, "text_encoder": {"lr": 1e-3},
                            "vae": {"frozen": True}}, total_steps=10, accumulate_steps=2)
    state = S.init_train_state(_params(), opt, jax.random.PRNGKey(0), use_ema=True)
    treedef = jax.tree.structure(state)
    n0 = len(apply_fn.traces)
    new = apply_fn(state, _grads_like(_params(), 0))
    assert jax.tree.structure(new) == treedef
    # The donated state's buffers were handed to the step for reuse.
    assert state.step.is_deleted()
    assert state.params["unet"]["conv"]["kernel"].is_deleted()
    assert state.ema_params["unet"]["conv"]["kernel"].is_deleted()
    for i in range(3):
        new = apply_fn(new, _grads_like(_params(), i + 1))
    assert len(apply_fn.traces) - n0 == 1, "same state structure must not recompile"
    assert int(new.step) == 4 and int(S.optimizer_steps(new)) == 2


def test_step_key_is_fold_in_of_run_key_and_step():
    opt = S.make_optimizer({"m": {"lr": 1e-3}}, total_steps=10)
    state = S.init_train_state({"m": {"w": jnp.ones(2)}}, opt, jax.random.PRNGKey(7))
    np.testing.assert_array_equal(np.asarray(state.step_key()),
                                  np.asarray(jax.random.fold_in(jax.random.PRNGKey(7), 0)))
    later = state.apply_gradients({"m": {"w": jnp.ones(2)}})
    assert not np.array_equal(np.asarray(later.step_key()), np.asarray(state.step_key()))


@pytest.mark.parametrize("schedule,diffusers_name", [("constant", "constant_with_warmup"),
                                                      ("cosine", "cosine"), ("linear", "linear")])
@pytest.mark.parametrize("warmup", [0, 3])
def test_schedules_match_diffusers(schedule, diffusers_name, warmup):
    total, lr = 12, 1e-3
    opt = S.make_optimizer({"unet": {"lr": lr, "schedule": schedule, "warmup_steps": warmup}},
                           total_steps=total)
    torch_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = get_scheduler(diffusers_name, torch_opt, num_warmup_steps=warmup,
                          num_training_steps=total)
    for count in range(total + 1):
        np.testing.assert_allclose(float(opt.schedules["unet"](count)),
                                   torch_opt.param_groups[0]["lr"], rtol=1e-5, atol=1e-12,
                                   err_msg=f"{schedule} at update {count}")
        torch_opt.step()
        sched.step()


def test_learning_rates_count_optimizer_updates():
    opt = S.make_optimizer({"unet": {"lr": 1.0, "schedule": "linear"}, "te": {"lr": 0.5},
                            "vae": {"frozen": True}}, total_steps=4, accumulate_steps=2)
    params = {"unet": {"w": jnp.ones(2)}, "te": {"w": jnp.ones(2)}, "vae": {"w": jnp.ones(2)}}
    state = S.init_train_state(params, opt, jax.random.PRNGKey(0))
    seen = []
    for _ in range(4):
        seen.append({k: float(v) for k, v in S.learning_rates(state).items()})
        state = state.apply_gradients(jax.tree.map(jnp.ones_like, params))
    assert [s["unet"] for s in seen] == [1.0, 1.0, 0.75, 0.75]
    assert all(s["te"] == 0.5 and s["vae"] == 0.0 for s in seen)


def test_compute_cast_keeps_float32_masters_and_integer_leaves():
    params = {"unet": {"w": jnp.ones((2, 2), jnp.bfloat16), "ids": jnp.arange(3)},
              "text_encoder": {"w": jnp.ones((2,), jnp.bfloat16)}}
    opt = S.make_optimizer({"unet": {"lr": 1e-3}, "text_encoder": {"frozen": True}}, total_steps=5)
    state = S.init_train_state(params, opt, jax.random.PRNGKey(0))
    assert state.params["unet"]["w"].dtype == jnp.float32
    assert state.params["unet"]["ids"].dtype == jnp.int32
    assert state.params["text_encoder"]["w"].dtype == jnp.bfloat16  # frozen: kept as given
    compute = S.cast_for_compute(state.params, jnp.bfloat16)
    assert compute["unet"]["w"].dtype == jnp.bfloat16
    assert compute["unet"]["ids"].dtype == jnp.int32
    grads = jax.grad(lambda p: jnp.sum(S.cast_for_compute(p, jnp.bfloat16)["w"] ** 2))(
        {"w": state.params["unet"]["w"]})
    assert grads["w"].dtype == jnp.float32


def test_ema_is_a_copy_not_an_alias():
    opt = S.make_optimizer({"m": {"lr": 1e-3}}, total_steps=5)
    state = S.init_train_state({"m": {"w": jnp.ones(4)}}, opt, jax.random.PRNGKey(0), use_ema=True)
    assert (state.ema_params["m"]["w"].unsafe_buffer_pointer()
            != state.params["m"]["w"].unsafe_buffer_pointer())


def test_errors_name_the_group_and_setting():
    with pytest.raises(ValueError, match="'unet'.*'warmup'"):
        S.make_optimizer({"unet": {"lr": 1e-3, "warmup": 10}}, total_steps=5)
    with pytest.raises(ValueError, match="'unet'.*'step'"):
        S.make_optimizer({"unet": {"lr": 1e-3, "schedule": "step"}}, total_steps=5)
    with pytest.raises(ValueError, match="'text_encoder'.*lr"):
        S.make_optimizer({"text_encoder": {"lr": 0.0}}, total_steps=5)
    opt = S.make_optimizer({"unet": {"lr": 1e-3}}, total_steps=5)
    with pytest.raises(ValueError, match=r"missing \['unet'\].*no group for \['vae'\]"):
        S.init_train_state({"vae": {"w": jnp.ones(2)}}, opt, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="'sometimes'"):
        S.EMAConfig(warmup="sometimes")


def test_guarded_adamw_and_clipping_match_optax_and_keep_moments_on_nonfinite_steps():
    params = _params()["unet"]
    ours = optax.chain(S.clip_by_global_norm(1.0), S.adamw(1e-2, 0.9, 0.999, 1e-8, 1e-2))
    reference = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2))
    state, ref_state = ours.init(params), reference.init(params)
    assert jax.tree.structure(state) == jax.tree.structure(ref_state)  # checkpoints unchanged
    for seed in range(3):
        grads = _grads_like(params, seed, scale=3.0)  # norm > 1: clipping applies
        updates, state = ours.update(grads, state, params, finite=jnp.bool_(True))
        ref_updates, ref_state = reference.update(grads, ref_state, params)
        chex.assert_trees_all_close(updates, ref_updates, rtol=1e-6, atol=1e-9)
        chex.assert_trees_all_close(state, ref_state, rtol=1e-6, atol=1e-9)
    bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), _grads_like(params, 9))
    _, kept = ours.update(bad, state, params, finite=jnp.bool_(False))
    chex.assert_trees_all_equal(kept[1][0], state[1][0])  # Adam's count and moments as they were


def test_optimizer_step_updates_moments_in_place():
    """The guarded Adam and the scalar clip let XLA write the moments and params over the donated
    old ones: no gradient-sized temporaries (optax's chain needs about 1.2x the params here)."""
    shapes = {"a": (512, 512), "b": (256, 1024), "c": (3, 3, 64, 128)}
    params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}
    optimizer = S.make_optimizer({"unet": {"lr": 1e-3, "weight_decay": 1e-2}}, total_steps=10,
                                 grad_clip_norm=1.0)
    opt_state = jax.eval_shape(optimizer.init, {"unet": params})

    def step(p, o, g):
        finite = jnp.isfinite(optax.tree.norm(g))
        u, o = optimizer.update(g, o, p, finite)
        p = jax.tree.map(lambda x, d: jnp.where(finite, x + d, x), p, u)
        return p, o

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
        {"unet": params}, opt_state, {"unet": params}).compile()
    param_bytes = sum(4 * int(np.prod(s)) for s in shapes.values())
    assert compiled.memory_analysis().temp_size_in_bytes < 0.05 * param_bytes
