"""Adapter files (`sdjax.adapters.formats`): kohya / WebUI, LyCORIS, diffusers / peft and sdjax's own
files, read into `network.Adapter`s and written back, checked against expectations computed here
from the same factors (in numpy / torch, on the reference models' weights), and the errors for
files that cannot be used. Outputs against diffusers / peft themselves: test_lora_parity.py."""
from __future__ import annotations

import json
import logging

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import sdjax
from sdjax.adapters import network
from sdjax.adapters.formats import load_adapter, save_adapter
from sdjax.adapters.names import layer_names
from sdjax.adapters.network import AdapterError, DenseDelta, LowRank, Weighted
from sdjax.models.clip import CLIPTextModel
from sdjax.models.layers import model_variables
from sdjax.weights import unet as unet_weights
from sdjax.weights.common import to_sdjax_layout

RNG = np.random.default_rng(0)


def normal(*shape, scale=1.0) -> np.ndarray:
    return (scale * RNG.standard_normal(shape)).astype(np.float32)


def write(path, tensors: dict, metadata=None) -> str:
    save_file({k: np.asarray(v, order="C") for k, v in tensors.items()}, str(path),
              metadata=metadata)
    return str(path)


def kohya_lora(prefix: str, down: np.ndarray, up: np.ndarray, alpha=None) -> dict:
    tensors = {f"{prefix}.lora_down.weight": down, f"{prefix}.lora_up.weight": up}
    if alpha is not None:
        tensors[f"{prefix}.alpha"] = np.asarray(alpha, np.float32)
    return tensors


def kernel(params, model: str, path: str) -> np.ndarray:
    tree = params[model]
    for part in path.split("/"):
        tree = tree[part]
    return np.asarray(tree["kernel"], np.float32)


def merged_delta(model, adapter, target: str, path: str) -> np.ndarray:
    """What `network.merge` adds to a layer's kernel (sdjax layout)."""
    merged = network.merge(model.params, [Weighted(adapter)])
    return kernel(merged, target, path) - kernel(model.params, target, path)


def assert_close(ours, expected, rtol=1e-6):
    ours, expected = np.asarray(ours, np.float64), np.asarray(expected, np.float64)
    assert ours.shape == expected.shape, (ours.shape, expected.shape)
    err = np.abs(ours - expected).max() / np.abs(expected).max()
    assert err <= rtol, f"relative error {err:.2e}"


@pytest.fixture(scope="module")
def sd1(tiny_sd):
    return sdjax.load_pretrained(tiny_sd.diffusers_folder("sd1"))


@pytest.fixture(scope="module")
def sdxl(tiny_sd):
    return sdjax.load_pretrained(tiny_sd.diffusers_folder("sdxl"))


# --- kohya / WebUI LoRA ----------------------------------------------------------------------------

# (kohya module name, its diffusers name, rank, alpha or None, conv kernel size or None for linear)
SD1_MODULES = [
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
     "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 4, 1.0, None),
    ("lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k",
     "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k", 2, 8.0, None),
    ("lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj",
     "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj", 4, None, None),
    # LoCon on a 3x3 conv; a 1x1-conv LoRA on SD 1.x's proj_in (dense in sdjax); original LDM names.
    ("lora_unet_down_blocks_0_resnets_1_conv1", "down_blocks.0.resnets.1.conv1", 3, 1.5, 3),
    ("lora_unet_input_blocks_1_1_proj_in", "down_blocks.0.attentions.0.proj_in", 2, 0.5, 1),
    ("lora_unet_output_blocks_4_0_skip_connection", "up_blocks.1.resnets.1.conv_shortcut", 2, 3.0, 1),
    ("lora_unet_up_blocks_1_upsamplers_0_conv", "up_blocks.1.upsamplers.0.conv", 4, 2.0, 3),
]


def sd1_kohya_tensors(reference_state: dict) -> tuple[dict, dict]:
    """A kohya file's tensors for SD1_MODULES, each module with its own alpha, and each module's
    expected weight delta in PyTorch layout, computed from the reference weights' shapes."""
    tensors, expected = {}, {}
    for prefix, name, rank, alpha, ksize in SD1_MODULES:
        weight = reference_state[name + ".weight"]
        out_features, in_features = weight.shape[:2]
        if ksize is None:
            down, up = normal(rank, in_features), normal(out_features, rank)
        else:
            down, up = normal(rank, in_features, ksize, ksize), normal(out_features, rank, 1, 1)
        tensors.update(kohya_lora(prefix, down, up, alpha))
        scale = (alpha if alpha is not None else rank) / rank
        update = torch.from_numpy(up).flatten(1) @ torch.from_numpy(down).flatten(1)
        expected[name] = scale * update.reshape(weight.shape).numpy()
    return tensors, expected


