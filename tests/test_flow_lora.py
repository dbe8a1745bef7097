"""SD3 and Flux LoRAs against diffusers / peft: a peft LoRA on diffusers' transformer and CLIP
encoders, saved with the pipeline's `save_lora_weights` and read back by its `load_lora_weights`
and by `sdjax.adapters.formats.load_adapter`; kohya's Flux files (the original model's names, fused
q/k/v and linear1) against diffusers' own conversion of them; both of sdjax's ways to apply them.

Agreement is max |sdjax - reference| / max |reference| <= 1e-5 (whole pipelines: relative L2 of the
images, as tests/test_flow_pipeline.py), and each LoRA must move the reference by more than 1%, so
the bound cannot pass with the LoRA dropped. Run with `-s` to see each case's errors."""
from __future__ import annotations

import dataclasses
import shutil

import jax
import numpy as np
import pytest
import torch
from flax import traverse_util

from sdjax.adapters import network
from sdjax.adapters.formats import load_adapter, save_adapter
from sdjax.adapters.names import layer_names
from sdjax.adapters.network import AdapterError, Weighted
from sdjax.models.clip import CLIPTextModel
from sdjax.models.layers import model_variables
from sdjax.sampling.generator import Generator
from sdjax.sampling.program import transformer_fn
from sdjax.sampling.requests import Request
from sdjax.sampling.spec import SamplingSpec
from sdjax.weights import flux as flux_weights
from sdjax.weights.architecture import Architecture
from sdjax.weights.pretrained import load_pretrained
from tests import flow_models
from tests.helpers import to_nchw, to_nhwc
from tests.single_file_writer import flux_to_original
from tests.test_lora_parity import MIN_EFFECT, TOLERANCE, assert_parity, relative

LATENT = (8, 8, 16)
GUIDANCE = 2.5  # Flux-dev's embedded guidance
# peft targets (a module whose name ends in one): every linear of the transformers (SD3's patch
# embedding conv too), with other ranks and alphas on some.
COMMON_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                  "to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                  "ff_context.net.2", "norm1.linear", "norm1_context.linear", "proj_out",
                  "context_embedder", "norm_out.linear", "linear_1", "linear_2"]
TRANSFORMER_TARGETS = {"sd3": COMMON_TARGETS + ["pos_embed.proj"],
                       "flux": COMMON_TARGETS + ["norm.linear", "proj_mlp", "x_embedder"]}
RANK_PATTERNS = {"sd3": {"to_k": 2, "pos_embed.proj": 2}, "flux": {"proj_mlp": 2, "x_embedder": 6}}
ALPHA_PATTERNS = {"sd3": {"ff.net.2": 1.5}, "flux": {"to_v": 3.0}}
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def assert_outputs_parity(case: str, base: dict, theirs: dict, **ours: dict) -> None:
    """Each output of `theirs` (the reference with the LoRA) moved from `base` and matched by
    every mode's outputs in `ours`."""
    for part, reference in theirs.items():
        assert_parity(f"{case} {part}", base[part], reference,
                      **{mode: out[part] for mode, out in ours.items()})


# --- the models and their outputs ------------------------------------------------------------------

