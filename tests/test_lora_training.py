"""LoRA training (sdjax.training.lora) on the training loop: only the LoRA factors train, kohya's
targets, init and dropouts, a learning rate per LoRA, float32 masters, checkpoints without the
frozen base; and through `experiments/train.py` in subprocesses: exact resume, 8 devices vs 1, and
the exported kohya file loaded by diffusers reproducing sdjax's outputs with the trained LoRA.

The fast tests share one compiled LoRA step on the tiny model; the subprocess runs share one
persistent compilation cache and one reference run.
"""
from __future__ import annotations

import functools
import json
import os
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import train_lora_tiny
from sdjax import parallel
from sdjax.adapters import formats
from sdjax.adapters.network import Weighted, with_runtime_adapters
from sdjax.models.layers import Dense, model_variables
from sdjax.training import lora, loop
from sdjax.training import state as state_lib
from sdjax.training import step as step_lib
from sdjax.training.checkpoints import Checkpoints
from tests.helpers import flat_params, run_python

BATCH = 4
UNET_LR, TEXT_LR = 1e-3, 5e-4


def _nbytes(tree) -> int:
    return sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def lora_run():
    """The tiny model with a LoCon LoRA on its U-Net and text encoder (EMA on), the compiled step,
    and a batch."""
    config = train_lora_tiny.get_config("locon")
    config.ema.use = True
    config.optimizer.groups.lora_unet.lr = UNET_LR
    config.optimizer.groups.lora_text_encoder.lr = TEXT_LR
    setup = loop.build(config)
    mesh = parallel.make_mesh()
    shardings = step_lib.state_sharding(mesh, setup.state)
    fn = step_lib.make_train_step(setup.task, mesh, shardings)
    rng = np.random.default_rng(0)
    batch = {"pixels": rng.uniform(-1, 1, (BATCH, 32, 32, 3)).astype(np.float32),
             "input_ids": setup.tokenizer(["a red circle", "a blue square"] * 2)}
    return {"setup": setup, "fn": fn, "mesh": mesh, "shardings": shardings, "batch": batch}


@pytest.fixture(scope="module")
def trained(lora_run):
    """The initial state (host) and the states and metrics after each of 3 steps."""
    run = lora_run
    state = step_lib.place(run["setup"].state, run["shardings"])
    states, metrics = [jax.device_get(run["setup"].state)], []
    for i in range(3):
        state, m = run["fn"](state, step_lib.device_batch(run["batch"], run["mesh"]),
                             jax.random.fold_in(jax.random.key(1), i))
        states.append(jax.device_get(state))
        metrics.append(jax.device_get(m))
    return states, metrics


def test_only_the_lora_factors_train_and_the_optimizer_and_ema_hold_nothing_of_the_base(
        lora_run, trained):
    network = lora_run["setup"].network
    states, metrics = trained
    first, last = states[0], states[-1]
    assert set(network.groups) == {"lora_unet", "lora_text_encoder"}
    assert last.optimizer.trainable == network.groups
    assert all(int(m["finite"]) == 1 and m["grad_norm"] > 0 for m in metrics)
    for name in ("unet", "vae", "text_encoder"):
        after = flat_params(last.params[name])
        for path, value in flat_params(first.params[name]).items():
            assert after[path].tobytes() == value.tobytes(), (name, path)
    for group in network.groups:
        before, after = flat_params(first.params[group]), flat_params(last.params[group])
        assert all(after[k].dtype == np.float32 for k in after)
        assert all(not np.array_equal(after[k], v) for k, v in before.items()), group
    # Adam's two moments of the factors, nothing else of any size; the EMA covers the factors only.
    factors = _nbytes({g: last.params[g] for g in network.groups})
    assert 2 * factors <= _nbytes(last.opt_state) < 2 * factors + 1024
    assert set(last.ema_params) == set(network.groups)
    assert _nbytes(last.ema_params) == factors


def test_each_lora_moves_at_its_own_learning_rate(trained):
    """Adam's first update is lr * sign(gradient): the up factors (down has no gradient while up is
    zero, as in kohya's init) move by exactly their group's rate."""
    states, metrics = trained
    np.testing.assert_allclose([metrics[0]["lr/lora_unet"], metrics[0]["lr/lora_text_encoder"]],
                               [UNET_LR, TEXT_LR], rtol=1e-6)
    assert metrics[0]["lr/unet"] == metrics[0]["lr/text_encoder"] == metrics[0]["lr/vae"] == 0
    for group, lr in (("lora_unet", UNET_LR), ("lora_text_encoder", TEXT_LR)):
        before, after = flat_params(states[0].params[group]), flat_params(states[1].params[group])
        ups = [k for k in before if k.endswith("['up']")]
        downs = [k for k in before if k.endswith("['down']")]
        assert all(np.array_equal(before[k], after[k]) for k in downs), group
        moved = max(np.max(np.abs(after[k] - before[k])) for k in ups)
        np.testing.assert_allclose(moved, lr, rtol=1e-3, err_msg=group)