def sdjax_path(diffusers_name: str) -> str:
    return unet_weights.rename_key(diffusers_name + ".weight").removesuffix("/kernel")


def test_kohya_file_honours_each_modules_own_alpha(sd1, tiny_sd, tmp_path):
    """Alphas 1, 8, none (= rank), 1.5, 0.5, 3, 2 on one file: diffusers would replace them all by
    the most common; each module here gets its own, checked against the reference model's weights
    plus scale * up @ down computed with torch."""
    state = tiny_sd.reference_state("sd1", "unet")
    tensors, expected = sd1_kohya_tensors(state)
    adapter = load_adapter(write(tmp_path / "mixed.safetensors", tensors), sd1)
    merged = network.merge(sd1.params, [Weighted(adapter)])
    assert len(adapter.modules["unet"]) == len(SD1_MODULES)
    for name, delta in expected.items():
        path = sdjax_path(name)
        want = to_sdjax_layout(state[name + ".weight"] + delta, kernel(sd1.params, "unet", path).shape,
                               "kernel")
        assert_close(kernel(merged, "unet", path), want)
        assert_close(kernel(merged, "unet", path) - kernel(sd1.params, "unet", path),
                     to_sdjax_layout(delta, want.shape, "kernel"), rtol=1e-5)


def test_missing_alpha_means_alpha_equals_rank(tiny_model, tmp_path):
    prefix = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v"
    down, up = normal(3, 32), normal(32, 3)
    adapter = load_adapter(write(tmp_path / "a.safetensors", kohya_lora(prefix, down, up)), tiny_model)
    (factor,) = adapter.modules["unet"].values()
    assert factor.alpha == 3 and factor.scale == 1
    assert_close(merged_delta(tiny_model, adapter, "unet",
                              "down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_v"),
                 (up @ down).T)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_half_precision_files_give_float32_factors(tiny_model, tmp_path, dtype):
    prefix = "lora_te_text_model_encoder_layers_1_mlp_fc2"
    down, up = normal(2, 64).astype(dtype), normal(32, 2).astype(dtype)
    tensors = {**kohya_lora(prefix, down, up), f"{prefix}.alpha": np.asarray(0.1, dtype)}
    adapter = load_adapter(write(tmp_path / "half.safetensors", tensors), tiny_model)
    factor = adapter.modules["text_encoder"]["layers_1/mlp/fc2"]
    assert factor.down.dtype == factor.up.dtype == np.float32
    np.testing.assert_array_equal(factor.down, down.astype(np.float32).T)
    np.testing.assert_array_equal(factor.up, up.astype(np.float32).T)
    assert factor.alpha == float(np.asarray(0.1, dtype))  # the stored half, as the WebUI reads it


