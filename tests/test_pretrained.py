"""`sdjax.load_pretrained`: diffusers folders, single files, standalone VAEs and the native format
load the same models; bad inputs are named."""
from __future__ import annotations

import dataclasses
import shutil

import chex
import jax
import numpy as np
import pytest

from sdjax.weights import pretrained
from sdjax.weights.common import WeightsError
from tests import single_file_writer as writer


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_single_file_loads_the_same_params_as_the_diffusers_folder(tiny_sd, family):
    from_folder = pretrained.load_pretrained(tiny_sd.diffusers_folder(family))
    from_file = pretrained.load_pretrained(tiny_sd.single_file(family))
    assert from_folder.family == from_file.family == family
    # A single file can't tell the training resolution (sample_size); everything else must agree.
    assert dataclasses.replace(from_folder.unet_config, sample_size=None) == dataclasses.replace(
        from_file.unet_config, sample_size=None)
    assert [c.num_layers for c in from_folder.text_configs] == [c.num_layers for c in from_file.text_configs]
    chex.assert_trees_all_equal(from_folder.params, from_file.params)
    assert from_folder.tokenizers[-1].pad_token == from_file.tokenizers[-1].pad_token


def test_diffusers_folder_params_equal_the_reference_tensors(tiny_sd):
    model = pretrained.load_pretrained(tiny_sd.diffusers_folder("sd1"))
    reference = tiny_sd.parts("sd1")["unet"].conv_in.weight.detach().numpy()
    np.testing.assert_array_equal(model.params["unet"]["conv_in"]["kernel"],
                                  reference.transpose(2, 3, 1, 0))
    assert model.scheduler_config["beta_schedule"] == "scaled_linear"
    assert model.text_encoder_names == ("text_encoder",)


def test_dtype_is_applied_to_every_param(tiny_sd):
    import ml_dtypes

    model = pretrained.load_pretrained(tiny_sd.diffusers_folder("sd1"), dtype=ml_dtypes.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(model.params)} == {np.dtype(ml_dtypes.bfloat16)}


def test_native_format_round_trips_configs_tokenizers_and_params(tiny_sd, tmp_path):
    model = pretrained.load_pretrained(tiny_sd.diffusers_folder("sdxl"))
    pretrained.save_pretrained(model, tmp_path / "native")
    again = pretrained.load_pretrained(tmp_path / "native")
    assert again.family == "sdxl"
    assert (again.unet_config, again.vae_config, again.text_configs) == (
        model.unet_config, model.vae_config, model.text_configs)
    assert again.scheduler_config == model.scheduler_config
    assert [t.pad_token for t in again.tokenizers] == [t.pad_token for t in model.tokenizers]
    chex.assert_trees_all_equal(model.params, again.params)
    # Saving over an existing folder replaces it whole and leaves no staging folder behind.
    pretrained.save_pretrained(again, tmp_path / "native")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["native"]


def test_native_load_checks_params_against_configs(tiny_sd, tmp_path):
    model = pretrained.load_pretrained(tiny_sd.diffusers_folder("sd1"))
    model.params["unet"]["conv_in"]["kernel"] = model.params["unet"]["conv_in"]["kernel"][..., :-1]
    pretrained.save_pretrained(model, tmp_path / "broken")
    with pytest.raises(WeightsError, match=r"broken.*unet.*conv_in/kernel"):
        pretrained.load_pretrained(tmp_path / "broken")


def test_vae_from_a_folder_or_a_file_replaces_the_pipelines_vae(tiny_sd, tmp_path):
    other = tiny_sd.parts("sd2")["vae"]  # same architecture, other weights
    other.save_pretrained(tmp_path / "vae")
    model = pretrained.load_pretrained(tiny_sd.diffusers_folder("sd1"), vae=tmp_path / "vae")
    expected = pretrained.load_pretrained(tiny_sd.diffusers_folder("sd2")).params["vae"]
    chex.assert_trees_all_equal(model.params["vae"], expected)
    vae_file = tmp_path / "vae.safetensors"
    writer.write_single_file(vae_file, writer.vae_to_original(writer.to_numpy(other.state_dict())))
    from_file = pretrained.load_pretrained(tiny_sd.diffusers_folder("sd1"), vae=vae_file)
    chex.assert_trees_all_equal(from_file.params["vae"], expected)
    assert from_file.vae_config.scaling_factor == model.vae_config.scaling_factor


def test_errors_name_what_is_wrong(tiny_sd, tmp_path):
    with pytest.raises(WeightsError, match="nothing-here: no such file or folder"):
        pretrained.load_pretrained(tmp_path / "nothing-here")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsError, match="empty: not a checkpoint folder: found neither model_index.json"):
        pretrained.load_pretrained(empty)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    with pytest.raises(WeightsError, match="model.ckpt.*(pickle|unpickle)"):
        pretrained.load_pretrained(ckpt)
    broken = tmp_path / "no-unet"
    shutil.copytree(tiny_sd.diffusers_folder("sd1"), broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(WeightsError, match="lists 'unet' but .*no-unet/unet is missing"):
        pretrained.load_pretrained(broken)
    with pytest.raises(WeightsError, match="no such VAE"):
        pretrained.load_pretrained(tiny_sd.diffusers_folder("sd1"), vae=tmp_path / "missing-vae")
