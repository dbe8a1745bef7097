"""CLIP text / vision / contrastive models against transformers, loaded through the folder loaders."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.models.clip import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel,
                               CLIPVisionConfig, CLIPVisionModel, text_hidden_state)
from sdjax.weights.clip import (clip_text_params, load_clip_folder, load_clip_text_folder,
                                load_clip_vision_folder)
from sdjax.weights.common import DictSource, WeightsError
from tests.helpers import rewritten_folder

import torch
import transformers

TOL = 1e-4
BATCH, SEQ = 3, 12

# eos_token_id 2 is transformers' legacy "argmax of the ids" pooling (the real end token is then
# vocab_size - 1, the highest id); other values pool at the first occurrence of that id, and the
# prompts then also hold ids above it, so argmax pooling would pick another position.
TEXT = {
    "openai_legacy_eos": dict(vocab_size=99, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4,
                              max_position_embeddings=16, hidden_act="quick_gelu",
                              eos_token_id=2, bos_token_id=0, pad_token_id=1, projection_dim=16),
    "openai_first_eos": dict(vocab_size=120, hidden_size=24, intermediate_size=40,
                             num_hidden_layers=3, num_attention_heads=2,
                             max_position_embeddings=12, hidden_act="quick_gelu",
                             eos_token_id=97, bos_token_id=96, pad_token_id=97, projection_dim=8),
    "openclip_h_like": dict(vocab_size=110, hidden_size=32, intermediate_size=48,
                            num_hidden_layers=3, num_attention_heads=4,
                            max_position_embeddings=16, hidden_act="gelu", eos_token_id=2,
                            bos_token_id=0, pad_token_id=1, projection_dim=16),
    "openclip_bigg_like": dict(vocab_size=128, hidden_size=40, intermediate_size=80,
                               num_hidden_layers=2, num_attention_heads=5,
                               max_position_embeddings=20, hidden_act="gelu", eos_token_id=100,
                               bos_token_id=99, pad_token_id=0, projection_dim=24,
                               layer_norm_eps=1e-6),
}
VISION = {
    "openai_legacy_eos": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, image_size=16, patch_size=4,
                              hidden_act="quick_gelu"),
    "openai_first_eos": dict(hidden_size=24, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=3, image_size=12, patch_size=6,
                             hidden_act="quick_gelu"),
    "openclip_h_like": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=2, image_size=16, patch_size=8, hidden_act="gelu"),
    "openclip_bigg_like": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                               num_attention_heads=2, image_size=8, patch_size=4,
                               hidden_act="gelu", layer_norm_eps=1e-6),
}
NAMES = list(TEXT)
MAX_DIFFS: dict[str, float] = {}


def _randomize(model, seed):
    """Spread the weights beyond transformers' init (unit layer norms, zero biases), so a
    swapped or dropped tensor cannot go unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name == "logit_scale":
                p.copy_(torch.tensor(1.5))
            else:
                p.copy_(0.2 * noise)
    return model.eval()


def _prompt_ids(cfg: dict, seed: int) -> np.ndarray:
    """BOS, text, end token, then padding -- as a tokenizer lays prompts out."""
    rng = np.random.default_rng(seed)
    vocab = cfg["vocab_size"]
    end = vocab - 1 if cfg["eos_token_id"] == 2 else cfg["eos_token_id"]
    specials = {cfg["bos_token_id"], end, cfg["pad_token_id"]}
    ids = np.full((BATCH, SEQ), cfg["pad_token_id"] if cfg["eos_token_id"] == 2 else end,
                  np.int64)
    for row, length in enumerate([4, SEQ - 2, 7][:BATCH]):
        body = [t for t in rng.integers(0, end if cfg["eos_token_id"] == 2 else vocab, 3 * SEQ)
                if t not in specials][:length]
        ids[row, :length + 2] = [cfg["bos_token_id"], *body, end]
    if cfg["eos_token_id"] != 2:
        assert (ids > end).any(), "argmax pooling must differ from first-EOS pooling here"
    return ids