def test_sdxl_kohya_prefixes_reach_both_text_encoders(sdxl, tmp_path):
    tensors = {**kohya_lora("lora_te1_text_model_encoder_layers_0_self_attn_k_proj",
                            normal(2, 64), normal(64, 2), 1.0),
               **kohya_lora("lora_te2_text_model_encoder_layers_1_mlp_fc1",
                            normal(2, 128), normal(256, 2), 1.0),
               **kohya_lora("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                            normal(2, 128), normal(128, 2), 1.0)}
    adapter = load_adapter(write(tmp_path / "xl.safetensors", tensors), sdxl)
    assert {m: sorted(v) for m, v in adapter.modules.items()} == {
        "text_encoder": ["layers_0/self_attn/k_proj"], "text_encoder_2": ["layers_1/mlp/fc1"],
        "unet": ["down_blocks_1/attentions_0/transformer_blocks_0/attn1/to_q"]}


def test_ldm_names_map_to_the_layers_the_single_file_loader_fills(tiny_sd):
    """For the tiny SDXL U-Net, every original (LDM) name the table knows is the layer that
    `load_pretrained` fills from that original key of a single-file checkpoint."""
    model = sdjax.load_pretrained(tiny_sd.single_file("sdxl"))
    original = tiny_sd.original_state("sdxl")
    names = layer_names(model.params, model.unet_config)
    reference = set(names.reference["unet"].values())
    ldm = {alias: path for alias, path in names.aliases["unet"].items()
           if "." in alias and alias not in reference}
    kernels = network.kernel_shapes(model.params, "unet")
    assert set(ldm.values()) == set(kernels)  # every adaptable layer has its LDM name
    for alias, path in ldm.items():
        key = "model.diffusion_model." + alias + ".weight"
        assert key in original, alias
        np.testing.assert_array_equal(kernel(model.params, "unet", path),
                                      to_sdjax_layout(original[key], kernels[path], "kernel"),
                                      err_msg=f"{alias} -> {path}")
        assert names.find("unet", alias.replace(".", "_")) == path


# --- LyCORIS ---------------------------------------------------------------------------------------

def tucker(core, wa, wb):
    """LyCORIS's CP/Tucker rebuild, written out: sum_ij core[i, j] * wa[i]^T wb[j] per tap."""
    core, wa, wb = map(torch.from_numpy, (core, wa, wb))
    return torch.einsum("ijhw,io,jc->ochw", core, wa, wb).contiguous().numpy()


def lycoris_modules() -> list:
    """(kohya prefix, sdjax path, tensors, expected delta in PyTorch layout) of each LyCORIS kind
    on the tiny model: out/in widths follow its layers."""
    cases = []
    # LoHa on a linear layer (32 -> 32), alpha 2 of rank 4.
    w1a, w1b, w2a, w2b = normal(32, 4), normal(4, 32), normal(32, 4), normal(4, 32)
    cases.append(("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k",
                  "down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_k",
                  dict(hada_w1_a=w1a, hada_w1_b=w1b, hada_w2_a=w2a, hada_w2_b=w2b,
                       alpha=np.float32(2)),
                  0.5 * (w1a @ w1b) * (w2a @ w2b)))
    # LoHa with Tucker cores on a 3x3 conv (64 -> 64).
    t1, t2 = normal(3, 3, 3, 3), normal(3, 3, 3, 3)
    a1, b1, a2, b2 = normal(3, 64), normal(3, 64), normal(3, 64), normal(3, 64)
    cases.append(("lora_unet_down_blocks_1_resnets_0_conv2", "down_blocks_1/resnets_0/conv2",
                  dict(hada_t1=t1, hada_w1_a=a1, hada_w1_b=b1, hada_t2=t2, hada_w2_a=a2,
                       hada_w2_b=b2, alpha=np.float32(1)),
                  tucker(t1, a1, b1) * tucker(t2, a2, b2) / 3))
    # LoKr, both factors whole: alpha does not apply (dim unset).
    k1, k2 = normal(4, 8), normal(8, 4)
    cases.append(("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v",
                  "down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_v",
                  dict(lokr_w1=k1, lokr_w2=k2, alpha=np.float32(7)),
                  torch.kron(torch.from_numpy(k1), torch.from_numpy(k2)).numpy()))
    # LoKr, w2 decomposed (rank 2, alpha 1), on the text encoder's fc2 (64 -> 32).
    k1, k2a, k2b = normal(4, 8), normal(8, 2), normal(2, 8)
    cases.append(("lora_te_text_model_encoder_layers_0_mlp_fc2", "layers_0/mlp/fc2",
                  dict(lokr_w1=k1, lokr_w2_a=k2a, lokr_w2_b=k2b, alpha=np.float32(1)),
                  0.5 * torch.kron(torch.from_numpy(k1), torch.from_numpy(k2a @ k2b)).numpy()))
    # LoKr on a 3x3 conv (64 -> 64): w1 decomposed, w2 a Tucker product; dim is w2's rank.
    k1a, k1b = normal(8, 2), normal(2, 8)
    t2, k2a, k2b = normal(2, 2, 3, 3), normal(2, 8), normal(2, 8)
    cases.append(("lora_unet_up_blocks_0_resnets_1_conv2", "up_blocks_0/resnets_1/conv2",
                  dict(lokr_w1_a=k1a, lokr_w1_b=k1b, lokr_t2=t2, lokr_w2_a=k2a, lokr_w2_b=k2b,
                       alpha=np.float32(3)),
                  1.5 * torch.kron(torch.from_numpy(k1a @ k1b)[:, :, None, None],
                                   torch.from_numpy(tucker(t2, k2a, k2b))).numpy()))
    # LoCon's Tucker form: lora_mid on a 3x3 conv, down/up 1x1.
    mid, down, up = normal(2, 2, 3, 3), normal(2, 32, 1, 1), normal(32, 2, 1, 1)
    cases.append(("lora_unet_down_blocks_0_resnets_0_conv1", "down_blocks_0/resnets_0/conv1",
                  {"lora_mid.weight": mid, "lora_down.weight": down, "lora_up.weight": up,
                   "alpha": np.float32(1)},
                  0.5 * tucker(mid, up[:, :, 0, 0].T, down[:, :, 0, 0])))
    # A module's `scale` replaces alpha / rank (ff.net.2 here: 256 -> 64).
    w1a, w1b, w2a, w2b = normal(64, 2), normal(2, 256), normal(64, 2), normal(2, 256)
    cases.append(("lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2",
                  "mid_block/attentions_0/transformer_blocks_0/ff/out",
                  dict(hada_w1_a=w1a, hada_w1_b=w1b, hada_w2_a=w2a, hada_w2_b=w2b,
                       alpha=np.float32(2), scale=np.float32(0.25)),
                  0.25 * (w1a @ w1b) * (w2a @ w2b)))
    return cases


def lycoris_file(tmp_path, cases) -> str:
    tensors = {}
    for prefix, _, parts, _ in cases:
        tensors.update({f"{prefix}.{part}": value for part, value in parts.items()})
    return write(tmp_path / "lycoris.safetensors", tensors)


def test_lycoris_modules_match_their_dense_reconstruction(tiny_model, tmp_path):
    cases = lycoris_modules()
    adapter = load_adapter(lycoris_file(tmp_path, cases), tiny_model)
    for prefix, path, _, expected in cases:
        target = "text_encoder" if prefix.startswith("lora_te") else "unet"
        factor = adapter.modules[target][path]
        assert isinstance(factor, DenseDelta), prefix
        shape = kernel(tiny_model.params, target, path).shape
        assert_close(merged_delta(tiny_model, adapter, target, path),
                     to_sdjax_layout(expected, shape, "kernel"), rtol=1e-5)


def test_full_difference_and_its_bias_apply_at_run_time_and_merged(tiny_model, tmp_path):
    """LyCORIS `diff` / `diff_b` (as the WebUI: the bias difference scaled by the weight only), on
    the text encoder, whose Dense layers apply the run-time collection as the U-Net's do."""
    diff, diff_b = normal(64, 32, scale=0.2), normal(64, scale=0.5)
    prefix = "lora_te_text_model_encoder_layers_1_mlp_fc1"
    adapter = load_adapter(write(tmp_path / "full.safetensors",
                                 {f"{prefix}.diff": diff, f"{prefix}.diff_b": diff_b,
                                  f"{prefix}.alpha": np.float32(4)}), tiny_model)
    factor = adapter.modules["text_encoder"]["layers_1/mlp/fc1"]
    np.testing.assert_array_equal(factor.delta, diff.T)
    np.testing.assert_array_equal(factor.bias, diff_b)
    weighted = [Weighted(adapter, text_encoder=0.6)]
    merged = network.merge(tiny_model.params, weighted)
    base_bias = tiny_model.params["text_encoder"]["layers_1"]["mlp"]["fc1"]["bias"]
    assert_close(merged["text_encoder"]["layers_1"]["mlp"]["fc1"]["bias"], base_bias + 0.6 * diff_b)
    text = CLIPTextModel(tiny_model.text_configs[0])
    ids = RNG.integers(0, 1000, (2, 12))
    run = jax.jit(lambda p: text.apply(model_variables(p, "text_encoder"), ids).last_hidden_state)
    base, runtime = run(tiny_model.params), run(network.with_runtime_adapters(tiny_model.params, weighted))
    assert np.abs(np.asarray(runtime) - np.asarray(base)).max() > 1e-2
    assert_close(runtime, run(merged), rtol=1e-5)


def test_lycoris_modules_round_trip_through_the_native_file(tiny_model, tmp_path):
    adapter = load_adapter(lycoris_file(tmp_path, lycoris_modules()), tiny_model)
    adapter.modules["text_encoder"]["layers_1/mlp/fc1"] = DenseDelta(normal(32, 64), normal(64))
    save_adapter(tmp_path / "native.safetensors", adapter, tiny_model, format="sdjax")
    again = load_adapter(tmp_path / "native.safetensors", tiny_model)
    assert_same_adapter(again, adapter)


# --- diffusers / peft ------------------------------------------------------------------------------

def test_peft_metadata_gives_alphas_ranks_and_rslora(tiny_model, tmp_path):
    """diffusers' save_lora_weights keeps peft's LoraConfig fields, prefixed per model, in
    `lora_adapter_metadata`: scale = lora_alpha (or the alpha_pattern match) / r, or / sqrt(r)
    under rsLoRA; the ranks must be the tensors'."""
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    k = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    fc1 = "text_model.encoder.layers.0.mlp.fc1"
    tensors = {f"unet.{q}.lora_A.weight": normal(4, 32), f"unet.{q}.lora_B.weight": normal(32, 4),
               f"unet.{k}.lora_A.weight": normal(2, 32), f"unet.{k}.lora_B.weight": normal(32, 2),
               f"text_encoder.{fc1}.lora_A.weight": normal(8, 32),
               f"text_encoder.{fc1}.lora_B.weight": normal(64, 8)}
    config = {"unet.r": 4, "unet.lora_alpha": 16, "unet.rank_pattern": {"attn1.to_k": 2},
              "unet.alpha_pattern": {"^down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k": 3},
              "text_encoder.r": 8, "text_encoder.lora_alpha": 2, "text_encoder.use_rslora": True}
    path = write(tmp_path / "peft.safetensors", tensors,
                 {"format": "pt", "lora_adapter_metadata": json.dumps(config)})
    adapter = load_adapter(path, tiny_model)
    unet, text = adapter.modules["unet"], adapter.modules["text_encoder"]
    assert unet["down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q"].scale == 16 / 4
    assert unet["down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_k"].scale == 3 / 2
    assert text["layers_0/mlp/fc1"].scale == pytest.approx(2 / np.sqrt(8), rel=1e-12)
    np.testing.assert_array_equal(text["layers_0/mlp/fc1"].down,
                                  tensors[f"text_encoder.{fc1}.lora_A.weight"].T)
    assert adapter.metadata["lora_adapter_metadata"] == json.dumps(config)
    # Without the metadata diffusers' scale is 1 (alpha = rank).
    bare = load_adapter(write(tmp_path / "bare.safetensors", tensors), tiny_model)
    assert {f.scale for layers in bare.modules.values() for f in layers.values()} == {1.0}
    # A metadata rank that is not the tensors' is an error (peft could not load the file either).
    config["unet.rank_pattern"] = {}
    with pytest.raises(AdapterError, match=r"rank 2, but lora_adapter_metadata gives .*attn1.to_k rank 4"):
        load_adapter(write(tmp_path / "wrong.safetensors", tensors,
                           {"lora_adapter_metadata": json.dumps(config)}), tiny_model)


def test_every_diffusers_spelling_of_a_module_is_read(tiny_model, tmp_path):
    """peft's lora_A/lora_B; diffusers' `lora.down`, `lora_linear_layer.down` and attention
    processors of old (`processor.to_q_lora`, text `self_attn.to_out_lora`); transformers 5's
    text-encoder names without `text_model.`; unprefixed keys of a model's own
    `save_lora_adapter` (its metadata unprefixed too)."""
    attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    cases = [  # (down key, up key, model, sdjax path, in, out)
        (f"unet.{attn}.processor.to_q_lora.down.weight", f"unet.{attn}.processor.to_q_lora.up.weight",
         "unet", "down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_q", 32, 32),
        (f"unet.{attn}.processor.to_out_lora.down.weight",
         f"unet.{attn}.processor.to_out_lora.up.weight",
         "unet", "down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_out", 32, 32),
        (f"unet.{attn}.to_v.lora.down.weight", f"unet.{attn}.to_v.lora.up.weight",
         "unet", "down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_v", 32, 32),
        ("text_encoder.text_model.encoder.layers.0.self_attn.to_out_lora.down.weight",
         "text_encoder.text_model.encoder.layers.0.self_attn.to_out_lora.up.weight",
         "text_encoder", "layers_0/self_attn/out_proj", 32, 32),
        ("text_encoder.text_model.encoder.layers.1.mlp.fc1.lora_linear_layer.down.weight",
         "text_encoder.text_model.encoder.layers.1.mlp.fc1.lora_linear_layer.up.weight",
         "text_encoder", "layers_1/mlp/fc1", 32, 64),
        ("text_encoder.encoder.layers.1.self_attn.v_proj.lora_A.weight",
         "text_encoder.encoder.layers.1.self_attn.v_proj.lora_B.weight",
         "text_encoder", "layers_1/self_attn/v_proj", 32, 32),
    ]
    tensors, expected = {}, {}
    for down_key, up_key, target, path, n_in, n_out in cases:
        down, up = normal(2, n_in), normal(n_out, 2)
        tensors.update({down_key: down, up_key: up})
        expected[target, path] = (down, up)
    adapter = load_adapter(write(tmp_path / "old.safetensors", tensors), tiny_model)
    assert {(m, p) for m, layers in adapter.modules.items() for p in layers} == set(expected)
    for (target, path), (down, up) in expected.items():
        factor = adapter.modules[target][path]
        np.testing.assert_array_equal(factor.down, down.T)
        np.testing.assert_array_equal(factor.up, up.T)

    # A model's own save_lora_adapter: no prefixes, the config unprefixed.
    q = "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"
    own = write(tmp_path / "own.safetensors",
                {f"{q}.lora_A.weight": normal(4, 128), f"{q}.lora_B.weight": normal(32, 4)},
                {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 2})})
    adapter = load_adapter(own, tiny_model)
    assert adapter.modules["unet"]["up_blocks_1/attentions_0/transformer_blocks_0/ff/out"].scale == 0.5


