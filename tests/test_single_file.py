"""Single-file checkpoints: tiny random diffusers/transformers pipelines (conftest's `tiny_sd`)
written in the original layouts (validated against diffusers' own single-file loader), read back
with `read_single_file`."""
from __future__ import annotations

import struct

import numpy as np
import pytest

import torch
import diffusers
import transformers

from sdjax.weights import single_file as sf  # noqa: E402
from sdjax.weights.common import SafetensorsFile, WeightsError  # noqa: E402
from tests import single_file_writer as writer  # noqa: E402

UNET_FIELDS = ("in_channels", "out_channels", "down_block_types", "up_block_types",
               "block_out_channels", "layers_per_block", "cross_attention_dim",
               "use_linear_projection", "addition_embed_type", "addition_time_embed_dim",
               "projection_class_embeddings_input_dim", "mid_block_type")
VAE_FIELDS = ("in_channels", "out_channels", "down_block_types", "up_block_types",
              "block_out_channels", "layers_per_block", "latent_channels", "scaling_factor")
CLIP_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "max_position_embeddings", "hidden_act")


def _per_level(value, levels):
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


# ---- The writer, checked against diffusers' own single-file loader -------------------------------
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_writer_output_loads_in_diffusers_from_single_file(family, tiny_sd):
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from safetensors.torch import load_file

    path = tiny_sd.single_file(family, "float32")
    folder = tiny_sd.diffusers_folder(family)
    models = tiny_sd.parts(family)
    loaded = {
        "unet": diffusers.UNet2DConditionModel.from_single_file(
            str(path), config=str(folder), subfolder="unet", local_files_only=True),
        "vae": diffusers.AutoencoderKL.from_single_file(
            str(path), config=str(folder), subfolder="vae", local_files_only=True),
    }
    checkpoint = load_file(str(path))
    for name, cls in (("text_encoder", transformers.CLIPTextModel),
                      ("text_encoder_2", transformers.CLIPTextModelWithProjection)):
        if name in models:
            loaded[name] = create_diffusers_clip_model_from_ldm(
                cls, checkpoint, config=str(folder), subfolder=name, local_files_only=True)
    assert loaded.keys() == models.keys()
    for name, model in loaded.items():
        want = models[name].state_dict()
        got = model.state_dict()
        assert got.keys() == want.keys(), name
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=f"{name}: {key}")


# ---- read_single_file ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("family", ["sd1", "sd1_inpaint", "sd2", "sdxl"])
def test_read_single_file_reproduces_configs_and_tensors(family, dtype, tiny_sd):
    checkpoint = sf.read_single_file(tiny_sd.single_file(family, dtype))
    models = tiny_sd.parts(family)
    assert checkpoint.family == family.removesuffix("_inpaint")
    assert checkpoint.inpainting == (family == "sd1_inpaint")
    assert checkpoint.parts.keys() == models.keys()
    assert any(k == "betas" for k in checkpoint.dropped) == (family != "sdxl")

    unet_config, _ = checkpoint.parts["unet"]
    want = dict(models["unet"].config)
    levels = len(want["block_out_channels"])
    for field in UNET_FIELDS:
        assert _jsonable(unet_config[field]) == _jsonable(want[field]), field
    for field in ("transformer_layers_per_block", "attention_head_dim"):
        assert _per_level(unet_config[field], levels) == _per_level(want[field], levels), field
    vae_config, _ = checkpoint.parts["vae"]
    for field in VAE_FIELDS:
        assert _jsonable(vae_config[field]) == _jsonable(models["vae"].config[field]), field
    for name in [k for k in models if k.startswith("text_encoder")]:
        config, _ = checkpoint.parts[name]
        want = models[name].config
        for field in CLIP_FIELDS + (("projection_dim",) if name == "text_encoder_2" else ()):
            assert config[field] == getattr(want, field), (name, field)

    for name in models:
        _, source = checkpoint.parts[name]
        want = tiny_sd.reference_state(family, name)
        assert set(source) == set(want), name
        for key, value in want.items():
            got = source[key]
            assert got.dtype == np.dtype(dtype), (name, key)
            np.testing.assert_array_equal(got, value.astype(dtype), err_msg=f"{name}: {key}")


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_inferred_configs_build_models_with_the_same_parameters(family, tiny_sd):
    checkpoint = sf.read_single_file(tiny_sd.single_file(family, "float32"))
    builders = {"unet": diffusers.UNet2DConditionModel.from_config,
                "vae": diffusers.AutoencoderKL.from_config,
                "text_encoder": lambda c: transformers.CLIPTextModel(transformers.CLIPTextConfig(**c)),
                "text_encoder_2": lambda c: transformers.CLIPTextModelWithProjection(
                    transformers.CLIPTextConfig(**c))}
    for name, (config, source) in checkpoint.parts.items():
        model = builders[name](dict(config))
        shapes = {k if name in ("unet", "vae") else writer.text_model_key(k): tuple(v.shape)
                  for k, v in model.state_dict().items()
                  if not k.endswith("position_ids")}
        assert shapes == {k: source[k].shape for k in source}, name


