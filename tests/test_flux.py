"""Parity of sdjax's Flux.1 transformer with diffusers' `FluxTransformer2DModel` (dev: guidance
embedding; schnell: none), loaded through the diffusers-folder loader and through Black Forest
Labs' original single-file layout."""
import copy
import inspect
import json
import math
import types

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import diffusers
from diffusers import FluxPipeline
from diffusers.loaders import single_file_utils

from sdjax.models.flux import (FluxConfig, FluxTransformer, image_ids, pack_latents,
                               unpack_latents)
from sdjax.weights.common import DictSource, RenamedSource, SafetensorsFile, WeightsError
from sdjax.weights.flux import (ORIGINAL_PREFIX, flux_config_from_original, flux_params,
                                flux_params_from_original, is_original_flux, load_flux)
from tests.helpers import flat_params, rewritten_folder, to_nhwc
from tests.single_file_writer import flux_to_original

TOL = 1e-5
COMMON = dict(patch_size=1, in_channels=16, joint_attention_dim=24, pooled_projection_dim=12,
              num_layers=2, num_single_layers=2)
# dev: 2 heads of 32, whose rotary split (4, 14, 14) is Flux.1's proportion, so it is inferred from
# an original file; schnell: 3 heads of 16, whose split must be given.
CONFIGS = {
    "dev": dict(attention_head_dim=32, num_attention_heads=2, axes_dims_rope=(4, 14, 14),
                guidance_embeds=True),
    "schnell": dict(attention_head_dim=16, num_attention_heads=3, axes_dims_rope=(4, 6, 6),
                    guidance_embeds=False),
}
# Latent (H, W): non-square (a row/column mix-up in packing or ids shows) and square.
LATENT_SHAPES = ((6, 4), (4, 4))
TEXT_LEN = 5
VAE_SCALE = 8
WEIGHTS = "diffusion_pytorch_model.safetensors"


def build_reference(overrides: dict, seed: int = 0):
    """A random diffusers model with every parameter drawn afresh (RMSNorm scales near 1, biases
    nonzero), so no layer is an identity or a zero that would hide a wrong mapping."""
    torch.manual_seed(seed)
    ref = diffusers.FluxTransformer2DModel(**COMMON, **overrides).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[1]))
    return ref


def reference_output(ref, latents, sigma, context, pooled, guidance) -> np.ndarray:
    """diffusers' transformer on the inputs as FluxPipeline prepares them: packed NCHW latents,
    its image ids, zero text ids; unpacked back to NHWC."""
    b, h, w, c = latents.shape
    packed = FluxPipeline._pack_latents(torch.from_numpy(latents.transpose(0, 3, 1, 2)), b, c, h, w)
    with torch.no_grad():
        out = ref(hidden_states=packed, encoder_hidden_states=torch.from_numpy(context),
                  pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(sigma),
                  img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu",
                                                                 torch.float32),
                  txt_ids=torch.zeros(context.shape[1], 3),
                  guidance=None if guidance is None else torch.from_numpy(guidance),
                  return_dict=False)[0]
    return to_nhwc(FluxPipeline._unpack_latents(out, h * VAE_SCALE, w * VAE_SCALE, VAE_SCALE))


def inputs(config: FluxConfig, shape: tuple[int, int], seed: int = 1) -> dict:
    rng = np.random.RandomState(seed)
    f32 = lambda *s: rng.randn(*s).astype(np.float32)
    return dict(latents=f32(2, *shape, config.latent_channels),
                sigma=np.array([0.3, 0.95], np.float32),
                context=f32(2, TEXT_LEN, config.joint_attention_dim),
                pooled=f32(2, config.pooled_projection_dim),
                guidance=np.array([3.5, 1.0], np.float32) if config.guidance_embeds else None)