@dataclasses.dataclass
class Flow:
    family: str
    folder: object
    model: object                # the sdjax Pretrained of the folder
    inputs: dict                 # transformer inputs (numpy, NHWC latents) and CLIP token ids
    ours: object                 # params -> {output name: array}, jitted once
    encoders: tuple[str, ...]    # the CLIP encoders (Flux's T5 is never adapted)

    def pipeline(self):
        """A fresh diffusers pipeline (load_lora_weights changes its models)."""
        return flow_models.reference_pipeline(self.family, self.folder)

    def theirs(self, pipe, scale: float = 1.0) -> dict:
        """The reference's outputs: the transformer's velocity (NHWC; its LoRA at `scale`) and
        each CLIP encoder's last hidden state."""
        x, t = to_nchw(self.inputs["x"]), torch.from_numpy(self.inputs["t"])
        context = torch.from_numpy(self.inputs["context"])
        pooled = torch.from_numpy(self.inputs["pooled"])
        kwargs = {"joint_attention_kwargs": {"scale": scale}}
        with torch.no_grad():
            if self.family == "sd3":
                velocity = pipe.transformer(hidden_states=x, timestep=t,
                                            encoder_hidden_states=context,
                                            pooled_projections=pooled, **kwargs).sample
            else:
                b, c, h, w = x.shape
                packed = pipe._pack_latents(x, b, c, h, w)
                image_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
                out = pipe.transformer(hidden_states=packed, timestep=t / 1000,
                                       guidance=torch.full((b,), GUIDANCE),
                                       encoder_hidden_states=context, pooled_projections=pooled,
                                       txt_ids=torch.zeros(context.shape[1], 3), img_ids=image_ids,
                                       **kwargs).sample
                velocity = pipe._unpack_latents(out, h * pipe.vae_scale_factor,
                                                w * pipe.vae_scale_factor, pipe.vae_scale_factor)
            outputs = {"transformer": to_nhwc(velocity)}
            for name in self.encoders:
                ids = torch.from_numpy(np.asarray(self.inputs["ids"], np.int64))
                outputs[name] = getattr(pipe, name)(ids).last_hidden_state.numpy()
        return outputs

    def runtime_and_merged(self, adapter: network.Adapter, **weights) -> dict:
        weighted = [Weighted(adapter, **weights)]
        return {"runtime": self.ours(network.with_runtime_adapters(self.model.params, weighted)),
                "merged": self.ours(network.merge(self.model.params, weighted))}


def _build_flow(family: str, root) -> Flow:
    folder = flow_models.save_folder(family, root)
    model = load_pretrained(folder)
    arch = Architecture.of(model)
    rng = np.random.default_rng(1)
    config = arch.transformer
    inputs = {"x": rng.standard_normal((2,) + LATENT).astype(np.float32),
              "t": np.array([250.0, 800.0], np.float32),
              "context": rng.standard_normal((2, 12, config.joint_attention_dim))
              .astype(np.float32),
              "pooled": rng.standard_normal((2, config.pooled_projection_dim)).astype(np.float32),
              "ids": np.asarray(model.tokenizers[0](["a red cat on a mat"]))}
    encoders = ("text_encoder", "text_encoder_2") if family == "sd3" else ("text_encoder",)
    texts = {name: CLIPTextModel(arch.text_encoders[i]) for i, name in enumerate(encoders)}
    conditioning = {"context": inputs["context"], "pooled": inputs["pooled"],
                    "guidance": np.full((2,), GUIDANCE, np.float32)}

    @jax.jit
    def ours(params):
        out = {"transformer": transformer_fn(arch, params)(inputs["x"], inputs["t"], conditioning)}
        for name, text in texts.items():
            out[name] = text.apply(model_variables(params, name), inputs["ids"]).last_hidden_state
        return out

    return Flow(family, folder, model, inputs, lambda p: jax.tree.map(np.asarray, ours(p)),
                encoders)


@pytest.fixture(scope="module")
def flows(tmp_path_factory):
    cache = {}

    def get(family: str) -> Flow:
        if family not in cache:
            flow = _build_flow(family, tmp_path_factory.mktemp(family))
            base = flow.theirs(flow.pipeline())
            for part, theirs in base.items():  # the models agree before any LoRA
                assert relative(flow.ours(flow.model.params)[part], theirs) <= TOLERANCE, part
            cache[family] = (flow, base)
        return cache[family]

    return get


