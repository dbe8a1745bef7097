"""ControlNet training (sdjax.training.controlnet) on the training loop: a new ControlNet leaves the
U-Net's output exactly as it was, only the ControlNet trains (at its own rate; the base frozen, out
of the optimizer state, the EMA and checkpoints), caption and control dropout at their rates, the
export read by diffusers' ControlNetModel reproducing sdjax's residuals; conditioning images cut
with their image's crop box; the shapes world's control images drawn from each scene's geometry;
and through `experiments/train.py` in subprocesses: exact resume, 8 devices vs 1, the export of a
checkpoint.

The fast tests share one compiled ControlNet step on the tiny model; the subprocess runs share one
persistent compilation cache and one reference run.
"""
from __future__ import annotations

import dataclasses
import json
import os
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import train_controlnet_tiny
from sdjax import parallel
from sdjax.data import shapes, shapes_control
from sdjax.models.controlnet import ControlNet
from sdjax.models.unet import UNet
from sdjax.training import controlnet as controlnet_lib
from sdjax.training import data as data_lib
from sdjax.training import loop
from sdjax.training import step as step_lib
from sdjax.training.checkpoints import Checkpoints
from sdjax.training.state import learning_rates
from tests.helpers import flat_params, run_python, take, to_nchw, to_nhwc

BATCH = 4
LR = 1e-3
GROUP = controlnet_lib.GROUP


def _nbytes(tree) -> int:
    return sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def cn_run():
    """The tiny model with a new ControlNet (EMA on), the compiled step, and a batch."""
    config = train_controlnet_tiny.get_config()
    config.ema.use = True
    config.controlnet.learning_rate = LR
    setup = loop.build(config)
    mesh = parallel.make_mesh()
    shardings = step_lib.state_sharding(mesh, setup.state)
    fn = step_lib.make_train_step(setup.task, mesh, shardings)
    rng = np.random.default_rng(0)
    batch = {"pixels": rng.uniform(-1, 1, (BATCH, 32, 32, 3)).astype(np.float32),
             "input_ids": setup.tokenizer(["a red circle", "a blue square"] * 2),
             "control_image": rng.uniform(0, 1, (BATCH, 32, 32, 3)).astype(np.float32)}
    return {"setup": setup, "fn": fn, "mesh": mesh, "shardings": shardings, "batch": batch}


def _step_key(i: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(1), i)


@pytest.fixture(scope="module")
def trained(cn_run):
    """The initial state (host) and the states and metrics after each of 3 steps."""
    run = cn_run
    state = step_lib.place(run["setup"].state, run["shardings"])
    states, metrics = [jax.device_get(run["setup"].state)], []
    for i in range(3):
        state, m = run["fn"](state, step_lib.device_batch(run["batch"], run["mesh"]), _step_key(i))
        states.append(jax.device_get(state))
        metrics.append(jax.device_get(m))
    return states, metrics


def test_a_new_controlnet_adds_exactly_zero_so_the_unet_and_loss_are_the_bases(cn_run):
    setup, batch = cn_run["setup"], cn_run["batch"]
    params = jax.device_get(setup.state.params)
    arch = setup.task.task.arch
    rng = np.random.default_rng(1)
    noisy = rng.standard_normal((BATCH, 16, 16, 4)).astype(np.float32)
    t = np.array([3, 250, 600, 999])

    @jax.jit
    def outputs(params):
        ids = jnp.asarray(batch["input_ids"])[:, :, 0]
        context = step_lib.text_conditioning(arch, params, ids)["context"]
        residuals = ControlNet(setup.controlnet).apply({"params": params[GROUP]}, noisy, t,
                                                       context, batch["control_image"])
        unet = UNet(arch.unet)
        base = unet.apply({"params": params["unet"]}, noisy, t, context)
        controlled = unet.apply({"params": params["unet"]}, noisy, t, context, control=residuals)
        return residuals, base, controlled

    (down, mid), base, controlled = outputs(params)
    assert len(down) == setup.controlnet.num_residuals
    assert all(not np.any(np.asarray(r)) for r in (*down, mid))
    np.testing.assert_array_equal(np.asarray(controlled), np.asarray(base))
    # The training objective too: with no dropout, the ControlNet task's loss is the base's.
    quiet = dataclasses.replace(setup.task, caption_dropout=0.0)
    key = jax.random.key(5)
    base_params = {k: v for k, v in params.items() if k != GROUP}
    without = jax.jit(setup.task.task.loss)(base_params, batch, key)[0]
    assert float(jax.jit(quiet.loss)(params, batch, key)[0]) == float(without)


