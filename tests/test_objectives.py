"""Training objectives against straightforward numpy computations and the diffusers reference."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from sdjax.diffusion.schedules import add_noise
from sdjax.training import objectives as obj
from tests.helpers import to_nchw, to_nhwc

T = 1000
SCHEDULER = DDPMScheduler(num_train_timesteps=T, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear")
ALPHAS_CUMPROD = SCHEDULER.alphas_cumprod.numpy().astype(np.float32)
RNG = np.random.RandomState(0)
X0 = RNG.randn(4, 8, 8, 4).astype(np.float32)
NOISE = RNG.randn(4, 8, 8, 4).astype(np.float32)
TIMESTEPS = np.array([0, 10, 500, 999], np.int32)


def _np_targets(prediction_type):
    ac = ALPHAS_CUMPROD[TIMESTEPS].astype(np.float64)[:, None, None, None]
    return {"epsilon": NOISE,
            "v_prediction": np.sqrt(ac) * NOISE - np.sqrt(1 - ac) * X0,
            "sample": X0}[prediction_type]


def _np_min_snr(prediction_type, gamma):
    ac = ALPHAS_CUMPROD[TIMESTEPS].astype(np.float64)
    s = ac / (1 - ac)
    m = np.minimum(s, gamma)
    return {"epsilon": m / s, "v_prediction": m / (s + 1), "sample": m}[prediction_type]


def test_add_noise_matches_numpy_and_diffusers():
    ours = np.asarray(add_noise(jnp.asarray(ALPHAS_CUMPROD), jnp.asarray(X0), jnp.asarray(NOISE),
                                jnp.asarray(TIMESTEPS)))
    ac = ALPHAS_CUMPROD[TIMESTEPS].astype(np.float64)[:, None, None, None]
    np.testing.assert_allclose(ours, np.sqrt(ac) * X0 + np.sqrt(1 - ac) * NOISE, atol=1e-5)
    ref = SCHEDULER.add_noise(to_nchw(X0), to_nchw(NOISE), torch.from_numpy(TIMESTEPS).long())
    np.testing.assert_allclose(ours, to_nhwc(ref), atol=1e-5)


def test_velocity_matches_numpy_and_diffusers():
    ours = np.asarray(obj.velocity(jnp.asarray(X0), jnp.asarray(NOISE), jnp.asarray(TIMESTEPS),
                                   jnp.asarray(ALPHAS_CUMPROD)))
    np.testing.assert_allclose(ours, _np_targets("v_prediction"), atol=1e-5)
    ref = SCHEDULER.get_velocity(to_nchw(X0), to_nchw(NOISE), torch.from_numpy(TIMESTEPS).long())
    np.testing.assert_allclose(ours, to_nhwc(ref), atol=1e-5)


def test_snr_matches_diffusers_compute_snr():
    ours = np.asarray(obj.snr(jnp.asarray(TIMESTEPS), jnp.asarray(ALPHAS_CUMPROD)))
    ref = compute_snr(SCHEDULER, torch.from_numpy(TIMESTEPS).long()).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-4)


@pytest.mark.parametrize("prediction_type", obj.PREDICTION_TYPES)
@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_diffusion_loss_matches_numpy(prediction_type, snr_gamma):
    prediction = RNG.randn(*X0.shape).astype(np.float32)
    loss, per_example = obj.diffusion_loss(
        jnp.asarray(prediction), jnp.asarray(X0), jnp.asarray(NOISE), jnp.asarray(TIMESTEPS),
        jnp.asarray(ALPHAS_CUMPROD), prediction_type, snr_gamma)
    expected = ((prediction - _np_targets(prediction_type)) ** 2).mean(axis=(1, 2, 3))
    if snr_gamma is not None:
        expected = expected * _np_min_snr(prediction_type, snr_gamma)
    np.testing.assert_allclose(np.asarray(per_example), expected, rtol=1e-4)
    np.testing.assert_allclose(float(loss), expected.mean(), rtol=1e-4)


@pytest.mark.parametrize("prediction_type", obj.PREDICTION_TYPES)
def test_diffusion_loss_is_zero_when_prediction_equals_target(prediction_type):
    target = obj.diffusion_target(jnp.asarray(X0), jnp.asarray(NOISE), jnp.asarray(TIMESTEPS),
                                  jnp.asarray(ALPHAS_CUMPROD), prediction_type)
    loss, per_example = obj.diffusion_loss(target, jnp.asarray(X0), jnp.asarray(NOISE),
                                           jnp.asarray(TIMESTEPS), jnp.asarray(ALPHAS_CUMPROD),
                                           prediction_type, snr_gamma=5.0)
    assert float(loss) == 0.0
    assert np.all(np.asarray(per_example) == 0.0)


def test_min_snr_weights_are_bounded_and_equal_in_x0_space():
    gamma = 5.0
    s = obj.snr(jnp.arange(T), jnp.asarray(ALPHAS_CUMPROD))
    eps = np.asarray(obj.min_snr_weights(s, gamma, "epsilon"))
    v = np.asarray(obj.min_snr_weights(s, gamma, "v_prediction"))
    x0 = np.asarray(obj.min_snr_weights(s, gamma, "sample"))
    assert np.all((eps > 0) & (eps <= 1.0 + 1e-6))
    assert np.all((v > 0) & (v < 1.0))
    assert np.all((x0 > 0) & (x0 <= gamma))
    # Low-noise steps (snr > gamma) are down-weighted; high-noise ones keep weight 1 for eps.
    assert eps[0] < 0.01 and eps[-1] == pytest.approx(1.0)
    # All three are min(snr, gamma) in x0-space: ||eps err||^2 = snr ||x0 err||^2,
    # ||v err||^2 = (snr + 1) ||x0 err||^2.
    np.testing.assert_allclose(eps * np.asarray(s), x0, rtol=1e-4)
    np.testing.assert_allclose(v * (np.asarray(s) + 1), x0, rtol=1e-4)


def test_min_snr_eps_weight_is_finite_at_zero_snr():
    w = obj.min_snr_weights(jnp.array([0.0, 1.0, 100.0]), 5.0, "epsilon")
    np.testing.assert_allclose(np.asarray(w), [1.0, 1.0, 0.05], rtol=1e-6)


def test_unknown_prediction_type_names_itself():
    with pytest.raises(ValueError, match="'x_start'"):
        obj.diffusion_target(jnp.asarray(X0), jnp.asarray(NOISE), jnp.asarray(TIMESTEPS),
                             jnp.asarray(ALPHAS_CUMPROD), "x_start")


def test_offset_noise_is_noise_plus_scaled_per_channel_offset():
    key = jax.random.PRNGKey(3)
    shape = (6, 16, 16, 4)
    ours = np.asarray(obj.offset_noise(key, shape, 0.1))
    noise_key, offset_key = jax.random.split(key)
    expected = (np.asarray(jax.random.normal(noise_key, shape))
                + 0.1 * np.asarray(jax.random.normal(offset_key, (6, 4)))[:, None, None, :])
    np.testing.assert_allclose(ours, expected, atol=1e-6)
    # Strength 0 is plain N(0, 1) noise; a large strength makes (H, W) means track the offset.
    plain = np.asarray(obj.offset_noise(key, shape, 0.0))
    np.testing.assert_allclose(plain, np.asarray(jax.random.normal(noise_key, shape)), atol=1e-6)
    strong = np.asarray(obj.offset_noise(key, shape, 10.0))
    np.testing.assert_allclose(strong.mean(axis=(1, 2)),
                               10.0 * np.asarray(jax.random.normal(offset_key, (6, 4))), atol=0.5)


def test_sample_timesteps_cover_the_whole_range_evenly():
    t = np.asarray(obj.sample_timesteps(jax.random.PRNGKey(0), 20000, T))
    assert t.dtype == np.int32 and t.shape == (20000,)
    assert t.min() >= 0 and t.max() == T - 1
    assert abs(t.mean() - (T - 1) / 2) < 10
    assert len(np.unique(t)) > 990


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 1.0])
def test_caption_dropout_replaces_whole_rows_at_the_given_rate(p):
    batch, length = 4000, 6
    ids = jnp.tile(jnp.arange(1, length + 1, dtype=jnp.int32)[None], (batch, 1))
    empty = jnp.array([49406] + [49407] * (length - 1), jnp.int32)
    out = np.asarray(obj.caption_dropout(jax.random.PRNGKey(1), ids, empty, p))
    dropped = np.all(out == np.asarray(empty)[None], axis=1)
    kept = np.all(out == np.asarray(ids), axis=1)
    assert np.all(dropped ^ kept), "every row is either untouched or entirely the empty prompt"
    assert abs(dropped.mean() - p) < 0.025


def test_caption_dropout_zeroes_embeddings_and_rejects_a_mismatched_empty():
    emb = jnp.ones((8, 3, 5))
    out = obj.caption_dropout(jax.random.PRNGKey(0), emb, jnp.zeros((3, 5)), 1.0)
    assert np.all(np.asarray(out) == 0)
    with pytest.raises(ValueError, match=r"\(4,\)"):
        obj.caption_dropout(jax.random.PRNGKey(0), jnp.ones((8, 3), jnp.int32), jnp.zeros(4), 0.5)


@pytest.mark.parametrize("reconstruction_loss", ["l1", "l2"])
def test_vae_loss_matches_numpy(reconstruction_loss):
    rec = RNG.randn(3, 16, 16, 3).astype(np.float32)
    target = RNG.randn(3, 16, 16, 3).astype(np.float32)
    mean = RNG.randn(3, 4, 4, 4).astype(np.float32)
    logvar = RNG.randn(3, 4, 4, 4).astype(np.float32) * 0.5
    loss, metrics = obj.vae_loss(jnp.asarray(rec), jnp.asarray(target), jnp.asarray(mean),
                                 jnp.asarray(logvar), 1e-2, reconstruction_loss)
    diff = rec.astype(np.float64) - target
    expected_rec = np.abs(diff).mean() if reconstruction_loss == "l1" else (diff ** 2).mean()
    kl_per_example = np.zeros(3)
    for b in range(3):  # KL(N(m, s^2) || N(0, 1)) = 0.5 (m^2 + s^2 - 1 - log s^2), summed
        m, lv = mean[b].astype(np.float64).ravel(), logvar[b].astype(np.float64).ravel()
        kl_per_example[b] = 0.5 * np.sum(m ** 2 + np.exp(lv) - 1 - lv)
    np.testing.assert_allclose(float(metrics["reconstruction"]), expected_rec, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["kl"]), kl_per_example.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(loss), expected_rec + 1e-2 * kl_per_example.mean(), rtol=1e-5)


def test_vae_loss_agrees_with_model_posterior_kl():
    from sdjax.models.vae import DiagonalGaussian
    mean = jnp.asarray(RNG.randn(2, 4, 4, 4).astype(np.float32))
    logvar = jnp.asarray(RNG.randn(2, 4, 4, 4).astype(np.float32))
    _, metrics = obj.vae_loss(jnp.zeros((2, 8, 8, 3)), jnp.zeros((2, 8, 8, 3)), mean, logvar, 1.0)
    np.testing.assert_allclose(float(metrics["kl"]),
                               float(jnp.mean(DiagonalGaussian(mean, logvar).kl())), rtol=1e-5)


def test_vae_loss_zero_for_perfect_reconstruction_and_standard_posterior():
    x = jnp.asarray(RNG.randn(2, 8, 8, 3).astype(np.float32))
    loss, metrics = obj.vae_loss(x, x, jnp.zeros((2, 2, 2, 4)), jnp.zeros((2, 2, 2, 4)), 1.0, "l2")
    assert float(loss) == 0.0 and float(metrics["kl"]) == 0.0
    with pytest.raises(ValueError, match="'l3'"):
        obj.vae_loss(x, x, jnp.zeros((2, 2, 2, 4)), jnp.zeros((2, 2, 2, 4)), 1.0, "l3")


def _np_clip_loss(text, image, logit_scale):
    text = text / np.linalg.norm(text, axis=1, keepdims=True)
    image = image / np.linalg.norm(image, axis=1, keepdims=True)
    logits = np.exp(min(logit_scale, math.log(100))) * text @ image.T

    def ce(lg):
        lg = lg - lg.max(axis=1, keepdims=True)
        logp = lg - np.log(np.exp(lg).sum(axis=1, keepdims=True))
        return -np.mean(np.diag(logp))

    return 0.5 * (ce(logits) + ce(logits.T)), logits


@pytest.mark.parametrize("logit_scale", [math.log(1 / 0.07), 2.0, 6.0])
def test_clip_contrastive_loss_matches_numpy(logit_scale):
    rng = np.random.RandomState(11)  # its own draws: near-tied logits would make argmax flaky
    text = rng.randn(6, 16).astype(np.float64)
    image = text + 0.8 * rng.randn(6, 16)
    loss, metrics = obj.clip_contrastive_loss(jnp.asarray(text, jnp.float32),
                                              jnp.asarray(image, jnp.float32), logit_scale)
    expected, logits = _np_clip_loss(text, image, logit_scale)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-4, atol=1e-6)
    labels = np.arange(6)
    t2i = np.mean(logits.argmax(axis=1) == labels)
    i2t = np.mean(logits.argmax(axis=0) == labels)
    np.testing.assert_allclose(float(metrics["text_to_image_accuracy"]), t2i)
    np.testing.assert_allclose(float(metrics["image_to_text_accuracy"]), i2t)
    np.testing.assert_allclose(float(metrics["accuracy"]), 0.5 * (t2i + i2t))
    # Above log(100) the scale is clamped (6.0 > log 100 = 4.605).
    np.testing.assert_allclose(float(metrics["logit_scale"]), min(math.exp(logit_scale), 100.0),
                               rtol=1e-5)


def test_clip_hard_negatives_join_the_image_to_text_candidates():
    text = RNG.randn(5, 8)
    image = text + 0.5 * RNG.randn(5, 8)
    negatives = RNG.randn(5, 3, 8)
    scale = 2.5
    loss, metrics = obj.clip_contrastive_loss(jnp.asarray(text, jnp.float32),
                                              jnp.asarray(image, jnp.float32), scale,
                                              jnp.asarray(negatives, jnp.float32))
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    candidates = np.concatenate([unit(text), unit(negatives.reshape(15, 8))])
    logits_i = math.exp(scale) * unit(image) @ candidates.T          # (5, 20)
    logits_t = math.exp(scale) * unit(text) @ unit(image).T

    def ce(lg):
        lg = lg - lg.max(axis=1, keepdims=True)
        return -np.mean(np.diag(lg - np.log(np.exp(lg).sum(axis=1, keepdims=True))))

    np.testing.assert_allclose(float(loss), 0.5 * (ce(logits_t) + ce(logits_i)), rtol=1e-4)
    np.testing.assert_allclose(float(metrics["image_to_text_accuracy"]),
                               np.mean(logits_i.argmax(axis=1) == np.arange(5)))
    # A negative identical to an image's own caption ties with it: that image's loss rises.
    clash = negatives.copy()
    clash[0, 0] = text[0]
    worse, _ = obj.clip_contrastive_loss(jnp.asarray(text, jnp.float32),
                                         jnp.asarray(image, jnp.float32), scale,
                                         jnp.asarray(clash, jnp.float32))
    assert float(worse) > float(loss)
    with pytest.raises(ValueError, match="negative_text_embeds shape"):
        obj.clip_contrastive_loss(jnp.asarray(text), jnp.asarray(image), scale,
                                  jnp.asarray(negatives[:4]))


def test_clip_loss_is_log_batch_for_identical_embeddings():
    e = jnp.ones((8, 4))
    loss, _ = obj.clip_contrastive_loss(e, e, 3.0)
    np.testing.assert_allclose(float(loss), math.log(8), rtol=1e-6)


def test_clip_loss_perfect_pairs_have_full_accuracy_and_low_loss():
    e = jnp.eye(8) * 3.0  # orthogonal after normalisation
    loss, metrics = obj.clip_contrastive_loss(e, e, math.log(100.0))
    assert float(metrics["accuracy"]) == 1.0
    assert float(loss) < 1e-3


def test_clip_logit_scale_gets_no_gradient_past_the_clamp():
    text = jnp.asarray(RNG.randn(4, 8).astype(np.float32))
    image = jnp.asarray(RNG.randn(4, 8).astype(np.float32))
    grad = lambda s: jax.grad(lambda s: obj.clip_contrastive_loss(text, image, s)[0])(s)
    assert float(grad(jnp.float32(2.0))) != 0.0
    assert float(grad(jnp.float32(5.0))) == 0.0


def test_losses_compute_in_float32_from_bfloat16_inputs():
    pred = jnp.asarray(X0 + 0.01, jnp.bfloat16)
    loss, per_example = obj.diffusion_loss(pred, jnp.asarray(X0, jnp.bfloat16),
                                           jnp.asarray(NOISE, jnp.bfloat16), jnp.asarray(TIMESTEPS),
                                           jnp.asarray(ALPHAS_CUMPROD), "sample")
    assert loss.dtype == jnp.float32 and per_example.dtype == jnp.float32


def test_diffusion_loss_jits_with_traced_timesteps():
    fn = jax.jit(lambda p, t: obj.diffusion_loss(p, jnp.asarray(X0), jnp.asarray(NOISE), t,
                                                 jnp.asarray(ALPHAS_CUMPROD), "v_prediction", 5.0))
    loss, _ = fn(jnp.asarray(X0), jnp.asarray(TIMESTEPS))
    assert np.isfinite(float(loss))
