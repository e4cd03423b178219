"""Orbax checkpoints of the whole round state: restore the latest, else start afresh."""

from __future__ import annotations

import os

import orbax.checkpoint as ocp

from sflam_jax.algorithms.base import RoundState


class Checkpointer:
    """Saves ``RoundState`` every ``every`` rounds (and on request) under ``directory``.

    Orbax writes each step into a temporary directory and renames it when complete, so a run
    killed mid-write leaves the previous checkpoint as the latest.
    """

    def __init__(self, directory: str, every: int, max_to_keep: int):
        self.every = every
        self._manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_round(self) -> int | None:
        return self._manager.latest_step()

    def restore_or_init(self, initial: RoundState) -> RoundState:
        """The latest saved state, or ``initial`` when there is none."""
        step = self._manager.latest_step()
        if step is None:
            return initial
        return self._manager.restore(step, args=ocp.args.StandardRestore(initial))

    def maybe_save(self, state: RoundState, force: bool = False) -> None:
        step = int(state.round)
        if force or step % self.every == 0:
            self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