def test_the_controlnet_starts_as_the_unets_encoder_with_zero_convs_at_zero(cn_run):
    params = cn_run["setup"].state.params
    net, unet = flat_params(params[GROUP]), flat_params(params["unet"])
    copied = [k for k in net if k in unet]
    assert any("down_blocks_0" in k for k in copied) and any("mid_block" in k for k in copied)
    for k in copied:
        np.testing.assert_array_equal(net[k], unet[k], err_msg=k)
    zero = [k for k in net if "controlnet_down_blocks" in k or "controlnet_mid_block" in k
            or "controlnet_cond_embedding']['conv_out" in k]
    assert len(zero) == 2 * (cn_run["setup"].controlnet.num_residuals + 2)
    assert all(not net[k].any() for k in zero)
    # The conditioning embedding takes the 32 px control image to the 16x16 latent: (16, 32).
    assert cn_run["setup"].controlnet.conditioning_embedding_out_channels == (16, 32)


def test_only_the_controlnet_trains_and_the_optimizer_and_ema_hold_nothing_else(cn_run, trained):
    states, metrics = trained
    first, last = states[0], states[-1]
    assert last.optimizer.trainable == (GROUP,)
    assert all(int(m["finite"]) == 1 and m["grad_norm"] > 0 for m in metrics)
    for name in ("unet", "vae", "text_encoder"):
        after = flat_params(last.params[name])
        for path, value in flat_params(first.params[name]).items():
            assert after[path].tobytes() == value.tobytes(), (name, path)
    before, after = flat_params(first.params[GROUP]), flat_params(last.params[GROUP])
    assert all(v.dtype == np.float32 for v in after.values())
    unchanged = [k for k, v in before.items() if np.array_equal(after[k], v)]
    assert not unchanged, unchanged[:5]
    size = _nbytes(last.params[GROUP])
    assert 2 * size <= _nbytes(last.opt_state) < 2 * size + 1024
    assert set(last.ema_params) == {GROUP} and _nbytes(last.ema_params) == size


def test_the_first_step_moves_only_the_zero_convs_by_the_controlnets_rate(trained):
    """Behind zero convs nothing else has a gradient yet; Adam's first update is lr * sign(g)."""
    states, metrics = trained
    assert float(metrics[0][f"lr/{GROUP}"]) == pytest.approx(LR, rel=1e-6)
    assert metrics[0]["lr/unet"] == metrics[0]["lr/text_encoder"] == 0
    before, after = flat_params(states[0].params[GROUP]), flat_params(states[1].params[GROUP])
    zero_convs = {k for k in before if "controlnet_down_blocks" in k or "controlnet_mid_block" in k}
    for k, v in before.items():
        if k in zero_convs:
            np.testing.assert_allclose(np.max(np.abs(after[k] - v)), LR, rtol=1e-3, err_msg=k)
        else:
            np.testing.assert_array_equal(after[k], v, err_msg=k)


def test_the_loss_on_a_fixed_problem_goes_down(cn_run):
    run = cn_run
    state = step_lib.place(run["setup"].state, run["shardings"])
    batch = step_lib.device_batch(run["batch"], run["mesh"])
    losses = []
    for _ in range(8):  # the same noise, timesteps and dropouts every step
        state, metrics = run["fn"](state, batch, _step_key(0))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.98 * losses[0], losses


def test_caption_and_control_dropout_happen_at_their_rates(cn_run, trained):
    setup, batch = cn_run["setup"], cn_run["batch"]
    task = dataclasses.replace(setup.task, control_dropout=0.25)
    assert task.caption_dropout == 0.5  # the original recipe's, from the config
    keys = jax.random.split(jax.random.key(7), 400)
    ids, control, rates = jax.jit(jax.vmap(lambda k: task.dropouts(batch, k)))(keys)
    assert abs(float(np.mean(rates["caption_dropped"])) - 0.5) < 0.05
    assert abs(float(np.mean(rates["control_dropped"])) - 0.25) < 0.05
    # A dropped caption is the empty prompt, a dropped control image zero; the rest untouched.
    empty = np.asarray(task.task.empty_ids)
    for row_ids, row_control in zip(np.asarray(ids)[:20], np.asarray(control)[:20]):
        for i in range(BATCH):
            assert (np.array_equal(row_ids[i], empty)
                    or np.array_equal(row_ids[i], batch["input_ids"][i]))
            assert (not row_control[i].any()
                    or np.array_equal(row_control[i], batch["control_image"][i]))
    # What the train step reported is what its loss fed the models.
    _, metrics = trained
    for i, m in enumerate(metrics):
        _, _, expected = setup.task.dropouts(
            batch, jax.random.fold_in(_step_key(i), controlnet_lib._STREAM))
        assert float(m["caption_dropped"]) == float(expected["caption_dropped"])


