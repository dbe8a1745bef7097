"""SD3 / SD3.5 MMDiT against diffusers' SD3Transformer2DModel: tiny random models saved as
diffusers folders and as Stability's original single files, loaded through sdjax's loaders and run
on the same inputs."""
from __future__ import annotations

import copy
import dataclasses
import json
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

from sdjax.models.mmdit import MMDiT, MMDiTConfig, sincos_position_embedding
from sdjax.weights.common import SafetensorsFile, WeightsError
from sdjax.weights.mmdit import (ORIGINAL_PREFIX, is_original_mmdit, load_mmdit,
                                 mmdit_config_from_original, mmdit_params_from_original)
from tests.helpers import flat_params, rewritten_folder, to_nchw, to_nhwc
from tests.single_file_writer import (mmdit_to_original, to_numpy, write_header_only,
                                      write_single_file)

# Width 128 = 2 heads of 64 for SD3 (its files show no head width: 64 is assumed); SD3.5's
# qk-norm weights show theirs, so its tiny models use 8. sample_size is 128 as in every release
# (single files do not record it).
_COMMON = dict(sample_size=128, patch_size=2, in_channels=4, num_layers=3, joint_attention_dim=16,
               pooled_projection_dim=12, pos_embed_max_size=16)
VARIANTS = {
    "sd3": dict(_COMMON, attention_head_dim=64, num_attention_heads=2, caption_projection_dim=128,
                out_channels=4),
    "sd35_medium": dict(_COMMON, attention_head_dim=8, num_attention_heads=2,
                        caption_projection_dim=16, out_channels=4, qk_norm="rms_norm",
                        dual_attention_layers=(0,)),
    "sd35_large": dict(_COMMON, attention_head_dim=8, num_attention_heads=2,
                       caption_projection_dim=16, out_channels=6, qk_norm="rms_norm"),
}
# Latent sizes: 4x6 patches, a non-square centre crop of the 16x16 position table; and the
# whole table.
SIZES = ((8, 12), (32, 32))
CONTEXT_LENGTH = 5
TOLERANCE = 1e-5
WEIGHTS = "diffusion_pytorch_model.safetensors"


def relative_error(got, want) -> float:
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def reference_output(ref, x, t, context, pooled, skip_layers=()):
    with torch.no_grad():
        return to_nhwc(ref(to_nchw(x), torch.from_numpy(context), torch.from_numpy(pooled),
                           torch.from_numpy(t), skip_layers=list(skip_layers) or None).sample)


def inputs(config: dict, size, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2,) + size + (config["in_channels"],)).astype(np.float32)
    t = np.array([700.0, 35.5], np.float32)  # sigma * 1000
    context = rng.standard_normal((2, CONTEXT_LENGTH, config["joint_attention_dim"])).astype(
        np.float32)
    pooled = rng.standard_normal((2, config["pooled_projection_dim"])).astype(np.float32)
    return x, t, context, pooled


class Built(NamedTuple):
    name: str
    config: dict  # diffusers config
    ref: SD3Transformer2DModel  # random weights
    folder: pathlib.Path  # its diffusers folder
    mmdit_config: MMDiTConfig  # read by load_mmdit
    params: dict  # read by load_mmdit
    fresh_table: np.ndarray  # the position table of the model as diffusers initialised it


_BUILT: dict[str, Built] = {}


def built(name: str, tmp_path_factory) -> Built:
    """The variant's reference model and what sdjax loads of it, built once per module. Every
    parameter is random (adaLN and output layers included, which some versions initialise to
    zero), so the comparisons mean something."""
    if name not in _BUILT:
        config = VARIANTS[name]
        torch.manual_seed(0)
        ref = SD3Transformer2DModel(**config).eval()
        fresh_table = ref.pos_embed.pos_embed.detach().numpy().copy()
        with torch.no_grad():  # unit-variance activations: matrices at 1/sqrt(fan-in)
            for key, param in ref.named_parameters():
                if param.ndim > 1:
                    param.copy_(torch.randn_like(param) / np.sqrt(param[0].numel()))
                else:
                    param.copy_(torch.randn_like(param) * 0.1 + (1.0 if ".norm_" in key else 0.0))
        folder = tmp_path_factory.mktemp(name) / "transformer"
        ref.save_pretrained(folder)
        mmdit_config, params = load_mmdit(folder)
        _BUILT[name] = Built(name, config, ref, folder, mmdit_config, params, fresh_table)
    return _BUILT[name]


