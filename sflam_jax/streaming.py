"""The round of a parallel protocol driven from the host, its clients' samples streamed in blocks.

``Engine.round`` keeps every training image on the device and runs the round as one program. For
populations whose data does not fit, and for several processes that each hold only their own
clients' samples, ``StreamedRound`` runs the same pieces from the host:

1. ``round_plan`` (jitted, identical on every process): sampled clients, their bits and keys;
2. the sampled clients are laid out in slots ``[num_chunks, C]``; with several processes a
   process's slots (the columns its devices train) hold only clients it owns;
3. for each block of ``chunks_per_block`` chunks the host gathers its slots' samples and one jitted
   ``accumulate`` call trains the block and adds it to the running sums (donated in place);
4. ``finish_round`` (jitted) averages and returns the state and metrics.

Device memory holds the model, the running sums and one block of chunks whatever S is. Client k
belongs to process ``k * P // K`` (contiguous ranges of the client ids).
"""

from __future__ import annotations

import jax
import numpy as np

from sflam_jax.algorithms.base import RoundState
from sflam_jax.data.batches import ClientRows, HostClients
from sflam_jax.engine import Engine


def owner_of(num_clients: int, num_processes: int) -> np.ndarray:
    """``[K]`` the process that holds each client's samples (contiguous id ranges)."""
    return (np.arange(num_clients) * num_processes // num_clients).astype(np.int32)


def owned_clients(num_clients: int, num_processes: int, process: int) -> np.ndarray:
    """``[K]`` bool, the clients whose samples ``process`` loads."""
    return owner_of(num_clients, num_processes) == process


def slot_columns(engine: Engine, num_processes: int) -> list[np.ndarray]:
    """For each process, the chunk columns its devices train (all columns for one process)."""
    c = engine.chunk
    if num_processes == 1:
        return [np.arange(c)]
    layout = engine.layout
    shards = layout.client_shards
    per_shard = c // shards
    owners = [{d.process_index for d in row} for row in layout.mesh.devices]
    columns = [[] for _ in range(num_processes)]
    for i, procs in enumerate(owners):
        (p,) = procs  # checked by check_process_layout
        columns[p].extend(range(i * per_shard, (i + 1) * per_shard))
    return [np.asarray(cols, np.int64) for cols in columns]


def check_process_layout(layout, num_processes: int) -> None:
    """Each ``clients`` row of the mesh must sit in one process, and each process needs a row."""
    from sflam_jax.errors import ConfigError

    if num_processes == 1:
        return
    rows = [{d.process_index for d in row} for row in layout.mesh.devices]
    if any(len(r) != 1 for r in rows):
        raise ConfigError(
            f"sharding.model={layout.mesh.shape['model']} spans processes: with "
            f"{num_processes} processes the 'model' axis must fit inside one process's "
            f"{jax.local_device_count()} devices"
        )
    if len(set().union(*rows)) != num_processes:
        raise ConfigError(
            f"sharding.clients={layout.mesh.shape['clients']} leaves processes without "
            f"devices: the mesh must span all {num_processes} processes (0 = every device)"
        )


def arrange(sampled: np.ndarray, owners: np.ndarray, columns: list[np.ndarray], chunk: int):
    """Slots ``[num_chunks, C]`` (position in ``sampled``, -1 empty) for owner-bound columns.

    Process p's i-th sampled client goes to chunk ``i // len(columns[p])`` at column
    ``columns[p][i % len(columns[p])]``; with one process this is the sampling order.
    """
    by_process = [np.flatnonzero(owners[sampled] == p) for p in range(len(columns))]
    num_chunks = max(
        1, max(-(-len(pos) // len(cols)) for pos, cols in zip(by_process, columns, strict=True))
    )
    slots = np.full((num_chunks, chunk), -1, np.int64)
    for pos, cols in zip(by_process, columns, strict=True):
        i = np.arange(len(pos))
        slots[i // len(cols), cols[i % len(cols)]] = pos
    return slots


class StreamedRound:
    """``round(state, key) -> (state, metrics)`` for data held by ``HostClients``.

    Args:
      engine: the round of a parallel protocol; its ``layout`` (required) places the arrays.
      host: this process's client table.
      chunks_per_block: chunks trained per device call.
      up_bits: uplink bits when the engine has no planner.
      state_shardings: NamedShardings of the round state.
      key_of: round index -> the round's key (traced inside the jitted plan; the trainer's
        ``round_key``, so the streamed and the one-program round sample alike).
    """

    def __init__(
        self,
        engine: Engine,
        host: HostClients,
        chunks_per_block: int,
        up_bits,
        state_shardings,
        key_of,
    ):
        self.engine = engine
        self.host = host
        self.chunks_per_block = chunks_per_block
        self.num_processes = jax.process_count()
        self.process = jax.process_index()
        layout = engine.layout
        check_process_layout(layout, self.num_processes)
        self.owners = owner_of(host.num_clients, self.num_processes)
        self.columns = slot_columns(engine, self.num_processes)
        self.local_columns = self.columns[self.process]
        repl = layout.replicated
        self.counts = host.counts
        self.block_sharding = layout.block_sharding()
        sums_sh = (state_shardings.params_c, state_shardings.params_s, repl, repl)
        self._plan = jax.jit(
            lambda counts, r: engine.round_plan(counts, key_of(r), up_bits), out_shardings=repl
        )
        self._empty = jax.jit(engine.empty_sums, out_shardings=sums_sh)
        self._accumulate = jax.jit(
            self._accumulate_block, donate_argnums=1, out_shardings=(sums_sh, repl)
        )
        self._finish = jax.jit(
            self._finish_round,
            donate_argnums=0,
            out_shardings=(state_shardings, repl),
        )

    def _accumulate_block(self, state, sums, plan, slots, rows: ClientRows):
        chunks = self.engine.in_chunks(plan, slots)
        chunks["rows"] = rows
        return self.engine.accumulate(state, sums, chunks, lambda c: c["rows"])

    def _finish_round(self, state, sums, system, clients, health):
        params_c, params_s, stats = self.engine.average(state, sums)
        return self.engine.finish_round(state, system, params_c, params_s, stats, clients, health)

    def _block_rows(self, plan_host, slots: np.ndarray) -> ClientRows:
        """This process's columns of the block, gathered on the host and placed on the mesh."""
        local = slots[:, self.local_columns]
        taken = local >= 0
        clients = np.where(taken, plan_host["clients"][np.maximum(local, 0)], 0)
        counts = np.where(taken, plan_host["counts"][np.maximum(local, 0)], 0)
        rows = self.host.rows(clients, counts)
        if self.num_processes == 1:
            return jax.device_put(rows, self.block_sharding)
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(
                self.block_sharding, x, (slots.shape[0], slots.shape[1], *x.shape[2:])
            ),
            rows,
        )

    def __call__(self, state: RoundState, r: int):
        """Round ``r`` (0-based) from ``state``; returns ``(new_state, metrics)``."""
        plan, system = self._plan(self.counts, np.int32(r))
        plan_host = jax.device_get(plan)
        slots = arrange(plan_host["clients"], self.owners, self.columns, self.engine.chunk)
        n = self.chunks_per_block
        blocks = -(-slots.shape[0] // n)
        slots = np.concatenate([slots, np.full((blocks * n - len(slots), slots.shape[1]), -1)])
        sums = self._empty(state)
        healths = []
        for b in range(blocks):
            block = slots[b * n : (b + 1) * n]
            # Dispatch is asynchronous: the host gathers this block while the device still
            # trains the previous one (the flags are fetched once, after the last block).
            rows = self._block_rows(plan_host, block)
            sums, health = self._accumulate(state, sums, plan, block.astype(np.int32), rows)
            healths.append(health)
        # Finite flags back in sampling order: [n, 3, C] per block -> [3, S].
        health = np.concatenate(jax.device_get(healths)).transpose(1, 0, 2).reshape(3, -1)
        flat = slots.reshape(-1)
        order = np.argsort(np.where(flat >= 0, flat, np.iinfo(np.int64).max), kind="stable")
        health = health[:, order[: len(plan_host["clients"])]]
        state, metrics = self._finish(state, sums, system, plan["clients"], health)
        return state, metrics