def test_checkpoints_hold_the_controlnet_and_its_ema_only(cn_run, trained, tmp_path):
    setup, state = cn_run["setup"], trained[0][-1]
    ckpt = Checkpoints(tmp_path, save_every=1, async_save=False)
    ckpt.save(3, state, {"step": 3})
    ckpt.wait()
    assert ckpt.stored_models(3) == {GROUP}
    restored, _ = ckpt.restore(setup.state)
    ckpt.close()
    for tree in ("params", "ema_params"):
        ours = flat_params(getattr(restored, tree)[GROUP])
        for k, v in flat_params(getattr(state, tree)[GROUP]).items():
            np.testing.assert_array_equal(ours[k], v)
    assert restored.params["unet"] is setup.state.params["unet"]  # the template's base


def test_the_export_loads_in_diffusers_and_gives_sdjaxs_residuals(cn_run, trained, tmp_path):
    import diffusers
    import torch

    from sdjax.weights.controlnet import load_controlnet

    setup, state = cn_run["setup"], trained[0][-1]
    path = loop.export(setup, state, str(tmp_path / "export"), use_ema=False)
    assert sorted(os.listdir(path)) == [controlnet_lib.EXPORT_FOLDER]
    params = state.params[GROUP]
    loaded = load_controlnet(path)
    for k, v in flat_params(params).items():
        np.testing.assert_array_equal(flat_params(loaded.params)[k], v, err_msg=k)

    reference = diffusers.ControlNetModel.from_pretrained(os.path.join(path, "controlnet")).eval()
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    t = np.array([10, 700])
    context = rng.standard_normal((2, 77, 32)).astype(np.float32)
    control = rng.uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
    down, mid = ControlNet(setup.controlnet).apply({"params": params}, x, t, context, control)
    with torch.no_grad():
        ref_down, ref_mid = reference(to_nchw(x), torch.from_numpy(t), torch.from_numpy(context),
                                      to_nchw(control), conditioning_scale=1.0, return_dict=False)
    assert len(ref_down) == len(down)
    for ours, theirs in zip((*down, mid), (*ref_down, ref_mid)):
        theirs = to_nhwc(theirs)
        assert np.max(np.abs(theirs)) > 0
        assert np.max(np.abs(np.asarray(ours) - theirs)) <= 1e-5 * np.max(np.abs(theirs))


def test_a_text_encoder_may_train_beside_it_at_its_own_rate():
    config = train_controlnet_tiny.get_config()
    config.controlnet.learning_rate = 2e-4
    with config.unlocked():
        config.optimizer.groups.text_encoder = {"lr": 3e-5, "frozen": False}
    setup = loop.build(config)
    assert set(setup.state.optimizer.trainable) == {GROUP, "text_encoder"}
    rates = learning_rates(setup.state)
    assert float(rates[GROUP]) == pytest.approx(2e-4) and float(rates["text_encoder"]) == \
        pytest.approx(3e-5)
    assert float(rates["unet"]) == float(rates["vae"]) == 0


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.optimizer.groups.update({"unet": {"lr": 1e-4}}), r"trains \['unet'\].*frozen"),
    (lambda c: c.optimizer.groups.controlnet.update({"lr": 1e-4}), "controlnet.learning_rate"),
    (lambda c: setattr(c.ldm, "caption_dropout", 0.1), "controlnet.caption_dropout"),
    (lambda c: setattr(c.lora, "use", True), "lora.use and controlnet.use"),
    (lambda c: setattr(c.controlnet, "drop_position", 0.5), "drop_position.*shapes_control"),
    (lambda c: setattr(c.controlnet, "conditioning_embedding_out_channels", (16, 32, 96, 256)),
     "2 widths needed"),
])
def test_a_controlnet_run_refuses_settings_it_cannot_honour(edit, message):
    config = train_controlnet_tiny.get_config()
    with config.unlocked():
        edit(config)
    with pytest.raises(ValueError, match=message) as err:
        loop.build(config)
    assert "\n" not in str(err.value)


# --- conditioning images in the data pipeline -----------------------------------------------------