# The SD3.5-medium-like variant (qk-norm and a dual-attention block) in the default run; the others
# with the slow tests.
@pytest.fixture(scope="module", params=[
    pytest.param(name, marks=() if name == "sd35_medium" else pytest.mark.slow) for name in VARIANTS])
def variant(request, tmp_path_factory):
    return built(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """The SD3.5-medium-like variant (qk-norm and MMDiT-X): the checks one variant suffices for."""
    return built("sd35_medium", tmp_path_factory)


@pytest.fixture(scope="module")
def apply():
    """One jitted apply for every config, input size and skip_layers (all static)."""
    return jax.jit(lambda config, params, x, t, context, pooled, skip: MMDiT(config).apply(
        {"params": params}, x, t, context, pooled, skip), static_argnums=(0, 6))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_outputs_match_diffusers(variant, apply, size):
    x, t, context, pooled = inputs(variant.config, size)
    want = reference_output(variant.ref, x, t, context, pooled)
    got = apply(variant.mmdit_config, variant.params, x, t, context, pooled, ())
    assert got.shape == (2,) + size + (variant.config["out_channels"],)
    assert relative_error(got, want) <= TOLERANCE


def test_skip_layers_match_diffusers_skip_layers(variant, apply):
    x, t, context, pooled = inputs(variant.config, SIZES[0], seed=1)
    want = reference_output(variant.ref, x, t, context, pooled, skip_layers=(1,))
    got = apply(variant.mmdit_config, variant.params, x, t, context, pooled, (1,))
    assert relative_error(got, want) <= TOLERANCE
    full = reference_output(variant.ref, x, t, context, pooled)
    assert relative_error(full, want) > 1e-2  # skipping the layer changes the output


def test_config_is_read_from_the_folder(variant):
    assert variant.mmdit_config == MMDiTConfig(**variant.config)
    assert MMDiTConfig.from_dict(variant.mmdit_config.to_dict()) == variant.mmdit_config
    hash(variant.mmdit_config)  # a static argument of jitted programs


def test_initial_position_table_is_diffusers_sincos(variant):
    config = variant.config
    params = jax.eval_shape(lambda: MMDiT(variant.mmdit_config).init(
        jax.random.key(0), *inputs(config, (2, 2))))
    assert params["params"]["pos_embed"]["pos_embed"].shape == variant.fresh_table.shape
    table = sincos_position_embedding(variant.mmdit_config.inner_dim, config["pos_embed_max_size"],
                                      config["sample_size"] // config["patch_size"])
    np.testing.assert_array_equal(table[None], variant.fresh_table)


@pytest.mark.slow  # two backward passes compile in ~20 s on 2 CPU cores
def test_remat_gives_the_same_gradients(medium):
    x, t, context, pooled = inputs(medium.config, SIZES[0])
    # The "reference" attention: "blocked"'s nested loops take long to differentiate and compile.
    cfg = dataclasses.replace(medium.mmdit_config, attention="reference")

    def gradients(remat):
        loss = lambda p: jnp.mean(jnp.square(MMDiT(cfg, remat=remat).apply(
            {"params": p}, x, t, context, pooled, (1,))))
        return flat_params(jax.jit(jax.grad(loss))(medium.params))

    plain, remat = gradients(False), gradients(True)
    for key in plain:
        np.testing.assert_allclose(remat[key], plain[key], rtol=1e-5, atol=1e-7, err_msg=key)


def test_sharded_and_fp16_folders_load_the_same_params(medium, tmp_path):
    ref, params = medium.ref, medium.params
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    _, sharded = load_mmdit(tmp_path / "sharded")
    assert_same_params(sharded, params)

    copy.deepcopy(ref).half().save_pretrained(tmp_path / "fp16", variant="fp16")
    _, half = load_mmdit(tmp_path / "fp16", dtype=jnp.float16)
    assert_same_params(half, jax.tree.map(lambda p: np.asarray(p, np.float16), params))


def assert_same_params(got, want):
    got, want = flat_params(got), flat_params(want)
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_original_layout_writer_inverts_diffusers_converter(variant):
    sd = variant.ref.state_dict()
    original = mmdit_to_original(sd, variant.config["num_layers"])
    converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
    assert sorted(converted) == sorted(sd)
    for key, value in sd.items():
        assert torch.equal(converted[key], value), key


def write_original_files(variant: Built, tmp_path_factory):
    """(folder, state dict): the variant's weights in the original layout, written as single
    files under `model.diffusion_model.` beside stand-in text encoder and VAE keys (as SD3 bundles
    have them), `bundle.safetensors`, and bare, `bare.safetensors`."""
    original = to_numpy(mmdit_to_original(variant.ref.state_dict(), variant.config["num_layers"]))
    root = tmp_path_factory.mktemp(f"{variant.name}_single")
    bundle = {ORIGINAL_PREFIX + k: v for k, v in original.items()}
    bundle["first_stage_model.decoder.conv_in.weight"] = np.zeros((2, 2, 3, 3), np.float32)
    bundle["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = np.ones(
        4, np.float32)
    write_single_file(root / "bundle.safetensors", bundle)
    write_single_file(root / "bare.safetensors", original)
    return root, original


@pytest.fixture(scope="module")
def medium_original(medium, tmp_path_factory):
    return write_original_files(medium, tmp_path_factory)


def test_original_single_files_with_and_without_prefix_load_the_same_params(variant,
                                                                            tmp_path_factory):
    root, _ = write_original_files(variant, tmp_path_factory)
    for layout in ("bundle", "bare"):
        source = SafetensorsFile(root / f"{layout}.safetensors")
        assert is_original_mmdit(source.keys())
        config = mmdit_config_from_original(source)
        assert config == variant.mmdit_config
        assert_same_params(mmdit_params_from_original(source, config), variant.params)


def test_original_single_file_in_fp16_and_fp8_loads_upcast(medium, medium_original):
    root, original = medium_original
    for dtype in (np.float16, ml_dtypes.float8_e4m3fn):
        path = root / f"{np.dtype(dtype).name}.safetensors"
        write_single_file(path, {k: v.astype(dtype) for k, v in original.items()})
        loaded = mmdit_params_from_original(SafetensorsFile(path), medium.mmdit_config,
                                            dtype=jnp.float32)
        assert_same_params(loaded, jax.tree.map(
            lambda p: np.asarray(p).astype(dtype).astype(np.float32), medium.params))


def test_original_keys_are_recognised():
    names = ["x_embedder.proj.weight", "joint_blocks.0.x_block.attn.qkv.weight", "pos_embed"]
    assert is_original_mmdit(names)
    assert is_original_mmdit([ORIGINAL_PREFIX + k for k in names])
    assert not is_original_mmdit(["pos_embed.proj.weight", "transformer_blocks.0.attn.to_q.weight"])
    assert not is_original_mmdit([ORIGINAL_PREFIX + "input_blocks.0.0.weight",
                                  "double_blocks.0.img_attn.qkv.weight", "img_in.weight"])


# Released configs (the diffusers folders on the hub), from their original single files' layouts.
RELEASES = {
    "sd3_medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                       pos_embed_max_size=192),
    "sd35_medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                        pos_embed_max_size=384, qk_norm="rms_norm",
                        dual_attention_layers=tuple(range(13))),
    "sd35_large": dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                       pos_embed_max_size=192, qk_norm="rms_norm"),
}


