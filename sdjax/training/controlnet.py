"""ControlNet training as diffusers' `examples/controlnet/train_controlnet.py` does it (Zhang et al.
2023), on the same loop, train step and latent-diffusion objective as full fine-tuning.

The ControlNet starts as a copy of the base U-Net's encoder (`weights.controlnet.controlnet_from_
unet`: its conditioning embedding fresh, its zero convs at zero, so a new ControlNet leaves the
U-Net's output exactly as it was) and is the train state's param group "controlnet"; the base
U-Net, VAE and text encoder(s) are frozen groups beside it (no optimizer state, no EMA, not in
checkpoints), unless the run also trains a text encoder at its own rate. Each step the captions
are replaced by the empty prompt with probability `caption_dropout` (the original recipe: 0.5, so
the ControlNet learns to read the control image alone) and the control image zeroed with
probability `control_dropout`; then the unchanged objective runs with the ControlNet's residuals
added to the frozen U-Net's skips and middle block.

Data: the batches bring each image's control image ("control_image", `training.data`). A run on
the shapes world names the function that writes it (`controlnet.shapes_data`, e.g.
`sdjax.data.shapes_control:controlnet_data`, which draws each scene's control image from its own
geometry), as the CLIP objective names its hard negatives: this code does not know that world.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from sdjax.models.controlnet import ControlNet, ControlNetConfig
from sdjax.training import objectives
from sdjax.training.step import WrappingTask
from sdjax.weights.controlnet import ControlNetWeights, controlnet_from_unet, save_controlnet

GROUP = "controlnet"
# The folder a run's export holds the ControlNet in (diffusers' ControlNetModel layout).
EXPORT_FOLDER = "controlnet"
# The models a ControlNet run may also train, each at its own rate; the U-Net and VAE stay frozen.
TRAINABLE_BASE_MODELS = ("text_encoder", "text_encoder_2")
# "Cnet": a step's dropouts come from fold_in(step key, this); the objective keeps the step key
# itself, so a new ControlNet reproduces the base model's loss for the same key.
_STREAM = 0x436E6574


@dataclasses.dataclass(frozen=True)
class ControlNetSettings:
    """`config.controlnet`: the ControlNet's learning rate, the conditioning dropouts, the
    conditioning embedding's widths (() = diffusers' (16, 32, 96, 256), as many stages as the
    VAE downsamples), and for data the run writes itself (the shapes world) the function that
    writes it (`shapes_data`, "package.module:function") and what it is asked for: which control
    image (`shapes_control`), how many examples, and how often each object's position is left
    out of its caption (`drop_position`: the control image shows it)."""
    learning_rate: float = 1e-5
    caption_dropout: float = 0.5
    control_dropout: float = 0.0
    conditioning_embedding_out_channels: tuple[int, ...] = ()
    shapes_data: str = ""
    shapes_control: str = ""
    shapes_examples: int = 0
    drop_position: float = 0.0

    def __post_init__(self):
        if not (isinstance(self.learning_rate, (int, float)) and math.isfinite(self.learning_rate)
                and self.learning_rate > 0):
            raise ValueError(f"controlnet.learning_rate must be a finite number > 0, got "
                             f"{self.learning_rate!r}")
        for field in ("caption_dropout", "control_dropout", "drop_position"):
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise ValueError(f"controlnet.{field} must be in [0, 1], got {value!r}")
        if any(not isinstance(w, int) or w < 1 for w in self.conditioning_embedding_out_channels):
            raise ValueError(f"controlnet.conditioning_embedding_out_channels must be positive "
                             f"integers, got {self.conditioning_embedding_out_channels!r}")
        if bool(self.shapes_control) != (self.shapes_examples > 0):
            raise ValueError("controlnet.shapes_control and controlnet.shapes_examples go "
                             "together: set both (shapes-world data) or neither (your own data)")
        if self.shapes_control and not self.shapes_data:
            raise ValueError("controlnet.shapes_control is set but controlnet.shapes_data names "
                             "no function (\"package.module:function\") that writes the data")
        if self.drop_position and not self.shapes_control:
            raise ValueError("controlnet.drop_position rewrites the shapes world's captions: it "
                             "needs controlnet.shapes_control")


def controlnet_settings(fields: Mapping[str, Any], exclude: Sequence[str] = ()
                        ) -> ControlNetSettings:
    """ControlNetSettings from a config's `controlnet` fields (lists as tuples), leaving out
    `exclude` (the fields the loop reads itself)."""
    known = {f.name for f in dataclasses.fields(ControlNetSettings)}
    unknown = sorted(set(fields) - known - set(exclude))
    if unknown:
        raise ValueError(f"controlnet: unknown settings {unknown}; known: {sorted(known)}")
    return ControlNetSettings(**{k: tuple(v) if isinstance(v, (list, tuple)) else v
                                 for k, v in fields.items() if k in known})


def conditioning_widths(settings: ControlNetSettings, latent_factor: int) -> tuple[int, ...]:
    """The conditioning embedding's widths: the configured ones, or diffusers' default cut to the
    VAE's downsampling (the control image is at pixel size, the residuals at latent size)."""
    stages = int(math.log2(latent_factor)) + 1
    widths = (settings.conditioning_embedding_out_channels
              or ControlNetConfig.conditioning_embedding_out_channels[:stages])
    if len(widths) != stages:
        raise ValueError(f"controlnet.conditioning_embedding_out_channels {tuple(widths)}: "
                         f"{stages} widths needed, one per stage of the VAE's {latent_factor}x "
                         f"downsampling and one more")
    return tuple(widths)