# --- sdjax's own file and the kohya writer --------------------------------------------------------

def random_adapter(model, *, dtype=np.float32) -> network.Adapter:
    """LowRank factors in sdjax layouts on dense, 3x3-conv and (SD 1.x) proj_in layers, with
    differing alphas, and a dense delta."""
    unet = {
        "down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q": LowRank(
            normal(32, 4).astype(dtype), normal(4, 32).astype(dtype), 3.0),
        "down_blocks_0/resnets_0/conv1": LowRank(normal(3, 3, 32, 2).astype(dtype),
                                                 normal(2, 32).astype(dtype), 0.7),
        "down_blocks_0/attentions_0/proj_in": LowRank(normal(32, 2).astype(dtype),
                                                      normal(2, 32).astype(dtype), 1.0),
    }
    text = {"layers_1/self_attn/q_proj": LowRank(normal(32, 2).astype(dtype),
                                                 normal(2, 32).astype(dtype), 2.0)}
    return network.Adapter("random", {"unet": unet, "text_encoder": text},
                           metadata={"ss_network_dim": "4"})


def assert_same_adapter(a: network.Adapter, b: network.Adapter, exact: bool = True):
    assert {m: set(v) for m, v in a.modules.items() if v} == {m: set(v) for m, v in b.modules.items() if v}
    for model, layers in a.modules.items():
        for path, fa in layers.items():
            fb = b.modules[model][path]
            assert type(fa) is type(fb)
            pairs = ([(fa.down, fb.down), (fa.up, fb.up)] if isinstance(fa, LowRank)
                     else [(fa.delta, fb.delta), (fa.bias, fb.bias)])
            for x, y in pairs:
                if x is None or y is None:
                    assert x is None and y is None
                elif exact:
                    assert x.dtype == y.dtype and x.shape == y.shape
                    np.testing.assert_array_equal(x, y)
                else:
                    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32))
            if isinstance(fa, LowRank):
                assert fa.alpha == fb.alpha if exact else np.float32(fa.alpha) == np.float32(fb.alpha)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_native_file_round_trips_bit_exact(tiny_model, tmp_path, dtype):
    adapter = random_adapter(tiny_model, dtype=dtype)
    adapter.modules["unet"]["up_blocks_0/resnets_0/conv_shortcut"] = DenseDelta(
        normal(1, 1, 128, 64).astype(dtype))
    path = save_adapter(tmp_path / "mine.safetensors", adapter, tiny_model, format="sdjax",
                        metadata={"note": "hello"})
    again = load_adapter(path, tiny_model)
    assert_same_adapter(again, adapter)
    assert again.metadata == {"ss_network_dim": "4", "note": "hello"}
    assert again.name == "mine" and again.source == str(path)