@pytest.mark.parametrize("release", list(RELEASES))
def test_released_layouts_infer_released_configs(release, tmp_path):
    with torch.device("meta"):  # shapes only: nothing allocated
        ref = SD3Transformer2DModel(**RELEASES[release])
    original = mmdit_to_original(ref.state_dict(), ref.config.num_layers)
    path = tmp_path / "model.safetensors"
    write_header_only(path, {ORIGINAL_PREFIX + k: np.broadcast_to(np.zeros((), np.float16),
                                                                   tuple(v.shape))
                             for k, v in original.items()})
    config = mmdit_config_from_original(SafetensorsFile(path))
    assert config == MMDiTConfig.from_diffusers(dict(ref.config))


# --- faults -------------------------------------------------------------------------------------

def assert_one_line_error(excinfo, *names):
    message = str(excinfo.value)
    assert "\n" not in message
    for name in names:
        assert str(name) in message, (name, message)


def edited_folder(variant: Built, dst, edit_state=None, edit_config=None):
    """A copy of the variant's diffusers folder with its state dict and/or config.json edited."""
    folder = variant.folder
    rewritten_folder(folder, dst, WEIGHTS, edit_state)
    if edit_config:
        config = json.loads((folder / "config.json").read_text())
        edit_config(config)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_bad_folders_are_one_line_errors_naming_file_and_key(medium, tmp_path):
    with pytest.raises(WeightsError) as excinfo:
        load_mmdit(tmp_path / "absent")
    assert_one_line_error(excinfo, tmp_path / "absent" / "config.json")

    folder = edited_folder(medium, tmp_path / "missing",
                           lambda s: s.pop("transformer_blocks.1.attn.norm_added_k.weight"))
    with pytest.raises(WeightsError) as excinfo:
        load_mmdit(folder)
    assert_one_line_error(excinfo, folder / WEIGHTS, "joint_blocks_1/attn/norm_added_k/scale")

    folder = edited_folder(medium, tmp_path / "unexpected", lambda s: s.update(
        {"transformer_blocks.2.attn.to_add_out.weight": np.zeros((16, 16), np.float32)}))
    with pytest.raises(WeightsError) as excinfo:
        load_mmdit(folder)
    assert_one_line_error(excinfo, folder / WEIGHTS, "transformer_blocks.2.attn.to_add_out.weight")

    folder = edited_folder(medium, tmp_path / "shape", lambda s: s.update(
        {"context_embedder.weight": np.zeros((16, 15), np.float32)}))
    with pytest.raises(WeightsError) as excinfo:
        load_mmdit(folder)
    assert_one_line_error(excinfo, folder / WEIGHTS, "context_embedder.weight", "(16, 15)")

    folder = edited_folder(medium, tmp_path / "config", edit_config=lambda c: c.update(
        {"use_flash": True}))
    with pytest.raises(WeightsError) as excinfo:
        load_mmdit(folder)
    assert_one_line_error(excinfo, folder / "config.json", "use_flash")

    folder = edited_folder(medium, tmp_path / "class", edit_config=lambda c: c.update(
        {"_class_name": "FluxTransformer2DModel"}))
    with pytest.raises(WeightsError) as excinfo:
        load_mmdit(folder)
    assert_one_line_error(excinfo, folder / "config.json", "FluxTransformer2DModel")