def _asymmetric(h: int, w: int) -> np.ndarray:
    """Every pixel different (a ramp across, another down, their product): any other crop box,
    flip or scale shows."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x * 7 + y * 13) % 256],
                    -1).astype(np.uint8)


def _pairs_agree(batch) -> None:
    """The control image holds the image's pixels (both written with the same content)."""
    image = np.round((batch["pixels"] + 1.0) * 127.5)
    control = np.round(batch["control_image"] * 255.0)
    assert batch["control_image"].dtype == np.float32
    assert 0 <= batch["control_image"].min() and batch["control_image"].max() <= 1
    np.testing.assert_array_equal(control, image)


@pytest.mark.parametrize("source", ["manifest", "conditioning_dir"])
def test_conditioning_images_get_their_images_crop_box_and_flip(tmp_path, source):
    (tmp_path / "images").mkdir()
    (tmp_path / "cond").mkdir()
    lines = []
    for i, (h, w) in enumerate([(24, 40), (40, 24), (30, 52), (36, 20)]):
        pixels = np.roll(_asymmetric(h, w), 5 * i, axis=1)
        Image.fromarray(pixels).save(tmp_path / "images" / f"{i}.png")
        Image.fromarray(pixels).save(tmp_path / "cond" / f"{i}.png")
        (tmp_path / "images" / f"{i}.txt").write_text(f"image {i}")
        lines.append(json.dumps({"image": f"images/{i}.png", "caption": f"image {i}",
                                 "conditioning_image": f"cond/{i}.png"}))
    kwargs = dict(batch_size=4, resolution=16, crop="random", random_flip=True, seed=3,
                  num_epochs=6, prefetch=0, conditioning=True)
    if source == "manifest":
        (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
        ds = data_lib.ImageCaptionDataset.from_manifest(tmp_path / "m.jsonl", **kwargs)
    else:
        ds = data_lib.ImageCaptionDataset.from_folder(tmp_path / "images",
                                                      conditioning_dir=tmp_path / "cond", **kwargs)
    with ds:
        batches = list(ds)
    assert len(batches) == 6
    for batch in batches:
        assert batch["control_image"].shape == (4, 16, 16, 3)
        _pairs_agree(batch)
    # The boxes did move (random crops and flips): the test would see a control image cut apart.
    first = [b["pixels"][list(b["index"]).index(0)] for b in batches]
    assert len({a.tobytes() for a in first}) > 2


def test_a_conditioning_image_stored_at_another_size_stays_registered(tmp_path):
    pixels = _asymmetric(48, 80)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(pixels).resize((40, 24), Image.BICUBIC).save(tmp_path / "a_cond.png")
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "a.png", "caption": "",
                                                  "conditioning_image": "a_cond.png"}))
    ds = data_lib.ImageCaptionDataset.from_manifest(tmp_path / "m.jsonl", batch_size=1,
                                                    resolution=24, prefetch=0, conditioning=True)
    with ds:
        batch = next(ds)
    image = (batch["pixels"][0] + 1) * 127.5
    control = batch["control_image"][0] * 255
    # Half the resolution, so not equal; but the ramps line up (a shifted box would be ~10 off).
    assert np.mean(np.abs(image[..., :2] - control[..., :2])) < 4


def test_a_missing_conditioning_image_is_a_one_line_error_naming_it(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "cond").mkdir()
    for name in ("a", "b"):
        Image.fromarray(_asymmetric(16, 16)).save(tmp_path / "images" / f"{name}.png")
        (tmp_path / "images" / f"{name}.txt").write_text(name)
    Image.fromarray(_asymmetric(16, 16)).save(tmp_path / "cond" / "a.png")
    with pytest.raises(ValueError, match=r"no conditioning image .*cond/b\.png") as err:
        data_lib.ImageCaptionDataset.from_folder(tmp_path / "images", batch_size=1,
                                                 conditioning=True,
                                                 conditioning_dir=tmp_path / "cond")
    assert "\n" not in str(err.value)
    (tmp_path / "m.jsonl").write_text(json.dumps(
        {"image": "images/a.png", "caption": "a", "conditioning_image": "cond/gone.png"}))
    with pytest.raises(ValueError, match=r"cond/gone\.png does not exist"):
        data_lib.ImageCaptionDataset.from_manifest(tmp_path / "m.jsonl", batch_size=1,
                                                   conditioning=True)
    (tmp_path / "plain.jsonl").write_text(json.dumps({"image": "images/a.png", "caption": "a"}))
    with pytest.raises(ValueError, match=r"a\.png: no conditioning image.*conditioning_dir"):
        data_lib.ImageCaptionDataset.from_manifest(tmp_path / "plain.jsonl", batch_size=1,
                                                   conditioning=True)
    # A .png edge map of a .jpg photo is found under its stem.
    Image.fromarray(_asymmetric(16, 16)).save(tmp_path / "images" / "c.jpg")
    Image.fromarray(_asymmetric(16, 16)).save(tmp_path / "cond" / "c.png")
    assert data_lib.conditioning_path(tmp_path / "images" / "c.jpg", tmp_path / "images",
                                      tmp_path / "cond") == str(tmp_path / "cond" / "c.png")


