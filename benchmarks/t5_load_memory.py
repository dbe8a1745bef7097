"""Peak memory (RSS) while loading a T5 encoder of T5-XXL's shapes (SD3's and Flux's long-prompt
encoder, ~4.8e9 params) in bfloat16 with `sdjax.weights.t5.load_t5`.

    python -m benchmarks.t5_load_memory                 # T5-XXL: writes ~9.5 GB under --workdir
    python -m benchmarks.t5_load_memory --preset=tiny   # seconds; what the tests run

The folder is a transformers T5EncoderModel folder of random bfloat16 weights, written one block
per safetensors shard (with model.safetensors.index.json, as the released ones are sharded), so
that no more than one block is ever in memory here. It is loaded in a fresh process
(`benchmarks.load_memory.measure`); the figures are that process's peak RSS (VmHWM, and
ru_maxrss) and the peak above its RSS once the libraries are imported, against the bytes of the
weights in the files. The folder is deleted afterwards unless --keep.
Target: peak above baseline <= 1.3x the files' bytes (one copy of the params, one tensor in flight).
"""
from __future__ import annotations

import json
import os
import shutil

from absl import app, flags

# Importing it defines its flags too: --preset and --workdir are shared, the others unused here.
from benchmarks.load_memory import _STATUS, measure

PRESETS = {
    "xxl": dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64),
    "tiny": dict(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
}

flags.DEFINE_integer("layers", 0, "number of blocks (default: the preset's)")
flags.DEFINE_bool("keep", False, "keep the checkpoint folder")
FLAGS = flags.FLAGS
FLAGS.set_default("preset", "xxl")

_LOADER = _STATUS + """
import json, resource, sys
import jax, jax.numpy as jnp, numpy as np
from sdjax.weights.t5 import load_t5
base = status_kib("VmRSS")
config, params = load_t5(sys.argv[1], dtype=jnp.bfloat16)
leaves = jax.tree.leaves(params)
print(json.dumps({"base_kib": base, "peak_kib": status_kib("VmHWM"),
                  "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "params": sum(int(x.size) for x in leaves),
                  "dtypes": sorted({str(x.dtype) for x in leaves})}))
"""


def block_tensors(config: dict, block: int) -> dict[str, tuple[int, ...]]:
    """The transformers names and shapes of one T5 encoder block (block 0 holds the position
    bias table); the gated (v1.1) feed-forward."""
    d, inner, ff = config["d_model"], config["num_heads"] * config["d_kv"], config["d_ff"]
    prefix = f"encoder.block.{block}.layer."
    shapes = {f"{prefix}0.SelfAttention.{n}.weight": (inner, d) for n in "qkv"}
    shapes[f"{prefix}0.SelfAttention.o.weight"] = (d, inner)
    shapes[f"{prefix}0.layer_norm.weight"] = (d,)
    shapes[f"{prefix}1.DenseReluDense.wi_0.weight"] = (ff, d)
    shapes[f"{prefix}1.DenseReluDense.wi_1.weight"] = (ff, d)
    shapes[f"{prefix}1.DenseReluDense.wo.weight"] = (d, ff)
    shapes[f"{prefix}1.layer_norm.weight"] = (d,)
    if block == 0:
        shapes[f"{prefix}0.SelfAttention.relative_attention_bias.weight"] = (
            config["relative_attention_num_buckets"], config["num_heads"])
    return shapes


def write_t5_folder(folder: str, config: dict, seed: int = 0) -> int:
    """A sharded transformers T5EncoderModel folder of random bfloat16 weights, one shard per
    block (embedding and final norm in the last); returns the weights' bytes."""
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards = [block_tensors(config, i) for i in range(config["num_layers"])]
    shards.append({"shared.weight": (config["vocab_size"], config["d_model"]),
                   "encoder.final_layer_norm.weight": (config["d_model"],)})
    weight_map, total = {}, 0
    for i, shapes in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for key, shape in shapes.items():
            values = np.ones(shape, np.float32) if key.endswith("layer_norm.weight") else \
                rng.standard_normal(shape, dtype=np.float32) * np.float32(0.05)
            tensors[key] = values.astype(ml_dtypes.bfloat16)
            del values
            weight_map[key] = name
            total += tensors[key].nbytes
        save_file(tensors, os.path.join(folder, name))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"architectures": ["T5EncoderModel"], "model_type": "t5",
                   "feed_forward_proj": "gated-gelu", "torch_dtype": "bfloat16", **config}, f,
                  indent=2)
    return total


def main(_):
    from benchmarks import timing

    if FLAGS.preset not in PRESETS:
        raise app.UsageError(f"--preset={FLAGS.preset}: choose one of {', '.join(PRESETS)}")
    config = dict(PRESETS[FLAGS.preset], relative_attention_num_buckets=32,
                  relative_attention_max_distance=128)
    if FLAGS.layers:
        config["num_layers"] = FLAGS.layers
    folder = os.path.join(FLAGS.workdir, f"t5-{FLAGS.preset}-{config['num_layers']}")
    try:
        file_bytes = write_t5_folder(folder, config)
        r = measure(_LOADER, folder)
    finally:
        if not FLAGS.keep:
            shutil.rmtree(folder, ignore_errors=True)
    mib = lambda kib: kib / 1024
    files = file_bytes / 2**20
    base, peak, maxrss = mib(r["base_kib"]), mib(r["peak_kib"]), mib(r["ru_maxrss_kib"])
    print(f"peak RSS loading a T5 encoder ({FLAGS.preset}, {config['num_layers']} blocks) with "
          f"load_t5(dtype=bfloat16) from {folder}; params stored as {', '.join(r['dtypes'])}")
    print(timing.table(
        ["params (M)", "files MiB", "base MiB", "peak MiB (VmHWM)", "ru_maxrss MiB",
         "(peak − base) / files", "peak / files"],
        [[r["params"] / 1e6, files, base, peak, maxrss, (peak - base) / files, peak / files]]))


if __name__ == "__main__":
    app.run(main)