def relative_error(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


# Flux.1-dev (guidance embedding) in the default run, schnell with the slow tests.
@pytest.fixture(scope="module", params=[
    pytest.param(name, marks=() if name == "dev" else pytest.mark.slow) for name in sorted(CONFIGS)])
def case(request, tmp_path_factory):
    ref = build_reference(CONFIGS[request.param])
    folder = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(folder, safe_serialization=True)
    config, params = load_flux(folder)
    model = FluxTransformer(config)
    apply = jax.jit(model.apply)
    runs = []
    for shape in LATENT_SHAPES:
        x = inputs(config, shape)
        runs.append((x, reference_output(ref, **x),
                     np.asarray(apply({"params": params}, x["latents"], x["sigma"], x["context"],
                                      x["pooled"], x["guidance"]))))
    state_dict = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
    return types.SimpleNamespace(name=request.param, ref=ref, folder=folder, config=config,
                                 params=params, runs=runs, state_dict=state_dict)


# ---- The model -------------------------------------------------------------------------------------
def test_output_matches_diffusers(case):
    for x, want, got in case.runs:
        assert got.shape == x["latents"].shape
        assert np.abs(want).max() > 0.1  # a meaningful output, not a near-zero one
        assert relative_error(got, want) <= TOL, (case.name, x["latents"].shape)


def test_output_depends_on_timestep_and_guidance(case):
    """The comparison above would pass vacuously if the conditioning did nothing."""
    x, _, got = case.runs[0]
    other = dict(x, sigma=x["sigma"][::-1].copy())
    if x["guidance"] is not None:
        other["guidance"] = x["guidance"][::-1].copy()
    assert relative_error(reference_output(case.ref, **other), got) > 1e-2


def test_loaded_config_is_the_diffusers_config(case):
    assert case.config == FluxConfig.from_diffusers(dict(case.ref.config))
    assert case.config.inner_dim == case.ref.inner_dim


@pytest.mark.parametrize("case", ["dev"], indirect=True)
def test_remat_gives_the_same_output(case):
    x, _, got = case.runs[0]
    remat = jax.jit(FluxTransformer(case.config, remat=True).apply)
    out = remat({"params": case.params}, x["latents"], x["sigma"], x["context"], x["pooled"],
                x["guidance"])
    assert relative_error(out, got) <= 1e-6


@pytest.mark.parametrize("case", ["dev"], indirect=True)
def test_bfloat16_compute_matches_diffusers_bfloat16(case):
    """In bfloat16 diffusers rounds sigma and sigma * 1000 (and guidance * 1000) to bfloat16
    before the sinusoids: t = 0.95 becomes 948, which moves the output by half its size. sdjax
    must round the same way, not merely stay close to float32."""
    x, want_float32, _ = case.runs[0]
    bf16 = lambda a: torch.from_numpy(a).to(torch.bfloat16)
    b, h, w, c = x["latents"].shape
    ref = copy.deepcopy(case.ref).to(torch.bfloat16)
    with torch.no_grad():  # as FluxPipeline calls it: sigma in the latents' dtype, guidance float32
        out = ref(hidden_states=FluxPipeline._pack_latents(
                      bf16(x["latents"].transpose(0, 3, 1, 2)), b, c, h, w),
                  encoder_hidden_states=bf16(x["context"]), pooled_projections=bf16(x["pooled"]),
                  timestep=bf16(x["sigma"]), guidance=torch.from_numpy(x["guidance"]),
                  img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu",
                                                                 torch.bfloat16),
                  txt_ids=torch.zeros(TEXT_LEN, 3, dtype=torch.bfloat16), return_dict=False)[0]
    want = to_nhwc(FluxPipeline._unpack_latents(out.float(), h * VAE_SCALE, w * VAE_SCALE,
                                                VAE_SCALE))
    model = FluxTransformer(case.config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.bfloat16), case.params)
    got = jax.jit(model.apply)({"params": params}, x["latents"], x["sigma"], x["context"],
                               x["pooled"], x["guidance"])
    assert got.dtype == jnp.bfloat16
    got = np.asarray(got, np.float32)
    assert relative_error(got, want) < 3e-2
    assert relative_error(got, want_float32) > 0.2


def test_guidance_must_match_the_config(case):
    x, _, _ = case.runs[0]
    model = FluxTransformer(case.config)
    wrong = None if case.config.guidance_embeds else x["sigma"]
    with pytest.raises(ValueError, match="guidance"):
        jax.eval_shape(lambda: model.apply({"params": case.params}, x["latents"], x["sigma"],
                                           x["context"], x["pooled"], wrong))


def test_odd_latent_sizes_are_refused(case):
    model = FluxTransformer(case.config)
    x = inputs(case.config, (5, 4))
    with pytest.raises(ValueError, match=r"even H and W, got \(2, 5, 4, 4\)"):
        jax.eval_shape(lambda: model.apply({"params": case.params}, x["latents"], x["sigma"],
                                           x["context"], x["pooled"], x["guidance"]))