def test_kohya_file_has_kohya_keys_and_layouts_and_loads_back(tiny_model, tmp_path):
    adapter = random_adapter(tiny_model)
    path = save_adapter(tmp_path / "kohya.safetensors", adapter, tiny_model,
                        metadata={"ss_network_module": "networks.lora"})
    tensors = load_file(str(path))
    unet = "lora_unet_down_blocks_0_"
    assert tensors[unet + "attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"].shape == (4, 32)
    assert tensors[unet + "attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight"].shape == (32, 4)
    assert tensors[unet + "resnets_0_conv1.lora_down.weight"].shape == (2, 32, 3, 3)
    assert tensors[unet + "resnets_0_conv1.lora_up.weight"].shape == (32, 2, 1, 1)
    # SD 1.x's proj_in is a 1x1 conv in the reference model: its factors are written as one.
    assert tensors[unet + "attentions_0_proj_in.lora_down.weight"].shape == (2, 32, 1, 1)
    assert tensors[unet + "resnets_0_conv1.alpha"] == np.float32(0.7)
    assert "lora_te_text_model_encoder_layers_1_self_attn_q_proj.lora_up.weight" in tensors
    again = load_adapter(path, tiny_model)
    assert again.metadata == {"ss_network_dim": "4", "ss_network_module": "networks.lora"}
    assert_same_adapter(again, adapter, exact=False)
    for model in ("unet", "text_encoder"):
        merged_a = network.merge(tiny_model.params, [Weighted(adapter)])[model]
        merged_b = network.merge(tiny_model.params, [Weighted(again)])[model]
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6),
                     merged_a, merged_b)


