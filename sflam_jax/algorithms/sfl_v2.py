"""SFL-V2: one server segment, updated by the sampled devices' steps in sequence (SPEC section 1).

Every device starts from the global client segment; the device segments are averaged (FedAvg) at
the end of the round and the shared server segment is the round's server segment. ``SharedServer``
also runs vanilla split learning (``algorithms.sl``), where the client segment is handed from
device to device as well.

The sampled clients (in sampling order) run under one ``lax.scan`` whose carry is the shared server
segment and its optimizer state; each client's local steps are the same ``client_step`` as SFLAM's
(same batches, same keys), so with one client per round the protocols coincide.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from sflam_jax.algorithms.base import (
    RoundState,
    SplitTraining,
    average_or_keep,
    baseline,
    health_flags,
)
from sflam_jax.data.batches import ClientRows, local_steps
from sflam_jax.wireless.costs import sfl_v2_round_costs


@dataclasses.dataclass(frozen=True)
class SharedServer(SplitTraining):
    """SFL-V2 (``relay_client=False``) or SL (``relay_client=True``); other fields as
    ``SplitTraining``."""

    relay_client: bool = False
    parallel = False

    def train_client(self, params_c, params_s, opt_s, rows: ClientRows, count, bits, key):
        """One client's ``tau_k`` local steps from ``params_c`` against the shared server.

        Returns ``(params_c, params_s, opt_s, stats [3])``; the device's optimizer state starts
        fresh, the server's carries on.
        """
        start, orders, step_key = self.client_start(
            params_c, params_s, count, key, rows.labels.shape[0]
        )
        # The shared server's optimizer state carries on from the previous client.
        carry = (*start[:3], opt_s, start[4])
        carry = jax.lax.fori_loop(
            0,
            local_steps(count, self.batch_size, self.local_epochs),
            lambda t, c: self.client_step(c, rows, count, orders, bits, step_key, t),
            carry,
        )
        params_c, params_s, _, opt_s, stats = carry
        return params_c, params_s, opt_s, stats

    def train_sequence(self, state: RoundState, plan: dict, rows_of: Callable):
        """Trains the round's clients one after another and aggregates them.

        Args:
          state: the round's global model.
          plan: ``{"clients", "counts", "up_bits", "keys"}`` each ``[S]``, in sampling order.
          rows_of: ``[n]`` client ids -> their ``ClientRows [n, L, ...]``.

        Returns:
          ``(params_c, params_s, stats [3], health [3, S], computed)``: the new global segments,
          the summed loss, correct predictions and samples, the finite flags of every client and
          the client steps run (``sum_k tau_k``).
        """

        def client_body(carry, client):
            params_c, params_s, opt_s, sum_c, stats = carry
            start_c = params_c if self.relay_client else state.params_c
            new_c, params_s, opt_s, client_stats = self.train_client(
                start_c,
                params_s,
                opt_s,
                jax.tree.map(lambda x: x[0], rows_of(client["clients"][None])),
                client["counts"],
                client["up_bits"],
                client["keys"],
            )
            w = client["counts"].astype(jnp.float32)
            sum_c = jax.tree.map(lambda a, x: a + w * x, sum_c, new_c)
            one = lambda tree: jax.tree.map(lambda x: x[None], tree)  # noqa: E731
            health = health_flags(one(client_stats), one(new_c), one(params_s))[0]
            return (new_c, params_s, opt_s, sum_c, stats + client_stats), health

        zeros = jax.tree.map(jnp.zeros_like, state.params_c)
        init = (
            state.params_c,
            state.params_s,
            self.optimizer.init(state.params_s),
            zeros,
            jnp.zeros((3,), jnp.float32),
        )
        (last_c, params_s, _, sum_c, stats), health = jax.lax.scan(client_body, init, plan)
        weight = jnp.sum(plan["counts"]).astype(jnp.float32)
        # SL hands on the last device's segment; SFL-V2 averages the devices' segments.
        averaged = average_or_keep(sum_c, weight, state.params_c)
        params_c = last_c if self.relay_client else averaged
        computed = jnp.sum(local_steps(plan["counts"], self.batch_size, self.local_epochs))
        return params_c, params_s, stats, health.T, computed


PROTOCOL = baseline(
    name="sfl_v2",
    make=SharedServer,
    cost_model=sfl_v2_round_costs,
    cost_split=False,
)
