"""Parity of sdjax's KL autoencoder with diffusers' `AutoencoderKL`, through the folder loader."""
import json
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import save_file

import torch
import diffusers

from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution  # noqa: E402

from sdjax.models.vae import (AutoencoderKL, DiagonalGaussian, VAEConfig,  # noqa: E402
                              scale_latents, unscale_latents)
from sdjax.weights.common import DictSource, SafetensorsFile, WeightsError  # noqa: E402
from sdjax.weights.vae import load_vae_folder, vae_params  # noqa: E402
from tests.helpers import rewritten_folder, to_nhwc

TOL = 1e-4

# Two tiny configs differing in width, depth, resnets per level, latent channels and quant convs.
CONFIGS = {
    "two_levels": dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
                       norm_num_groups=4),
    "three_levels": dict(block_out_channels=(8, 16, 24), layers_per_block=2, latent_channels=3,
                         norm_num_groups=8, use_quant_conv=False, scaling_factor=0.5),
}
IMAGE_HW = (16, 24)  # not square, so an H/W mix-up shows
LEGACY_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
WEIGHTS = "diffusion_pytorch_model.safetensors"


def build_reference(overrides, seed=0):
    n = len(overrides["block_out_channels"])
    torch.manual_seed(seed)
    ref = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, **overrides).eval()
    # Norm layers start as scale 1 / bias 0; perturb them so swapped or dropped norm params show.
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return ref


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    ref = build_reference(CONFIGS[request.param])
    folder = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(folder, safe_serialization=True)
    config, params = load_vae_folder(folder)

    rng = np.random.RandomState(1)
    x = rng.uniform(-1, 1, (2, 3) + IMAGE_HW).astype(np.float32)
    f = config.downsample_factor
    z = rng.randn(2, config.latent_channels, IMAGE_HW[0] // f, IMAGE_HW[1] // f).astype(np.float32)
    with torch.no_grad():
        posterior = ref.encode(torch.from_numpy(x)).latent_dist
        ref_out = types.SimpleNamespace(
            mean=to_nhwc(posterior.mean), logvar=to_nhwc(posterior.logvar),
            kl=posterior.kl().numpy(),
            decoded=to_nhwc(ref.decode(torch.from_numpy(z)).sample),
            forward=to_nhwc(ref(torch.from_numpy(x), sample_posterior=False).sample))

    model = AutoencoderKL(config)
    variables = {"params": params}
    return types.SimpleNamespace(
        name=request.param, folder=folder, ref=ref, ref_out=ref_out, config=config,
        params=params, model=model, x=jnp.asarray(x.transpose(0, 2, 3, 1)),
        z=jnp.asarray(z.transpose(0, 2, 3, 1)),
        encode=jax.jit(lambda x: model.apply(variables, x, method=AutoencoderKL.encode)),
        decode=jax.jit(lambda z: model.apply(variables, z, method=AutoencoderKL.decode)),
        forward=jax.jit(lambda x, key=None: model.apply(variables, x, key)))


def max_abs(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def test_posterior_matches_diffusers(case):
    posterior = case.encode(case.x)
    d_mean = max_abs(posterior.mean, case.ref_out.mean)
    d_logvar = max_abs(posterior.logvar, case.ref_out.logvar)
    print(f"[{case.name}] posterior max|diff|: mean {d_mean:.2e}, logvar {d_logvar:.2e}")
    assert posterior.mean.shape == case.ref_out.mean.shape
    assert d_mean <= TOL and d_logvar <= TOL


def test_decode_matches_diffusers(case):
    image = case.decode(case.z)
    d = max_abs(image, case.ref_out.decoded)
    print(f"[{case.name}] decode max|diff|: {d:.2e}")
    assert image.shape == (2,) + IMAGE_HW + (3,)
    assert d <= TOL


def test_forward_with_mode_matches_diffusers(case):
    d = max_abs(case.forward(case.x), case.ref_out.forward)
    print(f"[{case.name}] forward (mode) max|diff|: {d:.2e}")
    assert d <= TOL


def test_kl_matches_diffusers(case):
    kl = case.encode(case.x).kl()
    assert kl.shape == (2,)
    np.testing.assert_allclose(kl, case.ref_out.kl, rtol=1e-5, atol=TOL)


def test_forward_with_key_decodes_a_posterior_sample(case):
    key = jax.random.key(3)
    expected = case.decode(case.encode(case.x).sample(key))
    out = case.forward(case.x, key)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert max_abs(out, case.forward(case.x)) > 1e-3


def test_sample_statistics_match_posterior(case):
    posterior = case.encode(case.x)
    n = 4000
    samples = jax.vmap(posterior.sample)(jax.random.split(jax.random.key(0), n))
    mean, std = np.asarray(posterior.mean), np.asarray(posterior.std)
    # 5 standard errors per element: the empirical mean and std of n normal draws.
    assert np.all(np.abs(samples.mean(0) - mean) <= 5 * std / np.sqrt(n))
    assert np.all(np.abs(samples.std(0) / std - 1) <= 5 / np.sqrt(2 * n))
    key = jax.random.key(7)
    np.testing.assert_array_equal(posterior.sample(key), posterior.sample(key))
    assert posterior.mode() is posterior.mean


def test_extreme_moments_clip_and_kl_match_reference():
    rng = np.random.RandomState(0)
    moments = rng.randn(2, 6, 3, 5).astype(np.float32) * 3
    moments[:, 3:][:, :, 0] = 50.0   # logvar above the clip
    moments[:, 3:][:, :, 1] = -50.0  # and below it
    other_moments = rng.randn(2, 6, 3, 5).astype(np.float32)
    ref = DiagonalGaussianDistribution(torch.from_numpy(moments))
    ref_other = DiagonalGaussianDistribution(torch.from_numpy(other_moments))
    ours = DiagonalGaussian.from_moments(jnp.asarray(moments.transpose(0, 2, 3, 1)))
    other = DiagonalGaussian.from_moments(jnp.asarray(other_moments.transpose(0, 2, 3, 1)))
    assert float(ours.logvar.max()) == 20.0 and float(ours.logvar.min()) == -30.0
    np.testing.assert_array_equal(ours.logvar, to_nhwc(ref.logvar))
    np.testing.assert_allclose(ours.std, to_nhwc(ref.std), rtol=1e-6)
    np.testing.assert_allclose(ours.kl(), ref.kl().numpy(), rtol=1e-5)
    np.testing.assert_allclose(ours.kl(other), ref.kl(ref_other).numpy(), rtol=1e-5)


def test_diagonal_gaussian_is_a_pytree_through_jit():
    g = DiagonalGaussian.from_moments(jnp.zeros((1, 2, 2, 4)))
    out = jax.jit(lambda g: g)(g)
    assert isinstance(out, DiagonalGaussian) and len(jax.tree_util.tree_leaves(out)) == 2


def test_legacy_attention_names_load_to_same_params(case, tmp_path):
    def to_legacy(tensors):
        for key in list(tensors):
            for new, old in LEGACY_ATTENTION.items():
                key_legacy = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
                if key_legacy != key:
                    tensors[key_legacy] = tensors.pop(key)
                    break
        assert any(".proj_attn." in k for k in tensors) and not any(".to_q." in k for k in tensors)

    rewritten_folder(case.folder, tmp_path, WEIGHTS, to_legacy)
    config, params = load_vae_folder(tmp_path)
    assert config == case.config
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, case.params)


def test_fp16_variant_loads_when_plain_file_is_absent(case, tmp_path):
    def to_float16(tensors):
        for key in tensors:
            tensors[key] = tensors[key].astype(np.float16)

    rewritten_folder(case.folder, tmp_path, WEIGHTS, to_float16,
                     save_as="diffusion_pytorch_model.fp16.safetensors")
    _, params = load_vae_folder(tmp_path)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {np.dtype(np.float32)}
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4),
                           params, case.params)
    _, params16 = load_vae_folder(tmp_path, dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params16)} == {jnp.dtype(jnp.bfloat16)}


