"""Test-only: write tiny diffusers / transformers models as original-layout single-file checkpoints.

The inverse of `sdjax.weights.single_file`, written on its own (diffusers name -> original name, one
plain table per format) so the reader is checked against something it does not share code with;
the writer itself is checked against diffusers' own `from_single_file` in the tests.
"""
from __future__ import annotations

import re
from typing import Mapping, Optional

import numpy as np

# diffusers resnet sub-module -> openaimodel ResBlock sub-module
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
VAE_TOP = {"conv_norm_out": "norm_out", "conv_in": "conv_in", "conv_out": "conv_out"}
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
              "conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPEN_CLIP_TOP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                 "text_model.embeddings.position_embedding.weight": "positional_embedding",
                 "text_model.final_layer_norm.weight": "ln_final.weight",
                 "text_model.final_layer_norm.bias": "ln_final.bias"}
OPEN_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1",
                   "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}

# What real ldm checkpoints carry besides parameters (values are irrelevant to the reader).
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                    "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2")


def to_numpy(state_dict: Mapping) -> dict[str, np.ndarray]:
    return {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v))
            for k, v in state_dict.items()}


def unet_to_original(sd: Mapping[str, np.ndarray], layers_per_block: int) -> dict[str, np.ndarray]:
    per_level = layers_per_block + 1
    has_up_attention = {int(k.split(".")[1]) for k in sd if re.match(r"up_blocks\.\d+\.attentions", k)}
    out = {}
    for key, value in sd.items():
        module, param = key.rsplit(".", 1)
        parts = module.split(".")
        if module in UNET_TOP:
            new = UNET_TOP[module]
        elif parts[0] == "down_blocks":
            b = int(parts[1])
            if parts[2] == "resnets":
                new = f"input_blocks.{1 + b * per_level + int(parts[3])}.0.{UNET_RESNET[parts[4]]}"
            elif parts[2] == "attentions":
                new = f"input_blocks.{1 + b * per_level + int(parts[3])}.1." + ".".join(parts[4:])
            else:  # downsamplers.0.conv
                new = f"input_blocks.{(b + 1) * per_level}.0.op"
        elif parts[0] == "mid_block":
            if parts[1] == "resnets":
                new = f"middle_block.{2 * int(parts[2])}.{UNET_RESNET[parts[3]]}"
            else:
                new = "middle_block.1." + ".".join(parts[3:])
        elif parts[0] == "up_blocks":
            b = int(parts[1])
            if parts[2] == "resnets":
                new = f"output_blocks.{b * per_level + int(parts[3])}.0.{UNET_RESNET[parts[4]]}"
            elif parts[2] == "attentions":
                new = f"output_blocks.{b * per_level + int(parts[3])}.1." + ".".join(parts[4:])
            else:  # upsamplers.0.conv: after the level's last resnet (and its attention, if any)
                slot = 2 if b in has_up_attention else 1
                new = f"output_blocks.{b * per_level + layers_per_block}.{slot}.conv"
        else:
            raise KeyError(f"writer has no rule for U-Net key {key}")
        out[f"{new}.{param}"] = value
    return out


def vae_to_original(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("decoder.up_blocks."))
    out = {}
    for key, value in sd.items():
        module, param = key.rsplit(".", 1)
        parts = module.split(".")
        coder = parts[0]
        if parts[0] in ("quant_conv", "post_quant_conv"):
            new = parts[0]
        elif parts[1] in VAE_TOP:
            new = f"{coder}.{VAE_TOP[parts[1]]}"
        elif parts[1] == "down_blocks":
            if parts[3] == "resnets":
                new = f"encoder.down.{parts[2]}.block.{parts[4]}.{VAE_RESNET[parts[5]]}"
            else:
                new = f"encoder.down.{parts[2]}.downsample.conv"
        elif parts[1] == "up_blocks":
            level = levels - 1 - int(parts[2])
            if parts[3] == "resnets":
                new = f"decoder.up.{level}.block.{parts[4]}.{VAE_RESNET[parts[5]]}"
            else:
                new = f"decoder.up.{level}.upsample.conv"
        elif parts[2] == "resnets":
            new = f"{coder}.mid.block_{int(parts[3]) + 1}.{VAE_RESNET[parts[4]]}"
        else:  # mid_block.attentions.0.X: the original uses 1x1 convs
            new = f"{coder}.mid.attn_1.{VAE_ATTENTION['.'.join(parts[4:])]}"
            if param == "weight" and value.ndim == 2:
                value = value[:, :, None, None]
        out[f"{new}.{param}"] = value
    return out


