"""sdjax's U-Net against diffusers' UNet2DConditionModel: tiny random reference models saved as
safetensors folders, loaded through `load_unet_folder`, compared on the same inputs."""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch
import diffusers
from safetensors.numpy import load_file  # noqa: E402

from sdjax.weights import presets  # noqa: E402
from sdjax.models.unet import UNet, UNetConfig  # noqa: E402
from sdjax.weights.common import DictSource, WeightsError  # noqa: E402
from sdjax.weights.unet import load_unet_folder, unet_params  # noqa: E402
from tests.helpers import rewritten_folder

CA_DOWN, DOWN, CA_UP, UP = "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"

# Tiny versions of the released layouts. Each varies what the released models vary: widths, head
# counts (diffusers' attention_head_dim is a head COUNT), layers per level, context width,
# 1x1-conv vs linear projections, per-level transformer depth, SDXL's added embeddings.
CONFIGS = {
    "sd1_small": dict(block_out_channels=(32, 64), down_block_types=(CA_DOWN, DOWN),
                      up_block_types=(UP, CA_UP), layers_per_block=1, attention_head_dim=2,
                      cross_attention_dim=24, norm_num_groups=8),
    "sd1_three_levels": dict(block_out_channels=(16, 32, 48),
                             down_block_types=(CA_DOWN, CA_DOWN, DOWN),
                             up_block_types=(UP, CA_UP, CA_UP), layers_per_block=2,
                             attention_head_dim=4, cross_attention_dim=40, norm_num_groups=8),
    "sd2_small": dict(block_out_channels=(32, 64), down_block_types=(CA_DOWN, DOWN),
                      up_block_types=(UP, CA_UP), layers_per_block=1, attention_head_dim=(2, 4),
                      use_linear_projection=True, upcast_attention=True, cross_attention_dim=48,
                      norm_num_groups=8),
    # 24 channels / 5 heads: diffusers then runs the blocks at 5 * 4 = 20 features.
    "sd2_uneven_heads": dict(block_out_channels=(24, 48), down_block_types=(CA_DOWN, CA_DOWN),
                             up_block_types=(CA_UP, CA_UP), layers_per_block=(1, 2),
                             attention_head_dim=(5, 3), transformer_layers_per_block=2,
                             use_linear_projection=True, cross_attention_dim=16, norm_num_groups=4),
    "sdxl_small": dict(block_out_channels=(32, 64), down_block_types=(DOWN, CA_DOWN),
                       up_block_types=(CA_UP, UP), layers_per_block=1, attention_head_dim=(2, 4),
                       transformer_layers_per_block=(1, 2), use_linear_projection=True,
                       cross_attention_dim=32, norm_num_groups=8, addition_embed_type="text_time",
                       addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8),
    "sdxl_three_levels": dict(block_out_channels=(16, 32, 64),
                              down_block_types=(DOWN, CA_DOWN, CA_DOWN),
                              up_block_types=(CA_UP, CA_UP, UP), layers_per_block=1,
                              attention_head_dim=(1, 2, 4), transformer_layers_per_block=(1, 2, 3),
                              use_linear_projection=True, cross_attention_dim=24, norm_num_groups=8,
                              addition_embed_type="text_time", addition_time_embed_dim=4,
                              projection_class_embeddings_input_dim=12 + 6 * 4),
    "inpaint": dict(in_channels=9, out_channels=4, block_out_channels=(32, 64),
                    down_block_types=(CA_DOWN, DOWN), up_block_types=(UP, CA_UP), layers_per_block=1,
                    attention_head_dim=4, cross_attention_dim=24, norm_num_groups=8),
}
BATCH, HEIGHT, WIDTH = 2, 16, 12  # H != W catches swapped spatial axes.
CONTEXT_LEN = 7
TIMESTEPS = np.array([999, 37])
TIME_IDS = np.array([[1024, 1024, 0, 0, 1024, 1024], [768, 1344, 64, 32, 1024, 1024]], np.float32)
PARITY_TOLERANCE = 1e-4
WEIGHTS = "diffusion_pytorch_model.safetensors"


class Reference(NamedTuple):
    folder: str
    args: tuple          # sdjax inputs, NHWC
    expected: np.ndarray  # diffusers output, NHWC
    heads: tuple          # diffusers' head count per cross-attention down level (None elsewhere)


