"""ControlNet checkpoints (`sdjax.weights.controlnet`) against diffusers' `ControlNetModel`: tiny
random reference models saved as diffusers folders (plain, fp16 variant, sharded) and as
original-layout single files (`tests/single_file_writer.py`, itself checked against diffusers'
`from_single_file`), loaded through `load_controlnet`, compared on outputs and on every tensor;
`save_controlnet` read back by diffusers; `controlnet_from_unet` against `ControlNetModel.from_unet`."""
from __future__ import annotations

import copy
import dataclasses
import json
import pathlib
import shutil
from typing import NamedTuple

import jax
import numpy as np
import pytest

import torch
import diffusers

from sdjax.models.controlnet import ControlNet, ControlNetConfig
from sdjax.models.unet import UNetConfig
from sdjax.weights.common import WeightsError
from sdjax.weights.controlnet import (ControlNetWeights, controlnet_from_unet, load_controlnet,
                                      save_controlnet)
from sdjax.weights.unet import load_unet_folder
from tests import single_file_writer as writer
from tests.helpers import flat_params, to_nchw, to_nhwc

CA_DOWN, DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
# Tiny versions of the released layouts (diffusers ControlNetModel kwargs). sd1's embedding has the
# released four stages (diffusers' single-file reader expects conv_out at input_hint_block.14);
# the others two, so a different count of hint convs is read too.
FAMILIES = {
    "sd1": dict(block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8,
                cross_attention_dim=32, down_block_types=(CA_DOWN, DOWN), attention_head_dim=8,
                conditioning_embedding_out_channels=(8, 8, 16, 16)),
    # Linear projections, head counts per level (16-wide heads), upcast attention.
    "sd2": dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                cross_attention_dim=32, down_block_types=(CA_DOWN, CA_DOWN),
                attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
                conditioning_embedding_out_channels=(8, 16)),
    "sdxl": dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                 cross_attention_dim=32, down_block_types=(DOWN, CA_DOWN),
                 attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
                 use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8,
                 conditioning_embedding_out_channels=(8, 16)),
}
CONTROL_FIELDS = ("conditioning_embedding_out_channels", "conditioning_channels",
                  "controlnet_conditioning_channel_order", "global_pool_conditions")
BATCH, HEIGHT, WIDTH = 2, 8, 6  # latent size; H != W catches swapped spatial axes
CONTEXT_LEN = 7
TIMESTEPS = np.array([999, 37])
TIME_IDS = np.array([[1024, 1024, 0, 0, 1024, 1024], [768, 1344, 64, 32, 1024, 1024]], np.float32)
SCALE = 0.75
PARITY_TOLERANCE = 1e-5  # max |sdjax - diffusers| / max |diffusers|, per residual
WEIGHT_STD = 0.5
# Weights rounded to float16 (relative step 2^-11) against the float32 reference: ~1e-3 measured.
FP16_TOLERANCE = 5e-3


def unet_kwargs(family: str) -> dict:
    """The diffusers U-Net whose encoder the family's ControlNet mirrors."""
    kwargs = {k: v for k, v in FAMILIES[family].items() if k not in CONTROL_FIELDS}
    up = {CA_DOWN: "CrossAttnUpBlock2D", DOWN: "UpBlock2D"}
    kwargs["up_block_types"] = tuple(up[t] for t in reversed(kwargs["down_block_types"]))
    return kwargs


def base_config(family: str, **changes) -> UNetConfig:
    return UNetConfig.from_diffusers({**unet_kwargs(family), **changes})


class Reference(NamedTuple):
    model: torch.nn.Module      # float32, random weights everywhere
    folder: pathlib.Path        # save_pretrained
    fp16_folder: pathlib.Path   # save_pretrained(variant="fp16") of the float16 model
    base: UNetConfig
    args: tuple                 # ControlNet inputs, NHWC
    expected: tuple             # diffusers' residuals (down..., mid), NHWC