# --- the shapes world ----------------------------------------------------------------------------

def test_control_scenes_are_the_training_streams_own():
    """`training_scenes` must track `shapes.train_examples` draw for draw, or control images
    would show other jitter than their images."""
    examples = take(shapes.train_examples(11, 32), 40)
    for example, (scene, offsets) in zip(examples, shapes_control.training_scenes(11)):
        assert scene == example.scene
        np.testing.assert_array_equal(shapes.render(scene, 32, offsets=offsets), example.image)


def test_the_mask_covers_exactly_the_objects_and_edges_are_its_outline():
    examples = take(shapes.train_examples(4, 32), 30)
    for example, (scene, offsets) in zip(examples, shapes_control.training_scenes(4)):
        mask = shapes_control.control_image(scene, 32, offsets, "mask")
        edges = shapes_control.control_image(scene, 32, offsets, "edges")
        assert mask.dtype == np.uint8 and mask.shape == (32, 32, 3)
        assert (mask == mask[..., :1]).all() and (edges == edges[..., :1]).all()
        background = np.asarray(shapes.COLOURS[scene.background], np.uint8)
        drawn = (example.image != background).any(-1)
        np.testing.assert_array_equal(mask[..., 0] > 0, drawn, err_msg=example.caption)
        assert mask.max() == 255  # every object has pixels it covers whole
        assert (edges[..., 0] <= mask[..., 0]).all() and edges.max() > 0
        # The inside of an object is not an edge.
        assert (edges[..., 0][mask[..., 0] == 255] == 0).any()


def test_shapes_data_pairs_each_image_with_its_control_image(tmp_path):
    images, conditioning = shapes_control.write_control_data(tmp_path, 8, seed=2, image_size=32,
                                                            control="mask")
    names = sorted(p for p in os.listdir(images) if p.endswith(".png"))
    assert names == sorted(p for p in os.listdir(conditioning) if p.endswith(".png"))
    ds = data_lib.ImageCaptionDataset.from_folder(images, conditioning_dir=conditioning,
                                                  batch_size=8, resolution=32, prefetch=0,
                                                  conditioning=True, shuffle=False)
    with ds:
        batch = next(ds)
    for pixels, control, caption in zip(batch["pixels"], batch["control_image"], batch["captions"]):
        scene = shapes.parse_caption(caption)
        background = np.asarray(shapes.COLOURS[scene.background]) / 127.5 - 1
        drawn = np.abs(pixels - background).max(-1) > 1e-6
        np.testing.assert_array_equal(control[..., 0] > 0, drawn, err_msg=caption)


def test_drop_position_leaves_each_objects_position_out_at_its_rate():
    caption = "a small red circle on the left and a large blue square on the right, green background"
    scene = shapes.parse_caption(caption)
    kept = []
    for seed in range(3000):
        out = shapes_control.without_positions(caption, np.random.default_rng([7, seed]), 0.3)
        parsed = shapes.parse_caption(out)
        assert [dataclasses.replace(o, position=None) for o in parsed.objects] == \
            [dataclasses.replace(o, position=None) for o in scene.objects]
        assert parsed.background == scene.background
        kept += [o.position is not None for o in parsed.objects]
    assert abs(1 - np.mean(kept) - 0.3) < 0.03  # 5 sigma
    with pytest.raises(ValueError, match="controlnet.drop_position.*unknown words"):
        shapes_control.without_positions("a photo of a dog", np.random.default_rng(0), 0.5)


