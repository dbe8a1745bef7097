"""Train checkpoints: round trip, keep-last-N, interrupted writes never win, restore across device
counts (8 simulated CPU devices in a subprocess <-> this process's one)."""
import textwrap

import jax
import numpy as np
import pytest

from sdjax import parallel
from sdjax.training import state as state_lib
from sdjax.training import step as step_lib
from sdjax.training.checkpoints import Checkpoints
from tests.helpers import make_state, run_python


def _leaves(state):
    # Frozen models are not checkpointed: a restore keeps the template's (the run loads them again).
    trained = {name: state.params[name] for name in state.optimizer.trainable}
    return jax.tree.leaves(jax.device_get((state.step, trained, state.opt_state,
                                           state.ema_params, jax.random.key_data(state.rng))))


def _assert_same(a, b):
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_round_trip_keeps_last_n_and_only_due_steps(tmp_path):
    ckpt = Checkpoints(tmp_path, save_every=2, keep=2, async_save=True)
    states = {}
    for step in range(1, 7):
        states[step] = make_state(step)
        ckpt.save(step, states[step], {"step": step, "data": {"epoch": 0, "index": step}})
    ckpt.wait()
    assert ckpt.all_steps() == [4, 6]
    restored, meta = ckpt.restore(make_state(0))
    assert meta == {"step": 6, "data": {"epoch": 0, "index": 6}}
    _assert_same(restored, states[6])
    restored, _ = ckpt.restore(make_state(0), step=4)
    _assert_same(restored, states[4])
    ckpt.close()


def test_interrupted_write_never_replaces_the_last_complete_checkpoint(tmp_path):
    ckpt = Checkpoints(tmp_path, save_every=1, async_save=False)
    good = make_state(3)
    ckpt.save(3, good, {"step": 3})
    ckpt.wait()
    ckpt.close()
    # What a write killed mid-way leaves: orbax's temporary folder, never renamed into place.
    partial = tmp_path / "7.orbax-checkpoint-tmp-1732530000000000"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\x00" * 100)
    ckpt = Checkpoints(tmp_path, save_every=1)
    assert ckpt.latest_step() == 3
    restored, meta = ckpt.restore(make_state(0))
    assert meta["step"] == 3
    _assert_same(restored, good)
    ckpt.close()


def test_restore_refuses_a_state_of_another_structure(tmp_path):
    ckpt = Checkpoints(tmp_path, save_every=1, async_save=False)
    ckpt.save(1, make_state(1), {"step": 1})
    ckpt.wait()
    params = {"unet": {"big": np.zeros((256, 512), np.float32)}, "vae": {"w": np.zeros((4, 4), np.float32)}}
    optimizer = state_lib.make_optimizer({"unet": {"lr": 1e-3}, "vae": {"frozen": True}}, 10)
    other = state_lib.init_train_state(params, optimizer, jax.random.key(0), use_ema=True)
    with pytest.raises(ValueError, match="does not match"):
        ckpt.restore(other)
    ckpt.close()


def _run_on_8_devices(code: str) -> None:
    code = "from tests.helpers import make_state\n" + textwrap.dedent(code)
    out = run_python("-c", code, devices=8, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def test_checkpoint_moves_between_8_devices_and_1(tmp_path):
    # 1 device -> 8 (fsdp 2): the big leaf and its moments come back split over fsdp.
    ckpt = Checkpoints(tmp_path / "from1", save_every=1, async_save=False)
    ckpt.save(5, make_state(5), {"step": 5})
    ckpt.wait()
    ckpt.close()
    _run_on_8_devices(f"""
        import numpy as np, jax
        from sdjax import parallel
        from sdjax.training import step as step_lib
        from sdjax.training.checkpoints import Checkpoints
        assert jax.device_count() == 8
        mesh = parallel.make_mesh(fsdp=2)
        template = make_state(0)
        shardings = step_lib.state_sharding(mesh, template)
        template = step_lib.place(template, shardings)
        restored, _ = Checkpoints({str(tmp_path / 'from1')!r}).restore(template)
        big = restored.params["unet"]["big"]
        assert big.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp"), big.sharding
        assert len(big.addressable_shards) == 8 and big.addressable_shards[0].data.shape == (256, 256)
        paths = jax.tree_util.tree_flatten_with_path(restored.opt_state)[0]
        moments = [x for p, x in paths if "big" in jax.tree_util.keystr(p)]
        assert len(moments) == 2 and all(m.sharding.spec == big.sharding.spec for m in moments)
        expected = make_state(5)
        np.testing.assert_array_equal(np.asarray(big), expected.params["unet"]["big"])
        np.testing.assert_array_equal(np.asarray(restored.ema_params["unet"]["big"]),
                                      np.asarray(expected.ema_params["unet"]["big"]))
        # 8 devices -> written for the 1-device restore below.
        ckpt = Checkpoints({str(tmp_path / 'from8')!r}, save_every=1)
        nine = make_state(9)
        ckpt.save(9, step_lib.place(nine, step_lib.state_sharding(mesh, nine)), {{"step": 9}})
        ckpt.wait()
    """)
    mesh = parallel.make_mesh()
    template = make_state(0)
    template = step_lib.place(template, step_lib.state_sharding(mesh, template))
    restored, meta = Checkpoints(tmp_path / "from8").restore(template)
    assert meta["step"] == 9
    assert restored.params["unet"]["big"].sharding.device_set == set(jax.devices())
    _assert_same(restored, make_state(9))


def test_metrics_go_to_jsonl_and_tensorboard(tmp_path):
    """The loop's metrics writer: one JSON line per record, and TensorBoard scalars readable from
    the event file (parsed here from its TFRecord framing with tensorboardX's protos)."""
    import json
    import struct

    from tensorboardX.proto import event_pb2

    from sdjax.training.loop import MetricsWriter

    writer = MetricsWriter(str(tmp_path))
    writer.write(5, {"step": 5, "loss": 0.5, "lr/unet": 1e-3})
    writer.write(10, {"step": 10, "loss": 0.25, "lr/unet": 1e-3})
    writer.close()
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["loss"] for l in lines] == [0.5, 0.25]
    (event_file,) = (tmp_path / "tensorboard").iterdir()
    data, scalars = event_file.read_bytes(), {}
    while data:
        (length,) = struct.unpack("<Q", data[:8])
        event = event_pb2.Event.FromString(data[12:12 + length])
        data = data[12 + length + 4:]
        for value in event.summary.value:
            scalars.setdefault(value.tag, []).append((event.step, round(value.simple_value, 6)))
    assert scalars["loss"] == [(5, 0.5), (10, 0.25)]
    assert scalars["lr/unet"] == [(5, 0.001), (10, 0.001)]