def test_pack_unpack_match_the_pipeline_and_round_trip():
    rng = np.random.RandomState(0)
    latents = rng.randn(2, 6, 10, 3).astype(np.float32)
    nchw = torch.from_numpy(latents.transpose(0, 3, 1, 2))
    packed = pack_latents(jnp.asarray(latents))
    want = FluxPipeline._pack_latents(nchw, 2, 3, 6, 10).numpy()
    np.testing.assert_array_equal(np.asarray(packed), want)
    np.testing.assert_array_equal(np.asarray(unpack_latents(packed, 6, 10)), latents)
    unpacked = FluxPipeline._unpack_latents(torch.from_numpy(want), 6 * VAE_SCALE, 10 * VAE_SCALE,
                                            VAE_SCALE)
    np.testing.assert_array_equal(np.asarray(unpack_latents(jnp.asarray(want), 6, 10)),
                                  to_nhwc(unpacked))
    ids = FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32).numpy()
    np.testing.assert_array_equal(image_ids(3, 5), ids)


def test_config_from_diffusers_refuses_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match="unknown diffusers config keys: mlp_ratio"):
        FluxConfig.from_diffusers({"_class_name": "FluxTransformer2DModel", "mlp_ratio": 4})
    with pytest.raises(ValueError, match="axes_dims_rope"):
        FluxConfig.from_diffusers({"attention_head_dim": 64})
    with pytest.raises(ValueError, match="patch_size"):
        FluxConfig(patch_size=2)
    with pytest.raises(ValueError, match="in_channels"):
        FluxConfig(in_channels=18)


# ---- Folders ---------------------------------------------------------------------------------------
def test_sharded_folder_loads_identically(case, tmp_path):
    case.ref.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="300KB")
    assert (tmp_path / f"{WEIGHTS}.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    config, params = load_flux(tmp_path)
    assert config == case.config
    want = flat_params(case.params)
    assert {k: np.array_equal(v, want[k]) for k, v in flat_params(params).items()} == \
        {k: True for k in want}


def test_bad_folders_give_one_line_errors(case, tmp_path):
    def check(folder, *fragments):
        with pytest.raises(WeightsError) as err:
            load_flux(folder)
        message = str(err.value)
        assert "\n" not in message
        for fragment in fragments:
            assert fragment in message, message

    key = "transformer_blocks.1.attn.to_q.weight"
    path = rewritten_folder(case.folder, tmp_path / "shape", WEIGHTS,
                            lambda sd: sd.__setitem__(key, sd[key][:, :-1].copy()))
    check(tmp_path / "shape", path, key, "shape mismatch")
    path = rewritten_folder(case.folder, tmp_path / "missing", WEIGHTS,
                            lambda sd: sd.pop("single_transformer_blocks.0.proj_mlp.bias"))
    check(tmp_path / "missing", path, "missing keys", "single_transformer_blocks_0/proj_mlp/bias")

    (tmp_path / "config").mkdir()
    config = json.loads((case.folder / "config.json").read_text())
    (tmp_path / "config" / "config.json").write_text(json.dumps(dict(config, qk_norm="rms_norm")))
    check(tmp_path / "config", str(tmp_path / "config" / "config.json"), "qk_norm")
    (tmp_path / "config" / "config.json").write_text(
        json.dumps(dict(config, _class_name="SD3Transformer2DModel")))
    check(tmp_path / "config", "SD3Transformer2DModel")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(config))
    check(tmp_path / "empty", str(tmp_path / "empty"), "no transformer weights")


# ---- BFL's original layout -------------------------------------------------------------------------
# Written on its own (diffusers name -> original name), so the reader is checked against something
# it shares no code with; the writer itself is checked against diffusers' converter below.
def diffusers_converter(inner_dim: int):
    """diffusers' `convert_flux_transformer_checkpoint_to_diffusers`, whose single-block split
    hard-codes Flux.1's width 3072, with that width set to the tiny model's."""
    source = inspect.getsource(single_file_utils.convert_flux_transformer_checkpoint_to_diffusers)
    assert source.count("inner_dim = 3072") == 1
    namespace = dict(vars(single_file_utils))
    exec(source.replace("inner_dim = 3072", f"inner_dim = {inner_dim}"), namespace)
    return namespace["convert_flux_transformer_checkpoint_to_diffusers"]