def _build_reference(family: str, root: pathlib.Path) -> Reference:
    kwargs = FAMILIES[family]
    torch.manual_seed(len(family))
    model = diffusers.ControlNetModel(**kwargs).eval()
    with torch.no_grad():
        # diffusers zero-initialises the zero convs and conv_out: random everywhere makes
        # equality meaningful. At std 1 the attention logits are in the tens (saturated softmax)
        # and float32 rounding alone moves the output by ~1e-5; std 0.5 makes them 16x smaller.
        for p in model.parameters():
            p.normal_(0.0, WEIGHT_STD)
    model.save_pretrained(root / "folder")
    copy.deepcopy(model).half().save_pretrained(root / "fp16", variant="fp16")

    rng = np.random.default_rng(len(family))
    factor = 2 ** (len(kwargs["conditioning_embedding_out_channels"]) - 1)
    sample = rng.standard_normal((BATCH, HEIGHT, WIDTH, 4), np.float32)
    image = rng.uniform(0, 1, (BATCH, HEIGHT * factor, WIDTH * factor, 3)).astype(np.float32)
    context = rng.standard_normal((BATCH, CONTEXT_LEN, kwargs["cross_attention_dim"]), np.float32)
    added = None
    if kwargs.get("addition_embed_type") == "text_time":
        width = kwargs["projection_class_embeddings_input_dim"] - 6 * kwargs["addition_time_embed_dim"]
        added = {"text_embeds": rng.standard_normal((BATCH, width), np.float32),
                 "time_ids": TIME_IDS}
    with torch.no_grad():
        down, mid = model(to_nchw(sample), torch.from_numpy(TIMESTEPS), torch.from_numpy(context),
                          to_nchw(image), conditioning_scale=SCALE, return_dict=False,
                          added_cond_kwargs=None if added is None else
                          {k: torch.from_numpy(v) for k, v in added.items()})
    expected = tuple(to_nhwc(r) for r in (*down, mid))
    return Reference(model, root / "folder", root / "fp16", base_config(family),
                     (sample, TIMESTEPS, context, image, SCALE, added), expected)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cache: dict[str, Reference] = {}

    def get(family: str) -> Reference:
        if family not in cache:
            cache[family] = _build_reference(family, tmp_path_factory.mktemp(family))
        return cache[family]

    return get


@pytest.fixture(scope="module")
def compiled():
    """A jitted `ControlNet(config).apply` per config, compiled once."""
    cache = {}

    def get(config: ControlNetConfig):
        if config not in cache:
            model = ControlNet(config)
            cache[config] = jax.jit(lambda params, *args: model.apply({"params": params}, *args))
        return cache[config]

    return get


def residuals(compiled, controlnet: ControlNetWeights, args) -> list[np.ndarray]:
    down, mid = compiled(controlnet.config)(controlnet.params, *args)
    return [np.asarray(r) for r in (*down, mid)]


def relative_errors(got, want) -> list[float]:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert np.abs(w).max() > 0.1  # not a comparison of two near-zero maps
    return [float(np.abs(g - w).max() / np.abs(w).max()) for g, w in zip(got, want)]


def assert_same_params(got: dict, want: dict) -> None:
    got, want = flat_params(got), flat_params(want)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def original_file(ref: Reference, path: pathlib.Path, *, dtype="float32", prefix=True
                  ) -> pathlib.Path:
    """The reference model as an original-layout single file."""
    layers = ref.model.config.layers_per_block
    tensors = writer.build_controlnet_file(ref.model.state_dict(), layers, prefix=prefix)
    writer.write_single_file(path, tensors, dtype=np.dtype(dtype))
    return path


# ---- diffusers folders -----------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_diffusers_folder_gives_diffusers_residuals(family, reference, compiled):
    ref = reference(family)
    controlnet = load_controlnet(ref.folder)
    assert controlnet.config == ControlNetConfig.from_diffusers(
        json.loads((ref.folder / "config.json").read_text()))
    assert controlnet.source == str(ref.folder)
    errors = relative_errors(residuals(compiled, controlnet, ref.args), ref.expected)
    print(f"\n{family}: max relative error per residual {max(errors):.2e}")
    assert max(errors) <= PARITY_TOLERANCE, errors


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fp16_variant_folder_loads_the_rounded_weights(family, reference, compiled):
    ref = reference(family)
    assert (ref.fp16_folder / "diffusion_pytorch_model.fp16.safetensors").is_file()
    full = load_controlnet(ref.folder)
    half = load_controlnet(ref.fp16_folder)
    assert half.config == full.config
    rounded = jax.tree.map(lambda x: x.astype(np.float16).astype(np.float32), full.params)
    assert_same_params(half.params, rounded)
    assert load_controlnet(ref.fp16_folder, dtype="float16").params["conv_in"]["kernel"].dtype \
        == np.float16
    errors = relative_errors(residuals(compiled, half, ref.args), ref.expected)
    print(f"\n{family}: float16 weights, max relative error per residual {max(errors):.2e}")
    assert max(errors) <= FP16_TOLERANCE, errors