def test_kohya_writer_names_sdxl_text_encoders_te1_and_te2(sdxl, tmp_path):
    adapter = network.Adapter("xl", {
        "text_encoder": {"layers_0/mlp/fc1": LowRank(normal(64, 2), normal(2, 128), 1.0)},
        "text_encoder_2": {"layers_1/self_attn/out_proj": LowRank(normal(128, 2), normal(2, 128), 1.0)}})
    path = save_adapter(tmp_path / "xl.safetensors", adapter, sdxl)
    assert sorted(k for k in load_file(str(path)) if k.endswith(".alpha")) == [
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha",
        "lora_te2_text_model_encoder_layers_1_self_attn_out_proj.alpha"]
    assert_same_adapter(load_adapter(path, sdxl), adapter, exact=False)


def test_kohya_writer_refuses_dense_deltas_and_metadata_that_is_not_text(tiny_model, tmp_path):
    adapter = random_adapter(tiny_model)
    with pytest.raises(AdapterError, match=r"ss_steps.* is a int; safetensors metadata holds strings"):
        save_adapter(tmp_path / "a.safetensors", adapter, tiny_model, metadata={"ss_steps": 10})
    adapter.modules["unet"]["up_blocks_0/resnets_0/conv_shortcut"] = DenseDelta(normal(1, 1, 128, 64))
    with pytest.raises(AdapterError, match=r"conv_shortcut is a dense delta.*low-rank factors only"):
        save_adapter(tmp_path / "a.safetensors", adapter, tiny_model)
    with pytest.raises(ValueError, match="adapter format 'peft' is not one of kohya, sdjax"):
        save_adapter(tmp_path / "a.safetensors", adapter, tiny_model, format="peft")
    with pytest.raises(AdapterError, match="adapter 'empty' adapts no layer; nothing to save"):
        save_adapter(tmp_path / "a.safetensors", network.Adapter("empty", {}), tiny_model)
    assert list(tmp_path.iterdir()) == []