def test_a_new_lora_gives_exactly_the_base_models_loss(lora_run):
    setup = lora_run["setup"]
    params = jax.device_get(setup.state.params)
    base = {k: v for k, v in params.items() if k not in setup.network.groups}
    key = jax.random.key(5)
    lora_loss = jax.jit(setup.task.loss)
    without = jax.jit(setup.task.task.loss)(base, lora_run["batch"], key)[0]
    assert float(lora_loss(params, lora_run["batch"], key)[0]) == float(without)
    # A LoRA that is not zero changes it (the factors do reach the models).
    moved = {**params, "lora_unet": jax.tree.map(lambda x: x + 0.05, params["lora_unet"])}
    assert float(lora_loss(moved, lora_run["batch"], key)[0]) != float(without)


def test_bfloat16_compute_keeps_float32_lora_masters_and_a_bfloat16_base():
    config = train_lora_tiny.get_config()
    config.compute_dtype = "bfloat16"
    config.ema.use = True
    setup = loop.build(config)
    dtypes = lambda tree: {np.dtype(x.dtype) for x in jax.tree.leaves(tree)}
    assert dtypes({n: setup.state.params[n] for n in ("unet", "vae", "text_encoder")}) == \
        {np.dtype(jnp.bfloat16)}
    rng = np.random.default_rng(0)
    batch = {"pixels": rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32),
             "input_ids": setup.tokenizer(["a red circle", "a blue square"])}
    out, _ = jax.eval_shape(functools.partial(step_lib.train_step, setup.task), setup.state,
                            batch, jax.random.key(0))
    for tree in (setup.state.params, out.params, out.ema_params):
        assert dtypes({g: tree[g] for g in setup.network.groups}) == {np.dtype(np.float32)}
    assert dtypes(out.params["unet"]) == {np.dtype(jnp.bfloat16)}


# --- kohya's targets, init and dropouts -----------------------------------------------------------

def _network(tiny_model, **settings) -> lora.Network:
    return lora.make_network(tiny_model.params, tiny_model.unet_config, lora.LoRAConfig(**settings))


def test_default_targets_are_kohyas(tiny_model):
    plain = {(m.model, m.path): m for m in _network(tiny_model).modules}
    assert plain and all("/attentions_" in p or m == "text_encoder" for m, p in plain)
    text = sorted(p for m, p in plain if m == "text_encoder")
    assert text == sorted(f"layers_{i}/{n}" for i in range(2) for n in
                          ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj",
                           "self_attn/out_proj", "mlp/fc1", "mlp/fc2"))
    assert ("unet", "down_blocks_0/attentions_0/proj_in") in plain
    assert ("unet", "mid_block/attentions_0/transformer_blocks_0/ff/proj") in plain
    assert all(m.rank == 4 and m.alpha == 1.0 for m in plain.values())

    locon = {(m.model, m.path): m for m in _network(tiny_model, conv_dim=8, conv_alpha=0.0).modules}
    conv1 = locon["unet", "down_blocks_0/resnets_0/conv1"]
    assert (conv1.down_shape, conv1.up_shape, conv1.alpha) == ((3, 3, 32, 8), (8, 32), 8.0)
    assert locon["unet", "up_blocks_0/upsample/conv"].rank == 8
    assert locon["unet", "down_blocks_0/downsample/conv"].rank == 8
    # The resnets' Linear and 1x1 conv take the network's rank, as kohya's LoRAModule does.
    assert locon["unet", "down_blocks_1/resnets_0/conv_shortcut"].down_shape == (1, 1, 32, 4)
    assert locon["unet", "down_blocks_0/resnets_0/time_emb_proj"].down_shape == (128, 4)
    for never in ("conv_in", "conv_out", "time_embedding/linear_1"):
        assert ("unet", never) not in locon
    assert set(plain) < set(locon)

    only = _network(tiny_model, target_modules=(r"attn2\.to_(k|v)$",), train_text_encoder=False)
    assert {m.path.rsplit("/", 2)[-2:][1] for m in only.modules} == {"to_k", "to_v"}
    assert only.groups == ("lora_unet",)
    with pytest.raises(ValueError, match="conv1.*conv_dim is 0"):
        _network(tiny_model, target_modules=(r"resnets\.0\.conv1$",))