def _randomise_lora_b(module, seed: int) -> None:
    """peft's lora_B starts at zero: random B makes a LoRA that changes the model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(0.08 * torch.randn(p.shape, generator=generator) / p.shape[1] ** 0.5)


@pytest.fixture(scope="module")
def peft_loras(flows, tmp_path_factory):
    """family -> (flow, base outputs, the LoRA folder save_lora_weights wrote, the outputs of a
    pipeline that loaded it, that pipeline): a peft LoRA on diffusers' transformer (per-module
    ranks and alphas) and CLIP encoders (SD3's second with rsLoRA), with the adapter metadata
    diffusers writes."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    cache = {}

    def get(family: str):
        if family in cache:
            return cache[family]
        flow, base = flows(family)
        pipe = flow.pipeline()
        torch.manual_seed(0)
        configs = {"transformer": LoraConfig(
            r=4, lora_alpha=8, target_modules=TRANSFORMER_TARGETS[family],
            rank_pattern=RANK_PATTERNS[family], alpha_pattern=ALPHA_PATTERNS[family])}
        pipe.transformer.add_adapter(configs["transformer"])
        for index, name in enumerate(flow.encoders):
            configs[name] = LoraConfig(r=2, lora_alpha=6, use_rslora=index == 1,
                                       target_modules=TEXT_TARGETS, rank_pattern={"fc1": 4})
            # transformers' own add_adapter wants peft >= 0.22, which pip does not have yet.
            inject_adapter_in_model(configs[name], getattr(pipe, name))
        for seed, name in enumerate(configs):
            _randomise_lora_b(getattr(pipe, name), seed)
        with_peft = flow.theirs(pipe)
        folder = tmp_path_factory.mktemp(f"{family}-lora") / "lora"
        type(pipe).save_lora_weights(
            folder, **{f"{name}_lora_layers": get_peft_model_state_dict(getattr(pipe, name))
                       for name in configs},
            **{f"{name}_lora_adapter_metadata": config.to_dict()
               for name, config in configs.items()})
        loaded = flow.pipeline()
        loaded.load_lora_weights(str(folder))
        theirs = flow.theirs(loaded)
        for part, out in theirs.items():  # diffusers' own round trip is exact
            assert relative(out, with_peft[part]) <= 1e-6, part
        cache[family] = (flow, base, folder, theirs, loaded)
        return cache[family]

    return get


# --- diffusers / peft files ------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_peft_lora_saved_by_the_pipeline_matches_diffusers_transformer_and_clip(peft_loras, family):
    flow, base, folder, theirs, _ = peft_loras(family)
    adapter = load_adapter(folder, flow.model)
    assert set(adapter.modules) == {"transformer", *flow.encoders}
    assert adapter.name == "lora" and "lora_adapter_metadata" in adapter.metadata
    assert_outputs_parity(f"peft {family}", base, theirs, **flow.runtime_and_merged(adapter))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_unet_weight_scales_the_transformer_and_the_te_weight_the_clip_encoders(
        peft_loras, family):
    """Weighted(unet=0.5, text_encoder=0): the transformer's LoRA at half strength (diffusers'
    joint_attention_kwargs scale), the text encoders as without the LoRA."""
    flow, base, folder, _, loaded = peft_loras(family)
    adapter = load_adapter(folder, flow.model)
    theirs = flow.theirs(loaded, scale=0.5)
    ours = flow.runtime_and_merged(adapter, unet=0.5, text_encoder=0.0)
    assert_outputs_parity(f"peft {family} at 0.5", base, {"transformer": theirs["transformer"]},
                          **ours)
    for mode, out in ours.items():
        for name in flow.encoders:
            assert relative(out[name], base[name]) <= TOLERANCE, (mode, name)


# --- kohya's Flux files ----------------------------------------------------------------------------

# CLIP layers of kohya's Flux LoRA (`lora_te1_`), beside the transformer's.
KOHYA_TEXT = ["text_model.encoder.layers.0.self_attn.q_proj",
              "text_model.encoder.layers.1.self_attn.out_proj",
              "text_model.encoder.layers.1.mlp.fc1"]


def _flux_lora_factors(pipe) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray, float]]:
    """{(kohya prefix, module name): (down (r, in), up (out, r), alpha)}: a LoRA on every linear of
    the original (BFL) Flux model (`lora_unet_`) and a few CLIP layers (`lora_te1_`), with
    per-module ranks and alphas. The final layer's alphas equal their ranks: diffusers 0.42's
    conversion ignores those two modules' alphas (its "TODO: alphas")."""
    rng = np.random.default_rng(3)
    state = {k: v.numpy() for k, v in pipe.transformer.state_dict().items()}
    shapes = {("lora_unet_", key.removesuffix(".weight")): value.shape
              for key, value in flux_to_original(state).items()
              if key.endswith(".weight") and value.ndim == 2}
    text = pipe.text_encoder
    for name in KOHYA_TEXT:  # transformers 5's CLIPTextModel has no `text_model.` level
        module = text.get_submodule(name if hasattr(text, "text_model") else
                                    name.removeprefix("text_model."))
        shapes[("lora_te1_", name)] = module.weight.shape
    factors = {}
    for index, (key, (out_features, in_features)) in enumerate(sorted(shapes.items())):
        rank = (4, 2, 6)[index % 3]
        alpha = float(rank) if key[1].startswith("final_layer") else (1.0, 3.0, 8.0)[index % 3]
        down = rng.standard_normal((rank, in_features)) / np.sqrt(in_features)
        up = 0.2 * rng.standard_normal((out_features, rank)) / np.sqrt(rank)
        factors[key] = (down.astype(np.float32), up.astype(np.float32), alpha)
    return factors