def test_sharded_pipeline_and_diffusers_named_file_forms_load_the_same(reference, tmp_path,
                                                                      monkeypatch):
    ref = reference("sd1")
    want = load_controlnet(ref.folder).params
    sharded = tmp_path / "sharded"
    ref.model.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert_same_params(load_controlnet(sharded).params, want)
    pipeline = tmp_path / "pipeline"
    shutil.copytree(ref.folder, pipeline / "controlnet")
    (pipeline / "model_index.json").write_text("{}")
    assert_same_params(load_controlnet(pipeline).params, want)
    # A diffusers-named file beside its config.json, given by a relative path.
    monkeypatch.chdir(ref.folder.parent)
    assert_same_params(load_controlnet("folder/diffusion_pytorch_model.safetensors").params, want)


# ---- original-layout single files ------------------------------------------------------------------
@pytest.mark.parametrize("prefix", [True, False], ids=["control_model", "bare"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_original_layout_file_loads_the_folders_config_and_params(family, dtype, prefix,
                                                                  reference, tmp_path):
    ref = reference(family)
    path = original_file(ref, tmp_path / "cn.safetensors", dtype=dtype, prefix=prefix)
    loaded = load_controlnet(path, base=ref.base)
    folder = load_controlnet(ref.folder if dtype == "float32" else ref.fp16_folder)
    assert loaded.config == folder.config
    assert_same_params(loaded.params, folder.params)
    assert loaded.source == str(path)


@pytest.mark.parametrize("prefix", [True, False], ids=["control_model", "bare"])
def test_writer_output_loads_in_diffusers_from_single_file(prefix, reference, tmp_path):
    # Only sd1's layout: diffusers' converter takes conv_out from input_hint_block.14 (four
    # stages) and maps no label_emb (SDXL).
    ref = reference("sd1")
    path = original_file(ref, tmp_path / "cn.safetensors", prefix=prefix)
    model = diffusers.ControlNetModel.from_single_file(str(path), config=str(ref.folder),
                                                       local_files_only=True)
    want, got = ref.model.state_dict(), model.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)


SD1_CONVENTION = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=768,
                      down_block_types=(CA_DOWN, DOWN), attention_head_dim=8,
                      conditioning_embedding_out_channels=(8, 16))
SD2_CONVENTION = dict(block_out_channels=(64, 128), layers_per_block=1, cross_attention_dim=64,
                      down_block_types=(CA_DOWN, CA_DOWN), attention_head_dim=(1, 2),
                      use_linear_projection=True, conditioning_embedding_out_channels=(8, 16))


@pytest.mark.parametrize("kwargs", [SD1_CONVENTION, SD2_CONVENTION], ids=["sd1", "sd2"])
def test_without_base_a_file_gets_the_family_conventions(kwargs, tmp_path):
    """768-wide context: SD 1.x's 8 heads; otherwise 64-channel heads; 32 GroupNorm groups."""
    model = diffusers.ControlNetModel(**kwargs)
    model.save_pretrained(tmp_path / "folder")
    path = tmp_path / "cn.safetensors"
    writer.write_single_file(path, writer.build_controlnet_file(model.state_dict(), 1))
    loaded, folder = load_controlnet(path), load_controlnet(tmp_path / "folder")
    assert loaded.config == folder.config
    assert_same_params(loaded.params, folder.params)


def test_base_supplies_what_shapes_cannot_show(reference, tmp_path):
    ref = reference("sd2")
    path = original_file(ref, tmp_path / "cn.safetensors")
    base = dataclasses.replace(ref.base, attention_head_dim=(4, 8), upcast_attention=False,
                               attention="reference")
    config = load_controlnet(path, base=base).config
    assert (config.heads, config.upcast_attention, config.attention) == ((4, 8), False, "reference")
    assert config.norm_num_groups == 8 and config.use_linear_projection


