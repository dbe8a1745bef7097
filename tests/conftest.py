"""Fixtures several test modules share, each built once per session (plain helpers: helpers.py)."""
from __future__ import annotations

import pathlib

import numpy as np
import pytest

from tests import single_file_writer as writer
from tests.helpers import take


@pytest.fixture(scope="session")
def tiny_model():
    """`random_pretrained("tiny")`, read-only: build your own to change its params."""
    from sdjax.weights.presets import random_pretrained

    return random_pretrained("tiny")


@pytest.fixture(scope="session")
def shapes_train_examples():
    """The first 3,000 training examples of the shapes world (seed 0, 32 px)."""
    from sdjax.data import shapes

    return take(shapes.train_examples(0, 32), 3000)


# --- tiny SD pipelines for the checkpoint formats -------------------------------------------------

_VAE = dict(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
            latent_channels=4, norm_num_groups=32, sample_size=32,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
_CLIP_L = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=1, max_position_embeddings=16, hidden_act="quick_gelu")


class TinySD:
    """Tiny random SD 1.x (and its inpainting variant), 2.x and XL reference parts (torch), and the
    checkpoints made of them: original-layout single files (written by `single_file_writer`, which
    tests/test_single_file.py checks against diffusers' own loader) and diffusers folders."""

    FAMILIES = {
        "sd1": dict(
            unet=dict(block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=64,
                      down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                        "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                      attention_head_dim=8),
            text=_CLIP_L, scaling_factor=0.18215),
        "sd1_inpaint": dict(  # 9 input channels; written with pre-transformers-4 CLIP names
            unet=dict(in_channels=9, block_out_channels=(32, 64), layers_per_block=1,
                      cross_attention_dim=64, attention_head_dim=8,
                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
            text=_CLIP_L, scaling_factor=0.18215),
        "sd2": dict(
            unet=dict(block_out_channels=(64, 128, 128), layers_per_block=1, cross_attention_dim=64,
                      down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                        "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                      attention_head_dim=[1, 2, 2], use_linear_projection=True),
            # 23 layers: the file holds 24, of which SD 2.x uses 23.
            text=dict(_CLIP_L, num_hidden_layers=23, hidden_act="gelu"), scaling_factor=0.18215),
        "sdxl": dict(
            unet=dict(block_out_channels=(64, 128), layers_per_block=2,
                      cross_attention_dim=64 + 128, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                      transformer_layers_per_block=[1, 2], attention_head_dim=[1, 2],
                      use_linear_projection=True, addition_embed_type="text_time",
                      addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8),
            text=_CLIP_L,
            text_2=dict(_CLIP_L, hidden_size=128, num_attention_heads=2, intermediate_size=256,
                        hidden_act="gelu", projection_dim=32),
            scaling_factor=0.13025),
    }

    def __init__(self, root: pathlib.Path):
        self.root = root
        self._parts, self._files, self._folders = {}, {}, {}

    def parts(self, family: str) -> dict:
        """Torch models keyed like `SingleFileCheckpoint.parts`; shared, so never change them."""
        if family not in self._parts:
            import diffusers
            import torch
            import transformers

            spec = self.FAMILIES[family]
            torch.manual_seed(len(family))
            parts = {
                "unet": diffusers.UNet2DConditionModel(sample_size=8, norm_num_groups=32,
                                                       **spec["unet"]),
                "vae": diffusers.AutoencoderKL(scaling_factor=spec["scaling_factor"], **_VAE),
                "text_encoder": transformers.CLIPTextModel(
                    transformers.CLIPTextConfig(**spec["text"])),
            }
            if "text_2" in spec:
                parts["text_encoder_2"] = transformers.CLIPTextModelWithProjection(
                    transformers.CLIPTextConfig(**spec["text_2"]))
            # diffusers zero-initialises some layers; random everywhere makes equality meaningful.
            with torch.no_grad():
                for model in parts.values():
                    for p in model.parameters():
                        p.normal_()
            self._parts[family] = {k: m.eval() for k, m in parts.items()}
        return self._parts[family]

    def reference_state(self, family: str, part: str) -> dict[str, np.ndarray]:
        """A part's state dict in the names `read_single_file` promises (transformers 5 saves
        CLIPTextModel without `text_model.`; real checkpoints and transformers 4 have it)."""
        state = writer.to_numpy(self.parts(family)[part].state_dict())
        if part.startswith("text_encoder"):
            state = {writer.text_model_key(k): v for k, v in state.items()
                     if not k.endswith("position_ids")}
        return state

    def original_state(self, family: str, *, buffers=True, ema=None) -> dict[str, np.ndarray]:
        """The parts in the original (ldm / sgm) layout, as a single file holds them."""
        parts = {k: m.state_dict() for k, m in self.parts(family).items()}
        return writer.build_single_file(
            family=family.removesuffix("_inpaint"),
            layers_per_block=self.FAMILIES[family]["unet"]["layers_per_block"], buffers=buffers,
            ema=ema, clip_with_text_model=family != "sd1_inpaint", **parts)

    def single_file(self, family: str, dtype: str = "float32") -> pathlib.Path:
        """`original_state(family)` saved as one safetensors file of `dtype`."""
        if (family, dtype) not in self._files:
            path = self.root / f"{family}-{dtype}.safetensors"
            writer.write_single_file(path, self.original_state(family), dtype=np.dtype(dtype))
            self._files[family, dtype] = path
        return self._files[family, dtype]

    def diffusers_folder(self, family: str) -> pathlib.Path:
        """The parts as a diffusers folder (model_index.json, tokenizers, SD 1.5's scheduler)."""
        if family not in self._folders:
            from benchmarks.checkpoints import save_diffusers_folder
            from sdjax.weights.presets import preset

            self._folders[family] = save_diffusers_folder(
                self.parts(family), self.root / f"{family}-diffusers",
                scheduler=preset("sd15")["scheduler"])
        return self._folders[family]


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> TinySD:
    return TinySD(tmp_path_factory.mktemp("tiny_sd"))