def test_original_writer_agrees_with_diffusers_converter(case):
    original = {k: torch.from_numpy(v) for k, v in flux_to_original(case.state_dict).items()}
    converted = diffusers_converter(case.config.inner_dim)(original)
    assert sorted(converted) == sorted(case.state_dict)
    for key, value in converted.items():
        np.testing.assert_array_equal(value.numpy(), case.state_dict[key], err_msg=key)


def original_source(path, prefix: str):
    """The file as the single-file reader hands it over: the `model.diffusion_model.` prefix
    stripped."""
    file = SafetensorsFile(path)
    if not prefix:
        return file
    return RenamedSource(file, {k[len(prefix):]: (k, None) for k in file})


STORED = {"float32": torch.float32, "bfloat16": torch.bfloat16,
          "float8_e4m3fn": torch.float8_e4m3fn}


@pytest.mark.parametrize("stored,prefix,load_dtype", [
    ("float32", "", None), ("float32", ORIGINAL_PREFIX, None),
    ("bfloat16", ORIGINAL_PREFIX, None), ("float8_e4m3fn", "", jnp.bfloat16)])
def test_original_file_loads_the_same_params(case, tmp_path, stored, prefix, load_dtype):
    original = flux_to_original(case.state_dict)
    path = tmp_path / "flux1.safetensors"
    save_file({prefix + k: torch.from_numpy(v).to(STORED[stored]) for k, v in original.items()},
              str(path))
    file_keys = list(SafetensorsFile(path))
    assert is_original_flux(file_keys)
    source = original_source(path, prefix)
    rope = None if case.name == "dev" else case.config.axes_dims_rope
    config = flux_config_from_original(source, axes_dims_rope=rope)
    assert config == case.config
    params = flux_params_from_original(source, config, dtype=load_dtype)
    # The stored dtype's rounding of the diffusers weights, exactly: the converter only moves rows.
    rounded = {k: torch.from_numpy(v).to(STORED[stored]).float().numpy()
               for k, v in case.state_dict.items()}
    want = flat_params(flux_params(DictSource(rounded), case.config, dtype=load_dtype))
    got = flat_params(params)
    assert sorted(got) == sorted(want)
    for key, value in got.items():
        assert value.dtype == np.dtype(load_dtype or np.float32), key
        np.testing.assert_array_equal(value, want[key], err_msg=key)
    if stored == "float32":
        assert all(np.array_equal(v, flat_params(case.params)[k]) for k, v in got.items())
    if stored == "float8_e4m3fn":
        assert SafetensorsFile(path)["img_in.weight"].dtype == ml_dtypes.float8_e4m3fn


@pytest.mark.parametrize("case", ["schnell"], indirect=True)
def test_original_head_width_without_flux_split_needs_axes(case):
    source = DictSource(flux_to_original(case.state_dict), name="flux1.safetensors")
    with pytest.raises(WeightsError, match="flux1.safetensors: .*head width 16 .*axes_dims_rope"):
        flux_config_from_original(source)


def test_is_original_flux_only_for_flux_files(case):
    original = flux_to_original(case.state_dict)
    assert is_original_flux(original)
    assert is_original_flux(ORIGINAL_PREFIX + k for k in original)
    assert not is_original_flux(case.state_dict)
    assert not is_original_flux(["model.diffusion_model.input_blocks.0.0.weight",
                                 "model.diffusion_model.time_embed.0.weight"])
    assert not is_original_flux(["joint_blocks.0.x_block.attn.qkv.weight", "x_embedder.proj.weight"])