def test_init_is_kohyas_down_uniform_up_zero(tiny_model):
    network = _network(tiny_model, conv_dim=4)
    factors = network.init(0)
    for module in network.modules:
        f = network.factors(factors, module)
        bound = 1 / np.sqrt(np.prod(module.down_shape[:-1]))
        assert f["down"].shape == module.down_shape and f["up"].shape == module.up_shape
        assert not f["up"].any() and np.abs(f["down"]).max() <= bound
        assert np.abs(f["down"]).max() > 0.9 * bound or f["down"].size < 64


LAYER_IN, RANK, ALPHA = 6, 4, 2.0


def _layer_outputs(config: lora.LoRAConfig, keys, batch: int = 256, tokens: int = 3):
    """One Dense layer with zero base weights and up = identity, so that its output is the LoRA
    branch's rank activations: x.down * alpha / rank * (whatever the dropouts did), for each key."""
    module = lora.Module(model="unet", path="layer", down_shape=(LAYER_IN, RANK),
                         up_shape=(RANK, RANK), alpha=ALPHA)
    network = lora.Network(modules=(module,), config=config)
    rng = np.random.default_rng(0)
    down = rng.standard_normal((LAYER_IN, RANK)).astype(np.float32)
    factors = {"lora_unet": {"layer": {"down": down, "up": np.eye(RANK, dtype=np.float32)}}}
    x = rng.standard_normal((batch, tokens, LAYER_IN)).astype(np.float32)
    base = {"kernel": np.zeros((LAYER_IN, RANK), np.float32), "bias": np.zeros(RANK, np.float32)}

    @jax.jit
    def apply(key):
        collection = network.variables(factors, key, batch)["unet"]["layer"]
        return Dense(RANK).apply({"params": base, "lora": collection}, x)

    full = x @ down * (ALPHA / RANK)
    return x, down, full, [np.asarray(apply(k)) for k in keys]


def _kohya_forward(x, down, rank_mask, p_rank):
    """kohya's LoRAModule.forward (networks/lora.py) with a given rank-dropout mask, in torch:
    lx = lora_down(x); lx = lx * mask (per example and rank); scale = scale / (1 - p);
    org + lora_up(lx) * multiplier * scale."""
    import torch

    lora_down = torch.nn.Linear(LAYER_IN, RANK, bias=False)
    lora_up = torch.nn.Linear(RANK, RANK, bias=False)
    with torch.no_grad():
        lora_down.weight.copy_(torch.from_numpy(down.T))
        lora_up.weight.copy_(torch.eye(RANK))
        lx = lora_down(torch.from_numpy(x))
        lx = lx * torch.from_numpy(rank_mask).unsqueeze(1)
        scale = (ALPHA / RANK) * (1.0 / (1.0 - p_rank))
        return (lora_up(lx) * 1.0 * scale).numpy()


def test_rank_dropout_is_kohyas_mask_per_example_and_rank():
    p = 0.25
    x, down, full, (out,) = _layer_outputs(lora.LoRAConfig(rank_dropout=p), [jax.random.key(3)])
    # One mask per (example, rank), shared by the tokens: read it off the first token.
    mask = (np.abs(out[:, 0]) > 0.5 * np.abs(full[:, 0])).astype(np.float32)
    np.testing.assert_allclose(out, full * mask[:, None] / (1 - p), rtol=1e-5, atol=1e-6)
    assert abs((1 - mask.mean()) - p) < 0.05
    np.testing.assert_allclose(out, _kohya_forward(x, down, mask.astype(np.float32), p),
                               rtol=1e-5, atol=1e-6)


def test_module_dropout_skips_the_whole_module_for_the_step():
    p = 0.5
    keys = [jax.random.key(i) for i in range(200)]
    _, _, full, outs = _layer_outputs(lora.LoRAConfig(module_dropout=p), keys, batch=4)
    skipped = [not out.any() for out in outs]
    assert all(s or np.allclose(out, full, rtol=1e-6) for s, out in zip(skipped, outs))
    assert abs(np.mean(skipped) - p) < 0.12