def _kohya_tensors(factors) -> dict[str, np.ndarray]:
    tensors = {}
    for (prefix, name), (down, up, alpha) in factors.items():
        key = prefix + name.replace(".", "_")
        tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                        f"{key}.alpha": np.asarray(alpha, np.float32)})
    return tensors


@pytest.fixture(scope="module")
def kohya_flux(flows, tmp_path_factory):
    from safetensors.numpy import save_file

    flow, base = flows("flux")
    path = tmp_path_factory.mktemp("kohya-flux") / "kohya-flux.safetensors"
    factors = _flux_lora_factors(flow.pipeline())
    save_file(_kohya_tensors(factors), str(path),
              metadata={"ss_network_module": "networks.lora_flux"})
    return flow, base, path, factors


def test_kohya_flux_lora_merges_into_the_original_layout_as_each_modules_delta(kohya_flux):
    """sdjax's merged params, read back in the original (BFL) layout, are its weights plus each
    module's alpha / rank * up @ down: the fused qkv's and linear1's up factors split exactly onto
    q, k, v (and mlp), the final modulation's halves swapped and back."""
    flow, _, path, factors = kohya_flux
    merged = network.merge(flow.model.params, [Weighted(load_adapter(path, flow.model))])

    def original_layout(params) -> dict:
        flat = traverse_util.flatten_dict(params["transformer"])
        return flux_to_original({flux_weights.diffusers_key("/".join(k)):
                                 np.asarray(v).T if k[-1] == "kernel" else np.asarray(v)
                                 for k, v in flat.items()})

    before, after = original_layout(flow.model.params), original_layout(merged)
    changed = 0
    for key, weight in before.items():
        factor = factors.get(("lora_unet_", key.removesuffix(".weight")))
        if factor is not None and key.endswith(".weight"):
            down, up, alpha = factor
            weight = weight + alpha / down.shape[0] * (up @ down)
            changed += 1
        np.testing.assert_allclose(after[key], weight, rtol=0, atol=1e-6 * np.abs(weight).max(),
                                   err_msg=key)
    assert changed == sum(prefix == "lora_unet_" for prefix, _ in factors)


@pytest.mark.slow  # compiles both modes
def test_kohya_flux_lora_with_original_names_matches_diffusers_conversion(kohya_flux, tmp_path):
    """The file's fused qkv split row-wise, the final modulation's halves swapped, img_in ...
    guidance_in, and lora_te1_ CLIP layers, each module's alpha honoured, against diffusers'
    `_convert_kohya_flux_lora_to_diffusers`, without the single blocks' linear1 (that converter
    hard-codes FLUX.1's widths for it: the test above checks its split). diffusers 0.42's
    `load_lora_weights` drops the converted top-level modules (img_in, txt_in, time_in, vector_in,
    guidance_in, final_layer: its converter leaves them without the `transformer.` prefix), so the
    reference loads the converted state dict with the prefix added."""
    from safetensors.numpy import save_file

    flow, base, _, factors = kohya_flux
    path = tmp_path / "kohya-flux-no-linear1.safetensors"
    save_file(_kohya_tensors({k: v for k, v in factors.items() if not k[1].endswith("linear1")}),
              str(path))
    pipe = flow.pipeline()
    converted = type(pipe).lora_state_dict(str(path))
    converted = {k if k.startswith(("transformer.", "text_encoder.")) else "transformer." + k: v
                 for k, v in converted.items()}
    pipe.load_lora_weights(converted)
    adapter = load_adapter(path, flow.model)
    layers = adapter.modules["transformer"]
    down = layers["transformer_blocks_0/attn/to_q"].down
    assert all(layers[f"transformer_blocks_0/attn/to_{n}"].down is down for n in "kv")
    assert "norm_out/linear" in layers and "x_embedder" in layers
    assert_outputs_parity("kohya flux", base, flow.theirs(pipe), **flow.runtime_and_merged(adapter))