def test_bad_original_files_are_one_line_errors_naming_file_and_key(medium, medium_original,
                                                                     tmp_path):
    mmdit_config = medium.mmdit_config
    _, original = medium_original

    path = tmp_path / "extra.safetensors"
    write_single_file(path, dict(original, **{"joint_blocks.0.x_block.attn.rope": np.zeros(2)}))
    with pytest.raises(WeightsError) as excinfo:
        mmdit_params_from_original(SafetensorsFile(path), mmdit_config)
    assert_one_line_error(excinfo, path, "joint_blocks.0.x_block.attn.rope")

    path = tmp_path / "no_context.safetensors"
    write_single_file(path, {k: v for k, v in original.items() if k != "context_embedder.weight"})
    with pytest.raises(WeightsError) as excinfo:
        mmdit_config_from_original(SafetensorsFile(path))
    assert_one_line_error(excinfo, path, "context_embedder.weight")
    with pytest.raises(WeightsError) as excinfo:
        mmdit_params_from_original(SafetensorsFile(path), mmdit_config)
    assert_one_line_error(excinfo, path, "context_embedder/kernel")

    path = tmp_path / "gap.safetensors"
    write_single_file(path, {k: v for k, v in original.items()
                             if not k.startswith("joint_blocks.1.")})
    with pytest.raises(WeightsError) as excinfo:
        mmdit_config_from_original(SafetensorsFile(path))
    assert_one_line_error(excinfo, path, "joint_blocks")


def test_bfloat16_compute_and_storage():
    config = MMDiTConfig(**VARIANTS["sd35_medium"])
    model = MMDiT(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    example = inputs(VARIANTS["sd35_medium"], (8, 12))
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), *example))["params"]
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    out = jax.eval_shape(lambda p: model.apply({"params": p}, *example), params)
    assert out.dtype == jnp.bfloat16 and out.shape == (2, 8, 12, 4)


def test_bad_inputs_and_configs_are_refused():
    config = MMDiTConfig(**VARIANTS["sd35_medium"])
    model = MMDiT(config)
    x, t, context, pooled = inputs(VARIANTS["sd35_medium"], (34, 8))
    with pytest.raises(ValueError, match="pos_embed_max_size 16"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, context, pooled))
    with pytest.raises(ValueError, match="not a multiple of patch_size 2"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), x[:, :7], t, context, pooled))
    with pytest.raises(ValueError, match="skip_layers"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), x[:, :8], t, context, pooled, (3,)))
    with pytest.raises(ValueError, match="caption_projection_dim"):
        dataclasses.replace(config, caption_projection_dim=32)
    with pytest.raises(ValueError, match="qk_norm"):
        dataclasses.replace(config, qk_norm="layer_norm")
    with pytest.raises(ValueError, match="dual_attention_layers"):
        dataclasses.replace(config, dual_attention_layers=(3,))
    with pytest.raises(ValueError, match="unknown diffusers config keys: foo"):
        MMDiTConfig.from_diffusers({"foo": 1, "_class_name": "SD3Transformer2DModel"})
