"""Tiny latent-diffusion training run: the `tiny` random architecture on a folder of 32x32
image-caption pairs; finishes on a laptop CPU in a minute or two.

    python -m experiments.train --config=configs/train_tiny.py --workdir=/tmp/sdjax_tiny \
        --config.data.folder=/path/to/images_with_txt

Variants: `:vae` trains the tiny VAE, `:clip` a tiny CLIP (contrastive), `:textual_inversion` a
new token `<shape-x>` on the frozen model (`with_textual_inversion`).
"""
import ml_collections


def get_config(arg=None):
    if arg == "textual_inversion":
        return with_textual_inversion(get_config())
    objective = arg or "ldm"
    c = ml_collections.ConfigDict()
    c.objective = objective      # ldm | vae | clip
    c.seed = 0                   # run key (init, noise, timesteps, dropout) and data order
    c.init_from = ""             # any checkpoint load_pretrained reads; "" = random `preset`
    c.preset = "tiny"            # architecture of a random init (sdjax.weights.presets)
    c.vae = ""                   # optional standalone VAE replacing the checkpoint's
    c.total_steps = 20           # train_step calls (skipped non-finite steps count too)
    c.compute_dtype = "float32"  # float32 | bfloat16 (forward/backward); masters stay float32
    c.remat = False              # recompute blocks in the backward pass (memory for time)
    c.fsdp = 1                   # >1: split large params and optimizer moments over this many devices
    c.log_every = 5
    c.max_consecutive_nonfinite = 5  # stop (after a checkpoint of the last good state) at this many

    c.data = ml_collections.ConfigDict()
    c.data.folder = ""           # images with same-named .txt captions
    c.data.manifest = ""         # or a JSONL manifest
    # ControlNet runs: each image's conditioning image, the file of the same relative name here
    # (or the manifest's "conditioning_image", relative to the manifest)
    c.data.conditioning_dir = ""
    # "module:function" rewriting each caption as it is read, f(caption, rng) -> caption, with a
    # fresh rng per epoch and example (e.g. sdjax.data.shapes:prompt_phrasing)
    c.data.caption_transform = ""
    c.data.resolution = 32
    c.data.batch_size = 4        # global batch, over all hosts and devices
    c.data.use_latents = False   # read precomputed unscaled VAE latents (<image>.npy) instead
    c.data.crop = "center"
    c.data.random_flip = False
    c.data.shuffle = True
    c.data.num_workers = 2
    c.data.prefetch = 2

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.grad_clip_norm = 1.0
    c.optimizer.accumulate_steps = 1
    # One param group per model: lr, schedule (constant|cosine|linear), warmup_steps,
    # weight_decay, frozen. Models not listed are frozen.
    c.optimizer.groups = ml_collections.ConfigDict({
        "unet": {"lr": 1e-3, "schedule": "constant", "warmup_steps": 0, "weight_decay": 0.0,
                 "frozen": False},
        "text_encoder": {"lr": 1e-4, "schedule": "constant", "warmup_steps": 0,
                         "weight_decay": 0.0, "frozen": False},
    })
    if objective == "vae":
        c.optimizer.groups = ml_collections.ConfigDict({"vae": {"lr": 1e-3, "frozen": False}})
    if objective == "clip":
        c.optimizer.groups = ml_collections.ConfigDict({"clip": {"lr": 1e-3, "frozen": False}})

    c.ema = ml_collections.ConfigDict()
    c.ema.use = True
    c.ema.decay = 0.999
    c.ema.warmup = "default"     # default | power | none

    c.ldm = ml_collections.ConfigDict()
    # "" = the checkpoint scheduler's; epsilon | v_prediction | sample
    c.ldm.prediction_type = ""
    c.ldm.snr_gamma = 0.0        # min-SNR-gamma weighting; 0 = off
    c.ldm.offset_noise = 0.0
    c.ldm.caption_dropout = 0.1
    c.ldm.clip_skip = 0

    # LoRA training as kohya's sd-scripts does it (sdjax.training.lora; configs/train_lora_tiny.py):
    # the model frozen, LoRA factors trained in the param groups "lora_unet", "lora_text_encoder"
    # (their lr and schedule: kohya's unet_lr / text_encoder_lr). Exported as
    # export/<output_name>.safetensors (kohya's format) and <output_name>.sdjax.safetensors.
    c.lora = ml_collections.ConfigDict()
    c.lora.use = False
    c.lora.output_name = "lora"
    c.lora.network_dim = 4       # rank of Linear / 1x1-conv LoRAs
    c.lora.network_alpha = 1.0   # scale alpha / rank; 0 = the rank (scale 1)
    c.lora.conv_dim = 0          # >0: LoCon on the resnets' and samplers' 3x3 convs, this rank
    c.lora.conv_alpha = 1.0
    # Regular expressions replacing the default targets, searched in each layer's diffusers /
    # transformers name (e.g. r"attn2\.to_(k|v)$"); () = kohya's (sdjax.training.lora).
    c.lora.target_modules = ()
    c.lora.train_unet = True
    c.lora.train_text_encoder = True
    c.lora.dropout = 0.0         # kohya's network_dropout: per element of the down output
    c.lora.rank_dropout = 0.0    # per (example, rank), scale * 1/(1-p)
    c.lora.module_dropout = 0.0  # a whole module skipped for the step

    # ControlNet training as diffusers' examples/controlnet trains it (sdjax.training.controlnet;
    # configs/train_controlnet_tiny.py): the model frozen, a ControlNet copied from its U-Net's
    # encoder trained in the param group "controlnet" (its schedule from optimizer.groups.
    # controlnet, its rate here; a text encoder's group may train too, at its own rate).
    # Batches carry each image's control image (data.conditioning_dir or the manifest's
    # "conditioning_image"). Exported as export/controlnet/ (diffusers' ControlNetModel folder).
    c.controlnet = ml_collections.ConfigDict()
    c.controlnet.use = False
    c.controlnet.learning_rate = 1e-5
    c.controlnet.caption_dropout = 0.5   # captions -> the empty prompt (ldm.caption_dropout must be 0)
    c.controlnet.control_dropout = 0.0   # control images -> zero
    # () = diffusers' (16, 32, 96, 256), cut to the VAE's downsampling (the tiny VAE's 2x: (16, 32))
    c.controlnet.conditioning_embedding_out_channels = ()
    # Data the run writes into <workdir>/data instead of data.folder: the function that writes it
    # ("package.module:function"), which control image ("mask" | "edges": the objects white on
    # black, or their outlines, drawn from each scene's geometry), how many examples, and how
    # often each object's position is left out of its caption (the control image shows it).
    c.controlnet.shapes_data = "sdjax.data.shapes_control:controlnet_data"
    c.controlnet.shapes_control = ""
    c.controlnet.shapes_examples = 0
    c.controlnet.drop_position = 0.0

    # Textual inversion as diffusers' examples/textual_inversion trains it
    # (sdjax.training.textual_inversion; `with_textual_inversion`): the model frozen, only the new
    # token's vectors trained, in the param group "embeddings" (SDXL: both text encoders'). Exported
    # as export/<token>.safetensors (the WebUI's format) and export/learned_embeds.safetensors.
    c.textual_inversion = ml_collections.ConfigDict()
    c.textual_inversion.use = False
    c.textual_inversion.token = "<shape-x>"  # new: not a word of the vocabulary; names the file
    c.textual_inversion.num_vectors = 1
    c.textual_inversion.init_word = "shape"  # one token; every vector starts as its embedding

    c.vae_loss = ml_collections.ConfigDict()
    c.vae_loss.kl_weight = 1e-6
    c.vae_loss.reconstruction = "l1"

    c.clip = ml_collections.ConfigDict()  # architecture of the clip objective's random model
    c.clip.hidden_size = 32
    c.clip.layers = 2
    c.clip.heads = 2
    c.clip.projection_dim = 16
    c.clip.patch_size = 8
    # Per example, captions differing in one attribute that its image is also scored against
    # (NegCLIP-style), written by the function `hard_negative_captions` names:
    # "package.module:function", f(caption, rng, count) -> count captions.
    c.clip.hard_negatives = 0
    c.clip.hard_negative_captions = ""

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 10
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True
    # Also write a native folder (save_pretrained) every K steps; 0 = at the end only.
    c.checkpoint.export_every = 0

    c.sample = ml_collections.ConfigDict()
    c.sample.every = 0           # sample grid every K steps (and at the end); 0 = never
    c.sample.prompts = ("a red circle", "a blue square")
    c.sample.use_ema = True
    c.sample.sampler = "ddim"
    c.sample.steps = 10
    c.sample.cfg_scale = 3.0
    c.sample.seed = 0
    c.lock()
    return c


def with_textual_inversion(c):
    """Config `c` (a full fine-tune's) learning `c.textual_inversion.token` instead: only the
    group "embeddings" trains, at diffusers' settings (AdamW, weight decay 1e-2, constant rate);
    no EMA and no caption dropout (an empty caption holds no token to learn from)."""
    c.textual_inversion.use = True
    with c.unlocked():
        c.optimizer.groups = {"embeddings": {"lr": 5e-3, "schedule": "constant", "warmup_steps": 0,
                                             "weight_decay": 1e-2, "frozen": False}}
    c.ema.use = False
    c.ldm.caption_dropout = 0.0
    return c
