"""Single-file Stable Diffusion checkpoints in the original (CompVis / Stability) layouts.

A single `.safetensors` file (SD 1.x, SD 2.x, SDXL, inpainting U-Nets included) is split into parts;
each part is a diffusers / transformers style config dict, inferred from key names and shapes, and a
lazy TensorSource under diffusers / transformers key names. The per-model converters take it from
there, exactly as they would for a diffusers folder.

Nothing is read before it is asked for: configs come from the safetensors header alone, and the few
reshapes (OpenCLIP's fused q/k/v, the original VAE's 1x1-conv attention) happen per tensor on read.
The mappings follow diffusers' `loaders/single_file_utils.py`; here each format is one table of
(regex over the original key, diffusers name template, transform).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from sdjax.models.unet import UNetConfig
from sdjax.weights.common import (RenamedSource, SafetensorsFile, TensorSource, WeightsError,
                                  short_list)

Transform = Optional[Callable[[np.ndarray], np.ndarray]]
# A rule: (regex that must fullmatch the key below the part's prefix, ((template, transform), ...)).
# Templates are str.format'ed with the regex's named groups plus the values a part derives from them.
Rule = tuple[str, tuple[tuple[str, Transform], ...]]

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_TEXT_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TEXT2_PREFIX = "conditioner.embedders.1.model."

PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")

# Keys real files carry that hold no model parameter: the training schedule's buffers, EMA
# bookkeeping, CLIP's position ids and contrastive temperature, attention masks, the VAE's training
# loss (LPIPS / discriminator), sgm's denoiser tables.
NON_PARAMETER_KEYS = (
    r"betas", r"alphas_cumprod", r"alphas_cumprod_prev", r"sqrt_alphas_cumprod",
    r"sqrt_one_minus_alphas_cumprod", r"log_one_minus_alphas_cumprod",
    r"sqrt_recip_alphas_cumprod", r"sqrt_recipm1_alphas_cumprod", r"posterior_variance",
    r"posterior_log_variance_clipped", r"posterior_mean_coef[12]", r"lvlb_weights", r"logvar",
    r"model_ema\.decay", r"model_ema\.num_updates",
    r".+\.position_ids", r".+\.logit_scale", r".+\.attn_mask",
    r"(?:first_stage_model\.)?loss\..+", r"denoiser\.(?:log_)?sigmas",
)

SD_VAE_SCALING_FACTOR = 0.18215
SDXL_VAE_SCALING_FACTOR = 0.13025
SD2_OPEN_CLIP_LAYERS = 24
# All SD-family text encoders and SD 2.x / XL U-Nets use 64-channel attention heads.
HEAD_DIM = 64
# SD 1.x U-Nets use 8 heads at every level; diffusers calls that `attention_head_dim=8`.
SD1_HEADS = 8


def _pw(name: str) -> str:
    return rf"(?P<{name}>weight|bias)"


def _squeeze_1x1(array: np.ndarray) -> np.ndarray:
    """The original VAE's attention projections are 1x1 convs; diffusers has linear layers."""
    return array.reshape(array.shape[:2]) if array.ndim > 2 else array


def _transpose(array: np.ndarray) -> np.ndarray:
    """OpenCLIP applies text_projection as x @ P, (width, proj); transformers' Linear is (proj, width)."""
    return np.ascontiguousarray(array.T)


def _third(index: int) -> Callable[[np.ndarray], np.ndarray]:
    """Slice q, k or v out of OpenCLIP's fused in_proj (rows q | k | v)."""
    def take(array: np.ndarray) -> np.ndarray:
        rows = array.shape[0] // 3
        return array[index * rows:(index + 1) * rows]
    return take


def _one(template: str, transform: Transform = None) -> tuple[tuple[str, Transform], ...]:
    return ((template, transform),)


# ---- U-Net: openaimodel.UNetModel -> diffusers UNet2DConditionModel --------------------------------
_UNET_RESNET = (r"(?P<res>in_layers\.0|in_layers\.2|emb_layers\.1|out_layers\.0|out_layers\.3"
                r"|skip_connection)")
UNET_RESNET_NAMES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                     "out_layers.0": "norm2", "out_layers.3": "conv2",
                     "skip_connection": "conv_shortcut"}
# Inside a SpatialTransformer the original names are already diffusers'; list them so nothing
# unexpected passes through.
_UNET_ATTENTION = (r"(?P<rest>(?:norm|proj_in|proj_out)\.(?:weight|bias)|transformer_blocks\.\d+\."
                   r"(?:norm[123]|attn[12]\.to_[qkv]|attn[12]\.to_out\.0|ff\.net\.0\.proj|ff\.net\.2)"
                   r"\.(?:weight|bias))")