# ---- save_controlnet -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_saved_folder_loads_in_diffusers_with_the_same_outputs(family, reference, tmp_path):
    ref = reference(family)
    controlnet = load_controlnet(original_file(ref, tmp_path / "cn.safetensors"), base=ref.base)
    save_controlnet(controlnet, tmp_path / "saved")
    model = diffusers.ControlNetModel.from_pretrained(tmp_path / "saved").eval()
    want, got = ref.model.state_dict(), model.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
    sample, timesteps, context, image, scale, added = ref.args
    with torch.no_grad():
        down, mid = model(to_nchw(sample), torch.from_numpy(timesteps), torch.from_numpy(context),
                          to_nchw(image), conditioning_scale=scale, return_dict=False,
                          added_cond_kwargs=None if added is None else
                          {k: torch.from_numpy(v) for k, v in added.items()})
    for got_residual, want_residual in zip((*down, mid), ref.expected):
        np.testing.assert_array_equal(to_nhwc(got_residual), want_residual)
    again = load_controlnet(tmp_path / "saved")
    assert again.config == controlnet.config
    assert_same_params(again.params, controlnet.params)


def test_save_keeps_the_params_dtype(reference, tmp_path):
    from safetensors.numpy import load_file

    ref = reference("sd1")
    save_controlnet(load_controlnet(ref.folder, dtype="float16"), tmp_path / "half")
    stored = load_file(str(tmp_path / "half" / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in stored.values()} == {np.dtype(np.float16)}
    model = diffusers.ControlNetModel.from_pretrained(tmp_path / "half", torch_dtype=torch.float16)
    want = copy.deepcopy(ref.model).half().state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, want[key], rtol=0, atol=0, msg=key)


def test_saved_files_are_readable_by_other_users(reference, tmp_path):
    save_controlnet(load_controlnet(reference("sd1").folder), tmp_path / "shared")
    for path in [tmp_path / "shared", *(tmp_path / "shared").iterdir()]:
        assert path.stat().st_mode & 0o044 == 0o044, path


def test_save_refuses_a_non_empty_folder_and_overwrite_replaces_only_model_files(
        reference, tmp_path, monkeypatch):
    ref = reference("sd1")
    controlnet = load_controlnet(ref.folder)
    target = tmp_path / "target"
    target.mkdir()
    (target / "README.md").write_text("mine")
    (target / "diffusion_pytorch_model.fp16.safetensors").write_text("stale")
    with pytest.raises(WeightsError, match=rf"{target}: not empty \(holds README.md") as err:
        save_controlnet(controlnet, target)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in target.iterdir()) == [
        "README.md", "diffusion_pytorch_model.fp16.safetensors"]
    save_controlnet(controlnet, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == [
        "README.md", "config.json", "diffusion_pytorch_model.safetensors"]
    assert (target / "README.md").read_text() == "mine"
    assert_same_params(load_controlnet(target).params, controlnet.params)
    # Relative paths; an empty folder is filled; nothing is left beside the target.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    save_controlnet(controlnet, "empty")
    save_controlnet(controlnet, "new/nested")
    assert_same_params(load_controlnet("new/nested").params, controlnet.params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "new", "target"]
    (tmp_path / "file").write_text("")
    with pytest.raises(WeightsError, match="file: exists and is not a folder"):
        save_controlnet(controlnet, "file")


# ---- controlnet_from_unet --------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_controlnet_from_unet_copies_the_encoder_as_diffusers_does(family, compiled, reference,
                                                                  tmp_path):
    torch.manual_seed(1)
    unet = diffusers.UNet2DConditionModel(**unet_kwargs(family))
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_()
    unet.save_pretrained(tmp_path / "unet")
    unet_config, unet_params = load_unet_folder(tmp_path / "unet")
    widths = FAMILIES[family]["conditioning_embedding_out_channels"]
    controlnet = controlnet_from_unet(unet_config, unet_params, seed=0,
                                      conditioning_embedding_out_channels=widths)
    diffusers.ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=widths).save_pretrained(tmp_path / "reference")
    want = load_controlnet(tmp_path / "reference")
    assert controlnet.config.to_diffusers() == want.config.to_diffusers()
    assert controlnet.config.to_diffusers() == load_controlnet(reference(family).folder) \
        .config.to_diffusers()

    got, expected = flat_params(controlnet.params), flat_params(want.params)
    assert got.keys() == expected.keys()
    fresh = {k for k in got if k.startswith("['controlnet_cond_embedding']")}
    zero = {k for k in got if k.startswith(("['controlnet_down_blocks_", "['controlnet_mid_block']"))}
    for key in set(got) - fresh:  # the encoder (the U-Net's) and the zero convs
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    unet_flat = flat_params(unet_params)
    for key in set(got) - fresh - zero:
        np.testing.assert_array_equal(got[key], unet_flat[key], err_msg=key)
    for key in zero | {k for k in fresh if "['conv_out']" in k}:
        assert got[key].dtype == np.float32 and not got[key].any(), key
    for key in fresh - {k for k in fresh if "['conv_out']" in k}:
        if key.endswith("['kernel']"):
            assert got[key].std() > 0, key

    again = controlnet_from_unet(unet_config, unet_params, seed=0,
                                 conditioning_embedding_out_channels=widths)
    other = controlnet_from_unet(unet_config, unet_params, seed=1,
                                 conditioning_embedding_out_channels=widths)
    assert_same_params(again.params, controlnet.params)
    key = "['controlnet_cond_embedding']['conv_in']['kernel']"
    assert not np.array_equal(flat_params(other.params)[key], got[key])

    # Residuals start at exactly zero (the config normalised as a folder's, to reuse its program).
    config = ControlNetConfig.from_diffusers(controlnet.config.to_diffusers())
    down, mid = compiled(config)(controlnet.params, *reference(family).args)
    assert all(not np.asarray(r).any() for r in (*down, mid))