def test_comfyui_and_lora_transformer_spellings_load_the_same_factors(kohya_flux, peft_loras,
                                                                     tmp_path):
    """ComfyUI's `diffusion_model.<original name>.lora_A/B` keys (alpha beside them) give the
    kohya file's factors; `lora_transformer_<diffusers name flattened>` keys (lora_down / lora_up
    and alpha) give the diffusers file's."""
    from safetensors.numpy import save_file

    flow, _, path, factors = kohya_flux
    comfy = {}
    for (prefix, name), (down, up, alpha) in factors.items():
        if prefix == "lora_unet_":
            comfy.update({f"diffusion_model.{name}.lora_A.weight": down,
                          f"diffusion_model.{name}.lora_B.weight": up,
                          f"diffusion_model.{name}.alpha": np.asarray(alpha, np.float32)})
    save_file(comfy, str(tmp_path / "comfy.safetensors"))
    _assert_same_factors(load_adapter(tmp_path / "comfy.safetensors", flow.model),
                         load_adapter(path, flow.model), "transformer")

    _, _, folder, _, _ = peft_loras("flux")
    diffusers_file = load_adapter(folder, flow.model)
    reference = layer_names(flow.model.params, None, "flux").reference["transformer"]
    flattened = {}
    for layer, factor in diffusers_file.modules["transformer"].items():
        key = "lora_transformer_" + reference[layer].replace(".", "_")
        flattened.update({f"{key}.lora_down.weight": factor.down.T,
                          f"{key}.lora_up.weight": factor.up.T,
                          f"{key}.alpha": np.asarray(factor.alpha, np.float32)})
    save_file(flattened, str(tmp_path / "flat.safetensors"))
    _assert_same_factors(load_adapter(tmp_path / "flat.safetensors", flow.model), diffusers_file,
                         "transformer")


def _assert_same_factors(ours: network.Adapter, expected: network.Adapter, model: str) -> None:
    assert set(ours.modules[model]) == set(expected.modules[model])
    for path, factor in expected.modules[model].items():
        np.testing.assert_array_equal(ours.modules[model][path].down, factor.down, err_msg=path)
        np.testing.assert_array_equal(ours.modules[model][path].up, factor.up, err_msg=path)
        assert ours.modules[model][path].alpha == factor.alpha, path


# --- refusals --------------------------------------------------------------------------------------

def _file(tmp_path, name: str, tensors: dict):
    from safetensors.numpy import save_file

    path = tmp_path / f"{name}.safetensors"
    save_file({k: np.asarray(v, np.float32) for k, v in tensors.items()}, str(path))
    return path


def test_unsupported_flow_lora_files_are_refused_naming_file_and_key(flows, tmp_path):
    flux, _ = flows("flux")
    sd3, _ = flows("sd3")
    pair = lambda key, rows, cols, rank=2: {f"{key}.lora_down.weight": np.ones((rank, cols)),
                                            f"{key}.lora_up.weight": np.ones((rows, rank))}
    dim = 32
    cases = [
        # kohya's T5 LoRA (Flux's text_encoder_2 is a T5)
        (flux, "t5", pair("lora_te2_encoder_block_0_layer_0_SelfAttention_q", dim, dim),
         r"lora_te2_encoder_block_0_layer_0_SelfAttention_q\.lora_down\.weight .*T5 encoder"),
        # a fused qkv whose up is two projections wide
        (flux, "narrow", pair("lora_unet_double_blocks_0_img_attn_qkv", 2 * dim, dim),
         r"lora_unet_double_blocks_0_img_attn_qkv\.lora_(up|down)\.weight .*make a kernel of "
         r"\(32, 96\)"),
        # SD3 LoRAs in Stability's original names, which sdjax does not map (nor does diffusers)
        (sd3, "sd3-original", pair("lora_unet_joint_blocks_0_x_block_attn_qkv", 3 * dim, dim),
         r"no layer of transformer is named joint_blocks_0_x_block_attn_qkv"),
        # the fused qkv and diffusers' to_q of one block in one file
        (flux, "twice", {**pair("lora_unet_double_blocks_0_img_attn_qkv", 3 * dim, dim),
                         **pair("transformer.transformer_blocks.0.attn.to_q", dim, dim)},
         r"\.weight adapts transformer layer transformer_blocks_0/attn/to_q, which other keys"),
    ]
    for flow, name, tensors, message in cases:
        with pytest.raises(AdapterError, match=rf"{name}\.safetensors: .*{message}"):
            load_adapter(_file(tmp_path, name, tensors), flow.model)
    # sdjax writes no kohya-format file of a transformer LoRA, only its own
    adapter = network.Adapter("x", {"transformer": {"proj_out": network.LowRank(
        np.ones((dim, 2), np.float32), np.ones((2, 64), np.float32), 2.0)}})
    with pytest.raises(AdapterError, match="no kohya file for the flux transformer"):
        save_adapter(tmp_path / "x.safetensors", adapter, flux.model)
    assert (save_adapter(tmp_path / "x.safetensors", adapter, flux.model, format="sdjax")
            and load_adapter(tmp_path / "x.safetensors", flux.model).modules["transformer"])