def test_neuron_dropout_drops_each_element_of_the_down_output():
    p = 0.3
    _, _, full, (out,) = _layer_outputs(lora.LoRAConfig(dropout=p), [jax.random.key(4)])
    kept = np.abs(out) > 0.5 * np.abs(full)
    np.testing.assert_allclose(out, full * kept / (1 - p), rtol=1e-5, atol=1e-6)
    assert abs((1 - kept.mean()) - p) < 0.03
    assert not np.all(kept == kept[:, :1])  # not one mask per example: per element


def test_without_a_key_no_dropout_applies():
    _, _, full, _ = _layer_outputs(lora.LoRAConfig(), [])
    config = lora.LoRAConfig(dropout=0.5, rank_dropout=0.5, module_dropout=0.5)
    module = lora.Module("unet", "layer", (LAYER_IN, RANK), (RANK, RANK), ALPHA)
    network = lora.Network(modules=(module,), config=config)
    factors = {"lora_unet": {"layer": {"down": np.ones((LAYER_IN, RANK)), "up": np.eye(RANK)}}}
    collection = network.variables(factors)["unet"]["layer"]
    assert set(collection) == {"down", "up", "scale"}
    np.testing.assert_array_equal(collection["scale"], np.full(RANK, ALPHA / RANK, np.float32))


# --- configs, groups, checkpoints, export --------------------------------------------------------

def test_a_lora_run_refuses_to_train_the_base_and_needs_a_rate_per_lora():
    config = train_lora_tiny.get_config()
    with config.unlocked():
        config.optimizer.groups.unet = {"lr": 1e-4}
    with pytest.raises(ValueError, match=r"trains \['unet'\].*only its LoRA groups"):
        loop.build(config)
    config = train_lora_tiny.get_config()
    with config.unlocked():
        del config.optimizer.groups["lora_text_encoder"]
    with pytest.raises(ValueError, match="no group for.*lora_text_encoder"):
        loop.build(config)
    # Not training the text encoder's LoRA needs no edit of the groups.
    config = train_lora_tiny.get_config("unet_only")
    assert loop.build(config).network.groups == ("lora_unet",)
    with pytest.raises(ValueError, match="lora.rank_dropout must be in"):
        lora.LoRAConfig(rank_dropout=1.0)


def test_sdxls_second_text_encoder_takes_the_text_encoders_rate_and_kohyas_names():
    modules = tuple(lora.Module(model, "layer", (4, 2), (2, 4), 1.0)
                    for model in ("unet", "text_encoder", "text_encoder_2"))
    network = lora.Network(modules=modules, config=lora.LoRAConfig())
    groups = loop.lora_groups({"lora_unet": {"lr": 1e-4}, "lora_text_encoder": {"lr": 5e-5},
                               "vae": {"frozen": True}}, network)
    assert groups["lora_text_encoder_2"] == {"lr": 5e-5}
    groups = {name: state_lib.ParamGroup(**group) for name, group in groups.items()}
    metadata = lora.kohya_metadata(network, family="sdxl", prediction_type="epsilon",
                                   groups=groups, extra={"ss_seed": 3, "ss_vae_name": None})
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert (metadata["ss_unet_lr"], metadata["ss_text_encoder_lr"]) == ("0.0001", "5e-05")
    assert metadata["ss_seed"] == "3" and "ss_vae_name" not in metadata
    assert "ss_network_args" not in metadata and "ss_network_dropout" not in metadata
    sd2v = lora.kohya_metadata(network, family="sd2", prediction_type="v_prediction",
                               groups=groups, extra={})
    assert (sd2v["ss_base_model_version"], sd2v["ss_v2"]) == ("sd_v2_v", "True")


def test_checkpoints_hold_the_factors_and_not_the_frozen_base(lora_run, trained, tmp_path):
    setup, state = lora_run["setup"], trained[0][-1]
    ckpt = Checkpoints(tmp_path, save_every=1, async_save=False)
    ckpt.save(3, state, {"step": 3})
    ckpt.wait()
    assert ckpt.stored_models(3) == set(setup.network.groups)
    restored, _ = ckpt.restore(setup.state)
    ckpt.close()
    for group in setup.network.groups:
        for k, v in flat_params(state.params[group]).items():
            np.testing.assert_array_equal(flat_params(restored.params[group])[k], v)
    assert restored.params["unet"] is setup.state.params["unet"]  # the template's base