def test_bad_original_files_give_one_line_errors(case):
    original = flux_to_original(case.state_dict)
    config = case.config

    def check(edit, *fragments, infer=False):
        tensors = dict(original)
        edit(tensors)
        source = DictSource(tensors, name="flux1.safetensors")
        with pytest.raises(WeightsError) as err:
            if infer:
                flux_config_from_original(source)
            else:
                flux_params_from_original(source, config)
        message = str(err.value)
        assert "\n" not in message and message.startswith("flux1.safetensors: "), message
        for fragment in fragments:
            assert fragment in message, message

    check(lambda sd: sd.pop("single_blocks.1.linear2.bias"),
          "missing keys: single_blocks.1.linear2.bias")
    check(lambda sd: sd.__setitem__("double_blocks.2.img_mod.lin.weight", original["img_in.weight"]),
          "unexpected keys: double_blocks.2.img_mod.lin.weight")
    key = "single_blocks.0.linear1.weight"
    check(lambda sd: sd.__setitem__(key, sd[key][:-1]), f"shape mismatch for {key}")
    key = "double_blocks.1.txt_mlp.2.weight"
    check(lambda sd: sd.__setitem__(key, sd[key][:, :-1]), f"shape mismatch for {key}")
    check(lambda sd: sd.pop("img_in.weight"), "img_in.weight", infer=True)
    prefixed = lambda sd: [sd.__setitem__(ORIGINAL_PREFIX + k, sd.pop(k)) for k in list(sd)]
    check(prefixed, "strip the 'model.diffusion_model.' prefix", infer=True)


# The tensors of Black Forest Labs' `flux1-dev.safetensors` (schnell: without guidance_in), as
# that file's header lists them.
FLUX1_DEV_TOP = {"img_in.weight": (3072, 64), "txt_in.weight": (3072, 4096),
                 "time_in.in_layer.weight": (3072, 256), "time_in.out_layer.weight": (3072, 3072),
                 "vector_in.in_layer.weight": (3072, 768),
                 "vector_in.out_layer.weight": (3072, 3072),
                 "guidance_in.in_layer.weight": (3072, 256),
                 "guidance_in.out_layer.weight": (3072, 3072),
                 "final_layer.linear.weight": (64, 3072),
                 "final_layer.adaLN_modulation.1.weight": (6144, 3072)}
FLUX1_DEV_DOUBLE = {"img_mod.lin.weight": (18432, 3072), "img_attn.qkv.weight": (9216, 3072),
                    "img_attn.proj.weight": (3072, 3072), "img_mlp.0.weight": (12288, 3072),
                    "img_mlp.2.weight": (3072, 12288)}
FLUX1_DEV_SINGLE = {"linear1.weight": (21504, 3072), "linear2.weight": (3072, 15360),
                    "modulation.lin.weight": (9216, 3072)}


def flux1_dev_header() -> dict:
    shapes = dict(FLUX1_DEV_TOP)
    for i in range(19):
        for stream in ("img", "txt"):
            for name, shape in FLUX1_DEV_DOUBLE.items():
                shapes[f"double_blocks.{i}.{stream}{name[3:]}"] = shape
            for norm in ("query_norm", "key_norm"):
                shapes[f"double_blocks.{i}.{stream}_attn.norm.{norm}.scale"] = (128,)
    for i in range(38):
        for name, shape in FLUX1_DEV_SINGLE.items():
            shapes[f"single_blocks.{i}.{name}"] = shape
        for norm in ("query_norm", "key_norm"):
            shapes[f"single_blocks.{i}.norm.{norm}.scale"] = (128,)
    shapes.update({k[:-len("weight")] + "bias": s[:1] for k, s in list(shapes.items())
                   if k.endswith(".weight")})
    return shapes


@pytest.mark.slow
def test_full_size_original_layout_reads_as_flux1_dev(tmp_path):
    """The released dev file's layout (header only: a sparse file) gives diffusers' FLUX.1-dev
    transformer config, and every tensor it lists is one the converter reads at that shape."""
    from sdjax.weights import flux as flux_weights
    from sdjax.weights.flux import flux_shapes
    from tests.single_file_writer import write_header_only

    header = flux1_dev_header()
    path = tmp_path / "flux1-dev.safetensors"
    write_header_only(path, {k: np.broadcast_to(np.zeros((), np.float16), s)
                             for k, s in header.items()})
    source = SafetensorsFile(path)
    assert is_original_flux(source)
    config = flux_config_from_original(source)
    # FLUX.1-dev's transformer/config.json, as released.
    assert config == FluxConfig.from_diffusers({
        "_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.30.0.dev0",
        "attention_head_dim": 128, "guidance_embeds": True, "in_channels": 64,
        "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19,
        "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768})
    expected = flux_weights._original_shapes(flux_weights._original_mapping(config),
                                             flux_shapes(config))
    assert expected == header