# The encoder's rules (time embedding, conv_in, down levels, middle block): what a ControlNet shares.
UNET_ENCODER_RULES: tuple[Rule, ...] = (
    (rf"time_embed\.0\.{_pw('p')}", _one("time_embedding.linear_1.{p}")),
    (rf"time_embed\.2\.{_pw('p')}", _one("time_embedding.linear_2.{p}")),
    (rf"label_emb\.0\.0\.{_pw('p')}", _one("add_embedding.linear_1.{p}")),
    (rf"label_emb\.0\.2\.{_pw('p')}", _one("add_embedding.linear_2.{p}")),
    (rf"input_blocks\.0\.0\.{_pw('p')}", _one("conv_in.{p}")),
    (rf"input_blocks\.(?P<i>\d+)\.0\.op\.{_pw('p')}", _one("down_blocks.{b}.downsamplers.0.conv.{p}")),
    (rf"input_blocks\.(?P<i>\d+)\.0\.{_UNET_RESNET}\.{_pw('p')}",
     _one("down_blocks.{b}.resnets.{l}.{res}.{p}")),
    (rf"input_blocks\.(?P<i>\d+)\.1\.{_UNET_ATTENTION}", _one("down_blocks.{b}.attentions.{l}.{rest}")),
    (rf"middle_block\.0\.{_UNET_RESNET}\.{_pw('p')}", _one("mid_block.resnets.0.{res}.{p}")),
    (rf"middle_block\.1\.{_UNET_ATTENTION}", _one("mid_block.attentions.0.{rest}")),
    (rf"middle_block\.2\.{_UNET_RESNET}\.{_pw('p')}", _one("mid_block.resnets.1.{res}.{p}")),
)
UNET_RULES: tuple[Rule, ...] = UNET_ENCODER_RULES + (
    (rf"output_blocks\.(?P<o>\d+)\.0\.{_UNET_RESNET}\.{_pw('p')}",
     _one("up_blocks.{b}.resnets.{l}.{res}.{p}")),
    # The upsampler is the block's second module, or its third after an attention.
    (rf"output_blocks\.(?P<o>\d+)\.[12]\.conv\.{_pw('p')}", _one("up_blocks.{b}.upsamplers.0.conv.{p}")),
    (rf"output_blocks\.(?P<o>\d+)\.1\.{_UNET_ATTENTION}", _one("up_blocks.{b}.attentions.{l}.{rest}")),
    (rf"out\.0\.{_pw('p')}", _one("conv_norm_out.{p}")),
    (rf"out\.2\.{_pw('p')}", _one("conv_out.{p}")),
)

# ---- VAE: ldm AutoencoderKL -> diffusers AutoencoderKL ---------------------------------------------
_VAE_RESNET = r"(?P<res>norm1|conv1|norm2|conv2|nin_shortcut)"
_VAE_RESNET_NAMES = {"nin_shortcut": "conv_shortcut"}
_VAE_ATTN_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
VAE_RULES: tuple[Rule, ...] = (
    (rf"(?P<c>encoder|decoder)\.conv_in\.{_pw('p')}", _one("{c}.conv_in.{p}")),
    (rf"(?P<c>encoder|decoder)\.conv_out\.{_pw('p')}", _one("{c}.conv_out.{p}")),
    (rf"(?P<c>encoder|decoder)\.norm_out\.{_pw('p')}", _one("{c}.conv_norm_out.{p}")),
    (rf"encoder\.down\.(?P<n>\d+)\.block\.(?P<j>\d+)\.{_VAE_RESNET}\.{_pw('p')}",
     _one("encoder.down_blocks.{n}.resnets.{j}.{res}.{p}")),
    (rf"encoder\.down\.(?P<n>\d+)\.downsample\.conv\.{_pw('p')}",
     _one("encoder.down_blocks.{n}.downsamplers.0.conv.{p}")),
    # The original decoder numbers its levels from the bottom, diffusers from the top.
    (rf"decoder\.up\.(?P<u>\d+)\.block\.(?P<j>\d+)\.{_VAE_RESNET}\.{_pw('p')}",
     _one("decoder.up_blocks.{k}.resnets.{j}.{res}.{p}")),
    (rf"decoder\.up\.(?P<u>\d+)\.upsample\.conv\.{_pw('p')}",
     _one("decoder.up_blocks.{k}.upsamplers.0.conv.{p}")),
    (rf"(?P<c>encoder|decoder)\.mid\.block_1\.{_VAE_RESNET}\.{_pw('p')}",
     _one("{c}.mid_block.resnets.0.{res}.{p}")),
    (rf"(?P<c>encoder|decoder)\.mid\.block_2\.{_VAE_RESNET}\.{_pw('p')}",
     _one("{c}.mid_block.resnets.1.{res}.{p}")),
    (rf"(?P<c>encoder|decoder)\.mid\.attn_1\.(?P<attn>norm|q|k|v|proj_out)\.{_pw('p')}",
     _one("{c}.mid_block.attentions.0.{attn}.{p}", _squeeze_1x1)),
    (rf"(?P<q>quant_conv|post_quant_conv)\.{_pw('p')}", _one("{q}.{p}")),
)