def test_saving_replaces_only_adapter_files_and_leaves_nothing_else(tiny_model, tiny_sd, tmp_path):
    adapter = random_adapter(tiny_model)
    path = tmp_path / "lora.safetensors"
    save_adapter(path, adapter, tiny_model)
    save_adapter(path, adapter, tiny_model, format="sdjax")  # an adapter file: replaced
    assert load_file(str(path)).keys() == {f"{m}/{p}/{leaf}" for m, layers in adapter.modules.items()
                                           for p in layers for leaf in ("down", "up", "alpha")}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"]
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(tiny_sd.single_file("sd1", "float16").read_bytes())
    before = checkpoint.read_bytes()
    with pytest.raises(AdapterError, match="model.safetensors: exists and is not an adapter file"):
        save_adapter(checkpoint, adapter, tiny_model)
    assert checkpoint.read_bytes() == before
    notes = tmp_path / "notes.safetensors"
    notes.write_text("my notes")
    with pytest.raises(AdapterError, match="notes.safetensors: exists and is not an adapter file"):
        save_adapter(notes, adapter, tiny_model)
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(AdapterError, match="dir.safetensors: is a folder"):
        save_adapter(tmp_path / "dir.safetensors", adapter, tiny_model)
    with pytest.raises(AdapterError, match=r"lora.pt: adapter files are written as .safetensors"):
        save_adapter(tmp_path / "lora.pt", adapter, tiny_model)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "dir.safetensors", "lora.safetensors", "model.safetensors", "notes.safetensors"]


# --- names, folders, metadata, errors -------------------------------------------------------------

def small_kohya(tmp_path, name="small.safetensors", metadata=None, extra=None) -> str:
    prefix = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    return write(tmp_path / name, {**kohya_lora(prefix, normal(2, 32), normal(32, 2), 1.0),
                                   **(extra or {})}, metadata)