def _pixels(vcfg: dict, seed: int) -> np.ndarray:
    size = vcfg["image_size"]
    return np.random.default_rng(seed).standard_normal((2, 3, size, size)).astype(np.float32)


def _record(label: str, ours, theirs) -> float:
    diff = float(np.max(np.abs(np.asarray(ours, np.float64) - np.asarray(theirs, np.float64))))
    MAX_DIFFS[label] = diff
    assert np.asarray(ours).shape == np.asarray(theirs).shape, label
    assert diff <= TOL, f"{label}: max abs diff {diff:.3g} > {TOL}"
    return diff


@pytest.fixture(scope="module", autouse=True)
def report_max_diffs():
    yield
    print("\nmax abs diffs (float32):")
    for label, diff in sorted(MAX_DIFFS.items()):
        print(f"  {label:60s} {diff:.2e}")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """name -> (kind -> saved folder), built lazily and once."""
    cache = {}

    def get(name, kind):
        key = (name, kind)
        if key not in cache:
            seed = NAMES.index(name) * 10 + ["text", "text_proj", "vision_proj", "clip"].index(kind)
            tc = transformers.CLIPTextConfig(**TEXT[name])
            vc = transformers.CLIPVisionConfig(**VISION[name], projection_dim=TEXT[name]["projection_dim"])
            if kind == "text":
                model = transformers.CLIPTextModel(tc)
            elif kind == "text_proj":
                model = transformers.CLIPTextModelWithProjection(tc)
            elif kind == "vision_proj":
                model = transformers.CLIPVisionModelWithProjection(vc)
            else:
                model = transformers.CLIPModel(transformers.CLIPConfig(
                    text_config=tc.to_dict(), vision_config=vc.to_dict(),
                    projection_dim=TEXT[name]["projection_dim"]))
            _randomize(model, seed)
            path = tmp_path_factory.mktemp(f"{name}_{kind}")
            model.save_pretrained(path, safe_serialization=True)
            cache[key] = (path, model)
        return cache[key]

    return get


@pytest.mark.parametrize("name", NAMES)
def test_text_model_matches_transformers(folders, name):
    path, ref = folders(name, "text")
    config, params = load_clip_text_folder(path)
    assert config.projection_dim is None and config.eos_token_id == TEXT[name]["eos_token_id"]
    ids = _prompt_ids(TEXT[name], seed=1)
    with torch.no_grad():
        want = ref(torch.from_numpy(ids), output_hidden_states=True)
        penultimate_normed = ref.final_layer_norm(want.hidden_states[-2])
    model = CLIPTextModel(config)

    @jax.jit
    def run(params, ids):
        out = model.apply({"params": params}, ids)
        return out, text_hidden_state(model, params, out, clip_skip=1)

    out, skip1 = run(params, jnp.asarray(ids, jnp.int32))
    assert out.text_embeds is None
    assert len(out.hidden_states) == len(want.hidden_states) == TEXT[name]["num_hidden_layers"] + 1
    _record(f"{name} CLIPTextModel last_hidden_state", out.last_hidden_state, want.last_hidden_state)
    _record(f"{name} CLIPTextModel pooled", out.pooled_output, want.pooler_output)
    for i, (h, w) in enumerate(zip(out.hidden_states, want.hidden_states)):
        _record(f"{name} CLIPTextModel hidden_states[{i}]", h, w)
    _record(f"{name} CLIPTextModel clip_skip=1 (normed hidden_states[-2])", skip1,
            penultimate_normed)


