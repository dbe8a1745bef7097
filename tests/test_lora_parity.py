"""Adapters against diffusers / peft: files loaded by `sdjax.adapters.formats.load_adapter` and by
diffusers' `load_lora_weights` (or made by peft itself), the same U-Net / text-encoder inputs, both
of sdjax's ways to apply them (run-time collection and merged kernels).

Agreement is max |sdjax - reference| / max |reference| <= 1e-5, and each adapter must move the
reference output by more than 1% (relative), so the bound cannot pass with the adapter dropped.
The reference models have TinySD's architectures (conftest) with fan-in-scaled random weights
(test_sampling.randomise): with TinySD's own N(0, 1) weights the two implementations already
differ by ~1e-3 without any adapter, and a 1e-5 bound could not tell a wrong adapter from float
noise. kohya files given to diffusers use one alpha for every module (diffusers replaces differing
ones by the most common; test_adapter_formats checks sdjax keeps each module's own).

Run with `-s` to see each case's errors."""
from __future__ import annotations

import copy
import dataclasses

import jax
import numpy as np
import pytest

import diffusers
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from diffusers.utils import convert_state_dict_to_diffusers
from safetensors import safe_open
from safetensors.numpy import save_file

import sdjax
from benchmarks.checkpoints import save_diffusers_folder
from sdjax.adapters import network
from sdjax.adapters.formats import load_adapter, save_adapter
from sdjax.adapters.names import layer_names
from sdjax.adapters.network import LowRank, Weighted
from sdjax.models.clip import CLIPTextModel
from sdjax.models.layers import model_variables
from sdjax.models.unet import UNet
from sdjax.sampling import Generator, Request, SamplingSpec
from tests.test_sampling import (IMAGE, PROMPT, SD_SCHEDULER, STEPS, randomise, sd1_parts,
                                 seeded_noise, unit)
from tests.helpers import to_nchw

TOLERANCE = 1e-5
MIN_EFFECT = 1e-2
RNG = np.random.default_rng(7)

# SD 1.x layers adapted by every U-Net case (diffusers name, rank): attention and feed-forward
# linears, SD 1.x's 1x1-conv proj_in / proj_out (dense in sdjax), 3x3 resnet convs (LoCon), a
# 1x1 shortcut, the time projection, a strided downsampler, an upsampler and conv_in.
SD1_UNET = [
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 4),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", 2),
    ("down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0", 4),
    ("down_blocks.1.attentions.1.transformer_blocks.0.ff.net.0.proj", 4),
    ("mid_block.attentions.0.transformer_blocks.0.ff.net.2", 2),
    ("mid_block.attentions.0.transformer_blocks.0.attn2.to_v", 4),
    ("down_blocks.0.attentions.0.proj_in", 2),
    ("up_blocks.1.attentions.2.proj_out", 4),
    ("down_blocks.0.resnets.0.conv1", 2),
    ("up_blocks.0.resnets.1.conv2", 4),
    ("up_blocks.1.resnets.1.conv_shortcut", 2),
    ("down_blocks.1.resnets.0.time_emb_proj", 4),
    ("down_blocks.0.downsamplers.0.conv", 2),
    ("up_blocks.0.upsamplers.0.conv", 4),
    ("conv_in", 2),
]
SD1_TEXT = [("text_model.encoder.layers.0.self_attn.q_proj", 2),
            ("text_model.encoder.layers.1.mlp.fc1", 4),
            ("text_model.encoder.layers.0.self_attn.out_proj", 2),
            ("text_model.encoder.layers.1.mlp.fc2", 2)]
# SDXL, original LDM names as kohya writes them for SDXL (level 1 has two transformer blocks).
SDXL_UNET = [("input_blocks.4.1.transformer_blocks.0.attn1.to_q", 4),
             ("input_blocks.5.1.transformer_blocks.1.attn2.to_k", 2),
             ("input_blocks.4.1.proj_in", 2),
             ("middle_block.1.transformer_blocks.1.ff.net.2", 4),
             ("output_blocks.1.1.transformer_blocks.0.attn1.to_out.0", 2),
             ("output_blocks.0.0.in_layers.2", 2),
             ("output_blocks.4.0.skip_connection", 2),
             ("input_blocks.1.0.emb_layers.1", 4),
             ("input_blocks.3.0.op", 2),
             ("output_blocks.2.2.conv", 2),
             ("label_emb.0.0", 2)]
