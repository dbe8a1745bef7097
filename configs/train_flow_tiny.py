"""Rectified-flow training of a tiny random SD3 (MMDiT) or Flux transformer (or any SD3 / Flux
checkpoint, `--config.init_from`) on a folder of 32x32 image-caption pairs, as diffusers'
train_dreambooth_sd3.py / train_dreambooth_flux.py train them: the transformer trained, the CLIP
and T5 encoders and the VAE frozen (give a text encoder a group in `optimizer.groups` to train it
at its own rate); a few hundred steps on a laptop CPU.

    python -c "from sdjax.data.shapes_dataset import write_shapes_folder; write_shapes_folder('data/shapes', 256)"
    python -m experiments.train --config=configs/train_flow_tiny.py:flux --workdir=/tmp/sdjax_flux_tiny \
        --config.data.folder=data/shapes

Variants, comma-separated: `sd3` (the default) or `flux`, and `lora`: a LoRA on the frozen
transformer instead (diffusers' train_dreambooth_lora_sd3.py / _flux.py: their targets, rank 4,
alpha = rank, gaussian init), exported as `export/lora.safetensors` in diffusers' format, which
`StableDiffusion3Pipeline` / `FluxPipeline.load_lora_weights` read.
"""
from configs import train_tiny

FAMILIES = {"sd3": "tiny_sd3", "flux": "tiny_flux"}
# diffusers' --weighting_scheme defaults: logit_normal in the SD3 scripts, none in the Flux ones.
WEIGHTING = {"sd3": "logit_normal", "flux": "none"}


def get_config(arg=None):
    variants = [v for v in (arg or "sd3").split(",") if v]
    unknown = sorted(set(variants) - set(FAMILIES) - {"lora"})
    families = [v for v in variants if v in FAMILIES]
    if unknown or len(families) > 1:
        raise ValueError(f"flow config: variants {variants}; choose one of {sorted(FAMILIES)}, "
                         f"optionally with lora")
    family = families[0] if families else "sd3"
    c = train_tiny.get_config()
    with c.unlocked():
        c.objective = "flow"
        c.preset = FAMILIES[family]
        c.total_steps = 300
        c.log_every = 10
        c.checkpoint.every = 100
        c.optimizer.groups = {
            "transformer": {"lr": 1e-3, "schedule": "constant", "warmup_steps": 0,
                            "weight_decay": 0.0, "frozen": False}}
        c.flow = {
            # logit_normal | mode | uniform (timestep densities); sigma_sqrt | cosmap | none
            # (uniform timesteps, weighted loss): diffusers' --weighting_scheme
            "weighting_scheme": WEIGHTING[family],
            "logit_mean": 0.0,
            "logit_std": 1.0,
            "mode_scale": 1.29,
            # Flux-dev's embedded guidance during training (diffusers' --guidance_scale)
            "guidance": 3.5,
            "caption_dropout": 0.1,   # CLIP and T5 ids together -> the empty caption
            # T5 tokens per caption (0: diffusers' training default, 77 for SD3, 512 for Flux);
            # the tiny models' placeholder T5 vocabulary spells captions letter by letter
            "max_sequence_length": 64,
        }
        c.sample.sampler = "flow_euler"
        c.sample.steps = 10
    if "lora" in variants:
        c.lora.use = True
        c.lora.network_dim = 4
        c.lora.network_alpha = 0.0   # alpha = rank, as diffusers' scripts
        c.lora.train_text_encoder = False
        with c.unlocked():
            c.lora.init = "gaussian"
            c.optimizer.groups = {
                "lora_transformer": {"lr": 1e-3, "schedule": "constant", "warmup_steps": 0,
                                     "weight_decay": 0.0, "frozen": False}}
        c.ema.use = False
        c.flow.caption_dropout = 0.0
    return c