def test_export_writes_kohyas_file_with_its_metadata_and_the_native_file(lora_run, trained,
                                                                        tmp_path):
    setup, state = lora_run["setup"], trained[0][-1]
    path = loop.export(setup, state, str(tmp_path / "export"), use_ema=False)
    kohya, native = (tmp_path / "export" / f"lora{suffix}"
                     for suffix in (".safetensors", ".sdjax.safetensors"))
    from safetensors import safe_open

    with safe_open(kohya, "np") as f:
        metadata, keys = f.metadata(), set(f.keys())
    assert path == str(tmp_path / "export")
    assert metadata["ss_network_module"] == "networks.lora"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "1.0")
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "1.0"}
    assert metadata["ss_base_model_version"] == "sd_v1"
    assert float(metadata["ss_unet_lr"]) == UNET_LR
    assert float(metadata["ss_text_encoder_lr"]) == TEXT_LR
    assert metadata["ss_steps"] == "3" and metadata["ss_seed"] == "0"
    assert float(metadata["ss_training_started_at"]) <= float(metadata["ss_training_finished_at"])
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2.alpha" in keys
    expected = setup.network.adapter(jax.device_get(state.params), "lora")
    for file in (kohya, native):
        loaded = formats.load_adapter(file, setup.model)
        for model, layers in expected.modules.items():
            assert set(loaded.modules[model]) == set(layers)
            for name, factor in layers.items():
                got = loaded.modules[model][name]
                np.testing.assert_array_equal(got.down.reshape(factor.down.shape), factor.down)
                np.testing.assert_array_equal(got.up, factor.up)
                assert got.alpha == factor.alpha


# --- through experiments/train.py ----------------------------------------------------------------

STEPS, EVERY, RUN_BATCH = 6, 3, 8
RUN_SETTINGS = {
    "data.batch_size": RUN_BATCH, "checkpoint.every": EVERY, "checkpoint.keep": 10,
    "log_every": 1, "lora.rank_dropout": 0.25, "lora.module_dropout": 0.1, "lora.dropout": 0.1,
    # Rates that make the trained LoRA visible in the outputs the parity test compares.
    "optimizer.groups.lora_unet.lr": 1e-2, "optimizer.groups.lora_text_encoder.lr": 5e-3,
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from benchmarks.checkpoints import write_diffusers_folder
    from sdjax.data.shapes_dataset import write_shapes_folder

    root = tmp_path_factory.mktemp("lora_runs")
    settings = dict(RUN_SETTINGS, init_from=str(write_diffusers_folder("tiny", root / "base")),
                    **{"data.folder": str(write_shapes_folder(root / "data", 16))})
    env = {"JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(root / "xla_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}

    def train(workdir, *flags, devices=None, **overrides):
        args = [f"--config.{k}={v}" for k, v in {**settings, **overrides}.items()]
        with mock.patch.dict(os.environ, env):
            out = run_python("-m", "experiments.train", "--config=configs/train_lora_tiny.py:locon",
                             f"--workdir={workdir}", "--progress=false", *args, *flags,
                             devices=devices)
        assert out.returncode == 0, out.stderr[-4000:]
        return workdir

    reference = train(root / "reference", total_steps=STEPS)
    return {"root": root, "settings": settings, "train": train, "reference": reference}


def _restored(runs, workdir, step):
    """Checkpoint `step` of a run, restored here on one device (host arrays)."""
    config = train_lora_tiny.get_config("locon")
    for key, value in runs["settings"].items():
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = type(node[leaf])(value)
    setup = loop.build(config)
    state = step_lib.place(setup.state, step_lib.state_sharding(parallel.make_mesh(), setup.state))
    ckpt = Checkpoints(os.path.join(workdir, "checkpoints"))
    restored, meta = ckpt.restore(state, step)
    ckpt.close()
    return setup, jax.device_get(restored), meta


def _tensors(path):
    from safetensors.numpy import load_file

    return load_file(str(path))


@pytest.mark.slow  # three training runs (one compiles) and an export
def test_resume_gives_bit_identical_factors_and_files(runs):
    workdir = runs["root"] / "interrupted"
    runs["train"](workdir, total_steps=EVERY)
    runs["train"](workdir, total_steps=STEPS)
    setup, resumed, meta = _restored(runs, workdir, STEPS)
    _, expected, expected_meta = _restored(runs, runs["reference"], STEPS)
    assert meta == expected_meta
    trained = lambda state: ({g: state.params[g] for g in setup.network.groups}, state.opt_state)
    theirs = flat_params(trained(expected))
    for name, value in flat_params(trained(resumed)).items():
        np.testing.assert_array_equal(value, theirs[name], err_msg=name)
    # The files exported at the end, and those exported on demand from the checkpoint, hold them.
    runs["train"](workdir, f"--export_checkpoint={STEPS}", total_steps=STEPS)
    reference = _tensors(runs["reference"] / "export" / "lora.safetensors")
    for path in (workdir / "export", workdir / "exports" / f"step_{STEPS:07d}"):
        ours = _tensors(path / "lora.safetensors")
        assert set(ours) == set(reference)
        for key, value in reference.items():
            np.testing.assert_array_equal(ours[key], value, err_msg=f"{path}: {key}")


@pytest.mark.slow  # a training run on 8 simulated devices (compiles)
def test_eight_devices_train_the_same_factors_as_one(runs):
    workdir = runs["train"](runs["root"] / "eight", devices=8, total_steps=STEPS)
    setup, ours, _ = _restored(runs, workdir, STEPS)
    _, theirs, _ = _restored(runs, runs["reference"], STEPS)
    mine = flat_params({g: ours.params[g] for g in setup.network.groups})
    expected = flat_params({g: theirs.params[g] for g in setup.network.groups})
    # Same dropout masks (drawn from the step key, whatever the sharding) and the same data: the
    # losses agree to float rounding (other masks would move them by 1e-3 from the second step).
    # The batch-mean reductions sum in another order, which Adam's m / sqrt(v) magnifies on
    # factors with tiny gradients at these high rates (measured: relative L2 5.6e-5).
    losses = [[json.loads(line)["loss"] for line in (w / "metrics.jsonl").read_text().splitlines()]
              for w in (workdir, runs["reference"])]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)
    diff = sum(np.sum(np.square(mine[k] - v)) for k, v in expected.items())
    norm = sum(np.sum(np.square(v)) for v in expected.values())
    assert np.sqrt(diff / norm) < 3e-4