@pytest.mark.parametrize("name", NAMES)
def test_text_model_with_projection_matches_transformers(folders, name):
    path, ref = folders(name, "text_proj")
    config, params = load_clip_text_folder(path)
    assert config.projection_dim == TEXT[name]["projection_dim"]
    ids = _prompt_ids(TEXT[name], seed=2)
    with torch.no_grad():
        want = ref(torch.from_numpy(ids), output_hidden_states=True)
    model = CLIPTextModel(config)

    @jax.jit
    def run(params, ids):
        out = model.apply({"params": params}, ids)
        sdxl = text_hidden_state(model, params, out, clip_skip=1, apply_final_norm=False)
        return out, sdxl, text_hidden_state(model, params, out)

    out, sdxl, skip0 = run(params, jnp.asarray(ids, jnp.int32))
    _record(f"{name} WithProjection last_hidden_state", out.last_hidden_state,
            want.last_hidden_state)
    _record(f"{name} WithProjection text_embeds", out.text_embeds, want.text_embeds)
    _record(f"{name} WithProjection SDXL context (raw hidden_states[-2])", sdxl,
            want.hidden_states[-2])
    np.testing.assert_array_equal(skip0, out.last_hidden_state)


@pytest.mark.parametrize("name", NAMES)
def test_clip_model_matches_transformers(folders, name):
    path, ref = folders(name, "clip")
    config, params = load_clip_folder(path)
    ids = _prompt_ids(TEXT[name], seed=3)
    pixels = _pixels(VISION[name], seed=3)
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels))
        want_text = ref.get_text_features(input_ids=torch.from_numpy(ids))
        want_image = ref.get_image_features(pixel_values=torch.from_numpy(pixels))
    want_text = getattr(want_text, "pooler_output", want_text)
    want_image = getattr(want_image, "pooler_output", want_image)
    model = CLIPModel(config)
    nhwc = jnp.asarray(pixels.transpose(0, 2, 3, 1))
    out, text_features, image_features = jax.jit(lambda p, i, x: (
        model.apply({"params": p}, i, x),
        model.apply({"params": p}, i, method=CLIPModel.get_text_features),
        model.apply({"params": p}, x, method=CLIPModel.get_image_features)))(
            params, jnp.asarray(ids, jnp.int32), nhwc)
    _record(f"{name} CLIPModel logits_per_image", out.logits_per_image, want.logits_per_image)
    _record(f"{name} CLIPModel logits_per_text", out.logits_per_text, want.logits_per_text)
    _record(f"{name} CLIPModel text_embeds (normalised)", out.text_embeds, want.text_embeds)
    _record(f"{name} CLIPModel image_embeds (normalised)", out.image_embeds, want.image_embeds)
    _record(f"{name} CLIPModel get_text_features", text_features, want_text)
    _record(f"{name} CLIPModel get_image_features", image_features, want_image)
    assert float(jnp.std(out.logits_per_image)) > 0.1  # not a degenerate comparison

    # The text tower of a CLIPModel folder loads on its own, with its projection.
    text_config, text_params = load_clip_text_folder(path)
    assert text_config == config.text
    jax.tree.map(np.testing.assert_array_equal, text_params, params["text_model"])


@pytest.mark.parametrize("name", ["openai_legacy_eos", "openclip_bigg_like"])
def test_vision_model_with_projection_matches_transformers(folders, name):
    path, ref = folders(name, "vision_proj")
    config, params = load_clip_vision_folder(path)
    pixels = _pixels(VISION[name], seed=4)
    with torch.no_grad():
        want = ref(pixel_values=torch.from_numpy(pixels), output_hidden_states=True)
    model = CLIPVisionModel(config)
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    _record(f"{name} VisionWithProjection last_hidden_state", out.last_hidden_state,
            want.last_hidden_state)
    _record(f"{name} VisionWithProjection image_embeds", out.image_embeds, want.image_embeds)
    _record(f"{name} VisionWithProjection hidden_states[0]", out.hidden_states[0],
            want.hidden_states[0])
    with pytest.raises(ValueError, match="NHWC"):
        model.apply({"params": params}, jnp.asarray(pixels))


