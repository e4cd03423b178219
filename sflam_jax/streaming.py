"""The round of a parallel protocol driven from the host, its clients' samples streamed in blocks.

``Engine.round`` keeps every training image on the device and runs the round as one program. For
populations whose data does not fit, and for several processes that each hold only their own
clients' samples, ``StreamedRound`` runs the same pieces from the host:

1. ``round_plan`` (jitted, identical on every process): sampled clients, their bits and keys;
2. the sampled clients are laid out on the C lanes (or columns of chunks); with several processes
   a process's lanes (the ones its devices train) hold only clients it owns. With the ``"lanes"``
   schedule each process's clients are queued longest-first on its least-loaded lane
   (``Engine.lane_queues``), giving slots ``[C, D]``; with ``"chunks"``, slots ``[num_chunks, C]``
   in sampling order;
3. for each block (``chunks_per_block`` queue entries of every lane, or chunks) the host gathers
   its slots' samples and one jitted call trains the block and adds it to the running sums
   (donated in place);
4. ``finish_sums`` (jitted) averages and returns the state and metrics.

Device memory holds the model, the running sums and one block of chunks whatever S is. Client k
belongs to process ``k * P // K`` (contiguous ranges of the client ids).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sflam_jax.algorithms.base import RoundState
from sflam_jax.data.batches import ClientRows, HostClients, IndexedRows
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


def arrange_lanes(counts: np.ndarray, owners: np.ndarray, columns, lanes: int, queues_of):
    """Slots ``[C, D]`` (position in the plan, -1 empty): each process's sampled clients queued on
    its own lanes (``columns[p]``) by ``queues_of(counts [S], lanes) -> [lanes, S]`` (the engine's
    longest-first scheduling, run on the process's clients with the others' counts zeroed)."""
    queues = []
    for p, cols in enumerate(columns):
        mine = np.where(owners == p, counts, 0)
        queue = np.asarray(queues_of(mine, len(cols)))
        queues.append((cols, queue))
    depth = max(1, max(int((q >= 0).sum(axis=1).max(initial=0)) for _, q in queues))
    slots = np.full((lanes, depth), -1, np.int64)
    for cols, queue in queues:
        slots[cols] = queue[:, :depth]
    return slots


class StreamedRound:
    """``round(state, key) -> (state, metrics)`` for data held by ``HostClients``.

    Args:
      engine: the round of a parallel protocol; its ``layout`` (required) places the arrays.
      host: this process's client table.
      chunks_per_block: queue entries of every lane (or chunks) trained per device call.
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
        self.lanes = engine.schedule == "lanes"
        self.block_sharding = layout.lane_sharding() if self.lanes else layout.block_sharding()
        avg_c, avg_s = engine.algorithm.averaged(state_shardings.params_c, state_shardings.params_s)
        sums_sh = (avg_c, avg_s, repl, repl, repl, repl)
        self._queues = jax.jit(engine.lane_queues, static_argnums=1)
        self._plan = jax.jit(
            lambda counts, r: engine.round_plan(counts, key_of(r), up_bits), out_shardings=repl
        )
        self._empty = jax.jit(
            lambda state: engine.bound(state).empty_sums(state), out_shardings=sums_sh
        )
        self._accumulate = jax.jit(self._accumulate_block, donate_argnums=1, out_shardings=sums_sh)
        self._finish = jax.jit(
            self._finish_round,
            donate_argnums=0,
            out_shardings=(state_shardings, repl),
        )

    def _accumulate_block(self, state, sums, plan, slots, rows: ClientRows):
        engine = self.engine.bound(state)
        if self.lanes:
            # Lane c's block rows [n, L, ...] as one table; entry d of its queue starts at d * L.
            c, n, width = rows.labels.shape
            table = IndexedRows(
                rows.images.reshape(c, n * width, *rows.images.shape[3:]),
                rows.labels.reshape(c, n * width),
                None,
            )
            index_of = lambda pos, depth: depth[:, None] * width + jnp.arange(width)  # noqa: E731
            return engine.train_lanes(
                state, sums, plan, slots, (table, IndexedRows(0, 0, 0)), index_of
            )
        chunks = engine.in_chunks(plan, slots)
        chunks["rows"] = rows
        return engine.accumulate(state, sums, chunks, lambda c: c["rows"])

    def _finish_round(self, state, sums, system, plan):
        return self.engine.bound(state).finish_sums(state, system, sums, plan)

    def _block_rows(self, plan_host, slots: np.ndarray) -> ClientRows:
        """This process's lanes (columns) of the block, gathered on the host and placed on the
        mesh."""
        local = slots[self.local_columns] if self.lanes else slots[:, self.local_columns]
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
        n = self.chunks_per_block
        if self.lanes:
            owners = self.owners[plan_host["clients"]]
            slots = arrange_lanes(
                plan_host["counts"], owners, self.columns, self.engine.chunk, self._queues
            )
            blocks = -(-slots.shape[1] // n)
            slots = np.pad(slots, ((0, 0), (0, blocks * n - slots.shape[1])), constant_values=-1)
            block_of = lambda b: slots[:, b * n : (b + 1) * n]  # noqa: E731
        else:
            slots = arrange(plan_host["clients"], self.owners, self.columns, self.engine.chunk)
            blocks = -(-slots.shape[0] // n)
            slots = np.pad(slots, ((0, blocks * n - len(slots)), (0, 0)), constant_values=-1)
            block_of = lambda b: slots[b * n : (b + 1) * n]  # noqa: E731
        sums = self._empty(state)
        for b in range(blocks):
            block = block_of(b)
            # Dispatch is asynchronous: the host gathers this block while the device still
            # trains the previous one.
            rows = self._block_rows(plan_host, block)
            sums = self._accumulate(state, sums, plan, block.astype(np.int32), rows)
        return self._finish(state, sums, system, plan)
