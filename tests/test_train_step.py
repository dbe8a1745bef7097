"""The jitted train step: LDM/VAE/CLIP objectives, metrics, frozen groups, mixed precision, the
non-finite guard, no retracing."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import parallel
from sdjax.models.clip import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig
from sdjax.weights.architecture import Architecture
from sdjax.training import state as state_lib
from sdjax.training import step as step_lib

BATCH = 4


def _ids(tokenizers, captions):
    return np.stack([t(captions) for t in tokenizers], axis=1)[:, :, None]


@pytest.fixture(scope="module")
def ldm(tiny_model):
    arch = Architecture.of(tiny_model)
    task = step_lib.LDMTask(arch, empty_ids=_ids(tiny_model.tokenizers, [""])[0],
                            caption_dropout=0.2, snr_gamma=5.0, offset_noise=0.05)
    optimizer = state_lib.make_optimizer(
        {"unet": {"lr": 1e-3}, "text_encoder": {"lr": 1e-4}, "vae": {"frozen": True}},
        total_steps=100, grad_clip_norm=1.0)
    state = state_lib.init_train_state(tiny_model.params, optimizer, jax.random.key(0),
                                       use_ema=True, ema=state_lib.EMAConfig(decay=0.9))
    mesh = parallel.make_mesh()
    shardings = step_lib.state_sharding(mesh, state)
    traces = []
    fn = step_lib.make_train_step(task, mesh, shardings, on_trace=lambda: traces.append(1))
    rng = np.random.default_rng(0)
    batch = {"pixels": rng.uniform(-1, 1, (BATCH, 32, 32, 3)).astype(np.float32),
             "input_ids": _ids(tiny_model.tokenizers, ["a red circle", "a blue square"] * 2)}
    return {"fn": fn, "state": state, "shardings": shardings, "mesh": mesh, "batch": batch,
            "traces": traces}


def _fresh(ldm):
    return step_lib.place(ldm["state"], ldm["shardings"])


def _run(ldm, state, batch, step):
    return ldm["fn"](state, step_lib.device_batch(batch, ldm["mesh"]),
                     jax.random.fold_in(jax.random.key(1), step))


def test_ldm_step_trains_unet_and_text_encoder_not_the_frozen_vae(ldm):
    state = _fresh(ldm)
    before = jax.device_get(state.params)
    losses = []
    for i in range(4):
        state, metrics = _run(ldm, state, ldm["batch"], i)
        losses.append(float(metrics["loss"]))
    metrics = jax.device_get(metrics)
    assert int(state.step) == 4 and int(metrics["finite"]) == 1
    assert set(metrics) >= {"loss", "grad_norm", "param_norm", "lr/unet", "lr/text_encoder", "lr/vae"}
    np.testing.assert_allclose([metrics["lr/unet"], metrics["lr/text_encoder"], metrics["lr/vae"]],
                               [1e-3, 1e-4, 0.0], rtol=1e-6)
    assert metrics["grad_norm"] > 0 and np.isfinite(losses).all()
    after = jax.device_get(state.params)
    changed = lambda a, b: any(not np.array_equal(x, y) for x, y in
                               zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert changed(before["unet"], after["unet"])
    assert changed(before["text_encoder"], after["text_encoder"])
    assert not changed(before["vae"], after["vae"])
    assert set(state.ema_params) == {"unet", "text_encoder"}
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(after["unet"]))


def test_same_batch_and_key_give_the_same_step(ldm):
    a, ma = _run(ldm, _fresh(ldm), ldm["batch"], 7)
    b, mb = _run(ldm, _fresh(ldm), ldm["batch"], 7)
    assert float(ma["loss"]) == float(mb["loss"])
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    _, mc = _run(ldm, _fresh(ldm), ldm["batch"], 8)
    assert float(mc["loss"]) != float(ma["loss"])  # the key draws the noise and timesteps


def test_nonfinite_step_is_skipped_and_leaves_the_state_unchanged(ldm):
    state, _ = _run(ldm, _fresh(ldm), ldm["batch"], 0)
    before = jax.device_get((state.step, state.params, state.opt_state, state.ema_params))
    bad = dict(ldm["batch"], pixels=np.full_like(ldm["batch"]["pixels"], np.nan))
    state, metrics = _run(ldm, state, bad, 1)
    assert int(metrics["finite"]) == 0 and not np.isfinite(float(metrics["loss"]))
    after = jax.device_get((state.step, state.params, state.opt_state, state.ema_params))
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(x, y)
    state, metrics = _run(ldm, state, ldm["batch"], 2)
    assert int(metrics["finite"]) == 1 and int(state.step) == 2


def test_new_batches_and_keys_do_not_retrace(ldm):
    state = _fresh(ldm)
    for i in range(3):
        batch = dict(ldm["batch"], pixels=ldm["batch"]["pixels"] * (0.5 + 0.1 * i))
        state, _ = _run(ldm, state, batch, i)
    assert len(ldm["traces"]) == 1


def test_vae_objective_in_bfloat16_keeps_float32_masters(tiny_model):
    arch = Architecture.of(tiny_model, jnp.bfloat16)
    task = step_lib.VAETask(arch, kl_weight=1e-3, reconstruction_loss="l2")
    optimizer = state_lib.make_optimizer({"vae": {"lr": 1e-3}}, total_steps=10)
    state = state_lib.init_train_state({"vae": tiny_model.params["vae"]}, optimizer,
                                       jax.random.key(0))
    mesh = parallel.make_mesh()
    shardings = step_lib.state_sharding(mesh, state)
    fn = step_lib.make_train_step(task, mesh, shardings)
    state = step_lib.place(state, shardings)
    pixels = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    batch = step_lib.device_batch({"pixels": pixels}, mesh)
    state, metrics = fn(state, batch, jax.random.key(0))
    assert int(metrics["finite"]) == 1
    assert float(metrics["kl"]) > 0 and float(metrics["reconstruction"]) > 0
    np.testing.assert_allclose(float(metrics["loss"]),
                               float(metrics["reconstruction"]) + 1e-3 * float(metrics["kl"]),
                               rtol=1e-5)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))


def test_clip_objective_learns_to_match_pairs():
    text = CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1,
                          num_heads=2, max_position_embeddings=8, projection_dim=8)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                              image_size=8, patch_size=4, projection_dim=8)
    config = CLIPConfig(text=text, vision=vision)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 60, (4, 8)).astype(np.int32)
    pixels = rng.uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32)
    params = {"clip": CLIPModel(config).init(jax.random.key(0), ids[:1], pixels[:1])["params"]}
    optimizer = state_lib.make_optimizer({"clip": {"lr": 3e-3}}, total_steps=100)
    state = state_lib.init_train_state(params, optimizer, jax.random.key(0))
    mesh = parallel.make_mesh()
    shardings = step_lib.state_sharding(mesh, state)
    fn = step_lib.make_train_step(step_lib.CLIPTask(config), mesh, shardings)
    state = step_lib.place(state, shardings)
    batch = step_lib.device_batch({"pixels": pixels, "input_ids": ids}, mesh)
    losses = []
    for i in range(15):
        state, metrics = fn(state, batch, jax.random.key(i))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0]
    assert float(metrics["accuracy"]) == 1.0

    # Hard negatives: each image is also scored against captions of its own that match no image.
    negatives = np.stack([np.roll(ids, 1, axis=1), np.roll(ids, 2, axis=1)], axis=1)
    task = step_lib.CLIPTask(config)
    with_negatives = step_lib.device_batch(
        {"pixels": pixels, "input_ids": ids, "negative_input_ids": negatives}, mesh)
    loss_plain, _ = task.loss(jax.device_get(state.params), jax.device_get(batch), None)
    loss_neg, m = task.loss(jax.device_get(state.params), jax.device_get(with_negatives), None)
    assert float(loss_neg) > float(loss_plain)  # more candidates, never an easier choice
    fn = step_lib.make_train_step(task, mesh, shardings)
    state, metrics = fn(state, with_negatives, jax.random.key(99))
    assert float(metrics["finite"]) == 1.0


def test_place_copies_unless_told_to_consume_the_state(ldm):
    state = jax.tree.map(lambda x: x, ldm["state"])  # a fresh tree of the fixture's arrays
    moment = lambda s: jax.tree.leaves(s.opt_state)[1]
    copied = step_lib.place(state, ldm["shardings"])
    assert moment(copied).unsafe_buffer_pointer() != moment(state).unsafe_buffer_pointer()
    _run(ldm, copied, ldm["batch"], 0)  # donates the copies only
    assert not moment(state).is_deleted()
    consumed = step_lib.place(state, ldm["shardings"], consume=True)
    assert moment(consumed).unsafe_buffer_pointer() == moment(state).unsafe_buffer_pointer()
    # Host params (the frozen VAE here) are copied even so: a donating step leaves them intact.
    vae = lambda s: jax.tree.leaves(s.params["vae"])[0]
    assert isinstance(vae(state), np.ndarray)
    assert vae(consumed).unsafe_buffer_pointer() != vae(state).ctypes.data
