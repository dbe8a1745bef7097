"""SD3 / Flux checkpoints in the shapes people have them: single files (SD3.5 with and without its
text encoders, Flux's original transformer-only file, float8 weights) completed from a diffusers
folder, the native format, and SD3 without T5; each loads to the diffusers folder's params."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from sdjax.sampling.generator import Generator
from sdjax.sampling.requests import Request
from sdjax.sampling.spec import SamplingSpec
from sdjax.weights.common import WeightsError
from sdjax.weights.pretrained import load_pretrained, save_pretrained
from tests import flow_models
from tests.helpers import flat_params
from tests.single_file_writer import (flux_to_original, mmdit_to_original, text_model_key,
                                      to_numpy, vae_to_original, write_single_file)

SPEC = SamplingSpec(sampler="flow_euler", steps=2, height=32, width=32, max_sequence_length=8)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """{family: (torch parts, diffusers folder, the folder loaded)}."""
    root = tmp_path_factory.mktemp("flow_loading")
    out = {}
    for family in ("sd3", "flux"):
        folder = flow_models.save_folder(family, root)
        parts, _, _ = flow_models.build_parts(family)
        out[family] = (parts, folder, load_pretrained(folder))
    return out


def _bundle(parts, family: str, *, text: bool, vae: bool = True, prefix: bool = True) -> dict:
    """The parts in the original single-file layout."""
    state = {k: v for k, v in parts["transformer"].state_dict().items()}
    if family == "sd3":
        body = to_numpy(mmdit_to_original(state, parts["transformer"].config.num_layers))
    else:
        body = flux_to_original(to_numpy(state))
    out = {("model.diffusion_model." if prefix else "") + k: v for k, v in body.items()}
    if vae:
        out.update({f"first_stage_model.{k}": v
                    for k, v in vae_to_original(to_numpy(parts["vae"].state_dict())).items()})
    if text:
        names = {"text_encoder": "clip_l", "text_encoder_2": "clip_g" if family == "sd3" else "t5xxl",
                 "text_encoder_3": "t5xxl"}
        for name, short in names.items():
            if name not in parts:
                continue
            state = to_numpy(parts[name].state_dict())
            if short != "t5xxl":
                state = {text_model_key(k): v for k, v in state.items()
                         if not k.endswith("position_ids")}
            out.update({f"text_encoders.{short}.transformer.{k}": v for k, v in state.items()})
    return out


def _assert_same_params(got: dict, want: dict, parts=None) -> None:
    for part in parts or want:
        a, b = flat_params(got[part]), flat_params(want[part])
        assert sorted(a) == sorted(b), part
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{part}/{key}")


def test_sd35_file_with_its_text_encoders_loads_the_folders_params(built, tmp_path):
    parts, folder, reference = built["sd3"]
    path = tmp_path / "sd3.5_tiny_with_encoders.safetensors"
    write_single_file(path, _bundle(parts, "sd3", text=True))
    with pytest.raises(WeightsError, match=r"tokenizer_3.*components"):
        load_pretrained(path)  # no file holds T5's tokenizer
    model = load_pretrained(path, components=folder)
    # sample_size, which a file cannot say, comes from the components folder.
    assert model.family == "sd3" and model.transformer_config == reference.transformer_config
    assert model.vae_config.shift_factor == reference.vae_config.shift_factor
    _assert_same_params(model.params, reference.params)
    assert [type(t).__name__ for t in model.tokenizers] == ["CLIPTokenizer"] * 2 + ["T5Tokenizer"]


@pytest.mark.slow  # compiles sampling programs
def test_transformer_only_files_take_the_rest_from_components(built, tmp_path):
    for family in ("sd3", "flux"):
        parts, folder, reference = built[family]
        path = tmp_path / f"{family}_transformer.safetensors"
        # Flux as BFL ships it: bare keys; SD3 under model.diffusion_model. with its VAE.
        write_single_file(path, _bundle(parts, family, text=False, vae=family == "sd3",
                                        prefix=family == "sd3"))
        # (the tiny Flux's head width has no Flux.1 rotary split: the folder's config gives it)
        with pytest.raises(WeightsError, match=r"holds no .*text_encoder.*components|axes_dims_rope"):
            load_pretrained(path)
        model = load_pretrained(path, components=folder)
        _assert_same_params(model.params, reference.params)
        assert model.scheduler_config == reference.scheduler_config
        assert Generator(model)(Request(prompt="a cat"), SPEC)["images"].shape == (1, 32, 32, 3)


def test_components_of_another_family_are_refused(built, tmp_path):
    parts, _, _ = built["flux"]
    path = tmp_path / "flux.safetensors"
    write_single_file(path, _bundle(parts, "flux", text=False, vae=False, prefix=False))
    with pytest.raises(WeightsError, match="sd3 folder cannot complete the flux file"):
        load_pretrained(path, components=built["sd3"][1])


def test_components_are_refused_for_a_whole_checkpoint(built):
    _, folder, _ = built["sd3"]
    with pytest.raises(WeightsError, match="components= completes SD3 / Flux single files"):
        load_pretrained(folder, components=folder)


@pytest.mark.slow  # compiles sampling programs
def test_float8_transformer_file_loads_upcast_and_draws(built, tmp_path):
    import ml_dtypes

    parts, folder, reference = built["sd3"]
    path = tmp_path / "sd3_fp8.safetensors"
    bundle = _bundle(parts, "sd3", text=False)
    write_single_file(path, {k: v.astype(ml_dtypes.float8_e4m3fn) if k.startswith("model.") else v
                             for k, v in bundle.items()})
    model = load_pretrained(path, components=folder)
    got = flat_params(model.params["transformer"])
    want = flat_params(reference.params["transformer"])
    for key in got:
        assert got[key].dtype == np.float32
        np.testing.assert_array_equal(
            got[key], want[key].astype(ml_dtypes.float8_e4m3fn).astype(np.float32), err_msg=key)
    assert np.isfinite(Generator(model)(Request(prompt="a cat"), SPEC)["images"]).all()


@pytest.mark.slow  # compiles sampling programs
def test_native_save_and_load_keep_params_and_images(built, tmp_path):
    for family in ("sd3", "flux"):
        _, _, reference = built[family]
        save_pretrained(reference, tmp_path / family)
        model = load_pretrained(tmp_path / family)
        assert model.family == family and model.transformer_config == reference.transformer_config
        _assert_same_params(model.params, reference.params)
        request = Request(prompt="a (red:1.2) cat", seed=5)
        np.testing.assert_array_equal(Generator(model)(request, SPEC)["images"],
                                      Generator(reference)(request, SPEC)["images"])


@pytest.mark.slow  # compiles sampling programs
def test_sd3_without_t5_matches_diffusers_without_it(built, tmp_path):
    """SD3 folders saved without T5 (text_encoder_3: null) condition on zeros in its place."""
    parts, folder, _ = built["sd3"]
    lean = tmp_path / "sd3-no-t5"
    shutil.copytree(folder, lean, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3"))
    index = json.loads((lean / "model_index.json").read_text())
    index["text_encoder_3"] = index["tokenizer_3"] = [None, None]
    (lean / "model_index.json").write_text(json.dumps(index))
    model = load_pretrained(lean)
    assert len(model.text_configs) == 2
    noise = np.random.default_rng(0).standard_normal((1, 16, 16, 16)).astype(np.float32)
    ours = Generator(model)(Request(prompt="a red cat", noise=noise, cfg_scale=3.0), SPEC)
    pipe = flow_models.reference_pipeline("sd3", lean, text_encoder_3=None, tokenizer_3=None)
    assert pipe.text_encoder_3 is None
    with torch.no_grad():
        reference = pipe(prompt="a red cat", height=32, width=32, num_inference_steps=2,
                         guidance_scale=3.0, max_sequence_length=8, output_type="np",
                         latents=torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())).images
    images = flow_models.to_unit_images(np.asarray(ours["images"]))
    assert np.linalg.norm(images - reference) / np.linalg.norm(reference) <= 1e-5