# --- whole pipelines -------------------------------------------------------------------------------

# Two steps: this tiny Flux's whole-pipeline runs already differ by 5e-6 to 1.2e-5 from
# diffusers' without a LoRA (float32 rounding, growing with the steps and the guidance).
SIZE, STEPS, TOKENS = 32, 2, 24
PROMPT = "A photo of a red Cat, 4k!"
WEIGHT = 0.7


def _draw(pipe, flow: Flow, noise: np.ndarray, **kwargs) -> np.ndarray:
    """diffusers' pipeline from `noise` (NHWC latents; Flux's packed into 2x2 patches)."""
    latents = to_nchw(noise)
    if flow.family == "flux":
        latents = pipe._pack_latents(latents, *latents.shape)
    with torch.no_grad():
        return pipe(prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                    max_sequence_length=TOKENS, output_type="np", latents=latents,
                    guidance_scale=4.0 if flow.family == "sd3" else GUIDANCE, **kwargs).images


@pytest.mark.parametrize("family, mode", [
    ("flux", "runtime"), pytest.param("flux", "merged", marks=pytest.mark.slow),
    pytest.param("sd3", "runtime", marks=pytest.mark.slow),
    pytest.param("sd3", "merged", marks=pytest.mark.slow)])
def test_pipeline_with_a_peft_lora_matches_diffusers_and_a_new_weight_does_not_retrace(
        flows, peft_loras, tmp_path, family, mode):
    """diffusers with the LoRA at WEIGHT (joint_attention_kwargs, which scales its text encoders'
    LoRA too) against sdjax's Generator from the same latents: at run time through a
    `<lora:...>` tag and `lora_dir`, merged through Request.adapters; then the Generator draws at
    another weight with the program it has."""
    flow = flows(family)[0]
    _, _, folder, _, loaded = peft_loras(family)
    latent = SIZE // 2  # the tiny VAE halves the size
    noise = np.random.default_rng(3).standard_normal(
        (1, latent, latent, flow.model.vae_config.latent_channels)).astype(np.float32)
    reference = _draw(loaded, flow, noise, joint_attention_kwargs={"scale": WEIGHT})
    plain = _draw(flow.pipeline(), flow, noise)

    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    shutil.copy(folder / "pytorch_lora_weights.safetensors", lora_dir / "style.safetensors")
    cfg = 4.0 if family == "sd3" else 1.0
    fields = dict(noise=noise, cfg_scale=cfg,
                  **({} if family == "sd3" else {"embedded_guidance": GUIDANCE}))
    spec = SamplingSpec(sampler="flow_euler", steps=STEPS, height=SIZE, width=SIZE,
                        guidance=cfg != 1.0, max_sequence_length=TOKENS)
    generator = Generator(flow.model, adapter_mode=mode, lora_dir=lora_dir,
                          exported_programs=False)
    lora = lambda weight: (dict(prompt=f"{PROMPT} <lora:style:{weight}>") if mode == "runtime"
                           else dict(prompt=PROMPT, adapters=[(str(folder), weight)]))
    draw = lambda weight: flow_models.to_unit_images(np.asarray(
        generator(Request(**lora(weight), **fields), spec)["images"]))
    ours = draw(WEIGHT)
    traces = generator.traces
    other = draw(0.2)
    assert generator.traces == traces, "a weight change traced the program again"

    l2 = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
    print(f"\npipeline {family} {mode} at {WEIGHT}: effect {l2(reference, plain):.2e}, "
          f"error {l2(ours, reference):.2e}")
    assert l2(reference, plain) > MIN_EFFECT
    assert l2(ours, reference) <= TOLERANCE
    assert l2(other, ours) > 100 * TOLERANCE  # the new weight did something