def _build_reference(kwargs: dict, folder, seed: int = 0, **save_kwargs) -> Reference:
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel(sample_size=HEIGHT, **kwargs).eval()
    with torch.no_grad():
        # diffusers initialises norms to (1, 0) and some biases to 0: perturb every tensor so a
        # swapped or dropped scale/bias shows.
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True, **save_kwargs)
    rng = np.random.default_rng(seed)
    cfg = model.config
    sample = rng.standard_normal((BATCH, cfg.in_channels, HEIGHT, WIDTH), np.float32)
    context = rng.standard_normal((BATCH, CONTEXT_LEN, cfg.cross_attention_dim), np.float32)
    added = None
    if cfg.addition_embed_type == "text_time":
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = {"text_embeds": rng.standard_normal((BATCH, text_dim), np.float32),
                 "time_ids": TIME_IDS}
    with torch.no_grad():
        out = model(torch.from_numpy(sample), torch.from_numpy(TIMESTEPS), torch.from_numpy(context),
                    added_cond_kwargs=None if added is None else
                    {k: torch.from_numpy(v) for k, v in added.items()}).sample
    heads = tuple(block.attentions[0].transformer_blocks[0].attn1.heads
                  if hasattr(block, "attentions") else None for block in model.down_blocks)
    args = (sample.transpose(0, 2, 3, 1), TIMESTEPS, context, added)
    return Reference(str(folder), args, out.numpy().transpose(0, 2, 3, 1), heads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """name -> Reference, each built once per module."""
    cache: dict[str, Reference] = {}

    def get(name: str) -> Reference:
        if name not in cache:
            cache[name] = _build_reference(CONFIGS[name], tmp_path_factory.mktemp(name))
        return cache[name]

    return get


@pytest.fixture(scope="module")
def compiled():
    """A jitted `UNet(...).apply` per (config, dtype, param_dtype, remat), compiled once."""
    cache = {}

    def get(config: UNetConfig, dtype=jnp.float32, param_dtype=jnp.float32, remat=False):
        key = (config, dtype, param_dtype, remat)
        if key not in cache:
            model = UNet(config, dtype=dtype, param_dtype=param_dtype, remat=remat)
            cache[key] = jax.jit(lambda params, *args: model.apply({"params": params}, *args))
        return cache[key]

    return get


@pytest.mark.parametrize("name", list(CONFIGS))
def test_output_matches_diffusers(name, reference, compiled, record_property):
    ref = reference(name)
    config, params = load_unet_folder(ref.folder)
    assert config.heads == tuple(h if h is not None else config.heads[i]
                                 for i, h in enumerate(ref.heads))
    start = time.perf_counter()
    out = np.asarray(compiled(config)(params, *ref.args))
    chex.assert_shape(out, ref.expected.shape)
    err = float(np.abs(out - ref.expected).max())
    record_property("max_abs_diff", err)
    print(f"\n{name}: max |sdjax - diffusers| = {err:.2e} "
          f"(output max {np.abs(ref.expected).max():.2f}, "
          f"first call {time.perf_counter() - start:.1f} s)")
    assert np.abs(ref.expected).max() > 0.1  # the comparison is not between two near-zero maps
    assert err <= PARITY_TOLERANCE, f"{name}: max abs diff {err:.3g}"


def test_remat_gives_the_same_output(reference, compiled):
    ref = reference("sdxl_small")
    config, params = load_unet_folder(ref.folder)
    plain = compiled(config)(params, *ref.args)
    rematted = compiled(config, remat=True)(params, *ref.args)
    np.testing.assert_allclose(np.asarray(rematted), np.asarray(plain), rtol=0, atol=1e-6)


def test_training_mode_applies_resnet_dropout_under_remat(reference):
    ref = reference("sd1_small")
    config, params = load_unet_folder(ref.folder)
    model = UNet(dataclasses.replace(config, dropout=0.5), remat=True)
    fn = jax.jit(lambda key: model.apply({"params": params}, *ref.args, deterministic=False,
                                         rngs={"dropout": key}))
    first, again, other = (np.asarray(fn(jax.random.key(k))) for k in (0, 0, 1))
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-2
    assert np.abs(first - ref.expected).max() > 1e-2


def test_reference_attention_implementation_agrees(reference, compiled):
    ref = reference("sd2_small")
    config, params = load_unet_folder(ref.folder)
    out = compiled(dataclasses.replace(config, attention="reference"))(params, *ref.args)
    np.testing.assert_allclose(np.asarray(out), ref.expected, rtol=0, atol=PARITY_TOLERANCE)


def test_bfloat16_runs_close_to_float32(reference, compiled):
    ref = reference("sd1_small")
    config, params = load_unet_folder(ref.folder, dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
    out = compiled(config, jnp.bfloat16, jnp.bfloat16)(params, *ref.args)
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all()
    # bfloat16 keeps ~3 significant digits; the error stays a small fraction of the output's scale.
    assert np.abs(out - ref.expected).max() <= 0.05 * np.abs(ref.expected).max()


def test_scalar_timestep_broadcasts_over_the_batch(reference, compiled):
    ref = reference("sd1_small")
    config, params = load_unet_folder(ref.folder)
    sample, _, context, added = ref.args
    fn = compiled(config)
    np.testing.assert_allclose(np.asarray(fn(params, sample, np.float32(37), context, added)),
                               np.asarray(fn(params, sample, np.array([37, 37]), context, added)),
                               rtol=0, atol=1e-6)


def test_sharded_and_fp16_variant_folders_load_the_same_params(reference, tmp_path):
    ref = reference("sd1_small")
    config, params = load_unet_folder(ref.folder)
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel.from_pretrained(ref.folder)
    model.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="100KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    _, sharded = load_unet_folder(tmp_path / "sharded")
    chex.assert_trees_all_equal(sharded, params)

    model.to(torch.float16).save_pretrained(tmp_path / "fp16", safe_serialization=True,
                                            variant="fp16")
    assert (tmp_path / "fp16" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    _, half = load_unet_folder(tmp_path / "fp16")
    assert all(p.dtype == np.float32 for p in jax.tree.leaves(half))
    chex.assert_trees_all_equal(
        half, jax.tree.map(lambda p: p.astype(np.float16).astype(np.float32), params))


# --- configs ---------------------------------------------------------------------------------


def test_released_configs_resolve_heads_like_diffusers():
    sd15 = UNetConfig.from_diffusers(presets.preset("sd15")["unet"])
    assert sd15.heads == (8, 8, 8, 8)  # attention_head_dim=8 is a head count: widths 40..160
    sd21 = UNetConfig.from_diffusers(presets.preset("sd21")["unet"])
    assert sd21.heads == (5, 10, 20, 20)
    assert {c // h for c, h in zip(sd21.block_out_channels, sd21.heads)} == {64}
    # As SDXL's real config.json writes it: nulls for false flags, fields sdjax ignores.
    sdxl_json = {**presets.preset("sdxl")["unet"], "_class_name": "UNet2DConditionModel",
                 "_diffusers_version": "0.19.0.dev0", "upcast_attention": None,
                 "num_attention_heads": None, "addition_embed_type_num_heads": 64,
                 "class_embed_type": None, "only_cross_attention": False,
                 "mid_block_only_cross_attention": None, "resnet_out_scale_factor": 1.0}
    sdxl = UNetConfig.from_diffusers(sdxl_json)
    assert sdxl.heads == (5, 10, 20) and sdxl.transformer_depths == (1, 2, 10)
    assert sdxl.upcast_attention is False and sdxl.text_embeds_dim == 1280
    assert sdxl.block_out_channels == (320, 640, 1280)  # lists became tuples
    hash(sdxl)


def test_config_round_trips_through_a_dict_and_rejects_unknown_fields():
    config = UNetConfig.from_diffusers(presets.preset("sdxl")["unet"], attention="reference")
    d = json.loads(json.dumps(config.to_dict()))
    assert UNetConfig.from_dict(d) == config
    with pytest.raises(ValueError, match="unknown fields: bogus"):
        UNetConfig.from_dict({**d, "bogus": 1})


@pytest.mark.parametrize("field, value, shown", [
    ("class_embed_type", "timestep", "'timestep'"),
    ("resnet_time_scale_shift", "scale_shift", "'scale_shift'"),
    ("addition_embed_type", "text", "'text'"),
    ("down_block_types", ["SimpleCrossAttnDownBlock2D", DOWN], "'SimpleCrossAttnDownBlock2D'"),
    ("time_cond_proj_dim", 256, "256"),
    ("cross_attention_dim", [24, 32], "[24, 32]"),
    ("some_future_field", 1, "1"),
])
def test_unsupported_config_is_rejected_by_name(field, value, shown):
    base = {"block_out_channels": [32, 64], "down_block_types": [CA_DOWN, DOWN],
            "up_block_types": [UP, CA_UP], "cross_attention_dim": 24, "norm_num_groups": 8}
    with pytest.raises(ValueError, match=field) as info:
        UNetConfig.from_diffusers({**base, field: value})
    assert shown in str(info.value)


# --- loading errors --------------------------------------------------------------------------


def _copy_with_tensors(ref: Reference, folder, change) -> str:
    """A copy of `ref`'s folder whose tensors are changed in place by `change(dict)`."""
    rewritten_folder(ref.folder, folder, WEIGHTS, change)
    return str(folder)


def test_missing_key_names_file_and_param(reference, tmp_path):
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    folder = _copy_with_tensors(reference("sd1_small"), tmp_path / "m", lambda t: t.pop(key))
    with pytest.raises(WeightsError, match="missing keys") as info:
        load_unet_folder(folder)
    assert "diffusion_pytorch_model.safetensors" in str(info.value)
    assert "down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k/kernel" in str(info.value)


def test_unexpected_key_names_file_and_key(reference, tmp_path):
    key = "mid_block.attentions.0.extra.weight"
    folder = _copy_with_tensors(reference("sd1_small"), tmp_path / "u",
                                lambda t: t.update({key: np.ones(3, np.float32)}))
    with pytest.raises(WeightsError, match=f"unexpected keys: {key}") as info:
        load_unet_folder(folder)
    assert "diffusion_pytorch_model.safetensors" in str(info.value)


def test_shape_mismatch_names_file_key_and_shapes(reference, tmp_path):
    def widen(tensors):
        tensors["conv_in.weight"] = np.zeros((32, 5, 3, 3), np.float32)
    folder = _copy_with_tensors(reference("sd1_small"), tmp_path / "s", widen)
    with pytest.raises(WeightsError, match=r"shape mismatch for conv_in.weight: expected "
                                           r"\(3, 3, 4, 32\) .*got \(32, 5, 3, 3\)") as info:
        load_unet_folder(folder)
    assert "diffusion_pytorch_model.safetensors" in str(info.value)


def test_unsupported_config_in_folder_names_config_file(reference, tmp_path):
    folder = tmp_path / "c"
    shutil.copytree(reference("sd1_small").folder, folder)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "class_embed_type": "timestep"}))
    with pytest.raises(WeightsError, match=r"config\.json: .*class_embed_type='timestep'"):
        load_unet_folder(folder)


def test_folder_without_weights_names_folder(reference, tmp_path):
    shutil.copy(f"{reference('sd1_small').folder}/config.json", tmp_path / "config.json")
    with pytest.raises(WeightsError, match=f"{tmp_path}: no U-Net weights"):
        load_unet_folder(tmp_path)


def test_in_memory_state_dict_converts_to_the_folder_params(reference):
    ref = reference("sd1_small")
    config, params = load_unet_folder(ref.folder)
    tensors = load_file(f"{ref.folder}/{WEIGHTS}")
    chex.assert_trees_all_equal(unet_params(DictSource(tensors), config), params)


def test_bad_inputs_are_rejected(reference, compiled):
    ref = reference("sdxl_small")
    config, params = load_unet_folder(ref.folder)
    sample, t, context, added = ref.args
    fn = compiled(config)
    with pytest.raises(ValueError, match="NHWC"):
        fn(params, sample.transpose(0, 3, 1, 2), t, context, added)
    with pytest.raises(ValueError, match="text_embeds"):
        fn(params, sample, t, context, None)


@pytest.mark.parametrize("height, width", [(15, 12), (10, 14)])
def test_sizes_that_halve_unevenly_match_diffusers(reference, compiled, height, width):
    """diffusers upsamples to each skip's exact size when H or W is not a multiple of 2^levels
    (e.g. a 520 px image's 65-pixel latent); so does sdjax."""
    ref = reference("sd1_three_levels")
    config, params = load_unet_folder(ref.folder)
    sample, t, context, added = ref.args
    rng = np.random.default_rng(3)
    odd = rng.standard_normal((sample.shape[0], height, width, sample.shape[-1]), np.float32)
    model = diffusers.UNet2DConditionModel.from_pretrained(ref.folder).eval()
    with torch.no_grad():
        expected = model(torch.from_numpy(odd.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                         torch.from_numpy(context)).sample.numpy().transpose(0, 2, 3, 1)
    out = np.asarray(compiled(config)(params, odd, t, context, added))
    assert out.shape == expected.shape
    assert float(np.abs(out - expected).max()) <= PARITY_TOLERANCE


# --- full size -------------------------------------------------------------------------------


@pytest.mark.slow
def test_full_size_sd15_matches_diffusers(tmp_path):
    kwargs = presets.preset("sd15")["unet"]
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(**kwargs).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 4, 32, 32), np.float32)
    context = rng.standard_normal((2, 77, 768), np.float32)
    start = time.perf_counter()
    with torch.no_grad():
        expected = model(torch.from_numpy(sample), torch.from_numpy(TIMESTEPS),
                         torch.from_numpy(context)).sample.numpy().transpose(0, 2, 3, 1)
    torch_s = time.perf_counter() - start
    del model

    config, params = load_unet_folder(tmp_path)
    fn = jax.jit(lambda p, *a: UNet(config).apply({"params": p}, *a))
    args = (sample.transpose(0, 2, 3, 1), TIMESTEPS, context)
    start = time.perf_counter()
    out = np.asarray(fn(params, *args))
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    np.asarray(fn(params, *args))
    second_s = time.perf_counter() - start
    err = float(np.abs(out - expected).max())
    print(f"\nSD 1.5 full size, batch 2, 32x32: max |sdjax - diffusers| = {err:.2e} "
          f"(output max {np.abs(expected).max():.2f}); diffusers {torch_s:.1f} s, sdjax first call "
          f"(compile + run) {first_s:.1f} s, second call {second_s:.1f} s")
    assert err <= 1e-3
