"""Orbax checkpoints of the whole round state: restore the latest good one, else start afresh.

Each checkpoint holds two items: ``state`` (the engine's whole state) and ``meta`` (the config
that wrote it and a SHA-256 fingerprint of the state's bytes). On restore the newest checkpoint
whose meta reads, whose config matches and whose state restores to the same fingerprint wins; an
unreadable or altered one is moved to ``<run>/corrupt_checkpoints/`` with a warning and the
previous one is tried. A checkpoint written by another config stops the run
(``CheckpointMismatchError``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from sflam_jax.config import flatten
from sflam_jax.errors import CheckpointMismatchError

# Fields a resumed run may change: they steer the run (length, logging, checkpoint cadence, where
# the files are) but not the numbers of a round. A protocol adds its own (``Protocol.run_control``);
# every other field must match the checkpoint.
RUN_CONTROL_FIELDS = frozenset(
    {
        "num_rounds",
        "eval_every",
        "eval_from",
        "data.idx_dir",
        "data.data_dir",
        "data.download",
        "train.eval_batch_size",
        "checkpoint.every",
        "checkpoint.max_to_keep",
        "metrics.tensorboard",
        "metrics.progress",
        # Placement: a run may resume on another mesh or number of processes (the numbers agree
        # to float rounding, the order of FedAvg's sums being the only difference).
        "train.stream",
        "train.chunks_per_block",
        "sharding.clients",
        "sharding.model",
        "sharding.rules",
        "sharding.cpu_devices",
        "distributed.enabled",
        "distributed.coordinator_address",
        "distributed.num_processes",
        "distributed.process_id",
        "distributed.cpu_collectives",
    }
)


def to_record(cfg) -> dict:
    """The flattened config as plain JSON values (tuples become lists), as checkpoints store it."""
    return json.loads(json.dumps(flatten(cfg)))


def config_differences(saved: dict, current: dict, run_control=()) -> list[str]:
    """``"field is A there and B here"`` for each field outside ``RUN_CONTROL_FIELDS`` and
    ``run_control`` that differs between two ``to_record`` dicts (a field missing on one side
    counts as different)."""
    missing = object()
    free = RUN_CONTROL_FIELDS | frozenset(run_control)
    out = []
    for field in sorted(set(saved) | set(current)):
        a, b = saved.get(field, missing), current.get(field, missing)
        if field not in free and a != b:
            show = lambda v: "absent" if v is missing else repr(v)  # noqa: E731
            out.append(f"{field} is {show(a)} there and {show(b)} here")
    return out


def _host_value(leaf) -> np.ndarray:
    """A leaf's whole value on this host; an array split across processes is gathered (every
    process must call this in the same order)."""
    if isinstance(leaf, jax.Array) and not (leaf.is_fully_addressable or leaf.is_fully_replicated):
        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(jax.device_get(leaf))


def fingerprint(state) -> str:
    """SHA-256 over every leaf's dtype, shape and bytes, in tree order."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(state):
        array = np.ascontiguousarray(_host_value(leaf))
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


class Checkpointer:
    """Saves the engine's state (any pytree) every ``every`` rounds (and on request) under
    ``directory``.

    Orbax writes each step into a temporary directory and renames it when complete, so a run
    killed mid-write leaves the previous checkpoint as the latest.

    Args:
      directory: where the step directories go.
      every: rounds between checkpoints.
      max_to_keep: newest checkpoints kept (2 or more leave a fallback if the newest is damaged).
      config: the run's flattened config (``config.flatten``), stored with every checkpoint and
        compared on restore.
      run_control: the protocol's own fields a resumed run may change (``Protocol.run_control``).
    """

    def __init__(self, directory: str, every: int, max_to_keep: int, config: dict, run_control=()):
        self.directory = os.path.abspath(directory)
        self.every = every
        self._max_to_keep = max_to_keep
        self._config = config
        self._run_control = tuple(run_control)
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=self._max_to_keep, create=True),
        )

    def restore_or_init(self, initial):
        """The newest good saved state, or ``initial`` when there is none.

        Raises:
          CheckpointMismatchError: the newest readable checkpoint was written by another config.
        """
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                meta = self._manager.restore(
                    step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
                ).meta
                saved_config, saved_print = meta["config"], meta["fingerprint"]
            except Exception as e:  # noqa: BLE001 (any read failure means a damaged checkpoint)
                self._quarantine(step, f"its metadata does not read ({type(e).__name__}: {e})")
                continue
            differences = config_differences(saved_config, self._config, self._run_control)
            if differences:
                raise CheckpointMismatchError(
                    f"the checkpoint of round {step} in {self.directory} was written by a "
                    f"different config: {'; '.join(differences)}. Resume with the config it was "
                    "written with, use another --workdir, or pass --fresh to delete this run's "
                    "checkpoints and metrics and start again."
                )
            try:
                state = self._manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(initial))
                ).state
            except Exception as e:  # noqa: BLE001
                self._quarantine(step, f"its state does not read ({type(e).__name__}: {e})")
                continue
            if fingerprint(state) != saved_print:
                self._quarantine(step, "its state differs from the fingerprint saved with it")
                continue
            return state
        return initial

    def _quarantine(self, step: int, why: str) -> None:
        """Moves a damaged step out of the manager's directory and reopens the manager (process 0
        moves it; every process reopens after it)."""
        target = os.path.join(
            os.path.dirname(self.directory), "corrupt_checkpoints", f"{step}-{time.time_ns()}"
        )
        logging.warning(
            "checkpoint of round %d in %s is damaged: %s; moved to %s, trying the previous one",
            step,
            self.directory,
            why,
            target,
        )
        self._manager.close()
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"sflam_jax quarantine {step}")
        self._manager = self._open()

    def maybe_save(self, state, force: bool = False) -> None:
        step = int(state.round)
        if force or step % self.every == 0:
            meta = {"config": self._config, "fingerprint": fingerprint(state)}
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
                force=True,
            )

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