def test_padding_attention_mask_matches_transformers(folders):
    name = "openai_first_eos"
    path, ref = folders(name, "text")
    config, params = load_clip_text_folder(path)
    ids = _prompt_ids(TEXT[name], seed=5)
    mask = np.zeros_like(ids)
    for row, length in enumerate([6, SEQ, 9]):
        mask[row, :length] = 1
    with torch.no_grad():
        want = ref(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    out = jax.jit(CLIPTextModel(config).apply)({"params": params}, jnp.asarray(ids, jnp.int32),
                                                jnp.asarray(mask))
    valid = mask.astype(bool)  # padded query rows are not compared: the reference leaves them
    _record(f"{name} attention_mask last_hidden_state (valid rows)",
            np.asarray(out.last_hidden_state)[valid], want.last_hidden_state.numpy()[valid])


def test_legacy_prefixed_keys_and_position_ids_load_the_same(folders, tmp_path):
    """transformers 4 / SD checkpoints prefix `text_model.` and carry a position_ids buffer."""
    def to_legacy(tensors):
        for key in list(tensors):
            tensors[f"text_model.{key}"] = tensors.pop(key)
        tensors["text_model.embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]

    path, _ = folders("openai_legacy_eos", "text")
    config, params = load_clip_text_folder(path)
    rewritten_folder(path, tmp_path, "model.safetensors", to_legacy)
    legacy_config, legacy_params = load_clip_text_folder(tmp_path, dtype=jnp.bfloat16)
    assert legacy_config == config
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b, jnp.bfloat16)),
                 legacy_params, params)
    assert {str(x.dtype) for x in jax.tree.leaves(legacy_params)} == {"bfloat16"}


def test_sharded_folder_loads_the_same_params(folders, tmp_path):
    path, ref = folders("openclip_h_like", "text_proj")
    ref.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    _, params = load_clip_text_folder(tmp_path)
    _, whole = load_clip_text_folder(path)
    jax.tree.map(np.testing.assert_array_equal, params, whole)


@pytest.mark.parametrize("problem,key,message", [
    ("missing", "encoder.layers.1.mlp.fc2.bias", "missing keys for: text_model/layers_1/mlp/fc2/bias"),
    ("unexpected", "encoder.layers.7.mlp.fc2.bias", "unexpected keys: encoder.layers.7.mlp.fc2.bias"),
    ("shape", "encoder.layers.0.self_attn.q_proj.weight", "shape mismatch for "
     "encoder.layers.0.self_attn.q_proj.weight"),
])
def test_bad_checkpoints_raise_weights_error_naming_file_and_key(folders, tmp_path, problem, key,
                                                                  message):
    path, _ = folders("openai_legacy_eos", "text")

    def edit(tensors):
        if problem == "missing":
            del tensors[key]
        elif problem == "unexpected":
            tensors[key] = np.zeros(32, np.float32)
        else:
            tensors[key] = tensors[key][:, :-1].copy()

    file = rewritten_folder(path, tmp_path / problem, "model.safetensors", edit)
    with pytest.raises(WeightsError) as info:
        load_clip_text_folder(tmp_path / problem)
    assert file in str(info.value) and message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_weights_file_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TEXT["openai_legacy_eos"]))
    with pytest.raises(WeightsError, match="model.safetensors"):
        load_clip_text_folder(tmp_path)


def test_configs_round_trip_and_hash():
    text = CLIPTextConfig.from_transformers(
        {**TEXT["openclip_bigg_like"], "architectures": ["CLIPTextModelWithProjection"]})
    assert text.projection_dim == 24 and text.num_layers == 2 and text.layer_norm_eps == 1e-6
    vision = CLIPVisionConfig.from_transformers({**VISION["openclip_h_like"], "projection_dim": 24},
                                                with_projection=True)
    config = CLIPConfig(text, vision)
    assert CLIPConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert hash(config) == hash(CLIPConfig.from_dict(config.to_dict()))
    with pytest.raises(ValueError, match="projection_dim"):
        CLIPConfig(dataclasses.replace(text, projection_dim=None), vision)
    with pytest.raises(ValueError, match="hidden_act"):
        dataclasses.replace(text, hidden_act="relu6")