# A VAE already in diffusers names; older diffusers files name the attention query/key/value/proj_attn.
_DIFFUSERS_VAE_ATTN_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
DIFFUSERS_VAE_RULES: tuple[Rule, ...] = (
    (r"(?P<rest>(?:encoder|decoder)\.(?:conv_in|conv_out|conv_norm_out)\.(?:weight|bias)"
     r"|(?:quant_conv|post_quant_conv)\.(?:weight|bias)"
     r"|encoder\.down_blocks\.\d+\.(?:resnets\.\d+\.(?:norm1|conv1|norm2|conv2|conv_shortcut)"
     r"|downsamplers\.0\.conv)\.(?:weight|bias)"
     r"|decoder\.up_blocks\.\d+\.(?:resnets\.\d+\.(?:norm1|conv1|norm2|conv2|conv_shortcut)"
     r"|upsamplers\.0\.conv)\.(?:weight|bias)"
     r"|(?:encoder|decoder)\.mid_block\.resnets\.[01]\.(?:norm1|conv1|norm2|conv2|conv_shortcut)"
     r"\.(?:weight|bias))", _one("{rest}")),
    (rf"(?P<c>encoder|decoder)\.mid_block\.attentions\.0\."
     rf"(?P<attn>group_norm|to_q|to_k|to_v|to_out\.0|query|key|value|proj_attn)\.{_pw('p')}",
     _one("{c}.mid_block.attentions.0.{attn}.{p}", _squeeze_1x1)),
)

# ---- Text encoders --------------------------------------------------------------------------------
# OpenAI CLIP as saved by transformers 4 (`text_model.` present) or older (absent).
CLIP_RULES: tuple[Rule, ...] = (
    (r"(?:text_model\.)?(?P<rest>embeddings\.(?:token|position)_embedding\.weight"
     r"|final_layer_norm\.(?:weight|bias)"
     r"|encoder\.layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|layer_norm[12]|mlp\.fc[12])"
     r"\.(?:weight|bias))", _one("text_model.{rest}")),
)
_RESBLOCK = r"transformer\.resblocks\.(?P<n>\d+)\."
_LAYER = "text_model.encoder.layers.{n}."
OPEN_CLIP_RULES: tuple[Rule, ...] = (
    (r"token_embedding\.weight", _one("text_model.embeddings.token_embedding.weight")),
    (r"positional_embedding", _one("text_model.embeddings.position_embedding.weight")),
    (rf"ln_final\.{_pw('p')}", _one("text_model.final_layer_norm.{p}")),
    (r"text_projection", _one("text_projection.weight", _transpose)),
    (rf"{_RESBLOCK}attn\.in_proj_(?P<p>weight|bias)",
     ((_LAYER + "self_attn.q_proj.{p}", _third(0)), (_LAYER + "self_attn.k_proj.{p}", _third(1)),
      (_LAYER + "self_attn.v_proj.{p}", _third(2)))),
    (rf"{_RESBLOCK}attn\.out_proj\.{_pw('p')}", _one(_LAYER + "self_attn.out_proj.{p}")),
    (rf"{_RESBLOCK}ln_(?P<m>[12])\.{_pw('p')}", _one(_LAYER + "layer_norm{m}.{p}")),
    (rf"{_RESBLOCK}mlp\.c_fc\.{_pw('p')}", _one(_LAYER + "mlp.fc1.{p}")),
    (rf"{_RESBLOCK}mlp\.c_proj\.{_pw('p')}", _one(_LAYER + "mlp.fc2.{p}")),
)


# ---- Results ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SingleFileCheckpoint:
    """What `read_single_file` found.

    `parts` maps 'unet', 'vae', 'text_encoder' (and 'text_encoder_2' for SDXL) to
    (config dict in diffusers / transformers config.json form, lazy TensorSource in their key names).
    `dropped` lists the file's keys that carry no parameter and were left out.
    """

    path: str
    family: str                      # 'sd1' | 'sd2' | 'sdxl'
    inpainting: bool                 # U-Net takes 9 input channels (latents, mask, masked image)
    parts: dict[str, tuple[dict, TensorSource]]
    scheduler: dict
    dropped: tuple[str, ...] = ()


# ---- File checks -----------------------------------------------------------------------------------
def pickle_refusal_message(path: str, why: str,
                           select: str = "sd = sd.get('state_dict', sd)") -> str:
    """Why `path` is refused, and the two lines that convert it; `select` is the statement that
    turns the unpickled object `sd` into the dict of tensors to keep."""
    out = os.path.splitext(path)[0] + ".safetensors"
    return (f"{path}: {why}; sdjax never unpickles checkpoints (loading a pickle can run arbitrary "
            f"code). Convert it once to safetensors with PyTorch:\n"
            f"  import torch; sd = torch.load({path!r}, map_location='cpu', weights_only=True); "
            f"{select}\n"
            f"  from safetensors.torch import save_file; save_file({{k: v.contiguous() for k, v in "
            f"sd.items() if isinstance(v, torch.Tensor)}}, {out!r})")


