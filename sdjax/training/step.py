"""The train step: one jitted `train_step(state, batch, key) -> (state, metrics)` per objective.

Objectives (chosen by the task object, each a pure `loss(params, batch, key) -> (loss, metrics)`):
- `LDMTask`: latent diffusion. Frozen VAE encodes pixels to a posterior sample scaled by the VAE's
  scaling factor (or the batch brings precomputed, unscaled latents), captions are dropped to the
  empty prompt with some probability, the text encoder(s) run trained or frozen as their param
  groups say, noise (optionally offset) at uniform timesteps, eps / v / x0 target, min-SNR-gamma.
- `training.flow.FlowTask`: rectified flow matching of the SD3 and Flux transformers (diffusers'
  SD3 / Flux training scripts): velocity target, SD3's timestep densities and loss weightings.
- `VAETask`: the KL autoencoder's reconstruction + beta * KL.
- `CLIPTask`: CLIP's symmetric contrastive loss over the global batch.
- `training.lora.LoRATask`: `LDMTask` or `FlowTask` on a frozen model with trained LoRA factors
  (kohya's LoRA; diffusers' for the transformers).
- `training.controlnet.ControlNetTask`: `LDMTask` on a frozen model whose U-Net takes a trained
  ControlNet's residuals (`control`).

Non-finite guard: a step whose loss or gradient norm is not finite leaves the whole state as it
was, `step` included (the optimizer's counters, the EMA and `step` never disagree), and reports
`finite = 0`. The loop counts such steps and derives each call's key from its own call counter,
so a retried step sees new noise.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sdjax import parallel
from sdjax.diffusion.schedules import add_noise
from sdjax.models.clip import CLIPConfig, CLIPModel
from sdjax.models.layers import model_variables
from sdjax.models.unet import UNet
from sdjax.models.vae import AutoencoderKL, scale_latents
from sdjax.text.conditioning import encode_text, sdxl_time_ids
from sdjax.weights.architecture import Architecture
from sdjax.training import objectives
from sdjax.training.state import TrainState, cast_for_compute, learning_rates

OBJECTIVES = ("ldm", "flow", "vae", "clip")


def text_conditioning(arch: Architecture, params: dict, ids: jax.Array, clip_skip: int = 0) -> dict:
    """ids (B, encoders, 77) -> {"context": (B, 77, D)[, "text_embeds": (B, P) for SDXL]}: the
    conditioning sampling builds (`text.conditioning.encode_text`) for one 77-token chunk, no emphasis."""
    ids = ids[:, :, None, :]
    return encode_text(arch, params, ids, jnp.ones((ids.shape[0],) + ids.shape[2:], jnp.float32),
                       clip_skip)


def training_latents(arch: Architecture, params: dict, batch: dict, key: jax.Array) -> jax.Array:
    """What a diffusion objective denoises, float32, no gradient: the frozen VAE's posterior
    sample (drawn from `key`) of the batch's "pixels", or its precomputed unscaled "latents",
    scaled as the VAE's config says (`models.vae.scale_latents`: shift, then scaling factor)."""
    if "latents" in batch:
        z = batch["latents"].astype(jnp.float32)
    else:
        posterior = AutoencoderKL(arch.vae, dtype=arch.dtype).apply(
            {"params": params["vae"]}, batch["pixels"].astype(arch.dtype),
            method=AutoencoderKL.encode)
        z = posterior.sample(key).astype(jnp.float32)
    return jax.lax.stop_gradient(scale_latents(z, arch.vae))


class WrappingTask:
    """What a task that runs the latent-diffusion objective `self.task` with something added (a
    LoRA, new token rows, a ControlNet) reports as its own: the objective's dtype and target."""

    @property
    def dtype(self):
        return self.task.dtype

    @property
    def prediction_type(self) -> str:
        return self.task.prediction_type


