"""sdjax: latent diffusion (Stable Diffusion) in JAX/Flax."""

__version__ = "0.1.0"

_LAZY = {
    "load_pretrained": "sdjax.weights.pretrained",
    "save_pretrained": "sdjax.weights.pretrained",
    "Pretrained": "sdjax.weights.pretrained",
}


def __getattr__(name):
    # Keeps `import sdjax` light: the loaders pull in jax and flax only when used.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sdjax' has no attribute {name!r}")