def test_sharded_folder_loads_to_same_params(case, tmp_path):
    source = SafetensorsFile(case.folder / WEIGHTS)
    keys = sorted(source)
    shards = {"part-1.safetensors": keys[::2], "part-2.safetensors": keys[1::2]}
    for shard, shard_keys in shards.items():
        save_file({k: source[k] for k in shard_keys}, tmp_path / shard)
    index = {"weight_map": {k: shard for shard, ks in shards.items() for k in ks}}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(case.folder / "config.json", tmp_path / "config.json")
    _, params = load_vae_folder(tmp_path)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, case.params)


def test_mid_block_without_attention_loads_every_tensor(tmp_path):
    ref = build_reference(dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
                               norm_num_groups=4, mid_block_add_attention=False))
    ref.save_pretrained(tmp_path, safe_serialization=True)
    config, params = load_vae_folder(tmp_path)
    assert not config.mid_block_add_attention
    assert "attention" not in params["encoder"]["mid_block"]
    assert len(traverse_util.flatten_dict(params)) == len(ref.state_dict())


def test_params_cover_every_reference_tensor(case):
    n_ref = len(case.ref.state_dict())
    assert len(traverse_util.flatten_dict(case.params)) == n_ref
    init = AutoencoderKL(case.config).init(jax.random.key(0), case.x[:1])["params"]
    assert jax.tree_util.tree_structure(init) == jax.tree_util.tree_structure(case.params)