# Each encoder's set holds an out_proj: diffusers 0.42 tells kohya's text-encoder spellings apart
# by `to_out_lora` alone, and without one it drops q/k/v LoRAs beside mlp ones (UNEXPECTED keys).
SDXL_TEXT = [("lora_te1_", "text_model.encoder.layers.0.self_attn.k_proj", 2),
             ("lora_te1_", "text_model.encoder.layers.0.self_attn.out_proj", 2),
             ("lora_te1_", "text_model.encoder.layers.1.mlp.fc1", 4),
             ("lora_te2_", "text_model.encoder.layers.1.self_attn.v_proj", 2),
             ("lora_te2_", "text_model.encoder.layers.1.self_attn.out_proj", 4),
             ("lora_te2_", "text_model.encoder.layers.0.mlp.fc2", 4)]


def relative(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def assert_parity(case: str, theirs_base, theirs, **ours) -> None:
    effect = relative(theirs, theirs_base)
    errors = {mode: relative(out, theirs) for mode, out in ours.items()}
    print(f"\n{case}: adapter effect {effect:.2e}, "
          + ", ".join(f"{mode} error {err:.1e}" for mode, err in errors.items()))
    assert effect > MIN_EFFECT, f"{case}: the adapter barely changes the output ({effect:.1e})"
    for mode, err in errors.items():
        assert err <= TOLERANCE, f"{case} ({mode}): relative error {err:.2e}"


# --- reference models ------------------------------------------------------------------------------

@dataclasses.dataclass
class Reference:
    family: str
    folder: object
    model: object               # the sdjax Pretrained of the same folder
    unet_args: tuple            # torch inputs of the U-Net
    jax_unet: object            # params -> output (NHWC), jitted once
    ids: np.ndarray             # token ids for the text encoders
    jax_text: dict              # encoder name -> params -> last hidden state, jitted once

    def pipeline(self):
        """A fresh diffusers pipeline over the folder (load_lora_weights changes its models)."""
        if self.family == "sdxl":
            pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(self.folder)
        else:
            pipe = diffusers.StableDiffusionPipeline.from_pretrained(
                self.folder, safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def torch_unet(self, unet) -> np.ndarray:
        with torch.no_grad():
            return unet(*self.unet_args[:3], added_cond_kwargs=self.unet_args[3]).sample.numpy() \
                .transpose(0, 2, 3, 1)

    def torch_text(self, encoder) -> np.ndarray:
        with torch.no_grad():
            return encoder(torch.from_numpy(self.ids)).last_hidden_state.numpy()

    def outputs(self, params) -> dict:
        """sdjax's U-Net and text-encoder outputs under `params`."""
        out = {"unet": np.asarray(self.jax_unet(params))}
        out.update({name: np.asarray(run(params)) for name, run in self.jax_text.items()})
        return out

    def check(self, case: str, adapter: network.Adapter, reference: dict, base: dict) -> None:
        """sdjax's outputs with `adapter` (run time and merged) against the reference outputs."""
        weighted = [Weighted(adapter)]
        runtime = self.outputs(network.with_runtime_adapters(self.model.params, weighted))
        merged = self.outputs(network.merge(self.model.params, weighted))
        for part, theirs in reference.items():
            assert_parity(f"{case} {part}", base[part], theirs, runtime=runtime[part],
                          merged=merged[part])


@pytest.fixture(scope="module")
def references(tiny_sd, tmp_path_factory):
    cache = {}

    def get(family: str) -> Reference:
        if family not in cache:
            parts = {name: randomise(copy.deepcopy(part), seed)
                     for seed, (name, part) in enumerate(tiny_sd.parts(family).items())}
            folder = save_diffusers_folder(
                parts, tmp_path_factory.mktemp(f"lora-{family}"), scheduler=SD_SCHEDULER,
                pipeline_class="StableDiffusionXLPipeline" if family == "sdxl" else
                "StableDiffusionPipeline")
            model = sdjax.load_pretrained(folder)
            config = parts["unet"].config
            x = RNG.standard_normal((2, 8, 8, 4)).astype(np.float32)
            t = np.array([999, 37])
            context = RNG.standard_normal((2, 5, config.cross_attention_dim)).astype(np.float32)
            added = None
            if config.addition_embed_type == "text_time":
                text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
                added = {"text_embeds": RNG.standard_normal((2, text_dim)).astype(np.float32),
                         "time_ids": np.tile(np.float32([32, 32, 0, 0, 32, 32]), (2, 1))}
            unet = UNet(model.unet_config)
            jax_unet = jax.jit(lambda p: unet.apply(model_variables(p, "unet"), x, t, context, added))
            ids = RNG.integers(0, 1000, (2, 12))
            jax_text = {}
            for index, name in enumerate(model.text_encoder_names):
                text = CLIPTextModel(model.text_configs[index])
                jax_text[name] = jax.jit(lambda p, text=text, name=name: text.apply(
                    model_variables(p, name), ids).last_hidden_state)
            torch_args = (to_nchw(x), torch.from_numpy(t), torch.from_numpy(context),
                          None if added is None else {k: torch.from_numpy(v) for k, v in added.items()})
            cache[family] = Reference(family, folder, model, torch_args, jax_unet, ids, jax_text)
        return cache[family]

    return get


def reference_outputs(ref: Reference, pipe) -> dict:
    out = {"unet": ref.torch_unet(pipe.unet), "text_encoder": ref.torch_text(pipe.text_encoder)}
    if ref.family == "sdxl":
        out["text_encoder_2"] = ref.torch_text(pipe.text_encoder_2)
    return out


@pytest.fixture(scope="module")
def base_outputs(references):
    cache = {}

    def get(family: str) -> dict:
        if family not in cache:
            ref = references(family)
            cache[family] = reference_outputs(ref, ref.pipeline())
            ours = ref.outputs(ref.model.params)
            for part, theirs in cache[family].items():  # the models agree before any adapter
                assert relative(ours[part], theirs) <= TOLERANCE, part
        return cache[family]

    return get


# --- kohya files -----------------------------------------------------------------------------------

def kohya_tensors(prefix: str, weight: np.ndarray, rank: int, alpha: float) -> dict:
    """A random kohya module for a PyTorch weight: LoCon factors for convs, whose delta is a few
    percent of the weight (down ~ 1/sqrt(fan in), up ~ 1/sqrt(rank))."""
    out_features, fan_in = weight.shape[0], int(np.prod(weight.shape[1:]))
    kernel = weight.shape[2:]
    down = RNG.standard_normal((rank, weight.shape[1]) + kernel) / np.sqrt(fan_in)
    up = 0.3 * RNG.standard_normal((out_features, rank) + (1,) * len(kernel)) / np.sqrt(rank)
    return {f"{prefix}.lora_down.weight": down.astype(np.float32),
            f"{prefix}.lora_up.weight": up.astype(np.float32),
            f"{prefix}.alpha": np.asarray(alpha, np.float32)}


def diffusers_weight(model, name: str) -> np.ndarray:
    """The PyTorch weight of a reference module; text names as transformers 4 writes them
    (`text_model.encoder...`), which transformers 5 keeps for CLIPTextModelWithProjection only."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = model.get_submodule(name.removeprefix("text_model."))
    return module.weight.detach().numpy()


@pytest.fixture(scope="module")
def sd1_kohya_file(references, tmp_path_factory):
    """A kohya file (diffusers-style names, one alpha) for SD1_UNET and SD1_TEXT."""
    ref = references("sd1")
    pipe = ref.pipeline()
    tensors = {}
    for name, rank in SD1_UNET:
        tensors.update(kohya_tensors("lora_unet_" + name.replace(".", "_"),
                                     diffusers_weight(pipe.unet, name), rank, alpha=3.0))
    for name, rank in SD1_TEXT:
        tensors.update(kohya_tensors("lora_te_" + name.replace(".", "_"),
                                     diffusers_weight(pipe.text_encoder, name), rank, alpha=3.0))
    path = tmp_path_factory.mktemp("kohya") / "sd1-kohya.safetensors"
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


def test_kohya_lora_and_locon_match_diffusers_on_unet_and_text_encoder(references, base_outputs,
                                                                      sd1_kohya_file):
    """(a) and (b): U-Net (LoRA + LoCon) and text encoder (lora_te_) of one kohya file."""
    ref = references("sd1")
    pipe = ref.pipeline()
    pipe.load_lora_weights(str(sd1_kohya_file.parent), weight_name=sd1_kohya_file.name)
    adapter = load_adapter(sd1_kohya_file, ref.model)
    assert len(adapter.modules["unet"]) == len(SD1_UNET)
    assert len(adapter.modules["text_encoder"]) == len(SD1_TEXT)
    ref.check("kohya sd1", adapter, reference_outputs(ref, pipe), base_outputs("sd1"))


def test_sdxl_kohya_file_with_ldm_names_matches_diffusers(references, base_outputs, tmp_path):
    """(e): original LDM names for the U-Net, lora_te1_ / lora_te2_ for the two text encoders."""
    ref = references("sdxl")
    pipe = ref.pipeline()
    names = layer_names(ref.model.params, ref.model.unet_config)
    tensors = {}
    for name, rank in SDXL_UNET:
        diffusers_name = names.reference["unet"][names.find("unet", name)]
        tensors.update(kohya_tensors("lora_unet_" + name.replace(".", "_"),
                                     diffusers_weight(pipe.unet, diffusers_name), rank, 2.0))
    for prefix, name, rank in SDXL_TEXT:
        encoder = pipe.text_encoder if prefix == "lora_te1_" else pipe.text_encoder_2
        tensors.update(kohya_tensors(prefix + name.replace(".", "_"),
                                     diffusers_weight(encoder, name), rank, 2.0))
    path = tmp_path / "sdxl-kohya.safetensors"
    save_file(tensors, str(path))
    pipe.load_lora_weights(str(tmp_path), weight_name=path.name)
    adapter = load_adapter(path, ref.model)
    assert {m: len(v) for m, v in adapter.modules.items()} == {
        "unet": len(SDXL_UNET), "text_encoder": 3, "text_encoder_2": 3}
    ref.check("kohya sdxl (LDM names)", adapter, reference_outputs(ref, pipe), base_outputs("sdxl"))


# --- peft / diffusers files ------------------------------------------------------------------------

def test_peft_lora_saved_by_diffusers_matches_the_peft_model(references, base_outputs, tmp_path):
    """(c): a peft-wrapped reference U-Net and text encoder (r != lora_alpha, per-module ranks and
    alphas, rsLoRA on the text encoder), saved with diffusers' save_lora_weights and its adapter
    metadata; without the metadata a loader would be off by alpha / r."""
    ref = references("sd1")
    pipe = ref.pipeline()
    unet_config = LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False,
        target_modules=[name for name, _ in SD1_UNET],
        rank_pattern={name: rank for name, rank in SD1_UNET if rank != 4},
        alpha_pattern={"down_blocks.0.resnets.0.conv1": 5, "mid_block.attentions.0."
                       "transformer_blocks.0.ff.net.2": 1})
    text_config = LoraConfig(r=2, lora_alpha=6, use_rslora=True, init_lora_weights=False,
                             target_modules=[name.removeprefix("text_model.") for name, _ in SD1_TEXT],
                             rank_pattern={"layers.1.mlp.fc1": 4})
    pipe.unet.add_adapter(unet_config)
    # transformers' own add_adapter wants peft >= 0.22, which pip does not have yet.
    inject_adapter_in_model(text_config, pipe.text_encoder)
    theirs = reference_outputs(ref, pipe)
    folder = tmp_path / "peft-lora"
    diffusers.StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        # the diffusers training scripts' spelling for the text encoder (lora_linear_layer)
        text_encoder_lora_layers=convert_state_dict_to_diffusers(
            get_peft_model_state_dict(pipe.text_encoder)),
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=text_config.to_dict())
    adapter = load_adapter(folder, ref.model)
    assert adapter.name == "peft-lora" and "lora_adapter_metadata" in adapter.metadata
    assert len(adapter.modules["unet"]) == len(SD1_UNET)
    assert adapter.modules["unet"]["down_blocks_0/resnets_0/conv1"].scale == 5 / 2
    ref.check("peft sd1", adapter, theirs, base_outputs("sd1"))


# --- sdjax's kohya writer --------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_kohya_file_written_by_sdjax_loads_in_diffusers(references, base_outputs, tmp_path, family):
    """(f): a random Adapter (sdjax layouts, one alpha for diffusers' sake, ranks per layer)
    written by save_adapter(format="kohya") and loaded by diffusers reproduces sdjax's outputs
    (SDXL's U-Net layers under the original LDM names, as kohya writes them)."""
    ref = references(family)
    names = layer_names(ref.model.params, ref.model.unet_config)
    if family == "sd1":
        targets = [("unet", n, r) for n, r in SD1_UNET] + [("text_encoder", n, r) for n, r in SD1_TEXT]
    else:
        encoders = {"lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
        targets = [("unet", n, r) for n, r in SDXL_UNET] + [
            (encoders[prefix], n, r) for prefix, n, r in SDXL_TEXT]
    modules = {}
    for model, name, rank in targets:
        path = names.find(model, name)
        shape = network.kernel_shapes(ref.model.params, model)[path]
        fan_in = int(np.prod(shape[:-1]))
        down = RNG.standard_normal(shape[:-1] + (rank,)) / np.sqrt(fan_in)
        up = 0.3 * RNG.standard_normal((rank, shape[-1])) / np.sqrt(rank)
        modules.setdefault(model, {})[path] = LowRank(down.astype(np.float32),
                                                      up.astype(np.float32), 1.5)
    adapter = network.Adapter("written", modules)
    path = save_adapter(tmp_path / "written.safetensors", adapter, ref.model,
                        metadata={"ss_network_dim": "4"})
    if family == "sdxl":
        with safe_open(str(path), "np") as f:
            assert any(k.startswith("lora_unet_input_blocks_") for k in f.keys())
    pipe = ref.pipeline()
    pipe.load_lora_weights(str(tmp_path), weight_name=path.name)
    ref.check(f"sdjax-written kohya {family}", adapter, reference_outputs(ref, pipe),
              base_outputs(family))


# --- a whole pipeline ------------------------------------------------------------------------------

def test_pipeline_with_a_lora_at_weight_0_7_matches_diffusers(tmp_path):
    """(d): txt2img (DDIM, CFG 7.5, test_sampling's fixed initial latents) with a kohya LoRA on
    U-Net and text encoder at weight 0.7 (diffusers: cross_attention_kwargs scale, which scales
    the text encoder's LoRA too), final images compared; sdjax's Generator runs on params
    carrying the adapter (run time) and on merged params."""
    parts = sd1_parts()
    folder = save_diffusers_folder(parts, tmp_path / "sd1", scheduler=SD_SCHEDULER)
    tensors = {}
    for name in ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
                 "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                 "up_blocks.1.attentions.0.proj_out", "down_blocks.0.resnets.0.conv2",
                 "mid_block.resnets.1.conv1"):
        tensors.update(kohya_tensors("lora_unet_" + name.replace(".", "_"),
                                     diffusers_weight(parts["unet"], name), 4, 2.0))
    for name in ("text_model.encoder.layers.0.self_attn.v_proj",  # with an out_proj: see SDXL_TEXT
                 "text_model.encoder.layers.0.self_attn.out_proj", "text_model.encoder.layers.1.mlp.fc2"):
        tensors.update(kohya_tensors("lora_te_" + name.replace(".", "_"),
                                     diffusers_weight(parts["text_encoder"], name), 4, 2.0))
    lora = tmp_path / "style.safetensors"
    save_file(tensors, str(lora))

    seed, scale, weight = 5, 7.5, 0.7
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    run = dict(guidance_scale=scale, num_inference_steps=STEPS, height=IMAGE, width=IMAGE,
               latents=to_nchw(seeded_noise(seed)), output_type="np")
    base = pipe(PROMPT, **run).images
    pipe.load_lora_weights(str(tmp_path), weight_name=lora.name)
    theirs = pipe(PROMPT, cross_attention_kwargs={"scale": weight}, **run).images

    model = sdjax.load_pretrained(folder)
    weighted = [Weighted(load_adapter(lora, model), unet=weight, text_encoder=weight)]
    spec = SamplingSpec(sampler="ddim", steps=STEPS, height=IMAGE, width=IMAGE)
    ours = {}
    for mode, params in (("runtime", network.with_runtime_adapters(model.params, weighted)),
                         ("merged", network.merge(model.params, weighted))):
        generator = Generator(dataclasses.replace(model, params=params), exported_programs=False)
        ours[mode] = unit(generator(Request(PROMPT, seed=seed, cfg_scale=scale), spec)["images"])
    assert_parity("pipeline sd1 weight 0.7", base, theirs, **ours)