def test_a_shapes_controlnet_runs_batches_carry_masks_and_fewer_positions(tmp_path):
    config = train_controlnet_tiny.get_config("shapes")
    config.data.batch_size = 16
    with loop.make_dataset(config, tokenizer=None, workdir=str(tmp_path)) as ds:
        batches = [next(ds) for _ in range(4)]
    assert sorted(os.listdir(tmp_path / "data")) == ["conditioning_mask", "images"]
    objects = [o for b in batches for c in b["captions"] for o in shapes.parse_caption(c).objects]
    assert 0.3 < np.mean([o.position is None for o in objects]) < 0.7
    for batch in batches:
        assert batch["control_image"].shape == (16, 32, 32, 3)
        assert set(np.unique(batch["control_image"][..., 0] > 0)) == {False, True}
    config.controlnet.shapes_control = "depth"
    with pytest.raises(ValueError, match="shapes_control 'depth' is not one of"):
        loop.make_dataset(config, tokenizer=None, workdir=str(tmp_path))


# --- through experiments/train.py ----------------------------------------------------------------

STEPS, EVERY, RUN_BATCH = 4, 2, 8
RUN_SETTINGS = {"data.batch_size": RUN_BATCH, "checkpoint.every": EVERY, "checkpoint.keep": 10,
                "log_every": 1, "ema.use": True, "controlnet.control_dropout": 0.2}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnet_runs")
    env = {"JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(root / "xla_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}

    def train(workdir, *flags, devices=None, **overrides):
        args = [f"--config.{k}={v}" for k, v in {**RUN_SETTINGS, **overrides}.items()]
        with mock.patch.dict(os.environ, env):
            out = run_python("-m", "experiments.train",
                             "--config=configs/train_controlnet_tiny.py:shapes",
                             f"--workdir={workdir}", "--progress=false", *args, *flags,
                             devices=devices)
        assert out.returncode == 0, out.stderr[-4000:]
        return workdir

    reference = train(root / "reference", total_steps=STEPS)
    return {"root": root, "train": train, "reference": reference}


def _restored(workdir, step):
    """Checkpoint `step` of a run, restored here on one device (host arrays)."""
    config = train_controlnet_tiny.get_config("shapes")
    config.data.batch_size, config.ema.use = RUN_BATCH, True
    config.controlnet.control_dropout = 0.2
    setup = loop.build(config)
    state = step_lib.place(setup.state, step_lib.state_sharding(parallel.make_mesh(), setup.state))
    ckpt = Checkpoints(os.path.join(workdir, "checkpoints"))
    restored, meta = ckpt.restore(state, step)
    assert ckpt.stored_models(step) == {GROUP}  # the frozen base is not written
    ckpt.close()
    return jax.device_get(restored), meta


def _tensors(folder):
    from safetensors.numpy import load_file

    return load_file(str(folder / "controlnet" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.slow  # three training runs (one compiles) and an export
def test_resume_gives_a_bit_identical_controlnet_and_export(runs):
    workdir = runs["root"] / "interrupted"
    runs["train"](workdir, total_steps=EVERY)
    runs["train"](workdir, total_steps=STEPS)
    resumed, meta = _restored(workdir, STEPS)
    expected, expected_meta = _restored(runs["reference"], STEPS)
    assert meta == expected_meta
    trained = lambda s: (s.params[GROUP], s.ema_params, s.opt_state)
    theirs = flat_params(trained(expected))
    for name, value in flat_params(trained(resumed)).items():
        np.testing.assert_array_equal(value, theirs[name], err_msg=name)
    # The export at the end, and the one made on demand from the checkpoint, hold them (the EMA).
    runs["train"](workdir, f"--export_checkpoint={STEPS}", total_steps=STEPS)
    reference = _tensors(runs["reference"] / "export")
    assert reference
    for folder in (workdir / "export", workdir / "exports" / f"step_{STEPS:07d}"):
        ours = _tensors(folder)
        assert set(ours) == set(reference)
        for key, value in reference.items():
            np.testing.assert_array_equal(ours[key], value, err_msg=f"{folder}: {key}")


@pytest.mark.slow  # a training run on 8 simulated devices (compiles)
def test_eight_devices_train_the_same_controlnet_as_one(runs):
    workdir = runs["train"](runs["root"] / "eight", devices=8, total_steps=STEPS)
    ours, _ = _restored(workdir, STEPS)
    theirs, _ = _restored(runs["reference"], STEPS)
    losses = [[json.loads(line)["loss"] for line in (w / "metrics.jsonl").read_text().splitlines()]
              for w in (workdir, runs["reference"])]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    mine, expected = flat_params(ours.params[GROUP]), flat_params(theirs.params[GROUP])
    diff = sum(np.sum(np.square(mine[k] - v)) for k, v in expected.items())
    norm = sum(np.sum(np.square(v)) for v in expected.values())
    assert np.sqrt(diff / norm) < 1e-4
