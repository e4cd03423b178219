"""SFL-V2 and SL: protocols whose server segment is shared and updated client after client.

SPEC section 1: in SFL-V2 one server segment is updated by the S devices' steps in sequence while
every device starts from the global client segment and the device segments are averaged (FedAvg)
at the end of the round; in SL (vanilla split learning) the client segment is also handed from
device to device, and the round's result is the last device's pair of segments.

Both run the sampled clients (in sampling order) under one ``lax.scan`` whose carry is the shared
server segment and its optimizer state; each client's local steps are the same ``client_step`` as
SFLAM's (same batches, same keys), so with one client per round all three protocols coincide.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sflam_jax.algorithms.base import RoundState, average_or_keep, finite_per_client
from sflam_jax.algorithms.sflam import SFLAM
from sflam_jax.data.batches import ClientData, ClientRows, epoch_orders, gather_rows, local_steps


@dataclasses.dataclass(frozen=True)
class SequentialServer(SFLAM):
    """SFL-V2 (``relay_client=False``) or SL (``relay_client=True``); fields as ``SFLAM``."""

    relay_client: bool = False

    def train_client(self, params_c, params_s, opt_s, rows: ClientRows, count, bits, key):
        """One client's ``tau_k`` local steps from ``params_c`` against the shared server.

        Returns ``(params_c, params_s, opt_s, stats [3])``; the device's optimizer state starts
        fresh, the server's carries on.
        """
        order_key, step_key = jax.random.split(key)
        orders = epoch_orders(order_key, count, rows.labels.shape[0], self.local_epochs)
        carry = (
            params_c,
            params_s,
            self.optimizer.init(params_c),
            opt_s,
            jnp.zeros((3,), jnp.float32),
        )
        carry = jax.lax.fori_loop(
            0,
            local_steps(count, self.batch_size, self.local_epochs),
            lambda t, c: self.client_step(c, rows, count, orders, bits, step_key, t),
            carry,
        )
        params_c, params_s, _, opt_s, stats = carry
        return params_c, params_s, opt_s, stats

    def round(self, state: RoundState, data: ClientData, key: jax.Array, up_bits=32):
        """One SFL-V2 or SL round; arguments and metrics as ``SFLAM.round``."""
        plan, system = self.round_plan(data.counts, key, up_bits)

        def client_body(carry, client):
            params_c, params_s, opt_s, sum_c, stats = carry
            start_c = params_c if self.relay_client else state.params_c
            new_c, params_s, opt_s, client_stats = self.train_client(
                start_c,
                params_s,
                opt_s,
                jax.tree.map(lambda x: x[0], gather_rows(data, client["clients"][None])),
                client["counts"],
                client["up_bits"],
                client["keys"],
            )
            w = client["counts"].astype(jnp.float32)
            sum_c = jax.tree.map(lambda a, x: a + w * x, sum_c, new_c)
            one = lambda tree: jax.tree.map(lambda x: x[None], tree)  # noqa: E731
            health = jnp.stack(
                [
                    jnp.isfinite(client_stats[0]),
                    finite_per_client(one(new_c))[0],
                    finite_per_client(one(params_s))[0],
                ]
            )
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
        return self.finish_round(
            state, system, params_c, params_s, stats, plan["clients"], health.T
        )