@dataclasses.dataclass(frozen=True, eq=False)
class LDMTask:
    """Latent-diffusion objective of one architecture. `empty_ids` (encoders, 1, 77): the empty
    prompt, which caption dropout substitutes. `arch.dtype` is the compute dtype."""
    arch: Architecture
    empty_ids: np.ndarray
    prediction_type: str = "epsilon"
    snr_gamma: Optional[float] = None
    offset_noise: float = 0.0
    caption_dropout: float = 0.0
    clip_skip: int = 0
    remat: bool = False

    @property
    def dtype(self):
        return self.arch.dtype

    def __post_init__(self):
        objectives._check_prediction_type(self.prediction_type)
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")

    def loss(self, params: dict, batch: dict, key: jax.Array,
             control: Optional[Callable[..., tuple]] = None):
        """batch: "pixels" (B, H, W, 3) in [-1, 1] or "latents" (B, h, w, c) unscaled VAE latents;
        "input_ids" (B, encoders, 1, 77). Adapters in params[ADAPTERS_KEY] (LoRA training) reach
        the U-Net and the text encoders. `control(noisy, timesteps, context, added_cond)`: the
        (down residuals, mid residual) the U-Net adds (a ControlNet's), or None."""
        arch = self.arch
        latent_key, drop_key, noise_key, time_key = jax.random.split(key, 4)
        latents = training_latents(arch, params, batch, latent_key)
        b = latents.shape[0]

        ids = objectives.caption_dropout(drop_key, batch["input_ids"], self.empty_ids,
                                         self.caption_dropout)
        cond = text_conditioning(arch, params, ids[:, :, 0], self.clip_skip)
        added = None
        if arch.family == "sdxl":
            h, w = (s * arch.latent_factor for s in latents.shape[1:3])
            added = {"text_embeds": cond["text_embeds"], "time_ids": sdxl_time_ids(h, w, b)}

        if self.offset_noise > 0:
            noise = objectives.offset_noise(noise_key, latents.shape, self.offset_noise)
        else:
            noise = jax.random.normal(noise_key, latents.shape, jnp.float32)
        timesteps = objectives.sample_timesteps(time_key, b, arch.schedule.num_train_timesteps)
        alphas_cumprod = arch.schedule.alphas_cumprod
        noisy = add_noise(alphas_cumprod, latents, noise, timesteps)
        noisy, context = noisy.astype(arch.dtype), cond["context"].astype(arch.dtype)
        residuals = None if control is None else control(noisy, timesteps, context, added)
        prediction = UNet(arch.unet, dtype=arch.dtype, remat=self.remat).apply(
            model_variables(params, "unet"), noisy, timesteps, context, added, control=residuals)
        loss, _ = objectives.diffusion_loss(prediction, latents, noise, timesteps, alphas_cumprod,
                                            self.prediction_type, self.snr_gamma)
        return loss, {}


@dataclasses.dataclass(frozen=True, eq=False)
class VAETask:
    """KL-autoencoder objective: decode a posterior sample, reconstruction + kl_weight * KL."""
    arch: Architecture
    kl_weight: float = 1e-6
    reconstruction_loss: str = "l1"
    remat: bool = False

    @property
    def dtype(self):
        return self.arch.dtype

    def loss(self, params: dict, batch: dict, key: jax.Array):
        vae = AutoencoderKL(self.arch.vae, dtype=self.arch.dtype, remat=self.remat)
        pixels = batch["pixels"]
        posterior = vae.apply({"params": params["vae"]}, pixels.astype(self.arch.dtype),
                              method=AutoencoderKL.encode)
        reconstruction = vae.apply({"params": params["vae"]}, posterior.sample(key),
                                   method=AutoencoderKL.decode)
        loss, metrics = objectives.vae_loss(reconstruction, pixels, posterior.mean, posterior.logvar,
                                            self.kl_weight, self.reconstruction_loss)
        return loss, {"reconstruction": metrics["reconstruction"], "kl": metrics["kl"]}


@dataclasses.dataclass(frozen=True, eq=False)
class CLIPTask:
    """CLIP contrastive objective on params["clip"]; batch "pixels" (B, S, S, 3), "input_ids" (B, L)
    and optionally "negative_input_ids" (B, K, L): hard-negative captions every image is also
    scored against (`objectives.clip_contrastive_loss`)."""
    config: CLIPConfig
    dtype: Any = jnp.float32
    remat: bool = False

    def loss(self, params: dict, batch: dict, key: jax.Array):
        del key  # deterministic
        model = CLIPModel(self.config, dtype=self.dtype, remat=self.remat)
        out = model.apply({"params": params["clip"]}, batch["input_ids"],
                          batch["pixels"].astype(self.dtype))
        negatives = None
        if "negative_input_ids" in batch:
            ids = batch["negative_input_ids"]
            negatives = model.apply({"params": params["clip"]}, ids.reshape(-1, ids.shape[-1]),
                                    method=CLIPModel.get_text_features)
            negatives = negatives.reshape(ids.shape[0], ids.shape[1], -1)
        loss, metrics = objectives.clip_contrastive_loss(
            out.text_output.text_embeds, out.vision_output.image_embeds,
            params["clip"]["logit_scale"], negatives)
        return loss, {k: v for k, v in metrics.items() if k != "loss"}


