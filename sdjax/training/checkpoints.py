"""Train checkpoints with orbax: every K steps, keep the last N, written asynchronously.

A checkpoint holds the train state (the trainable models' params, optimizer state, EMA, step, run
key) and a JSON `meta` item (the loop's step counter, the dataset position, counters). Orbax
writes each step into a temporary folder and renames it when complete, so a write interrupted by a
crash or SIGKILL never replaces the last good checkpoint; `latest_step` and `restore` see only
finalised ones.

Restoring takes a template state laid out as the new run wants it (its shardings, on its mesh):
a checkpoint written on 8 devices restores on 1 and the reverse. Frozen models (a LoRA run's whole
base, a fine-tune's VAE) are not written: the run loads them again, and restoring keeps the
template's (checkpoints written with them still restore).
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging

from sdjax.training.state import TrainState

STATE, META = "state", "meta"


def _state_tree(state: TrainState, params: Optional[tuple[str, ...]] = None) -> dict:
    """What a checkpoint stores of `state`: the params of the models named in `params` (default:
    the trainable ones). Typed PRNG keys are stored as their raw uint32 data."""
    names = state.optimizer.trainable if params is None else params
    tree = {"step": state.step, "params": {name: state.params[name] for name in names},
            "opt_state": state.opt_state, "rng": jax.random.key_data(state.rng)}
    if state.ema_params is not None:
        tree["ema_params"] = state.ema_params
    return tree


def _abstract(tree: Any) -> Any:
    # Host (numpy) leaves, e.g. a frozen model of an unplaced state, restore onto one device.
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=getattr(x, "sharding", default)), tree)


def _first_line(err: Exception, limit: int = 300) -> str:
    text = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    return text if len(text) <= limit else text[:limit] + "..."


class Checkpoints:
    """A directory of train checkpoints (orbax `CheckpointManager`).

    save_every: `save` writes only at multiples of it unless forced; keep: how many to keep
    (None: all); async_save: write in a background thread (`wait` joins it)."""

    def __init__(self, directory: str | os.PathLike, *, save_every: int = 1000,
                 keep: Optional[int] = 3, async_save: bool = True):
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_every = save_every
        # The interval is decided here: orbax would also save the first step it is shown.
        options = ocp.CheckpointManagerOptions(save_interval_steps=1, max_to_keep=keep,
                                               enable_async_checkpointing=async_save, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=(STATE, META))

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: TrainState, meta: dict, *, force: bool = False) -> bool:
        """Start writing checkpoint `step` if it is due (or forced); True if it was started."""
        if not force and step % self.save_every:
            return False
        return self._manager.save(step, args=ocp.args.Composite(
            **{STATE: ocp.args.StandardSave(_state_tree(state)), META: ocp.args.JsonSave(meta)}),
            force=True)

    def restore(self, template: TrainState, step: Optional[int] = None) -> tuple[TrainState, dict]:
        """Checkpoint `step` laid out like `template`: same structure and dtypes required, each leaf
        placed with the template's sharding. Returns (state, meta).

        Without `step`, the newest checkpoint that can be read: a damaged one (truncated or missing
        files, a crash between orbax's writes) is skipped with a one-line warning naming it, and
        the one before it restored; the meta returned is always that of the state returned."""
        if step is not None:
            try:
                return self._restore(template, step)
            except (ValueError, KeyError) as err:
                raise ValueError(f"{self.directory}/{step}: checkpoint does not match this run's "
                                 f"train state ({_first_line(err)})") from None
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"{self.directory}: no complete checkpoint to restore")
        problems = []
        for candidate in steps:
            try:
                restored = self._restore(template, candidate)
            except Exception as err:  # noqa: BLE001 - judged below, by whether an older one reads
                problems.append(f"{candidate}: {_first_line(err)}")
                continue
            # An older checkpoint of the same run restores: the newer ones were damaged.
            for problem in problems:
                logging.warning("checkpoint %s/%s (damaged); restored step %d instead",
                                self.directory, problem, candidate)
            return restored
        raise ValueError(f"{self.directory}: no checkpoint restores into this run's train state "
                         f"(it does not match, or it is damaged): " + "; ".join(problems))

    def _restore(self, template: TrainState, step: int) -> tuple[TrainState, dict]:
        # Checkpoints written before frozen models were left out hold them too: read what is there.
        frozen = [n for n in template.params if n not in template.optimizer.trainable]
        stored = self.stored_models(step)
        target = _state_tree(template, template.optimizer.trainable +
                             tuple(n for n in frozen if n in stored))
        restored = self._manager.restore(step, args=ocp.args.Composite(
            **{STATE: ocp.args.StandardRestore(_abstract(target)), META: ocp.args.JsonRestore()}))
        tree = restored[STATE]
        trainable = set(template.optimizer.trainable)
        params = {**template.params,
                  **{name: sub for name, sub in tree["params"].items() if name in trainable}}
        state = template.replace(step=tree["step"], params=params,
                                 opt_state=tree["opt_state"],
                                 rng=jax.random.wrap_key_data(tree["rng"],
                                                              impl=jax.random.key_impl(template.rng)),
                                 ema_params=tree.get("ema_params"))
        return state, dict(restored[META])

    def stored_models(self, step: int) -> set[str]:
        """The models whose params checkpoint `step` holds (empty when it cannot be read: a
        restore then says what is wrong)."""
        try:
            return set(self._manager.item_metadata(step)[STATE]["params"])
        except Exception:  # noqa: BLE001 - a damaged checkpoint is reported by the restore
            return set()

    def wait(self) -> None:
        """Block until a background write has finished (and been finalised)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