def test_names_metadata_and_diffusers_folders(tiny_model, tmp_path):
    file = small_kohya(tmp_path, "style_a.safetensors", metadata={"ss_output_name": "style"})
    adapter = load_adapter(file, tiny_model)
    assert (adapter.name, adapter.metadata, adapter.source) == (
        "style_a", {"ss_output_name": "style"}, file)
    assert load_adapter(file, tiny_model, name="other").name == "other"
    folder = tmp_path / "my-lora"
    folder.mkdir()
    small_kohya(folder, "pytorch_lora_weights.safetensors")
    small_kohya(folder, "another.safetensors")
    adapter = load_adapter(folder, tiny_model)
    assert adapter.name == "my-lora"
    assert adapter.source == str(folder / "pytorch_lora_weights.safetensors")


def test_unplaceable_keys_are_errors_or_one_warning(tiny_model, tmp_path, caplog):
    extra = {**kohya_lora("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn9_to_q",
                          normal(2, 32), normal(32, 2)),
             **kohya_lora("lora_te2_text_model_encoder_layers_0_mlp_fc1", normal(2, 32), normal(64, 2)),
             "lora_unet_conv_in.w_norm": normal(32)}
    file = small_kohya(tmp_path, extra=extra)
    with pytest.raises(AdapterError, match=r"small.safetensors: 5 keys fit no layer of this sd1 "
                                           r"model: .*attn9_to_q.lora_down.weight \(no layer of unet "
                                           r"is named .*strict=False loads the rest"):
        load_adapter(file, tiny_model)
    with pytest.raises(AdapterError, match=r"lora_te2_.*this model has no text_encoder_2"):
        load_adapter(file, tiny_model)
    with pytest.raises(AdapterError, match=r"w_norm \(a LyCORIS norm-layer weight"):
        load_adapter(file, tiny_model)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        adapter = load_adapter(file, tiny_model, strict=False)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 5 keys" in warnings[0].getMessage()
    assert list(adapter.modules["unet"]) == ["down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q"]


def test_a_file_without_adapter_keys_names_what_it_holds(tiny_model, tiny_sd, tmp_path):
    with pytest.raises(AdapterError, match=r"sd1-float16.safetensors: no adapter tensors .*named like "
                                           r"(model\.|cond_stage_model\.|first_stage_model\.)"):
        load_adapter(tiny_sd.single_file("sd1", "float16"), tiny_model)
    with pytest.raises(AdapterError, match="it holds no tensors"):
        load_adapter(write(tmp_path / "empty.safetensors", {}), tiny_model)


def test_an_adapter_for_another_model_names_the_layer_and_both_shapes(sd1, tmp_path):
    prefix = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    file = write(tmp_path / "sdxl-lora.safetensors", kohya_lora(prefix, normal(4, 320), normal(320, 4)))
    with pytest.raises(AdapterError, match=r"sdxl-lora.safetensors: unet down_blocks_0/attentions_0/"
                                           r"transformer_blocks_0/attn1/to_q: the layer's kernel is "
                                           r"\(32, 32\).*down \(320, 4\), up \(4, 320\)"):
        load_adapter(file, sd1)


def test_dora_and_pickles_are_refused_with_what_to_do(tiny_model, tmp_path):
    prefix = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    file = small_kohya(tmp_path, "dora.safetensors", extra={f"{prefix}.dora_scale": normal(1, 32)})
    with pytest.raises(AdapterError, match=rf"dora.safetensors: {prefix}.dora_scale: DoRA is not "
                                           r"supported: .*norm"):
        load_adapter(file, tiny_model)
    pickle = tmp_path / "old.pt"
    pickle.write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    with pytest.raises(AdapterError, match=r"(?s)old.pt: a .pt adapter is a pickle; sdjax never "
                                           r"unpickles.*torch.load.*save_file"):
        load_adapter(pickle, tiny_model)
    folder = tmp_path / "diffusers-lora"
    folder.mkdir()
    (folder / "pytorch_lora_weights.bin").write_bytes(b"PK\x03\x04")
    with pytest.raises(AdapterError, match=r"pytorch_lora_weights.bin: a .bin adapter is a pickle"):
        load_adapter(folder, tiny_model)
    with pytest.raises(AdapterError, match="nothing-here: no such file or folder"):
        load_adapter(tmp_path / "nothing-here", tiny_model)


def test_two_names_for_one_layer_are_an_error(tiny_model, tmp_path):
    extra = kohya_lora("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q",
                       normal(2, 32), normal(32, 2), 1.0)
    with pytest.raises(AdapterError, match=r"input_blocks_1_1_transformer_blocks_0_attn1_to_q.* and "
                                           r"lora_unet_down_blocks_0_.* both give the"):
        load_adapter(small_kohya(tmp_path, extra=extra), tiny_model)