def test_the_model_classmethod_from_unet_is_what_controlnet_from_unet_returns(reference):
    from sdjax.models.unet import UNet

    unet_params = load_controlnet(reference("sd1").folder).params  # holds every encoder param
    widths = FAMILIES["sd1"]["conditioning_embedding_out_channels"]
    module, params = ControlNet.from_unet(UNet(base_config("sd1")), unet_params, seed=3,
                                          conditioning_embedding_out_channels=widths)
    weights = controlnet_from_unet(base_config("sd1"), unet_params, seed=3,
                                   conditioning_embedding_out_channels=widths)
    assert module.config == weights.config
    got, want = flat_params(params), flat_params(weights.params)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in got)


def test_controlnet_from_unet_refuses_params_of_another_unet(reference, tmp_path):
    with pytest.raises(WeightsError, match="lack add_embedding"):
        controlnet_from_unet(base_config("sdxl"), load_controlnet(reference("sd1").folder).params)
    with pytest.raises(WeightsError, match="controlnet_from_unet: .*conditioning_channel_order"):
        controlnet_from_unet(base_config("sd1"), {}, controlnet_conditioning_channel_order="rgba")


# ---- bad inputs ------------------------------------------------------------------------------------
def test_pickles_are_refused_with_the_conversion(tmp_path):
    for name in ("control_v11p_sd15_canny.pth", "controlnet.ckpt"):
        path = tmp_path / name
        torch.save({"input_hint_block.0.weight": torch.zeros(2)}, path)
        with pytest.raises(WeightsError, match="never unpickles") as err:
            load_controlnet(path)
        assert str(path) in str(err.value) and "save_file" in str(err.value)
    disguised = tmp_path / "disguised.safetensors"
    torch.save({"w": torch.zeros(2)}, disguised)
    with pytest.raises(WeightsError, match=rf"{disguised}: .*pickle"):
        load_controlnet(disguised)


def test_truncated_file_is_an_error(reference, tmp_path):
    path = original_file(reference("sd1"), tmp_path / "cut.safetensors")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightsError, match=r"cut\.safetensors: truncated"):
        load_controlnet(path)


def test_a_unet_is_not_a_controlnet(tiny_sd, tmp_path, reference):
    with pytest.raises(WeightsError, match=r"sd1-float32\.safetensors: not a ControlNet: .*"
                                           r"model\.diffusion_model"):
        load_controlnet(tiny_sd.single_file("sd1"))
    unet = diffusers.UNet2DConditionModel(**unet_kwargs("sd1"))
    unet.save_pretrained(tmp_path / "unet")
    with pytest.raises(WeightsError, match=r"unet/config\.json: _class_name is "
                                           r"'UNet2DConditionModel': not supported"):
        load_controlnet(tmp_path / "unet")
    bare_unet = tmp_path / "bare_unet.safetensors"
    writer.write_single_file(bare_unet, writer.unet_to_original(
        writer.to_numpy(unet.state_dict()), 2))
    with pytest.raises(WeightsError, match=r"bare_unet\.safetensors: not a ControlNet: .*U-Net"):
        load_controlnet(bare_unet)