def _select(ok: jax.Array, new, old):
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def train_step(task, state: TrainState, batch: dict, key: jax.Array) -> tuple[TrainState, dict]:
    """One micro-step of `task` on the global `batch` (unjitted; see `make_train_step`).

    Gradients flow only into the optimizer's trainable models, w.r.t. float32 masters; the forward
    pass sees the params cast to the task's compute dtype. Metrics: loss, grad_norm (global norm of
    this micro-batch's gradients, before clipping), param_norm (trainable models, after the
    step), lr/<model> (the rate this step applied), finite (0: the update was skipped), plus the
    objective's own."""
    trainable = state.optimizer.trainable

    def loss_of(trained):
        params = {**state.params, **trained}
        if jnp.dtype(task.dtype) != jnp.float32:
            params = cast_for_compute(params, task.dtype)
        return task.loss(params, batch, key)

    trained = {name: state.params[name] for name in trainable}
    (loss, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(trained)
    # Frozen models take zero gradients, which the optimizer discards unread (dead code to XLA).
    full_grads = {name: grads[name] if name in grads else jax.tree.map(jnp.zeros_like, sub)
                  for name, sub in state.params.items()}
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    rates = learning_rates(state)
    new = state.apply_gradients(full_grads, finite)
    # What the step would keep must be finite too (an overflowing update): else it is skipped. The
    # guarded Adam has then already taken the (finite) gradients into its moments. One global norm
    # (the metric's): a finiteness reduction per leaf made XLA compile the tiny step 5x slower.
    new_norm = optax.tree.norm({name: new.params[name] for name in trainable})
    finite = finite & jnp.isfinite(new_norm)
    state = state.replace(step=jnp.where(finite, new.step, state.step),
                          params={**state.params, **_select(
                              finite, {n: new.params[n] for n in trainable},
                              {n: state.params[n] for n in trainable})},
                          opt_state=state.optimizer.keep_if_finite(finite, new.opt_state,
                                                                   state.opt_state),
                          ema_params=(None if state.ema_params is None else
                                      _select(finite, new.ema_params, state.ema_params)))
    metrics = {"loss": loss.astype(jnp.float32), "grad_norm": grad_norm,
               "param_norm": jnp.where(finite, new_norm,
                                       optax.tree.norm({n: state.params[n] for n in trainable})),
               "finite": finite.astype(jnp.int32), **aux}
    metrics.update({f"lr/{name}": rate for name, rate in rates.items()})
    return state, metrics


def state_sharding(mesh: jax.sharding.Mesh, state: TrainState) -> TrainState:
    """Shardings of every leaf of a train state: params, their optimizer moments and EMA split
    alike over fsdp (same shapes, same decision), scalars and keys replicated."""
    return parallel.param_sharding(mesh, state)


def make_train_step(task, mesh: jax.sharding.Mesh, state_shardings: TrainState,
                    on_trace: Optional[Callable[[], None]] = None) -> Callable:
    """`train_step` jitted on `mesh`: the state donated and kept in `state_shardings`, the batch
    split over every device, the key and metrics replicated."""
    def step(state, batch, key):
        if on_trace is not None:
            on_trace()
        return train_step(task, state, batch, key)

    return jax.jit(step, in_shardings=(state_shardings, parallel.batch_sharding(mesh),
                                       parallel.replicated(mesh)),
                   out_shardings=(state_shardings, parallel.replicated(mesh)),
                   donate_argnums=(0,))


def place(tree: Any, shardings: Any, *, consume: bool = False) -> Any:
    """Host (or single-device) arrays -> global arrays with `shardings`, on any number of hosts
    (every host holds the whole tree), in fresh buffers that the train step may donate.

    consume: on one process, hand over the arrays already on the devices (float32 masters,
    optimizer moments, EMA) instead of copying them, moved only where `shardings` puts them
    elsewhere; `tree` must not be used afterwards. Copying would hold the train state twice at
    once (SD 1.5 U-Net masters and moments: 10 GB more). Host (numpy) arrays are copied either
    way, so a loaded model's params stay intact when the step donates."""
    def put(x, sharding):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x), sharding),
                                            impl=jax.random.key_impl(x))
        if (consume and isinstance(x, jax.Array) and x.is_fully_addressable
                and sharding.is_fully_addressable):
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding,
                                            lambda index: np.array(host[index]))

    return jax.tree.map(put, tree, shardings)


def device_batch(local: dict, mesh: jax.sharding.Mesh) -> dict:
    """This host's rows of the global batch -> global arrays split over the mesh (every host
    passes its own contiguous slice, in process order). Non-array entries (captions) are dropped."""
    sharding = parallel.batch_sharding(mesh)
    arrays = {k: v for k, v in local.items() if isinstance(v, np.ndarray) and k != "index"}
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in arrays.items()}