@pytest.mark.slow  # loads the reference run's export into diffusers (torch)
def test_the_kohya_file_loads_in_diffusers_and_reproduces_sdjax(runs):
    import diffusers
    import torch

    from sdjax.models.clip import CLIPTextModel
    from sdjax.models.unet import UNet
    from sdjax.weights.pretrained import load_pretrained
    from tests.helpers import to_nchw, to_nhwc

    export = runs["reference"] / "export"
    setup, restored, _ = _restored(runs, runs["reference"], STEPS)
    model = load_pretrained(runs["settings"]["init_from"])
    native = formats.load_adapter(export / "lora.sdjax.safetensors", model)
    trained = setup.network.adapter(restored.params, "lora")
    for name, factor in trained.modules["unet"].items():  # the native file is the trained LoRA
        np.testing.assert_array_equal(native.modules["unet"][name].up, factor.up)
        assert native.modules["unet"][name].down.dtype == np.float32
    params = with_runtime_adapters(model.params, [Weighted(native)])

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(runs["settings"]["init_from"],
                                                             safety_checker=None)
    rng = np.random.default_rng(0)
    ids = model.tokenizers[0](["a red circle on a blue background"])
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([10, 700])

    def sdjax_outputs(p):
        text = CLIPTextModel(model.text_configs[0]).apply(model_variables(p, "text_encoder"), ids)
        context = np.repeat(np.asarray(text.last_hidden_state), 2, axis=0)
        eps = UNet(model.unet_config).apply(model_variables(p, "unet"), x, t, context)
        return np.asarray(text.last_hidden_state), np.asarray(eps), context

    def diffusers_outputs(context):
        with torch.no_grad():
            hidden = pipe.text_encoder(torch.from_numpy(np.asarray(ids, np.int64)))[0].numpy()
            eps = pipe.unet(to_nchw(x), torch.from_numpy(t), torch.from_numpy(context)).sample
        return hidden, to_nhwc(eps)

    base_text, base_eps, _ = sdjax_outputs(model.params)
    text, eps, context = sdjax_outputs(params)
    pipe.load_lora_weights(str(export), weight_name="lora.safetensors")
    ref_text, ref_eps = diffusers_outputs(context)
    relative = lambda a, b: float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
    assert relative(text, ref_text) <= 1e-5 and relative(eps, ref_eps) <= 1e-5
    # The trained LoRA changes both outputs far beyond that tolerance.
    assert relative(base_text, ref_text) > 1e-3 and relative(base_eps, ref_eps) > 1e-3
