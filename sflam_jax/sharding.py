"""The device mesh, where the round state lives on it, and multi-process start-up.

The mesh has two axes (``config.sharding``):

- ``clients``: the client axis of a chunk (its stacked client copies and their samples) is split
  over it, so each device trains ``C / clients`` of the chunk's clients; FedAvg's weighted sum over
  the chunk becomes a reduction across this axis;
- ``model``: the server segment's parameters are split over it by logical-axis rules
  (``config.sharding.rules``, e.g. attention heads and the MLP width to ``"model"``); parameters
  without a rule are replicated. The client segment (a device's model) is replicated.

Everything is placed with ``NamedSharding`` and compiled by ``jax.jit`` (GSPMD); there is no
``pmap``. The same code runs on one CPU, eight fake CPU devices, a multi-GPU host or a TPU pod
slice; across hosts ``initialize_distributed`` starts ``jax.distributed`` first and the mesh then
spans every process's devices, grouped by process along the ``clients`` axis. On a CPU,
``set_cpu_devices`` splits the host into several XLA devices first, so the ``clients`` axis spans
its cores.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sflam_jax.errors import ConfigError
from sflam_jax.models import vit

MESH_AXES = ("clients", "model")


def set_cpu_devices(shard_cfg) -> None:
    """Splits JAX's CPU backend into ``sharding.cpu_devices`` devices (0: JAX's default).

    Each CPU device runs its own stream of work, so the clients of a chunk, split over the mesh's
    ``clients`` axis, train on the cores side by side instead of sharing one stream (on the 2-core
    reference machine about 1.2x one device: ``scripts/bench_round.py``, ``jit_chunked_cores``).
    No effect on GPU or TPU backends. Must run before anything starts a JAX backend.

    Raises:
      ConfigError: the CPU backend already started with another number of devices.
    """
    n = shard_cfg.cpu_devices
    if not n or jax.config.jax_num_cpu_devices == n:
        return
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        have = len(jax.devices("cpu"))
        if have != n:
            raise ConfigError(
                f"sharding.cpu_devices={n} cannot be applied: JAX's CPU backend already started "
                f"with {have} device(s) in this process; set it before anything uses JAX "
                "(a fresh process, such as the command line)"
            ) from None


def initialize_distributed(dist_cfg) -> None:
    """Starts ``jax.distributed`` when ``config.distributed.enabled`` (once per process).

    Empty coordinator / process fields are left to JAX, which reads them from the cluster
    (TPU pods, SLURM, Open MPI, Kubernetes) or from ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``. On the CPU backend the processes talk through
    ``dist_cfg.cpu_collectives`` (gloo).
    """
    if not dist_cfg.enabled or jax.distributed.is_initialized():
        return
    # Only the CPU client reads this; it must be set before the backend starts, so it is set
    # whatever the backend (asking which backend would start it).
    jax.config.update("jax_cpu_collectives_implementation", dist_cfg.cpu_collectives)
    kwargs = {}
    address = dist_cfg.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    if address:
        kwargs["coordinator_address"] = address
    num = dist_cfg.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", 0))
    if num:
        kwargs["num_processes"] = num
    pid = dist_cfg.process_id if dist_cfg.process_id >= 0 else os.environ.get("JAX_PROCESS_ID")
    if pid is not None:
        kwargs["process_id"] = int(pid)
    jax.distributed.initialize(**kwargs)


def make_mesh(shard_cfg, devices=None) -> Mesh:
    """The ``(clients, model)`` mesh of ``config.sharding`` over ``devices`` (default: all).

    ``sharding.clients = 0`` takes every device not on the ``model`` axis; a smaller mesh uses the
    first ``clients x model`` devices. Devices are ordered by process, so a process's devices hold
    consecutive client slots.

    Raises:
      ConfigError: the axis sizes do not fit the devices.
    """
    devices = sorted(devices or jax.devices(), key=lambda d: (d.process_index, d.id))
    n = len(devices)
    model = shard_cfg.model
    if model < 1 or n % model:
        raise ConfigError(
            f"sharding.model={model} is invalid: must be >= 1 and divide the {n} devices"
        )
    clients = shard_cfg.clients or n // model
    if clients * model > n:
        raise ConfigError(
            f"sharding.clients={shard_cfg.clients} is invalid: clients x model "
            f"({clients} x {model}) exceeds the {n} devices (0 = {n // model})"
        )
    used = np.asarray(devices[: clients * model], dtype=object)
    return Mesh(used.reshape(clients, model), MESH_AXES)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the round's arrays live on ``mesh``.

    Attributes:
      mesh: the ``(clients, model)`` mesh.
      rules: ``((logical axis, mesh axis or None), ...)``; the first rule of a name wins.
    """

    mesh: Mesh
    rules: tuple = ()

    @classmethod
    def from_config(cls, shard_cfg, devices=None) -> Layout:
        rules = tuple((str(a), b or None) for a, b in shard_cfg.rules)
        for logical, axis in rules:
            if axis is not None and axis not in MESH_AXES:
                raise ConfigError(
                    f"sharding.rules maps {logical!r} to {axis!r}; allowed mesh axes: "
                    f"{', '.join(map(repr, MESH_AXES))} or None"
                )
        return cls(make_mesh(shard_cfg, devices), rules)

    @property
    def client_shards(self) -> int:
        return self.mesh.shape["clients"]

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def spec(self, names: tuple) -> P:
        """Mesh axes of a parameter's logical axis names (each mesh axis used once)."""
        table = {}
        for logical, axis in self.rules:
            table.setdefault(logical, axis)
        used, out = set(), []
        for name in names:
            axis = table.get(name)
            out.append(None if axis in used else axis)
            used.add(axis)
        return P(*out)

    def param_specs(self, params: dict, server: bool) -> dict:
        """PartitionSpecs of a segment: the rules for the server segment, replicated otherwise."""
        if not server:
            return jax.tree.map(lambda _: P(), params)
        axes = vit.logical_axes(params)
        specs = jax.tree.map(self.spec, axes, is_leaf=lambda x: isinstance(x, tuple))
        self._check_divisible(params, specs)
        return specs

    def _check_divisible(self, params, specs) -> None:
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        for (path, x), spec in zip(flat, jax.tree.leaves(specs, is_leaf=_is_spec), strict=True):
            for dim, axis in zip(x.shape, spec, strict=False):
                if axis is not None and dim % self.mesh.shape[axis]:
                    raise ConfigError(
                        f"sharding.rules split {jax.tree_util.keystr(path)} (size {dim}) over "
                        f"{axis!r}={self.mesh.shape[axis]} devices, which does not divide it; "
                        "change sharding.model or the rules"
                    )

    def state_shardings(self, state):
        """NamedShardings of a ``RoundState``: server segment by the rules, the rest replicated."""
        specs_s = self.param_specs(state.params_s, server=True)
        return state.replace(
            round=self.replicated,
            params_c=jax.tree.map(lambda _: self.replicated, state.params_c),
            params_s=jax.tree.map(lambda s: NamedSharding(self.mesh, s), specs_s, is_leaf=_is_spec),
            sim_time_s=self.replicated,
            sim_energy_j=self.replicated,
        )

    def place(self, state, shardings):
        """``state`` on the mesh with ``shardings`` (every process passes the same values)."""
        return jax.tree.map(
            lambda x, s: jax.make_array_from_callback(
                np.shape(x), s, lambda idx: np.asarray(x)[idx]
            ),
            state,
            shardings,
        )

    def replicate(self, tree):
        """Host or device arrays as global arrays replicated on every device of the mesh."""
        return self.place(tree, jax.tree.map(lambda _: self.replicated, tree))

    def stacked(self, tree, server: bool):
        """Constrains ``[C, ...]`` client copies: C over ``clients``, the rest as the segment."""
        specs = self.param_specs(jax.tree.map(lambda x: x[0], tree), server)
        return jax.tree.map(
            lambda s, x: jax.lax.with_sharding_constraint(
                x, NamedSharding(self.mesh, P("clients", *s))
            ),
            specs,
            tree,
            is_leaf=_is_spec,
        )

    def client_major(self, tree):
        """Constrains arrays whose leading axis is the chunk's client axis to ``clients``."""
        sharding = NamedSharding(self.mesh, P("clients"))
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)

    def lane_sharding(self) -> NamedSharding:
        """Arrays ``[C, ...]`` of a streamed block of lanes: C over ``clients``."""
        return NamedSharding(self.mesh, P("clients"))

    def block_sharding(self) -> NamedSharding:
        """Arrays ``[n, C, ...]`` of a streamed block: C over ``clients``."""
        return NamedSharding(self.mesh, P(None, "clients"))


def _is_spec(x) -> bool:
    return isinstance(x, P)