def clip_to_original(sd: Mapping[str, np.ndarray], *, with_text_model: bool = True
                     ) -> dict[str, np.ndarray]:
    """OpenAI CLIP text in transformers 4 names (or, `with_text_model=False`, the older ones)."""
    out = {}
    for key, value in sd.items():
        bare = key.removeprefix("text_model.")
        out[("text_model." if with_text_model else "") + bare] = value
    return out


def text_model_key(key: str) -> str:
    """A CLIP text key in transformers 4 names: transformers 5 saves CLIPTextModel without the
    `text_model.` prefix (the projection of CLIPTextModelWithProjection never had it)."""
    return key if key.startswith(("text_model.", "text_projection")) else "text_model." + key


def clip_to_open_clip(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    sd = {text_model_key(k): v for k, v in sd.items()}
    out, fused = {}, {}
    for key, value in sd.items():
        if key in OPEN_CLIP_TOP:
            out[OPEN_CLIP_TOP[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.copy()
        else:
            m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
            n, module, param = m.groups()
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                fused.setdefault((n, param), {})[module[10]] = value
            else:
                out[f"transformer.resblocks.{n}.{OPEN_CLIP_LAYER[module]}.{param}"] = value
    for (n, param), qkv in fused.items():
        out[f"transformer.resblocks.{n}.attn.in_proj_{param}"] = _concat_rows(
            [qkv["q"], qkv["k"], qkv["v"]])
    return out


def placeholder(shape, dtype=np.float16) -> np.ndarray:
    """A zero-stride stand-in for a tensor: full-size layouts can be written header-only."""
    return np.broadcast_to(np.zeros((), dtype), tuple(shape))


def _is_placeholder(value: np.ndarray) -> bool:
    return value.size > 1 and not any(value.strides)


def _concat_rows(arrays):
    if all(_is_placeholder(a) for a in arrays):
        shape = (sum(a.shape[0] for a in arrays),) + arrays[0].shape[1:]
        return placeholder(shape, arrays[0].dtype)
    return np.concatenate(arrays)


def _random_like(value, gen):
    if _is_placeholder(value):
        return placeholder(value.shape, value.dtype)
    return gen.standard_normal(value.shape).astype(value.dtype)


def ema_name(key: str) -> str:
    return "model_ema." + key.removeprefix("model.").replace(".", "")


def build_single_file(*, family: str, unet: Mapping, layers_per_block: int, vae: Mapping,
                      text_encoder: Mapping, text_encoder_2: Optional[Mapping] = None,
                      buffers: bool = True, ema: Optional[Mapping] = None,
                      clip_with_text_model: bool = True, rng: int = 0) -> dict[str, np.ndarray]:
    """The original-layout state dict of a pipeline's parts (numpy), as real files hold it.

    `family` 'sd2': `text_encoder` (23 layers) is written as OpenCLIP with one extra random 24th
    layer and a random text_projection, like SD 2.x files. `ema`: a diffusers-named U-Net state dict
    written as ldm's `model_ema.*` copy.
    """
    gen = np.random.default_rng(rng)
    out = {"model.diffusion_model." + k: v for k, v in
           unet_to_original(to_numpy(unet), layers_per_block).items()}
    out.update({"first_stage_model." + k: v for k, v in vae_to_original(to_numpy(vae)).items()})
    text = to_numpy(text_encoder)
    if family == "sd1":
        out.update({"cond_stage_model.transformer." + k: v
                    for k, v in clip_to_original(text, with_text_model=clip_with_text_model).items()})
        position_ids = ("cond_stage_model.transformer."
                        + ("text_model." if clip_with_text_model else "") + "embeddings.position_ids")
    elif family == "sd2":
        open_clip = clip_to_open_clip(text)
        layers = 1 + max(int(k.split(".")[2]) for k in open_clip if k.startswith("transformer."))
        for key in [k for k in open_clip if k.startswith("transformer.resblocks.0.")]:
            extra = key.replace(".0.", f".{layers}.", 1)
            open_clip[extra] = _random_like(open_clip[key], gen)
        width = open_clip["token_embedding.weight"].shape[1]
        token = open_clip["token_embedding.weight"]
        open_clip["text_projection"] = (
            placeholder((width, width), token.dtype) if _is_placeholder(token)
            else gen.standard_normal((width, width)).astype(token.dtype))
        out.update({"cond_stage_model.model." + k: v for k, v in open_clip.items()})
        position_ids = None
        if buffers:
            out["cond_stage_model.model.logit_scale"] = np.array(4.6, np.float32)
    elif family == "sdxl":
        out.update({"conditioner.embedders.0.transformer." + k: v
                    for k, v in clip_to_original(text).items()})
        out.update({"conditioner.embedders.1.model." + k: v
                    for k, v in clip_to_open_clip(to_numpy(text_encoder_2)).items()})
        position_ids = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"
        if buffers:
            out["conditioner.embedders.1.model.logit_scale"] = np.array(4.6, np.float32)
    else:
        raise ValueError(family)
    if buffers:
        if family != "sdxl":  # sgm (SDXL) files hold no ldm schedule buffers
            betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
            for name in SCHEDULE_BUFFERS:
                out[name] = betas.astype(np.float32)
        if position_ids:
            length = next(v for k, v in out.items()
                          if k.endswith("position_embedding.weight")).shape[0]
            out[position_ids] = np.arange(length, dtype=np.int64)[None]
    if ema is not None:
        for key, value in unet_to_original(to_numpy(ema), layers_per_block).items():
            out[ema_name("model.diffusion_model." + key)] = value
        out["model_ema.decay"] = np.array(0.9999, np.float32)
        out["model_ema.num_updates"] = np.array(1234, np.int32)
    return out


def write_single_file(path, state_dict: Mapping[str, np.ndarray], dtype=None) -> None:
    """Save with safetensors; floating tensors cast to `dtype` (e.g. np.float16) if given."""
    from safetensors.numpy import save_file

    def cast(v):
        v = np.ascontiguousarray(v)
        return v.astype(dtype) if dtype is not None and np.issubdtype(v.dtype, np.floating) else v

    save_file({k: cast(v) for k, v in state_dict.items()}, str(path))


def write_header_only(path, state_dict: Mapping[str, np.ndarray]) -> None:
    """A valid safetensors file of the right size whose data is a hole (sparse, all zeros): lets a
    test read full-size layouts (keys, shapes, configs) without writing gigabytes."""
    import json

    codes = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(np.int64): "I64",
             np.dtype(np.int32): "I32"}
    header, offset = {}, 0
    for key, value in state_dict.items():
        size = value.size * value.dtype.itemsize
        header[key] = {"dtype": codes[value.dtype], "shape": list(value.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        f.truncate(8 + len(blob) + offset)


# --- ControlNets (cldm's ControlNet: the U-Net encoder plus hint convs, zero convs, middle out) ----

def controlnet_to_original(sd: Mapping[str, np.ndarray], layers_per_block: int
                           ) -> dict[str, np.ndarray]:
    """A diffusers ControlNetModel state dict in the original layout, without `control_model.`.
    The conditioning embedding's convs sit at the even slots of input_hint_block (SiLUs between):
    conv_in at 0, blocks.j at 2(j + 1), conv_out after the last block."""
    blocks = {int(k.split(".")[2]) for k in sd if k.startswith("controlnet_cond_embedding.blocks.")}
    hint = {"conv_in": 0, "conv_out": 2 * (len(blocks) + 1)}
    out, encoder = {}, {}
    for key, value in sd.items():
        module, param = key.rsplit(".", 1)
        parts = module.split(".")
        if parts[0] == "controlnet_cond_embedding":
            slot = hint[parts[1]] if parts[1] in hint else 2 * (int(parts[2]) + 1)
            out[f"input_hint_block.{slot}.{param}"] = value
        elif parts[0] == "controlnet_down_blocks":
            out[f"zero_convs.{parts[1]}.0.{param}"] = value
        elif parts[0] == "controlnet_mid_block":
            out[f"middle_block_out.0.{param}"] = value
        else:
            encoder[key] = value
    out.update(unet_to_original(encoder, layers_per_block))
    return out


def build_controlnet_file(controlnet: Mapping, layers_per_block: int, *, prefix: bool = True,
                          buffers: bool = True) -> dict[str, np.ndarray]:
    """A ControlNet's original-layout state dict as files hold it: under `control_model.` (as cldm
    saves it, with the schedule buffers beside when `buffers`) or bare (as extracted files)."""
    out = controlnet_to_original(to_numpy(controlnet), layers_per_block)
    if not prefix:
        return out
    out = {"control_model." + k: v for k, v in out.items()}
    if buffers:
        betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
        for name in SCHEDULE_BUFFERS + ("lvlb_weights",):
            out[name] = betas.astype(np.float32)
    return out


# --- flow transformers --------------------------------------------------------------------------

def mmdit_to_original(sd: dict, num_layers: int) -> dict:
    """A diffusers SD3Transformer2DModel state dict in Stability's layout: the inverse of diffusers'
    `convert_sd3_transformer_checkpoint_to_diffusers` (checked against it in test_mmdit.py). Works
    on torch tensors, meta ones included."""
    import torch

    def swap(t):  # diffusers' scale | shift -> the original's shift | scale
        scale, shift = t.chunk(2, dim=0)
        return torch.cat([shift, scale])

    out = {"pos_embed": sd["pos_embed.pos_embed"]}
    top = {"pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder",
           "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
           "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
           "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
           "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
           "proj_out": "final_layer.linear"}
    for p in ("weight", "bias"):
        for new, old in top.items():
            out[f"{old}.{p}"] = sd[f"{new}.{p}"]
        out[f"final_layer.adaLN_modulation.1.{p}"] = swap(sd[f"norm_out.linear.{p}"])
    for i in range(num_layers):
        d, o = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        last = i == num_layers - 1
        streams = {"x_block.attn.": ("attn.to_", ""), "context_block.attn.": ("attn.add_", "_proj")}
        if f"{d}attn2.to_q.weight" in sd:
            streams["x_block.attn2."] = ("attn2.to_", "")
        for o_attn, (head, tail) in streams.items():
            for p in ("weight", "bias"):
                out[f"{o}{o_attn}qkv.{p}"] = torch.cat([sd[f"{d}{head}{n}{tail}.{p}"] for n in "qkv"])
        renames = {"attn.to_out.0": "x_block.attn.proj", "attn2.to_out.0": "x_block.attn2.proj",
                   "attn.to_add_out": "context_block.attn.proj",
                   "norm1.linear": "x_block.adaLN_modulation.1",
                   "norm1_context.linear": "context_block.adaLN_modulation.1",
                   "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
                   "ff_context.net.0.proj": "context_block.mlp.fc1",
                   "ff_context.net.2": "context_block.mlp.fc2",
                   "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
                   "attn.norm_added_q": "context_block.attn.ln_q",
                   "attn.norm_added_k": "context_block.attn.ln_k",
                   "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k"}
        for new, old in renames.items():
            for p in ("weight", "bias"):
                if f"{d}{new}.{p}" in sd:
                    value = sd[f"{d}{new}.{p}"]
                    out[f"{o}{old}.{p}"] = swap(value) if last and new == "norm1_context.linear" \
                        else value
    return out


FLUX_ORIGINAL_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in",
                "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
                "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
                "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
                "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
                "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
                "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
                "proj_out": "final_layer.linear"}
FLUX_ORIGINAL_DOUBLE = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
                   "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
                   "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
                   "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
                   "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                   "attn.norm_added_q": "txt_attn.norm.query_norm",
                   "attn.norm_added_k": "txt_attn.norm.key_norm"}
FLUX_ORIGINAL_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2",
                   "attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}


def flux_to_original(sd: dict) -> dict:
    """A diffusers Flux state dict in BFL's layout: q/k/v (and the single blocks' MLP input) fused
    row-wise, the final adaLN's halves as (shift, scale), RMSNorm weights named `scale`."""
    sd, out = dict(sd), {}
    blocks = lambda name: sorted({int(k.split(".")[1]) for k in sd if k.startswith(name + ".")})
    for p in ("weight", "bias"):
        for i in blocks("transformer_blocks"):
            pre = f"transformer_blocks.{i}.attn."
            out[f"double_blocks.{i}.img_attn.qkv.{p}"] = np.concatenate(
                [sd.pop(f"{pre}to_{n}.{p}") for n in "qkv"])
            out[f"double_blocks.{i}.txt_attn.qkv.{p}"] = np.concatenate(
                [sd.pop(f"{pre}add_{n}_proj.{p}") for n in "qkv"])
        for i in blocks("single_transformer_blocks"):
            pre = f"single_transformer_blocks.{i}."
            out[f"single_blocks.{i}.linear1.{p}"] = np.concatenate(
                [sd.pop(f"{pre}attn.to_{n}.{p}") for n in "qkv"] + [sd.pop(f"{pre}proj_mlp.{p}")])
        scale, shift = np.split(sd.pop(f"norm_out.linear.{p}"), 2)
        out[f"final_layer.adaLN_modulation.1.{p}"] = np.concatenate([shift, scale])
    for key, value in sd.items():
        module, leaf = key.rsplit(".", 1)
        if module in FLUX_ORIGINAL_TOP:
            out[f"{FLUX_ORIGINAL_TOP[module]}.{leaf}"] = value
            continue
        stack, i, rest = module.split(".", 2)
        table, name = ((FLUX_ORIGINAL_DOUBLE, "double_blocks") if stack == "transformer_blocks"
                       else (FLUX_ORIGINAL_SINGLE, "single_blocks"))
        out[f"{name}.{i}.{table[rest]}.{'scale' if 'norm_' in rest else leaf}"] = value
    return out