def test_unknown_and_missing_keys_are_named(reference, tmp_path):
    ref = reference("sd1")
    state = writer.build_controlnet_file(ref.model.state_dict(), 2)
    cases = {
        "extra.safetensors": ({"control_model.input_blocks.1.0.extra.weight": np.zeros(2)},
                              r"extra\.safetensors: 1 keys that are not part of a ControlNet: "
                              r"control_model\.input_blocks\.1\.0\.extra\.weight"),
        "outside.safetensors": ({"model.diffusion_model.out.2.weight": np.zeros(2)},
                                r"outside\.safetensors: 1 keys outside 'control_model\.': "
                                r"model\.diffusion_model\.out\.2\.weight"),
        "missing.safetensors": ({"control_model.zero_convs.3.0.weight": None},
                                r"missing\.safetensors: ControlNet: missing keys for: "
                                r"controlnet_down_blocks_3/kernel"),
        "hints.safetensors": ({"control_model.input_hint_block.4.weight": None,
                               "control_model.input_hint_block.4.bias": None},
                              r"hints\.safetensors: input_hint_block convs at \[0, 2, 6"),
    }
    for name, (edit, message) in cases.items():
        tensors = {**state, **{k: v for k, v in edit.items() if v is not None}}
        tensors = {k: v for k, v in tensors.items() if edit.get(k, 0) is not None}
        writer.write_single_file(tmp_path / name, tensors)
        with pytest.raises(WeightsError, match=message) as err:
            load_controlnet(tmp_path / name, base=ref.base)
        assert "\n" not in str(err.value), name


@pytest.mark.parametrize("class_name", ["ControlNetXSAdapter", "ControlNetUnionModel",
                                        "SD3ControlNetModel", "FluxControlNetModel", None])
def test_other_controlnet_classes_are_refused(class_name, reference, tmp_path):
    folder = tmp_path / "other"
    shutil.copytree(reference("sd1").folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("_class_name")
    if class_name:
        config["_class_name"] = class_name
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=rf"other/config\.json: _class_name is "
                                           rf"{class_name!r}: not supported"):
        load_controlnet(folder)


def test_bad_folders_and_configs_are_named(reference, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsError, match=r"empty/config\.json: no such file"):
        load_controlnet(empty)
    unknown = tmp_path / "unknown"
    shutil.copytree(reference("sd1").folder, unknown)
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "magic_field": 3}))
    with pytest.raises(WeightsError, match=r"unknown/config\.json: .*magic_field"):
        load_controlnet(unknown)
    (unknown / "config.json").write_text(json.dumps(config))
    (unknown / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"unknown: no ControlNet weights"):
        load_controlnet(unknown)
    lonely = tmp_path / "lonely.safetensors"
    shutil.copy(reference("sd1").folder / "diffusion_pytorch_model.safetensors", lonely)
    with pytest.raises(WeightsError, match=r"lonely\.safetensors: diffusers-named .*config\.json"):
        load_controlnet(lonely)
    with pytest.raises(WeightsError, match="nowhere: no such file or folder"):
        load_controlnet(tmp_path / "nowhere")


@pytest.mark.parametrize("family, change, message", [
    ("sd1", dict(block_out_channels=(64, 64)), r"block_out_channels \(32, 64\) does not match the "
                                               r"U-Net's \(64, 64\)"),
    ("sd1", dict(layers_per_block=1), r"layers_per_block \(2, 2\) does not match the U-Net's "
                                      r"\(1, 1\)"),
    ("sd1", dict(cross_attention_dim=48), r"cross_attention_dim 32 does not match the U-Net's 48"),
    ("sd1", dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=64),
     r"addition_embed_type None does not match the U-Net's 'text_time'"),
    ("sdxl", dict(projection_class_embeddings_input_dim=32 + 6 * 8),
     r"pooled text embedding width \d+ does not match the U-Net's 32"),
], ids=["widths", "layers", "context", "sdxl_base", "pooled_width"])
def test_a_base_that_does_not_fit_is_refused(family, change, message, reference, tmp_path):
    ref = reference(family)
    base = base_config(family, **change)
    path = original_file(ref, tmp_path / "cn.safetensors")
    for source in (path, ref.folder):
        with pytest.raises(WeightsError, match=message) as err:
            load_controlnet(source, base=base)
        assert str(err.value).startswith(str(source)) and "\n" not in str(err.value)