def test_sd2_drops_the_unused_24th_open_clip_layer(tiny_sd):
    checkpoint = sf.read_single_file(tiny_sd.single_file("sd2", "float16"))
    config, source = checkpoint.parts["text_encoder"]
    assert config["num_hidden_layers"] == 23
    assert not any(k.startswith("text_model.encoder.layers.23.") for k in source)
    assert "text_projection.weight" not in source
    assert "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight" in checkpoint.dropped
    assert "cond_stage_model.model.text_projection" in checkpoint.dropped


def test_sd2_file_with_only_the_23_used_layers_keeps_them_all(tiny_sd, tmp_path):
    state = {k: v for k, v in tiny_sd.original_state("sd2").items()
             if not k.startswith("cond_stage_model.model.transformer.resblocks.23.")}
    path = tmp_path / "sd2-23.safetensors"
    writer.write_single_file(path, state)
    config, source = sf.read_single_file(path).parts["text_encoder"]
    assert config["num_hidden_layers"] == 23
    assert set(source) == set(tiny_sd.reference_state("sd2", "text_encoder"))


def test_sdxl_text_projection_is_transposed_to_a_linear(tiny_sd):
    checkpoint = sf.read_single_file(tiny_sd.single_file("sdxl", "float32"))
    _, source = checkpoint.parts["text_encoder_2"]
    linear = tiny_sd.parts("sdxl")["text_encoder_2"].text_projection.weight.detach().numpy()
    assert linear.shape == (32, 128)
    np.testing.assert_array_equal(source["text_projection.weight"], linear)
    assert checkpoint.parts["unet"][0]["addition_time_embed_dim"] == 8
    assert checkpoint.parts["vae"][0]["scaling_factor"] == 0.13025


def test_extract_ema_reads_the_model_ema_copy(tiny_sd, tmp_path):
    unet = tiny_sd.parts("sd1")["unet"].state_dict()
    ema = {k: v * 0.5 + 0.25 for k, v in unet.items()}
    path = tmp_path / "sd1-ema.safetensors"
    writer.write_single_file(path, tiny_sd.original_state("sd1", ema=ema), dtype=np.float16)
    plain = sf.read_single_file(path)
    assert "model_ema.decay" in plain.dropped
    assert any(k.startswith("model_ema.diffusion_model") for k in plain.dropped)
    with_ema = sf.read_single_file(path, extract_ema=True)
    _, source = with_ema.parts["unet"]
    _, plain_source = plain.parts["unet"]
    assert set(source) == set(unet)
    for key, value in unet.items():
        np.testing.assert_array_equal(source[key], (value * 0.5 + 0.25).numpy().astype(np.float16))
        np.testing.assert_array_equal(plain_source[key], value.numpy().astype(np.float16))
    with pytest.raises(WeightsError, match="no EMA copy"):
        sf.read_single_file(tiny_sd.single_file("sd1", "float16"), extract_ema=True)


def test_scheduler_config_takes_prediction_type(tiny_sd):
    path = tiny_sd.single_file("sd2", "float16")
    assert sf.read_single_file(path).scheduler["prediction_type"] == "epsilon"
    config = sf.read_single_file(path, prediction_type="v_prediction").scheduler
    assert config["prediction_type"] == "v_prediction"
    assert (config["num_train_timesteps"], config["beta_start"], config["beta_end"],
            config["beta_schedule"]) == (1000, 0.00085, 0.012, "scaled_linear")


