"""LoRAs in sampling: `Request.adapters` and `<lora:...>` prompt tags, the Generator's two modes
(run time: weights are data, no recompiling; merged: into a copy of the base kernels) giving the
same images for every kind of sampler and mode, exported programs serving every weight, PNG
parameters naming the LoRAs, the prompt-file runner's resume check, and the ablation's LoRA
weight axis. The LoRAs are random factors on the tiny model's layers (tests/lora_sampling_check.py);
the multi-device comparison runs in a subprocess with 8 simulated CPU devices."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from sdjax.adapters.network import Weighted
from sdjax.sampling import Generator, Request, SamplingSpec
from sdjax.sampling import generate, loras, requests
from sdjax.text.prompts import NamedLora, extract_loras
from tests.helpers import json_result, run_python
from tests.lora_sampling_check import random_lora

SIZE = 32
PROMPT = "a red circle on the left"
# float32 images in [-1, 1]: run-time factors and merged kernels sum the same products in another
# order; a few steps of sampling keep that difference near 1e-6 (measured: 4e-6).
MODES_ATOL = 1e-4
# What a U-Net LoRA changes in an image, at least, for the tests to mean something (measured:
# 0.08 and more). The random tiny U-Net barely listens to its text (another prompt moves a pixel
# by 1e-3), so text-encoder changes are checked on the conditioning itself.
VISIBLE = 1e-2


@pytest.fixture(scope="module")
def lora_a():
    return random_lora("a", 0)


@pytest.fixture(scope="module")
def lora_b():
    """Same ranks and targets as lora_a, other values."""
    return random_lora("b", 1)


@pytest.fixture(scope="module")
def pair(lora_a, lora_b):
    """Two LoRAs at once, what most tests draw with (one program for them all)."""
    return [Weighted(lora_a, 0.8, 0.6), Weighted(lora_b, -0.4, 0.9)]


def kohya_tensors(seed: int) -> dict[str, np.ndarray]:
    """A tiny kohya / WebUI LoRA file's tensors for the tiny model, in PyTorch layouts: a linear
    layer's down (r, in) and up (out, r), a conv's down (r, in, 3, 3) and up (out, r, 1, 1), alpha."""
    rng = np.random.default_rng(seed)
    layers = {  # key: (down shape, up shape, alpha, standard deviation)
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
            ((4, 32), (32, 4), 2.0, 0.3),
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v":
            ((4, 32), (64, 4), 4.0, 0.3),
        "lora_unet_down_blocks_0_resnets_0_conv1": ((2, 32, 3, 3), (32, 2, 1, 1), 1.0, 0.1),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": ((2, 32), (32, 2), 2.0, 0.5),
    }
    tensors = {}
    for key, (down, up, alpha, std) in layers.items():
        tensors[f"{key}.lora_down.weight"] = rng.normal(0, std, down).astype(np.float32)
        tensors[f"{key}.lora_up.weight"] = rng.normal(0, std, up).astype(np.float32)
        tensors[f"{key}.alpha"] = np.array(alpha, np.float32)
    return tensors


def same_lora_in_memory(tensors: dict[str, np.ndarray]):
    """The kohya tensors as an sdjax Adapter, transposed here: down (in, r) or (kh, kw, in, r),
    up (r, out)."""
    from sdjax.adapters.network import Adapter, LowRank

    paths = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
             ("unet", "down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q"),
             "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v":
             ("unet", "mid_block/attentions_0/transformer_blocks_0/attn2/to_v"),
             "lora_unet_down_blocks_0_resnets_0_conv1": ("unet", "down_blocks_0/resnets_0/conv1"),
             "lora_te_text_model_encoder_layers_0_self_attn_q_proj":
             ("text_encoder", "layers_0/self_attn/q_proj")}
    modules: dict = {"unet": {}, "text_encoder": {}}
    for key, (model, path) in paths.items():
        down, up = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
        down = down.T if down.ndim == 2 else down.transpose(2, 3, 1, 0)
        modules[model][path] = LowRank(down, up.reshape(up.shape[:2]).T,
                                       float(tensors[f"{key}.alpha"]))
    return Adapter("ink (in memory)", modules)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """A LoRA folder holding `styles/ink.safetensors` (kohya keys) and a text file beside it."""
    from safetensors.numpy import save_file

    root = tmp_path_factory.mktemp("loras")
    (root / "styles").mkdir()
    save_file(kohya_tensors(0), str(root / "styles" / "ink.safetensors"),
              metadata={"ss_network_module": "networks.lora"})
    (root / "styles" / "ink.txt").write_text("trigger words: ink")
    return root


@pytest.fixture(scope="module")
def runtime(tiny_model, lora_dir):
    return Generator(tiny_model, exported_programs=False, lora_dir=lora_dir)


@pytest.fixture(scope="module")
def merged(tiny_model):
    return Generator(tiny_model, exported_programs=False, adapter_mode="merged")


def spec_of(sampler="euler", **kw):
    return SamplingSpec(**{"sampler": sampler, "steps": 3, "height": SIZE, "width": SIZE, **kw})


def smooth_image():
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    return np.stack([np.sin(3 * x), np.cos(2 * y), x * y], -1).astype(np.float32) * 0.8


def half_mask():
    mask = np.zeros((SIZE, SIZE), np.float32)
    mask[:, : SIZE // 2] = 1
    return mask


def request(adapters=(), **kw):
    return Request(**{"prompt": PROMPT, "negative_prompt": "blue", "seed": 5, "num_images": 2,
                      "cfg_scale": [3.0, 7.5], "guidance_rescale": [0.0, 0.7],
                      "adapters": adapters, **kw})


# --- the two modes ------------------------------------------------------------------------------------

# Every kind of sampler (single-step, multistep, stochastic) and mode, with per-image guidance
# scales and rescale, in three programs.
CASES = {
    "euler txt2img": (spec_of("euler"), {}),
    "dpmpp_2m img2img": (spec_of("dpmpp_2m", mode="img2img", strength=0.7),
                         {"init_image": smooth_image()}),
    "euler_a inpaint": (spec_of("euler_a", mode="inpaint"),
                        {"init_image": smooth_image(), "mask": half_mask()}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_runtime_and_merged_modes_give_the_same_images(runtime, merged, pair, case):
    spec, extra = CASES[case]
    base = merged(request(**extra), spec)["images"]  # merged params run the base model's program
    ours = runtime(request(pair, **extra), spec)["images"]
    theirs = merged(request(pair, **extra), spec)["images"]
    assert np.abs(ours - base).max() > VISIBLE
    np.testing.assert_allclose(ours, theirs, atol=MODES_ATOL, rtol=0)
    if spec.mode == "inpaint":  # the init image's overlay outside the mask is untouched by LoRAs
        np.testing.assert_array_equal(ours[:, :, -4:], base[:, :, -4:])


def test_a_new_weight_or_a_lora_of_the_same_shapes_does_not_retrace(runtime, pair, lora_a, lora_b):
    spec = spec_of("euler")
    first = runtime(request(pair), spec)["images"]
    traces = runtime.traces
    lora_c = random_lora("c", 3)
    others = [runtime(request([Weighted(lora_a, 0.3, 0.6), pair[1]]), spec)["images"],
              runtime(request([pair[0], Weighted(lora_b, -0.4, 2.0)]), spec)["images"],
              runtime(request([pair[0], Weighted(lora_c, -0.4, 0.9)]), spec)["images"]]
    # The same LoRAs in the other order: the same sum of deltas.
    swapped = runtime(request([pair[1], pair[0]]), spec)["images"]
    assert runtime.traces == traces
    np.testing.assert_allclose(swapped, first, atol=MODES_ATOL, rtol=0)
    # Each is a real change of what the program reads (the text-encoder weight's the least).
    for other in others:
        assert np.abs(other - first).max() > 2 * MODES_ATOL
    # Back to the first weights: the same image.
    np.testing.assert_array_equal(runtime(request(pair), spec)["images"], first)
    # One LoRA has fewer rank columns: other shapes, so another program.
    runtime(request([Weighted(lora_a, 0.8, 0.6)]), spec)
    assert runtime.traces == traces + 1


def test_a_weight_change_reuploads_only_the_scale_arrays(runtime, lora_a):
    first = runtime.params_for((Weighted(lora_a, 0.8, 0.6),))["adapters"]
    second = runtime.params_for((Weighted(lora_a, 0.2, 0.6),))["adapters"]
    attention = ("unet", "mid_block", "attentions_0", "transformer_blocks_0", "attn1", "to_q")

    def leaf(tree, *path):
        for key in path:
            tree = tree[key]
        return tree

    for name in ("down", "up"):
        assert leaf(second, *attention, name) is leaf(first, *attention, name)
    delta = ("unet", "up_blocks_0", "resnets_0", "conv1", "delta")
    assert leaf(second, *delta) is leaf(first, *delta)
    np.testing.assert_allclose(np.asarray(leaf(second, *attention, "scale")),
                               np.asarray(leaf(first, *attention, "scale")) * 0.2 / 0.8, rtol=1e-6)
    # The text encoder's weight did not change, so neither did its scales' values.
    te = ("text_encoder", "layers_0", "self_attn", "q_proj", "scale")
    np.testing.assert_array_equal(np.asarray(leaf(second, *te)), np.asarray(leaf(first, *te)))
    # The base params are the Generator's own placed arrays, not copies.
    assert runtime.params_for((Weighted(lora_a, 0.2, 0.6),))["vae"] is runtime.params["vae"]


def test_runtime_scales_hold_weight_times_alpha_over_rank_per_rank_column(tiny_model, lora_a, lora_b):
    from flax import traverse_util

    from sdjax.adapters import network

    adapters = (Weighted(lora_a, 0.7, -0.2), Weighted(lora_b, 1.3, 0.5))
    flat = traverse_util.flatten_dict(network.runtime_variables(adapters, tiny_model.params))
    for model, weight_of in (("unet", lambda w: w.unet), ("text_encoder", lambda w: w.text_encoder)):
        for path in set(lora_a.modules.get(model, {})) | set(lora_b.modules.get(model, {})):
            want = [np.full(f.rank, np.float32(weight_of(w)) * f.scale, np.float32)
                    for w in adapters if (f := w.adapter.modules.get(model, {}).get(path))
                    is not None and isinstance(f, network.LowRank)]
            key = (model,) + tuple(path.split("/")) + ("scale",)
            if want:  # else the layer carries dense deltas only
                np.testing.assert_array_equal(flat[key], np.concatenate(want), err_msg=str(key))


def test_merged_mode_remerges_only_on_change_and_dropping_loras_restores_the_base_exactly(
        merged, lora_a, pair):
    spec = spec_of("euler")
    before = merged(request(), spec)["images"]
    adapted = merged.params_for((Weighted(lora_a, 0.8, 0.6),))
    assert merged.params_for((Weighted(lora_a, 0.8, 0.6),)) is adapted
    assert merged.params_for((Weighted(lora_a, 0.5, 0.6),)) is not adapted
    adapted = merged.params_for((Weighted(lora_a, 0.8, 0.6),))
    # Untouched params are the base's placed arrays; merged kernels are new ones.
    assert adapted["vae"] is not None and all(
        a is b for a, b in zip(*(jax_leaves(p["vae"]) for p in (adapted, merged.params))))
    conv = ("unet", "up_blocks_0", "resnets_0", "conv1", "kernel")
    assert _at(adapted, conv) is not _at(merged.params, conv)
    with_lora = merged(request(pair), spec)["images"]
    assert np.abs(with_lora - before).max() > VISIBLE
    np.testing.assert_array_equal(merged(request(), spec)["images"], before)
    np.testing.assert_array_equal(np.asarray(_at(merged.params, conv)),
                                  _at(merged.model.params, conv))


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def _at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def test_the_text_encoder_weight_alone_changes_the_conditioning(runtime, merged, lora_a):
    import jax

    from sdjax.text.conditioning import encode_text

    spec = spec_of("euler")
    batch = runtime.prepare(request(), spec)
    context = jax.jit(lambda params: encode_text(runtime.arch, params, batch["ids"],
                                                 batch["weights"])["context"])
    base = np.asarray(context(runtime.params))
    te_only = (Weighted(lora_a, 0.0, 1.0),)
    text_only = (Weighted(random_lora("t", 2, unet=False), 1.0, 1.0),)
    for adapters in (te_only, text_only):
        ours = np.asarray(context(runtime.params_for(adapters)))
        assert np.abs(ours - base).max() > 0.1 * np.abs(base).max()
        np.testing.assert_allclose(np.asarray(context(merged.params_for(adapters))), ours,
                                   atol=1e-5, rtol=0)
    # In images: the text-encoder weight alone changes them, the same in both modes; zero
    # weights draw the base model's.
    base_images = runtime(request(), spec)["images"]
    te_images = runtime(request(te_only), spec)["images"]
    assert np.abs(te_images - base_images).max() > 5 * MODES_ATOL
    np.testing.assert_allclose(merged(request(te_only), spec)["images"], te_images,
                               atol=MODES_ATOL, rtol=0)
    np.testing.assert_allclose(runtime(request([Weighted(lora_a, 0.0, 0.0)]), spec)["images"],
                               base_images, atol=1e-6, rtol=0)


# 8 devices in a subprocess, three layouts: ~50 s.
@pytest.mark.slow
def test_modes_agree_and_runtime_is_bit_identical_across_devices_jit_pmap_and_fsdp():
    result = json_result(run_python("-m", "tests.lora_sampling_check", devices=8, timeout=900))
    assert result["lora_changes_images"] > VISIBLE
    assert all(result["runtime_bit_identical"].values()), result["runtime_max_abs_diff"]
    assert max(result["merged_max_abs_diff"].values()) < MODES_ATOL, result
    assert result["traces_after_weight_change"] == {"jit8": 0, "pmap8": 0, "fsdp2": 0}
    assert "fsdp" in result["fsdp_delta_sharding"], result["fsdp_delta_sharding"]


# --- exported programs ----------------------------------------------------------------------------------

def test_an_exported_program_serves_every_weight(tiny_model, lora_a, lora_b, tmp_path):
    spec = spec_of("euler")
    first = Generator(tiny_model, exported_programs=str(tmp_path))
    first(request([Weighted(lora_a, 0.5, 0.5)]), spec)
    assert [e["outcome"] for e in first.program_log] == ["miss"] and first.traces == 1
    # Another weight, another LoRA of the same shapes: the same program, no lookup, no trace.
    drawn = first(request([Weighted(lora_b, 0.9, 0.2)]), spec)["images"]
    assert len(first.program_log) == 1 and first.traces == 1
    # A later launch loads the program written for the first weights and draws the same image.
    second = Generator(tiny_model, exported_programs=str(tmp_path))
    again = second(request([Weighted(lora_b, 0.9, 0.2)]), spec)["images"]
    assert [e["outcome"] for e in second.program_log] == ["hit"] and second.traces == 0
    np.testing.assert_array_equal(again, drawn)
    sidecars = list(tmp_path.glob("*.json"))
    assert len(sidecars) == 1
    assert json.loads(sidecars[0].read_text())["description"]["params"]["leaves"] > \
        len(jax_leaves(tiny_model.params))


# --- prompts and requests -------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt, text, expected", [
    ("a <lora:ink:0.8> cat", "a  cat", [NamedLora("ink", 0.8, 0.8)]),
    ("<lora:ink>", "", [NamedLora("ink", 1.0, 1.0)]),
    # Positional: text encoder, then U-Net (the WebUI's order).
    ("<lora:ink:0.5:1.2>", "", [NamedLora("ink", unet=1.2, text_encoder=0.5)]),
    ("<lora:ink:unet=0.3>", "", [NamedLora("ink", unet=0.3, text_encoder=1.0)]),
    # A named te= also becomes the U-Net's weight when no U-Net weight is given, as in the WebUI.
    ("<lora:ink:0.2:te=0.7>", "", [NamedLora("ink", unet=0.7, text_encoder=0.7)]),
    ("<lora:ink:te=0.1:unet=0.9>x<lyco:style/pen:2>",
     "x", [NamedLora("ink", unet=0.9, text_encoder=0.1), NamedLora("style/pen", 2.0, 2.0)]),
    ("no tags (red:1.2)", "no tags (red:1.2)", []),
])
def test_lora_tags_are_read_as_the_webui_reads_them(prompt, text, expected):
    assert extract_loras(prompt) == (text, tuple(expected))


@pytest.mark.parametrize("prompt, message", [
    ("a <hypernet:anime:1> cat", "<hypernet:anime:1> is a 'hypernet' extra network"),
    ("<lora:ink:strong>", "<lora:ink:strong>: weight 'strong' is not a number"),
    ("<lora:ink:inf>", "weight 'inf' is not a number"),
    ("<lora:ink:1:1:8>", "a fourth argument ('8') is not applied"),
    ("<lora:ink:dyn=8>", "dyn= is not applied"),
    ("<lora::1>", "<lora::1> names no LoRA"),
])
def test_bad_tags_are_errors_naming_the_tag(prompt, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        extract_loras(prompt)


def test_tags_are_removed_from_the_text_the_tokenizer_sees(runtime):
    spec = spec_of("euler")
    tagged = requests.prepare_batch(runtime.arch, runtime.model.tokenizers, Request(
        "a red <lora:ink:0.5>circle", negative_prompt="<lora:ink:1>blurry"), spec)
    plain = requests.prepare_batch(runtime.arch, runtime.model.tokenizers, Request(
        "a red circle", negative_prompt="blurry"), spec)
    for key in ("ids", "weights", "neg_ids", "neg_weights"):
        np.testing.assert_array_equal(tagged[key], plain[key], err_msg=key)
    assert requests.request_loras(Request("a <lora:x:0.5>", negative_prompt="<lora:y:2>",
                                          adapters=[("z", 0.3)])) == (
        NamedLora("z", 0.3, 0.3), NamedLora("x", 0.5, 0.5), NamedLora("y", 2.0, 2.0))


def test_prompts_of_one_request_naming_other_loras_is_an_error(runtime):
    with pytest.raises(ValueError, match="prompt 1 names LoRAs <lora:b:1:1> but prompt 0 names "
                                         "<lora:a:1:1>: a request is one program call.*separate"):
        runtime.prepare(Request(["x <lora:a:1>", "y <lora:b:1>"], num_images=2), spec_of())
    with pytest.raises(ValueError, match="negative_prompt 1 names LoRAs"):
        runtime.prepare(Request("x", negative_prompt=["n", "n <lora:b:1>"], num_images=2),
                        spec_of())
    with pytest.raises(ValueError, match="<hypernet:h:1> is a 'hypernet' extra network"):
        runtime.prepare(Request("x <hypernet:h:1>"), spec_of())


@pytest.mark.parametrize("entry, expected", [
    (("ink", 0.5), NamedLora("ink", 0.5, 0.5)),
    (["ink", 0.5, 2], NamedLora("ink", 0.5, 2.0)),
    (NamedLora("ink", 1.0, 0.0), NamedLora("ink", 1.0, 0.0)),
])
def test_request_adapters_take_weighted_and_name_weight_entries(entry, expected):
    assert loras.lora_entry(entry) == expected


@pytest.mark.parametrize("entry", ["ink", ("ink",), ("ink", "0.5"), ("ink", float("nan")),
                                   ("ink", 1, 2, 3), (3, 1.0)])
def test_bad_request_adapters_are_errors(entry):
    with pytest.raises(ValueError, match="adapters entry"):
        loras.lora_entry(entry)


@pytest.mark.parametrize("text, expected", [
    ("ink", NamedLora("ink", 1.0, 1.0)),
    ("ink:0.5", NamedLora("ink", 0.5, 0.5)),
    ("ink:0.5:1.5", NamedLora("ink", 0.5, 1.5)),
    ("/loras/ink.safetensors:-1", NamedLora("/loras/ink.safetensors", -1.0, -1.0)),
    ("C:\\loras\\ink.safetensors:0.8", NamedLora("C:\\loras\\ink.safetensors", 0.8, 0.8)),
])
def test_the_lora_flag_reads_name_then_unet_then_text_encoder_weight(text, expected):
    assert loras.parse_lora(text) == expected


def test_names_that_find_no_file_or_several_are_errors(runtime, lora_dir, tmp_path):
    with pytest.raises(ValueError, match="LoRA 'nowhere': no such file or folder, and no LoRA "
                                         "folder is set"):
        loras.LoraLibrary(runtime.model).adapter("nowhere")
    with pytest.raises(ValueError, match=f"LoRA 'nowhere': no .* file of that name in {lora_dir}"):
        runtime.prepare(request(prompt="x <lora:nowhere:1>"), spec_of())
    library = loras.LoraLibrary(runtime.model, tmp_path)
    (tmp_path / "sub").mkdir()
    for path in (tmp_path / "ink.safetensors", tmp_path / "sub" / "ink.safetensors",
                 tmp_path / "sub" / "pen.safetensors"):
        path.write_bytes(b"")
    with pytest.raises(ValueError, match="LoRA 'nib': no .safetensors.* file of that name in"):
        library.path_of("nib")
    with pytest.raises(ValueError, match="LoRA 'ink' is ambiguous"):
        library.path_of("ink")
    pen = str(tmp_path / "sub" / "pen.safetensors")
    assert library.path_of("pen") == library.path_of("sub/pen") == pen


def test_a_name_in_the_lora_folder_wins_over_a_same_named_folder_in_the_working_directory(
        tiny_model, lora_dir, tmp_path, monkeypatch):
    (tmp_path / "ink").mkdir()  # e.g. a training run's folder, no adapter in it
    (tmp_path / "ink" / "notes.txt").write_text("not a LoRA")
    monkeypatch.chdir(tmp_path)
    library = loras.LoraLibrary(tiny_model, os.path.relpath(lora_dir, tmp_path))
    adapter = library.adapter("ink")
    assert os.path.samefile(adapter.source, lora_dir / "styles" / "ink.safetensors")
    assert adapter.name == "ink"


# --- PNG parameters ---------------------------------------------------------------------------------

def test_png_parameters_name_every_lora_with_its_weights_and_file_hash(tmp_path, lora_a, lora_b):
    import dataclasses

    from safetensors.numpy import save_file

    path = tmp_path / "ink.safetensors"
    save_file({"x": np.arange(6, dtype=np.float32)}, str(path), metadata={"ss_note": "n"})
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    webui_hash = hashlib.sha256(data[8 + header:]).hexdigest()[:12]  # the WebUI's addnet hash
    from_file = dataclasses.replace(lora_a, name="ink", source=str(path))
    config = _config()
    settings = generate.generation_parameters(
        config, spec_of(), 5, "model", (Weighted(from_file, 0.8, 0.5), Weighted(lora_b, 1.0, 1.0)),
        "merged")
    assert settings["Lora weights"] == '"ink: unet=0.8 te=0.5, b: unet=1 te=1"'
    assert settings["Lora hashes"] == f'"ink: {webui_hash}"'
    assert settings["Lora mode"] == "merged"
    assert "Lora weights" not in generate.generation_parameters(config, spec_of(), 5, "model")


def _config():
    from configs import sd15

    return sd15.get_config()


# --- the prompt-file runner and the CLI -------------------------------------------------------------

def test_a_changed_lora_weight_refuses_to_resume_into_the_folder(tmp_path):
    from sdjax.sampling import batches

    config = _config()
    config.loras = ("ink:0.5",)
    batches._check_and_write_config(config, str(tmp_path))
    config.loras = ("ink:0.8",)
    with pytest.raises(ValueError, match=r"loras: \['ink:0.5'\] -> \['ink:0.8'\]"):
        batches._check_and_write_config(config, str(tmp_path))


def test_prompt_file_lines_take_a_loras_field(tmp_path):
    from sdjax.sampling import batches

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a", "loras": ["ink:0.5", ["pen", 1, 0]]}) + "\n"
                    + json.dumps({"prompt": "b <lora:ink:2>"}) + "\n")
    config = _config()
    config.loras = ("base",)
    first, second = batches.read_prompts(path, config)
    assert first.loras == (NamedLora("base"), NamedLora("ink", 0.5, 0.5), NamedLora("pen", 1.0, 0.0))
    assert second.loras == (NamedLora("base"),) and second.prompt == "b <lora:ink:2>"
    path.write_text(json.dumps({"prompt": "a", "loras": "ink"}) + "\n")
    with pytest.raises(batches.PromptFileError, match="p.jsonl:1: field 'loras' must be a list"):
        batches.read_prompts(path, config)


@pytest.mark.parametrize("args, message", [
    (["--lora=ink:0.5:nan"], "LoRA 'ink:0.5:nan': weights must be finite"),
    (["--lora_mode=fused"], "flag --lora_mode=fused: value should be one of <runtime|merged>"),
    (["--lora=nowhere"], "LoRA 'nowhere': no such file or folder"),
    (["--prompt=x <hypernet:h:1>"], "<hypernet:h:1> is a 'hypernet' extra network"),
])
def test_cli_lora_errors_are_one_line(tmp_path, args, message):
    result = run_python("-m", "experiments.generate", "--model=random:tiny", "--prompt=x",
                        "--height=32", "--width=32", "--config.steps=2",
                        "--config.progress=false", f"--out_dir={tmp_path}",
                        "--config.compilation_cache=", *args)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


# --- LoRA files end to end ----------------------------------------------------------------------------

def test_a_kohya_file_in_the_lora_dir_draws_with_a_prompt_tag(runtime, lora_dir):
    spec = spec_of("euler")
    tagged = runtime(request(prompt=PROMPT + " <lora:ink:0.5>"), spec)["images"]
    assert np.abs(tagged - runtime(request(), spec)["images"]).max() > VISIBLE
    traces = runtime.traces
    loaded = runtime.adapters_for(request(prompt=PROMPT + " <lora:ink:0.5>"))
    assert [(w.adapter.name, w.unet, w.text_encoder) for w in loaded] == [("ink", 0.5, 0.5)]
    assert loaded[0].adapter.source == str(lora_dir / "styles" / "ink.safetensors")
    # The same factors built here from the file's tensors, the same entry by name, by path.
    in_memory = same_lora_in_memory(kohya_tensors(0))
    for adapters in ([Weighted(in_memory, 0.5, 0.5)], [("ink", 0.5)],
                     [(str(lora_dir / "styles" / "ink.safetensors"), 0.5, 0.5)]):
        np.testing.assert_allclose(runtime(request(adapters), spec)["images"], tagged,
                                   atol=1e-6, rtol=0, err_msg=str(adapters))
    # Another weight in the tag: the same program.
    other = runtime(request(prompt=PROMPT + " <lora:ink:1:unet=0.2>"), spec)["images"]
    assert runtime.traces == traces and np.abs(other - tagged).max() > VISIBLE


def test_generate_cli_draws_with_tags_and_records_loras_and_hashes(lora_dir, tmp_path):
    path = lora_dir / "styles" / "ink.safetensors"
    data = path.read_bytes()
    webui_hash = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]
    result = run_python("-m", "experiments.generate", "--model=random:tiny", "--height=32",
                        "--width=32", "--config.steps=2", "--config.progress=false",
                        "--config.compilation_cache=", f"--out_dir={tmp_path}",
                        f"--lora_dir={lora_dir}", "--lora=ink:0.25:0", "--lora_mode=merged",
                        "--prompt=a red circle <lora:ink:0.5>", "--num_images=2")
    assert result.returncode == 0, result.stderr[-3000:]
    from sdjax import images as images_lib

    text = images_lib.read_parameters(tmp_path / "00001-1.png")
    assert text.startswith("a red circle <lora:ink:0.5>\n")
    assert ('Lora weights: "ink: unet=0.25 te=0, ink: unet=0.5 te=0.5", '
            f'Lora hashes: "ink: {webui_hash}, ink: {webui_hash}", Lora mode: merged') in text
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["loras"], config["lora_mode"], config["lora_dir"]) == (
        ["ink:0.25:0"], "merged", str(lora_dir))


def test_prompt_file_runs_record_loras_and_refuse_images_of_a_changed_lora_file(
        tiny_model, lora_dir, tmp_path):
    import shutil

    from safetensors.numpy import save_file

    from sdjax import images as images_lib
    from sdjax.sampling import batches

    folder = tmp_path / "loras"
    shutil.copytree(lora_dir, folder)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(line) for line in [
        {"prompt": "a red circle <lora:ink:0.5>"},
        {"prompt": "a red circle", "loras": ["ink:0.5"]},
        {"prompt": "a red circle"},
    ]) + "\n")
    config = _config()
    config.height = config.width = SIZE
    config.steps, config.sampler, config.num_images, config.seed = 2, "euler", 1, 3
    config.lora_dir, config.compilation_cache, config.progress = str(folder), "", False
    config.out_dir = str(tmp_path / "out")
    stats = batches.sample_to_dir(config, prompts, model=tiny_model)
    assert stats["written"] == 3
    records = {r["prompt_index"]: r for r in batches.read_manifest(config.out_dir)}
    ink = str(folder / "styles" / "ink.safetensors")
    data = open(ink, "rb").read()
    webui_hash = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]
    for index in (0, 1):
        assert records[index]["loras"] == [{"name": "ink", "unet": 0.5, "te": 0.5,
                                            "hash": webui_hash}]
    assert "loras" not in records[2]
    assert 'Lora hashes: "ink: ' in images_lib.read_parameters(
        tmp_path / "out" / records[0]["path"])
    # Retrained LoRA file under the same name: its old images are not this run's.
    save_file(kohya_tensors(5), ink)
    with pytest.raises(ValueError, match="drawn from other prompt-file lines.*loras"):
        batches.sample_to_dir(config, prompts, model=tiny_model)


def test_ablation_sweeps_the_lora_weight_without_recompiling(runtime, tmp_path):
    from configs import ablate as ablate_config
    from sdjax.evaluation import ablation

    config = ablate_config.get_config("tiny")
    with config.unlocked():
        config.samplers, config.steps, config.cfg_scales, config.variants = (
            ("euler",), (2,), (5.0,), ("cfg",))
        config.num_prompts, config.num_seeds, config.height, config.width = 1, 2, SIZE, SIZE
        config.loras, config.lora_weights = ("ink",), (0.0, 0.5, 1.5)
        config.grid.x, config.grid.y = "lora_weight", "sampler"
        config.out_dir, config.compilation_cache = str(tmp_path), ""
    result = ablation.run_sweep(config, generator=runtime)
    assert result["programs"] == 1 and result["traces"] == 1
    assert [r["lora_weight"] for r in result["rows"]] == [0.0, 0.5, 1.5]
    assert result["columns"][:5] == ["sampler", "steps", "variant", "cfg_scale", "lora_weight"]
    records = ablation.read_records(str(tmp_path))
    images = [ablation._load_images(str(tmp_path), r) for r in records]
    assert all(np.abs(a.astype(int) - b.astype(int)).max() > 2 for a, b in zip(images, images[1:]))
    (grid,) = result["grids"]
    assert grid["col_labels"] == ["LoRA 0", "LoRA 0.5", "LoRA 1.5"]
    from sdjax import images as images_lib

    text = images_lib.read_parameters(tmp_path / records[1]["files"][0])
    assert 'Lora weights: "ink: unet=0.5 te=0.5"' in text
    # A restart with more weights draws only the new ones, in the same program.
    with config.unlocked():
        config.lora_weights = (0.0, 0.5, 1.5, 3.0)
    again = ablation.run_sweep(config, generator=runtime)
    assert again["generated"] == 1 and again["skipped"] == 3 and again["traces"] == 0


def test_embeddings_dir_adds_the_folders_tokens_to_the_loaded_model(tmp_path):
    from safetensors.numpy import save_file

    save_file({"emb_params": np.random.default_rng(0).normal(size=(2, 32)).astype(np.float32)},
              str(tmp_path / "inkstyle.safetensors"))
    plain = generate.load_model(_config_with(model="random:tiny"))
    model = generate.load_model(_config_with(model="random:tiny", embeddings_dir=str(tmp_path)))
    vocabulary = plain.text_configs[0].vocab_size
    assert model.text_configs[0].vocab_size == vocabulary + 2
    # The file's name is its token, two vectors: the two ids after the vocabulary.
    assert list(model.tokenizers[0].encode("an inkstyle cat"))[1:3] == [vocabulary, vocabulary + 1]


def _config_with(**fields):
    config = _config()
    for name, value in fields.items():
        setattr(config, name, value)
    return config