def test_remat_matches_and_bfloat16_stays_close_to_float32(folders):
    path, _ = folders("openclip_h_like", "text_proj")
    config, params = load_clip_text_folder(path)
    ids = jnp.asarray(_prompt_ids(TEXT["openclip_h_like"], seed=6), jnp.int32)
    plain = jax.jit(CLIPTextModel(config).apply)({"params": params}, ids)
    remat = jax.jit(CLIPTextModel(config, remat=True).apply)({"params": params}, ids)
    np.testing.assert_allclose(remat.last_hidden_state, plain.last_hidden_state, atol=1e-6)
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    low = jax.jit(CLIPTextModel(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16).apply)(
        {"params": half}, ids)
    assert low.last_hidden_state.dtype == jnp.bfloat16
    scale = float(jnp.max(jnp.abs(plain.text_embeds)))
    assert float(jnp.max(jnp.abs(low.text_embeds.astype(jnp.float32) - plain.text_embeds))) < 0.1 * scale


def test_clip_skip_out_of_range_raises(folders):
    path, _ = folders("openai_legacy_eos", "text")
    config, params = load_clip_text_folder(path)
    model = CLIPTextModel(config)
    out = jax.eval_shape(model.apply, {"params": params}, jnp.zeros((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="clip_skip"):
        text_hidden_state(model, params, out, clip_skip=3)


def test_in_memory_source_converts_linear_weights_to_kernels():
    """clip_text_params works on any TensorSource (single-file readers hand over renamed views)."""
    config = CLIPTextConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_layers=1,
                            num_heads=2, max_position_embeddings=4)
    tensors = {
        "text_model.embeddings.token_embedding.weight": np.ones((10, 8), np.float32),
        "text_model.embeddings.position_embedding.weight": np.ones((4, 8), np.float32),
        "text_model.final_layer_norm.weight": np.ones(8, np.float32),
        "text_model.final_layer_norm.bias": np.zeros(8, np.float32),
    }
    prefix = "text_model.encoder.layers.0."
    for proj in ("q", "k", "v", "out"):
        tensors[f"{prefix}self_attn.{proj}_proj.weight"] = np.eye(8, dtype=np.float32)
        tensors[f"{prefix}self_attn.{proj}_proj.bias"] = np.zeros(8, np.float32)
    tensors[f"{prefix}mlp.fc1.weight"] = np.arange(128, dtype=np.float32).reshape(16, 8)
    tensors[f"{prefix}mlp.fc1.bias"] = np.zeros(16, np.float32)
    tensors[f"{prefix}mlp.fc2.weight"] = np.zeros((8, 16), np.float32)
    tensors[f"{prefix}mlp.fc2.bias"] = np.zeros(8, np.float32)
    for norm in ("layer_norm1", "layer_norm2"):
        tensors[f"{prefix}{norm}.weight"] = np.ones(8, np.float32)
        tensors[f"{prefix}{norm}.bias"] = np.zeros(8, np.float32)
    params = clip_text_params(DictSource(tensors, name="mem"), config)
    # (out, in) linear weights become (in, out) kernels.
    np.testing.assert_array_equal(params["layers_0"]["mlp"]["fc1"]["kernel"],
                                  tensors[f"{prefix}mlp.fc1.weight"].T)


@pytest.mark.parametrize("config_json,count", [
    # SD 1.x: OpenAI CLIP ViT-L/14 text encoder.
    (dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
          hidden_act="quick_gelu", eos_token_id=2, architectures=["CLIPTextModel"]), 123_060_480),
    # SD 2.x: OpenCLIP ViT-H/14 text encoder, as diffusers ships it (23 of 24 layers).
    (dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
          hidden_act="gelu", eos_token_id=2, architectures=["CLIPTextModel"]), 340_387_840),
    # SDXL text_encoder_2: OpenCLIP bigG with projection.
    (dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
          hidden_act="gelu", projection_dim=1280, eos_token_id=2,
          architectures=["CLIPTextModelWithProjection"]), 694_659_840),
], ids=["sd15", "sd2", "sdxl_2"])
def test_released_text_encoders_have_their_parameter_counts(config_json, count):
    from sdjax.weights.common import abstract_params

    config = CLIPTextConfig.from_transformers(config_json)
    shapes = abstract_params(CLIPTextModel(config), jnp.zeros((1, 77), jnp.int32))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == count
