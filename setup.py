"""sdjax: latent diffusion (Stable Diffusion) in JAX/Flax."""
import setuptools

setuptools.setup(
    name="sdjax",
    version="0.1.0",
    description="Latent diffusion (Stable Diffusion) in JAX/Flax: sampling, training, checkpoints.",
    # experiments/ and configs/ too, so `python -m experiments.generate` runs from any directory.
    packages=setuptools.find_packages(include=["sdjax", "sdjax.*", "experiments", "configs"]),
    package_data={"sdjax": ["assets/*", "assets/**/*"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7,<0.11",
        "flax>=0.10,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "ml-collections>=1.0,<2",
        "absl-py>=2.1,<3",
        "safetensors>=0.4,<1",
        "ml-dtypes>=0.4",
        "numpy>=1.26,<3",
        "pillow>=10,<14",
        "tqdm>=4.66,<5",
        "matplotlib>=3.7",
        "tensorboardX>=2.6",
        "tokenizers>=0.15,<1",  # the CLIP BPE (sdjax/text/tokenizer.py), T5's Unigram
        "sentencepiece>=0.2",  # T5 tokenizer folders holding only spiece.model (text/t5_tokenizer.py)
        "protobuf>=3.20",  # which reads spiece.model's pieces and normalisation table
        "flatbuffers>=23.0",  # jax.export's serialization (sdjax/exported.py)
    ],
    extras_require={
        # References for parity tests; never needed at run time.
        "test": [
            "torch==2.13.0",
            "diffusers>=0.40,<0.50",
            "transformers>=5.0,<6",
            "accelerate>=1.0",
            "peft>=0.21,<1",  # diffusers' load_lora_weights, LoRA parity tests
            "pytest>=8",
            "chex>=0.1.88",
            "opencv-python-headless>=4.8,<6",  # the canny preprocessor, tested like the others
        ],
        # ControlNet preprocessors that need OpenCV ("canny"; sdjax/preprocessors.py).
        "control": ["opencv-python-headless>=4.8,<6"],
    },
)