def test_reading_loads_no_tensor_until_asked(tiny_sd, monkeypatch):
    path = tiny_sd.single_file("sdxl", "float16")
    reads = []
    original = SafetensorsFile.__getitem__
    monkeypatch.setattr(SafetensorsFile, "__getitem__",
                        lambda self, key: reads.append(key) or original(self, key))
    checkpoint = sf.read_single_file(path)
    assert reads == []
    _, source = checkpoint.parts["text_encoder_2"]
    source["text_model.encoder.layers.1.self_attn.k_proj.weight"]
    assert reads == ["conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"]


# ---- Full-size layouts (header-only files): the inferred configs are the published ones ----------
_CA, _DB, _CU, _UB = "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"
_SD_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=[320, 640, 1280, 1280], down_block_types=[_CA, _CA, _CA, _DB],
                up_block_types=[_UB, _CU, _CU, _CU], cross_attention_dim=768, attention_head_dim=8,
                use_linear_projection=False)
_SD_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
               in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4, sample_size=512, scaling_factor=0.18215)
_CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
PUBLISHED = {  # the diffusers / transformers config.json of each released model (architecture fields)
    "sd15": dict(unet=_SD_UNET, vae=_SD_VAE, text_encoder=_CLIP_L),
    "sd21": dict(
        unet=dict(_SD_UNET, sample_size=96, cross_attention_dim=1024,
                  attention_head_dim=[5, 10, 20, 20], use_linear_projection=True),
        vae=dict(_SD_VAE, sample_size=768),
        text_encoder=dict(_CLIP_L, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                          num_attention_heads=16, hidden_act="gelu")),
    "sdxl": dict(
        unet=dict(_SD_UNET, sample_size=128, block_out_channels=[320, 640, 1280],
                  down_block_types=[_DB, _CA, _CA], up_block_types=[_CU, _CU, _UB],
                  transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20],
                  cross_attention_dim=2048, use_linear_projection=True,
                  addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816),
        vae=dict(_SD_VAE, sample_size=1024, scaling_factor=0.13025),
        text_encoder=_CLIP_L,
        text_encoder_2=dict(_CLIP_L, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                            num_attention_heads=20, hidden_act="gelu", projection_dim=1280)),
}


@pytest.mark.parametrize("release", ["sd15", "sd21", "sdxl"])
def test_full_size_layouts_infer_the_published_configs(release, tmp_path):
    configs = PUBLISHED[release]
    with torch.device("meta"):  # shapes only, no memory
        models = {
            "unet": diffusers.UNet2DConditionModel(**configs["unet"]),
            "vae": diffusers.AutoencoderKL(**configs["vae"]),
            "text_encoder": transformers.CLIPTextModel(
                transformers.CLIPTextConfig(**configs["text_encoder"])),
        }
        if "text_encoder_2" in configs:
            models["text_encoder_2"] = transformers.CLIPTextModelWithProjection(
                transformers.CLIPTextConfig(**configs["text_encoder_2"]))
    shapes = {name: {k: writer.placeholder(v.shape) for k, v in m.state_dict().items()}
              for name, m in models.items()}
    family = {"sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl"}[release]
    path = tmp_path / f"{release}.safetensors"
    writer.write_header_only(path, writer.build_single_file(
        family=family, layers_per_block=2, **shapes))
    checkpoint = sf.read_single_file(path)
    assert checkpoint.family == family and not checkpoint.inpainting
    for name, want in configs.items():
        config, source = checkpoint.parts[name]
        for field, value in want.items():
            assert _jsonable(config[field]) == value, (name, field)
        assert len(source) == len([k for k in shapes[name] if not k.endswith("position_ids")])


# ---- Standalone VAE files --------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["original", "first_stage_model", "diffusers"])
def test_read_vae_file_reads_each_layout(layout, tiny_sd, tmp_path):
    vae = tiny_sd.parts("sd1")["vae"]
    path = tmp_path / f"vae-{layout}.safetensors"
    if layout == "diffusers":
        path = tiny_sd.diffusers_folder("sd1") / "vae" / "diffusion_pytorch_model.safetensors"
    else:
        prefix = "first_stage_model." if layout == "first_stage_model" else ""
        state = writer.vae_to_original(writer.to_numpy(vae.state_dict()))
        writer.write_single_file(path, {prefix + k: v for k, v in state.items()})
    config, source = sf.read_vae_file(path, scaling_factor=0.13025)
    for field in VAE_FIELDS[:-1]:
        assert _jsonable(config[field]) == _jsonable(vae.config[field]), field
    assert config["scaling_factor"] == 0.13025
    want = writer.to_numpy(vae.state_dict())
    assert set(source) == set(want)
    for key, value in want.items():
        np.testing.assert_array_equal(source[key], value, err_msg=key)