def _pickle_refusal(path: str, why: str) -> WeightsError:
    return WeightsError(pickle_refusal_message(path, why))


def read_header(path: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """key -> (dtype, shape) from the safetensors header; refuses pickles and truncated files."""
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: no such file")
    if path.lower().endswith(PICKLE_EXTENSIONS):
        raise _pickle_refusal(path, f"a {os.path.splitext(path)[1]} file is a pickle checkpoint")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        start = f.read(9)
        # torch.save writes a zip ("PK") or, before torch 1.6, a raw pickle (protocol byte 0x80, then
        # the protocol). A safetensors header length can start with those bytes too, but is followed by '{'.
        pickled = len(start) > 1 and start[0] == 0x80 and 2 <= start[1] <= 5
        if start[:2] == b"PK" or (pickled and start[8:9] != b"{"):
            raise _pickle_refusal(path, "the file is a pickle (torch.save) checkpoint")
        if len(start) < 9:
            raise WeightsError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        length = int.from_bytes(start[:8], "little")
        if length > size - 8:
            raise WeightsError(f"{path}: truncated (or not a safetensors file): header length "
                               f"{length} bytes, the file holds {size - 8} after it")
        f.seek(8)
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise WeightsError(f"{path}: not a safetensors file (unreadable header: {err})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    try:
        data_end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
        entries = {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items()}
    except (KeyError, TypeError, IndexError, ValueError) as err:
        raise WeightsError(f"{path}: not a safetensors file (malformed header entry: {err!r})") from None
    if 8 + length + data_end > size:
        raise WeightsError(f"{path}: truncated safetensors file: tensors need {8 + length + data_end} "
                           f"bytes, the file holds {size}")
    return entries


# ---- Renaming engine -------------------------------------------------------------------------------
class Part:
    """The keys of one part: original name -> diffusers name (+ transform), built from one table."""

    def __init__(self, file: str, what: str):
        self.file, self.what = file, what
        self.mapping: dict[str, tuple[str, Transform]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}  # original key (below prefix) -> shape

    def add(self, rules: Sequence[Rule], rest: str, old: str, shape: tuple[int, ...],
            derive: Callable[[dict], dict], translate: Mapping[str, Mapping[str, str]]) -> bool:
        for pattern, targets in rules:
            match = re.fullmatch(pattern, rest)
            if match is None:
                continue
            groups = {k: v for k, v in match.groupdict().items() if v is not None}
            values = {k: translate.get(k, {}).get(v, v) for k, v in groups.items()}
            values.update(derive(groups))
            for template, transform in targets:
                new = template.format(**values)
                if new in self.mapping:
                    raise WeightsError(f"{self.file}: {self.what}: both {self.mapping[new][0]} and "
                                       f"{old} map to {new}")
                self.mapping[new] = (old, transform)
            self.shapes[rest] = shape
            return True
        return False


def _no_derive(groups: dict) -> dict:
    return {}


def unet_block_index(layers_per_block: int) -> Callable[[dict], dict]:
    """UNET_RULES' derived values: input block i (after conv_in) and output block o -> the diffusers
    level b and layer l."""
    stride = layers_per_block + 1

    def index(groups: dict) -> dict:
        if "i" in groups:
            i = int(groups["i"]) - 1
            return {"b": i // stride, "l": i % stride}
        if "o" in groups:
            return {"b": int(groups["o"]) // stride, "l": int(groups["o"]) % stride}
        return {}

    return index


def _indices(keys: Iterable[str], pattern: str) -> list[int]:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return sorted(found)


# ---- Config inference ------------------------------------------------------------------------------
def _unet_layout(shapes: Mapping[str, tuple[int, ...]], file: str) -> dict:
    """Levels, resnets per level and attention per level of an openaimodel U-Net, from its keys."""
    inputs = _indices(shapes, r"input_blocks\.(\d+)\.")
    downsamplers = [i for i in inputs if f"input_blocks.{i}.0.op.weight" in shapes]
    layers_per_block = (downsamplers[0] - 1) if downsamplers else len(inputs) - 1
    stride, levels = layers_per_block + 1, len(downsamplers) + 1
    # conv_in, then per level its resnets and (but the lowest) a downsampler.
    if (layers_per_block < 1 or inputs != list(range(stride * levels))
            or downsamplers != [stride * (b + 1) for b in range(levels - 1)]):
        raise WeightsError(f"{file}: U-Net input_blocks {inputs} (downsamplers at {downsamplers}) do "
                           f"not form levels of equal depth")
    return {"layers_per_block": layers_per_block, "levels": levels}


def _depth(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> int:
    blocks = _indices(shapes, re.escape(prefix) + r"transformer_blocks\.(\d+)\.")
    return len(blocks)


# Where the inferred U-Net config's values come from (tensor names under UNET_PREFIX): a config
# that sdjax refuses is most often one mis-shaped tensor, which the error then names.
UNET_CONFIG_SOURCES = {
    "time_embedding_dim": "time_embed.0.weight", "in_channels": "input_blocks.0.0.weight",
    "out_channels": "out.2.weight", "block_out_channels": "input_blocks.*.0.out_layers.3.weight",
    "norm_num_groups": "input_blocks.*.0.out_layers.3.weight",
    "cross_attention_dim": "*.attn2.to_k.weight", "attention_head_dim": "*.proj_in.weight",
    "projection_class_embeddings_input_dim": "label_emb.0.0.weight",
    "addition_time_embed_dim": "label_emb.0.0.weight",
}


def unet_config_error(path, err: ValueError, shapes: Mapping[str, tuple[int, ...]]) -> WeightsError:
    """A refused inferred U-Net config as an error naming the file and the tensors it came from."""
    import fnmatch

    sources = sorted({source for field, source in UNET_CONFIG_SOURCES.items() if field in str(err)})
    named = [f"{UNET_PREFIX}{key} {tuple(shapes[key])}" for source in sources
             for key in sorted(k for k in shapes if fnmatch.fnmatchcase(k, source))][:4]
    where = (f"; the value comes from the shape of {', '.join(named)}: is that tensor mis-shaped?"
             if named else " (inferred from the file's tensor shapes)")
    return WeightsError(f"{path}: U-Net: {err}{where}")


def unet_encoder_config(shapes: Mapping[str, tuple[int, ...]], family: str, file: str,
                        pooled_dim: Optional[int] = None) -> dict:
    """The fields of a diffusers UNet2DConditionModel config that the encoder (time embedding,
    conv_in, down levels, middle block) tells, inferred from original key names and shapes: what a
    ControlNet's config shares with its U-Net's."""
    layout = _unet_layout(shapes, file)
    lpb, levels = layout["layers_per_block"], layout["levels"]
    stride = lpb + 1
    first = [1 + b * stride for b in range(levels)]  # first resnet of each down level
    block_out = [shapes[f"input_blocks.{i}.0.out_layers.3.weight"][0] for i in first]
    down_attn = [f"input_blocks.{i}.1.proj_in.weight" in shapes for i in first]
    depth = [_depth(shapes, f"input_blocks.{i}.1.") if a else 1 for i, a in zip(first, down_attn)]
    mid_depth = _depth(shapes, "middle_block.1.")
    if mid_depth and mid_depth != depth[-1] and down_attn[-1]:
        raise WeightsError(f"{file}: U-Net middle block has {mid_depth} transformer layers, the "
                           f"lowest level {depth[-1]}; diffusers cannot express that")
    if mid_depth:
        depth[-1] = mid_depth
    proj_in = next((shapes[k] for k in shapes if k.endswith(".proj_in.weight")), None)
    to_k = next((shapes[k] for k in shapes if k.endswith(".attn2.to_k.weight")), None)
    conv_in = shapes["input_blocks.0.0.weight"]
    time_dim = shapes["time_embed.0.weight"][0]
    if family == "sd1":
        heads: int | list[int] = SD1_HEADS
    else:
        heads = [c // HEAD_DIM if c % HEAD_DIM == 0 else 1 for c in block_out]
    config = {
        "in_channels": conv_in[1],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attn],
        "mid_block_type": "UNetMidBlock2DCrossAttn" if mid_depth else None,
        "block_out_channels": block_out,
        "layers_per_block": lpb,
        "transformer_layers_per_block": depth[0] if len(set(depth)) == 1 else depth,
        "cross_attention_dim": to_k[1] if to_k else None,
        "attention_head_dim": heads,
        "use_linear_projection": bool(proj_in is not None and len(proj_in) == 2),
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "norm_num_groups": 32,
        "addition_embed_type": None,
        "addition_time_embed_dim": None,
        "projection_class_embeddings_input_dim": None,
    }
    if time_dim != 4 * block_out[0]:
        config["time_embedding_dim"] = time_dim
    if "label_emb.0.0.weight" in shapes:
        if family != "sdxl":
            raise WeightsError(f"{file}: U-Net has label_emb (class / image conditioning), which "
                               f"sdjax reads only for SDXL's text_time embedding")
        adm = shapes["label_emb.0.0.weight"][1]
        # SDXL: pooled text embedding + 6 sinusoidal time ids (size, crop, target size).
        config["addition_embed_type"] = "text_time"
        config["addition_time_embed_dim"] = (adm - pooled_dim) // 6 if pooled_dim else 256
        config["projection_class_embeddings_input_dim"] = adm
    return config


def unet_config(shapes: Mapping[str, tuple[int, ...]], family: str, file: str,
                pooled_dim: Optional[int] = None) -> dict:
    """A diffusers UNet2DConditionModel config inferred from original key names and shapes."""
    encoder = unet_encoder_config(shapes, family, file, pooled_dim)
    stride, levels = encoder["layers_per_block"] + 1, len(encoder["block_out_channels"])
    up_attn = [f"output_blocks.{b * stride}.1.proj_in.weight" in shapes for b in range(levels)]
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": {"sd1": 64, "sd2": 96, "sdxl": 128}[family],
        **encoder,
        "out_channels": shapes["out.2.weight"][0],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn],
    }


def vae_config(shapes: Mapping[str, tuple[int, ...]], *, scaling_factor: float,
               sample_size: int) -> dict:
    """A diffusers AutoencoderKL config inferred from diffusers key names and shapes."""
    levels = _indices(shapes, r"encoder\.down_blocks\.(\d+)\.")
    block_out = [shapes[f"encoder.down_blocks.{b}.resnets.0.conv2.weight"][0] for b in levels]
    layers = _indices(shapes, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": shapes["encoder.conv_in.weight"][1],
        "out_channels": shapes["decoder.conv_out.weight"][0],
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": block_out,
        "layers_per_block": len(layers),
        "latent_channels": shapes["decoder.conv_in.weight"][1],
        "norm_num_groups": 32,
        "act_fn": "silu",
        "sample_size": sample_size,
        "scaling_factor": scaling_factor,
        "force_upcast": True,
        "use_quant_conv": "quant_conv.weight" in shapes,
        "use_post_quant_conv": "post_quant_conv.weight" in shapes,
        "mid_block_add_attention": "encoder.mid_block.attentions.0.to_q.weight" in shapes,
    }


def clip_text_config(shapes: Mapping[str, tuple[int, ...]], *, hidden_act: str) -> dict:
    """A transformers CLIPTextConfig dict (plus `architectures`) from transformers key names."""
    vocab, hidden = shapes["text_model.embeddings.token_embedding.weight"]
    layers = _indices(shapes, r"text_model\.encoder\.layers\.(\d+)\.")
    with_projection = "text_projection.weight" in shapes
    return {
        "architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0],
        "num_hidden_layers": len(layers),
        "num_attention_heads": max(1, hidden // HEAD_DIM),
        "max_position_embeddings": shapes["text_model.embeddings.position_embedding.weight"][0],
        "hidden_act": hidden_act,
        "layer_norm_eps": 1e-5,
        "projection_dim": shapes["text_projection.weight"][0] if with_projection else hidden,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
    }


def scheduler_config(prediction_type: Optional[str], num_train_timesteps: int = 1000) -> dict:
    """The SD training schedule as a diffusers scheduler config.

    The weights cannot tell epsilon- from v-prediction (SD 2.x 768-v and 2.1 are v), so
    `prediction_type` is the caller's to give; it defaults to 'epsilon'.
    """
    return {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": num_train_timesteps,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": prediction_type or "epsilon",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "timestep_spacing": "leading",
    }


# ---- Readers ---------------------------------------------------------------------------------------
def _detect_family(keys: Sequence[str], path: str) -> str:
    if any(k.startswith("conditioner.embedders.") for k in keys):
        if not any(k.startswith(SDXL_TEXT2_PREFIX) for k in keys):
            raise WeightsError(f"{path}: SDXL conditioner without {SDXL_TEXT2_PREFIX}* (an SDXL "
                               f"refiner?); only SDXL base layouts are supported")
        return "sdxl"
    if any(k.startswith(SD2_TEXT_PREFIX) for k in keys):
        return "sd2"
    if any(k.startswith(SD1_TEXT_PREFIX) for k in keys):
        return "sd1"
    raise WeightsError(f"{path}: cannot tell the text encoder: looked for keys starting with "
                       f"{SD1_TEXT_PREFIX!r} (SD 1.x), {SD2_TEXT_PREFIX!r} (SD 2.x) or "
                       f"'conditioner.embedders.' (SDXL)")


def _ema_name(key: str) -> str:
    """ldm's LitEma stores `model.diffusion_model.a.b` as `model_ema.diffusion_modelab`."""
    return EMA_PREFIX + key[len("model."):].replace(".", "")


def read_single_file(path: str | os.PathLike, *, prediction_type: Optional[str] = None,
                     extract_ema: bool = False) -> SingleFileCheckpoint:
    """Split an original-layout SD 1.x / 2.x / XL `.safetensors` checkpoint into diffusers-named parts.

    Configs are inferred from key names and shapes; conventions the weights cannot show follow
    diffusers: SD 1.x U-Nets get `attention_head_dim=8`, SD 2.x / XL ones 64-channel heads per level,
    text encoders 64-channel heads, `sample_size` 64 / 96 / 128 latents for SD 1.x / 2.x / XL,
    `upcast_attention` off (SD 2.1 768-v wants it on). SD 2.x's OpenCLIP tower has 24 layers of which
    SD 2.x uses 23: the last layer and `text_projection` are dropped and a 23-layer config produced
    (a file with 23 layers, converted back from diffusers, keeps them all).
    `prediction_type` cannot be told from the weights either (see `scheduler_config`).

    `extract_ema=True` reads the U-Net from the file's `model_ema.*` copy; otherwise that copy is
    dropped. Non-parameter keys (`NON_PARAMETER_KEYS`) are dropped; any other key no table knows
    is a WeightsError, as are pickle files, truncated files and unrecognised layouts.
    """
    path = os.fspath(path)
    header = read_header(path)
    keys = list(header)
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise WeightsError(f"{path}: no Stable Diffusion U-Net found: looked for keys starting with "
                           f"{UNET_PREFIX!r} ({len(keys)} keys, e.g. {', '.join(keys[:3])})")
    family = _detect_family(keys, path)
    if extract_ema and not any(k.startswith(EMA_PREFIX + "diffusion_model") for k in keys):
        raise WeightsError(f"{path}: extract_ema=True but the file has no EMA copy "
                           f"({EMA_PREFIX}diffusion_model*)")

    shape_of = {k: v[1] for k, v in header.items()}
    drop = [re.compile(p) for p in NON_PARAMETER_KEYS]
    if not extract_ema:
        drop.append(re.compile(re.escape(EMA_PREFIX) + r".+"))

    text_parts = {"sd1": [("text_encoder", SD1_TEXT_PREFIX, CLIP_RULES, "quick_gelu")],
                  "sd2": [("text_encoder", SD2_TEXT_PREFIX, OPEN_CLIP_RULES, "gelu")],
                  "sdxl": [("text_encoder", SDXL_TEXT_PREFIX, CLIP_RULES, "quick_gelu"),
                           ("text_encoder_2", SDXL_TEXT2_PREFIX, OPEN_CLIP_RULES, "gelu")]}[family]
    if family == "sd2":
        # SD 2.x conditions on OpenCLIP ViT-H's penultimate layer; its projection is unused. A file
        # converted back from diffusers holds only the 23 layers used, and keeps them all.
        drop.append(re.compile(re.escape(SD2_TEXT_PREFIX + "text_projection")))
        blocks = _indices(keys, re.escape(SD2_TEXT_PREFIX) + r"transformer\.resblocks\.(\d+)\.")
        if len(blocks) == SD2_OPEN_CLIP_LAYERS:
            drop.append(re.compile(re.escape(f"{SD2_TEXT_PREFIX}transformer.resblocks.{blocks[-1]}.")
                                   + ".+"))

    unet_shapes = {k[len(UNET_PREFIX):]: s for k, s in shape_of.items() if k.startswith(UNET_PREFIX)}
    unet_index = unet_block_index(_unet_layout(unet_shapes, path)["layers_per_block"])

    vae_levels = len(_indices(keys, re.escape(VAE_PREFIX) + r"decoder\.up\.(\d+)\."))

    def vae_index(groups: dict) -> dict:
        return {"k": vae_levels - 1 - int(groups["u"])} if "u" in groups else {}

    specs = [("unet", UNET_PREFIX, UNET_RULES, unet_index, {"res": UNET_RESNET_NAMES}),
             ("vae", VAE_PREFIX, VAE_RULES, vae_index,
              {"res": _VAE_RESNET_NAMES, "attn": _VAE_ATTN_NAMES})]
    specs += [(name, prefix, rules, _no_derive, {}) for name, prefix, rules, _ in text_parts]
    parts = {name: Part(path, name) for name, *_ in specs}
    dropped, unknown = [], []
    for key in keys:
        if any(p.fullmatch(key) for p in drop):
            dropped.append(key)
            continue
        if extract_ema and key.startswith(EMA_PREFIX):
            continue  # checked against the U-Net below
        for name, prefix, rules, derive, translate in specs:
            if key.startswith(prefix):
                if parts[name].add(rules, key[len(prefix):], key, shape_of[key], derive, translate):
                    break
                unknown.append(key)
                break
        else:
            unknown.append(key)
    if unknown:
        raise WeightsError(f"{path}: {len(unknown)} keys of no known part (family {family}): "
                           + short_list(unknown))
    if not parts["vae"].mapping:
        raise WeightsError(f"{path}: no VAE found: looked for keys starting with {VAE_PREFIX!r}")

    source = SafetensorsFile(path)
    unet = parts["unet"]
    if extract_ema:
        for new, (old, transform) in list(unet.mapping.items()):
            ema = _ema_name(old)
            if ema not in shape_of:
                raise WeightsError(f"{path}: extract_ema=True but {ema} (EMA of {old}) is missing")
            if shape_of[ema] != shape_of[old]:
                raise WeightsError(f"{path}: {ema} has shape {shape_of[ema]}, {old} {shape_of[old]}")
            unet.mapping[new] = (ema, transform)
        used = {old for old, _ in unet.mapping.values()}
        extra = [k for k in keys if k.startswith(EMA_PREFIX) and k not in used
                 and not any(p.fullmatch(k) for p in drop)]
        if extra:
            raise WeightsError(f"{path}: EMA keys that match no U-Net parameter: "
                               + short_list(extra))

    vae_scale = SDXL_VAE_SCALING_FACTOR if family == "sdxl" else SD_VAE_SCALING_FACTOR
    image_size = {"sd1": 512, "sd2": 768, "sdxl": 1024}[family]
    try:
        result: dict[str, tuple[dict, TensorSource]] = {}
        for name, _, _, act in text_parts:
            config = clip_text_config(_renamed_shapes(parts[name], shape_of), hidden_act=act)
            result[name] = (config, RenamedSource(source, parts[name].mapping))
        # SDXL's add_embedding sees the pooled (projected) text embedding of the second encoder.
        pooled = result["text_encoder_2"][0]["projection_dim"] if "text_encoder_2" in result else None
        result["unet"] = (unet_config(unet.shapes, family, path, pooled_dim=pooled),
                          RenamedSource(source, unet.mapping))
        try:
            UNetConfig.from_diffusers(result["unet"][0])
        except ValueError as err:
            raise unet_config_error(path, err, unet.shapes) from None
        result["vae"] = (vae_config(_renamed_shapes(parts["vae"], shape_of), scaling_factor=vae_scale,
                                    sample_size=image_size),
                         RenamedSource(source, parts["vae"].mapping))
    except KeyError as err:  # a part lacks a key its config is read from
        raise WeightsError(f"{path}: cannot infer the configs: no {err.args[0]!r} (under its "
                           f"part's prefix)") from None
    timesteps = shape_of["betas"][0] if "betas" in shape_of else 1000
    return SingleFileCheckpoint(
        path=path, family=family, inpainting=result["unet"][0]["in_channels"] == 9,
        parts={k: result[k] for k in ("unet", "vae", "text_encoder", "text_encoder_2") if k in result},
        scheduler=scheduler_config(prediction_type, timesteps), dropped=tuple(dropped))


def _renamed_shapes(part: Part, shape_of: Mapping[str, tuple[int, ...]]) -> dict:
    """Shapes under the new names, computed from the header (no tensor is read)."""
    out = {}
    for new, (old, transform) in part.mapping.items():
        shape = shape_of[old]
        if transform is _squeeze_1x1:
            shape = shape[:2]
        elif transform is _transpose:
            shape = shape[::-1]
        elif transform is not None:  # a third of a fused q/k/v
            shape = (shape[0] // 3,) + shape[1:]
        out[new] = shape
    return out


def read_vae_file(path: str | os.PathLike, *, scaling_factor: float = SD_VAE_SCALING_FACTOR,
                  prefix: Optional[str] = None) -> tuple[dict, TensorSource]:
    """A standalone VAE `.safetensors` -> (diffusers AutoencoderKL config, lazy diffusers-named source).

    Accepts the original layout (`encoder.down.0...`), the same under `first_stage_model.` (or
    `vae.`), and diffusers names. SD and SDXL VAEs share one architecture, so the weights cannot
    say which latent scale they were trained for: pass `scaling_factor` (0.13025 for SDXL's).
    `prefix` given: the VAE bundled in a larger file under that prefix; other keys are not looked at.
    """
    path = os.fspath(path)
    header = read_header(path)
    shape_of = {k: v[1] for k, v in header.items()}
    keys = list(shape_of)
    if prefix is not None:
        keys = [k for k in keys if k.startswith(prefix)]
    else:
        prefix = next((p for p in (VAE_PREFIX, "vae.") if any(k.startswith(p) for k in keys)), "")
    body = [k[len(prefix):] for k in keys if k.startswith(prefix)]
    if any(k.startswith("encoder.down_blocks.") for k in body):
        rules, translate, derive = DIFFUSERS_VAE_RULES, {"attn": _DIFFUSERS_VAE_ATTN_NAMES}, _no_derive
    elif any(k.startswith("encoder.down.") for k in body):
        levels = len(_indices(body, r"decoder\.up\.(\d+)\."))
        rules, translate = VAE_RULES, {"res": _VAE_RESNET_NAMES, "attn": _VAE_ATTN_NAMES}

        def derive(groups: dict) -> dict:
            return {"k": levels - 1 - int(groups["u"])} if "u" in groups else {}
    else:
        raise WeightsError(f"{path}: not a VAE: looked for keys 'encoder.down.*' (original layout, "
                           f"optionally under 'first_stage_model.' or 'vae.') or "
                           f"'encoder.down_blocks.*' (diffusers)")
    drop = [re.compile(p) for p in NON_PARAMETER_KEYS]
    part, unknown = Part(path, "vae"), []
    for key in keys:
        if any(p.fullmatch(key) for p in drop):
            continue
        if not (key.startswith(prefix) and part.add(rules, key[len(prefix):], key, shape_of[key],
                                                     derive, translate)):
            unknown.append(key)
    if unknown:
        raise WeightsError(f"{path}: {len(unknown)} keys that are not part of a VAE: "
                           + short_list(unknown))
    try:
        config = vae_config(_renamed_shapes(part, shape_of), scaling_factor=scaling_factor,
                            sample_size=512)
    except KeyError as err:
        raise WeightsError(f"{path}: cannot infer the VAE config: no {err.args[0]!r}") from None
    return config, RenamedSource(SafetensorsFile(path), part.mapping)