def init_controlnet(model, settings: ControlNetSettings, seed: int) -> ControlNetWeights:
    """A new ControlNet for `model` (a `Pretrained`): its U-Net's encoder, zero convs at zero."""
    latent_factor = 2 ** (len(model.vae_config.block_out_channels) - 1)
    return controlnet_from_unet(
        model.unet_config, model.params["unet"], seed=seed,
        conditioning_embedding_out_channels=conditioning_widths(settings, latent_factor))


def controlnet_groups(groups: dict, settings: ControlNetSettings) -> dict:
    """The optimizer groups of a ControlNet run: "controlnet" at `controlnet.learning_rate` (its
    schedule, warm-up and weight decay from `optimizer.groups.controlnet` when given), a text
    encoder at its own rate when its group trains, every other model frozen."""
    trained = [name for name, group in groups.items() if name != GROUP
               and name not in TRAINABLE_BASE_MODELS and not group.get("frozen", False)]
    if trained:
        raise ValueError(f"optimizer.groups trains {trained}, but a ControlNet run "
                         f"(controlnet.use) keeps the U-Net and VAE frozen; it trains the group "
                         f"{GROUP!r} (and a text encoder, if its group says so)")
    group = dict(groups.get(GROUP, {}))
    if "lr" in group:
        raise ValueError("optimizer.groups.controlnet.lr: the ControlNet's rate is "
                         "controlnet.learning_rate")
    if group.get("frozen", False):
        raise ValueError("optimizer.groups.controlnet.frozen: a ControlNet run trains its "
                         "ControlNet")
    return {**groups, GROUP: {**group, "lr": settings.learning_rate, "frozen": False}}


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: static data of a jitted task
class ControlNetTask(WrappingTask):
    """`task` (the latent-diffusion objective, `step.LDMTask`, with no caption dropout of its own)
    run with the ControlNet of params["controlnet"] feeding the frozen U-Net. The batch brings
    "control_image" (B, H, W, C) in [0, 1] at pixel size."""
    task: Any
    config: ControlNetConfig
    caption_dropout: float = 0.5
    control_dropout: float = 0.0

    def dropouts(self, batch: dict, key: jax.Array) -> tuple[jax.Array, jax.Array, dict]:
        """(input_ids with dropped captions the empty prompt, control images with dropped ones
        zero, {"caption_dropped", "control_dropped"}: the fractions of the batch that the models
        see with the empty prompt, and with a zero control image)."""
        caption_key, control_key = jax.random.split(key)
        ids = batch["input_ids"]
        dropped = objectives.caption_dropout(caption_key, ids, self.task.empty_ids,
                                             self.caption_dropout)
        empty = jnp.asarray(self.task.empty_ids, ids.dtype)[None]
        caption_dropped = jnp.all(dropped == empty, axis=tuple(range(1, ids.ndim)))
        control = batch["control_image"]
        control_dropped = jax.random.uniform(control_key, control.shape[:1]) < self.control_dropout
        control = jnp.where(control_dropped[:, None, None, None], 0.0, control)
        return dropped, control, {"caption_dropped": jnp.mean(caption_dropped.astype(jnp.float32)),
                                  "control_dropped": jnp.mean(control_dropped.astype(jnp.float32))}

    def loss(self, params: dict, batch: dict, key: jax.Array):
        ids, control, rates = self.dropouts(batch, jax.random.fold_in(key, _STREAM))
        controlnet = ControlNet(self.config, dtype=self.dtype, remat=self.task.remat)
        variables = {"params": params[GROUP]}

        def residuals(noisy, timesteps, context, added):
            return controlnet.apply(variables, noisy, timesteps, context, control,
                                    added_cond=added)

        base = {name: value for name, value in params.items() if name != GROUP}
        loss, aux = self.task.loss(base, {**batch, "input_ids": ids}, key, control=residuals)
        return loss, {**aux, **rates}


def export_files(config: ControlNetConfig, params: Mapping[str, Any], model, directory: str,
                 source: str = "") -> dict[str, str]:
    """Write the ControlNet of `params` (host arrays) as `<directory>/controlnet/` (diffusers'
    `ControlNetModel.from_pretrained` and `load_controlnet` read it); when the run also trained a
    text encoder, `model` (the `Pretrained` trained on) with it, as `save_pretrained` writes
    `<directory>`. Returns {"controlnet": path[, "model": path]}."""
    from sdjax.weights.pretrained import save_pretrained

    paths = {}
    trained_base = {name: params[name] for name in TRAINABLE_BASE_MODELS if name in params}
    if trained_base:
        save_pretrained(dataclasses.replace(model, params={**model.params, **trained_base},
                                            source=directory), directory)
        paths["model"] = directory
    paths["controlnet"] = os.path.join(directory, EXPORT_FOLDER)
    save_controlnet(ControlNetWeights(config=config, params=params[GROUP], source=source),
                    paths["controlnet"], overwrite=True)
    return paths


__all__ = ["ControlNetSettings", "ControlNetTask", "EXPORT_FOLDER", "GROUP", "conditioning_widths",
           "controlnet_groups", "controlnet_settings", "export_files", "init_controlnet"]