def test_read_vae_file_refuses_other_models(tiny_sd, tmp_path):
    with pytest.raises(WeightsError, match="keys that are not part of a VAE: cond_stage_model"):
        sf.read_vae_file(tiny_sd.single_file("sd1", "float16"))
    unet_only = tmp_path / "unet.safetensors"
    writer.write_single_file(unet_only, writer.unet_to_original(
        writer.to_numpy(tiny_sd.parts("sd1")["unet"].state_dict()), layers_per_block=2))
    with pytest.raises(WeightsError, match=r"unet\.safetensors: not a VAE"):
        sf.read_vae_file(unet_only)


# ---- Errors ----------------------------------------------------------------------------------------
def test_pickle_checkpoints_are_refused_by_extension_and_by_content(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not even opened")
    with pytest.raises(WeightsError, match=r"never unpickles") as err:
        sf.read_single_file(ckpt)
    message = str(err.value)
    assert str(ckpt) in message and "weights_only=True" in message and "save_file" in message
    disguised = tmp_path / "model.safetensors"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, disguised)  # a zip, starts with "PK"
    with pytest.raises(WeightsError, match="pickle"):
        sf.read_single_file(disguised)
    legacy = tmp_path / "legacy.safetensors"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)  # b"\x80\x02"
    with pytest.raises(WeightsError, match="pickle"):
        sf.read_vae_file(legacy)


def test_safetensors_header_starting_like_a_pickle_is_not_refused(tiny_sd, tmp_path):
    # A header of 0x0280 bytes begins b"\x80\x02", as a protocol-2 pickle does.
    path = tmp_path / "vae.safetensors"
    state = writer.vae_to_original(writer.to_numpy(tiny_sd.parts("sd1")["vae"].state_dict()))
    writer.write_single_file(path, {"first_stage_model." + k: v for k, v in state.items()})
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    target = (length // 0x10000 + 1) * 0x10000 + 0x0280
    padded = struct.pack("<Q", target) + data[8:8 + length] + b" " * (target - length) + data[8 + length:]
    assert padded[:2] == b"\x80\x02"
    path.write_bytes(padded)
    config, _ = sf.read_vae_file(path)
    assert config["block_out_channels"] == [32, 64]


def test_truncated_file_is_an_error(tiny_sd, tmp_path):
    data = tiny_sd.single_file("sd1", "float16").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(WeightsError, match=r"cut\.safetensors: truncated"):
        sf.read_single_file(cut)
    cut.write_bytes(data[:100])
    with pytest.raises(WeightsError, match="truncated"):
        sf.read_single_file(cut)


def test_undetectable_architecture_is_an_error(tiny_sd, tmp_path):
    path = tmp_path / "unknown.safetensors"
    writer.write_single_file(path, {"encoder.layer.0.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(WeightsError, match=r"unknown\.safetensors: no Stable Diffusion U-Net.*"
                                           r"model\.diffusion_model\."):
        sf.read_single_file(path)
    state = {k: v for k, v in tiny_sd.original_state("sd1").items() if not k.startswith("cond_stage_model.")}
    writer.write_single_file(path, state)
    with pytest.raises(WeightsError, match="cannot tell the text encoder"):
        sf.read_single_file(path)


def test_unknown_keys_are_listed(tiny_sd, tmp_path):
    state = tiny_sd.original_state("sd1")
    state["model.diffusion_model.input_blocks.1.0.new_layer.weight"] = np.zeros(3, np.float32)
    state["control_model.zero_convs.0.0.weight"] = np.zeros(3, np.float32)
    path = tmp_path / "extra.safetensors"
    writer.write_single_file(path, state)
    with pytest.raises(WeightsError) as err:
        sf.read_single_file(path)
    message = str(err.value)
    assert "extra.safetensors" in message and "2 keys" in message
    assert "input_blocks.1.0.new_layer.weight" in message and "control_model.zero_convs" in message


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value