def test_missing_key_names_file_and_key(case, tmp_path):
    dropped = "decoder.mid_block.attentions.0.to_v.weight"
    rewritten_folder(case.folder, tmp_path, WEIGHTS, lambda tensors: tensors.pop(dropped))
    with pytest.raises(WeightsError, match=r"diffusion_pytorch_model\.safetensors.*missing keys"
                       r".*decoder/mid_block/attention/to_v/kernel"):
        load_vae_folder(tmp_path)


def test_shape_mismatch_names_source_and_key(case):
    source = SafetensorsFile(case.folder / WEIGHTS)
    tensors = {k: source[k] for k in source}
    tensors["encoder.conv_in.weight"] = tensors["encoder.conv_in.weight"][:, :2]
    with pytest.raises(WeightsError, match=r"vae-under-test.*shape mismatch for "
                       r"encoder\.conv_in\.weight"):
        vae_params(DictSource(tensors, name="vae-under-test"), case.config)


def test_unexpected_key_is_an_error_naming_the_key(case):
    source = SafetensorsFile(case.folder / WEIGHTS)
    tensors = {k: source[k] for k in source}
    tensors["encoder.mid_block.attentions.1.to_q.weight"] = np.zeros((1,), np.float32)
    with pytest.raises(WeightsError, match=r"unexpected keys: encoder\.mid_block\.attentions\.1"):
        vae_params(DictSource(tensors, name="extra"), case.config)


def test_unknown_block_type_is_a_value_error_naming_the_field(tmp_path):
    raw = dict(diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4).config)
    raw["down_block_types"] = ["AttnDownEncoderBlock2D"]
    with pytest.raises(ValueError, match=r"down_block_types.*'AttnDownEncoderBlock2D'"):
        VAEConfig.from_diffusers(raw)
    raw["down_block_types"], raw["up_block_types"] = ["DownEncoderBlock2D"], ["UpBlock2D"]
    with pytest.raises(ValueError, match=r"up_block_types.*'UpBlock2D'"):
        VAEConfig.from_diffusers(raw)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(WeightsError, match=r"config\.json.*up_block_types"):
        load_vae_folder(tmp_path)


def test_missing_weights_file_names_the_folder(case, tmp_path):
    shutil.copy(case.folder / "config.json", tmp_path / "config.json")
    with pytest.raises(WeightsError, match=r"no diffusion_pytorch_model\.safetensors"):
        load_vae_folder(tmp_path)
    with pytest.raises(WeightsError, match=r"config\.json: no such file"):
        load_vae_folder(tmp_path / "nowhere")


def test_config_round_trips_and_hashes(case):
    config = VAEConfig.from_diffusers(dict(case.ref.config))
    assert config == case.config and hash(config) == hash(case.config)
    assert VAEConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.latent_channels == CONFIGS[case.name]["latent_channels"]
    with pytest.raises(ValueError, match="unknown diffusers config keys: not_a_field"):
        VAEConfig.from_diffusers({**dict(case.ref.config), "not_a_field": 1})


def test_scale_latents_inverts_and_applies_shift():
    config = VAEConfig(block_out_channels=(8,), norm_num_groups=4, scaling_factor=0.5,
                       shift_factor=0.25)
    z = jnp.arange(8.0).reshape(1, 1, 2, 4)
    np.testing.assert_allclose(scale_latents(z, config), (z - 0.25) * 0.5)
    np.testing.assert_allclose(unscale_latents(scale_latents(z, config), config), z, rtol=1e-6)
    per_channel = VAEConfig(block_out_channels=(8,), norm_num_groups=4, scaling_factor=0.5,
                            latents_mean=(1.0, 2.0, 3.0, 4.0), latents_std=(2.0, 2.0, 4.0, 4.0))
    np.testing.assert_allclose(scale_latents(z, per_channel),
                               (z - jnp.array([1.0, 2, 3, 4])) * 0.5 / jnp.array([2.0, 2, 4, 4]))
    np.testing.assert_allclose(unscale_latents(scale_latents(z, per_channel), per_channel), z,
                               rtol=1e-6)


@pytest.mark.parametrize("case", ["two_levels"], indirect=True)
def test_remat_changes_neither_outputs_nor_gradients(case):
    remat_model = AutoencoderKL(case.config, remat=True)

    def loss(model, params):
        return jnp.mean(model.apply({"params": params}, case.x) ** 2)

    g_plain = jax.jit(jax.grad(lambda p: loss(case.model, p)))(case.params)
    g_remat = jax.jit(jax.grad(lambda p: loss(remat_model, p)))(case.params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           g_plain, g_remat)


@pytest.mark.parametrize("case", ["two_levels"], indirect=True)
def test_bfloat16_compute_stays_close_to_diffusers(case):
    model = AutoencoderKL(case.config, dtype=jnp.bfloat16)
    out = jax.jit(lambda x: model.apply({"params": case.params}, x))(case.x)
    assert out.dtype == jnp.bfloat16
    assert max_abs(out, case.ref_out.forward) < 0.1
