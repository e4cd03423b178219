"""SFLAM: SFL-V1 with quantized cut-layer traffic (SPEC sections 1 and 2).

One round, for the S sampled clients:

1. every client starts from the global client segment ``w_c`` and its own copy of the global
   server segment ``w_s``;
2. ``tau_k = E * ceil(n_k / B)`` local steps: device forward, uplink quantization ``Q_{b_k}``,
   server forward and backward on the client's server copy, downlink quantization of
   ``dL/da_hat``, device backward (straight through the quantizer), an optimizer step on each side;
3. data-weighted FedAvg of both segments with ``rho_k = n_k / sum_j n_j``.

``SFLV1.train_chunk`` is step 2 for a chunk of C clients under ``jax.vmap``; the engine
(``sflam_jax.engine``) samples the clients, plans the round's resources, places the chunk on the
mesh and does step 3. The step loop of a chunk stops at the largest ``tau_k`` inside it; clients
that are done earlier keep their parameters (masked update).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sflam_jax.algorithms.base import Costs, Protocol, SplitTraining
from sflam_jax.allocation import IN_GRAPH
from sflam_jax.data.batches import ClientRows, local_steps
from sflam_jax.wireless.costs import sflam_round_costs


@dataclasses.dataclass(frozen=True)
class SFLV1(SplitTraining):
    """SFL-V1 local training: every client against its own server copy; fields as
    ``SplitTraining``. The engine averages the results (FedAvg)."""

    parallel = True

    def train_chunk(self, params_c, params_s, rows: ClientRows, counts, up_bits, keys):
        """Local training of C clients from their starting copies.

        Args:
          params_c: ``[C, ...]`` each client's starting client segment.
          params_s: ``[C, ...]`` each client's starting server copy.
          rows: ``[C, L, ...]`` the clients' padded samples.
          counts: ``[C]`` samples of each (0 for padding slots).
          up_bits: ``[C]`` uplink bits.
          keys: ``[C]`` per-client keys.

        Returns:
          ``(params_c [C, ...], params_s [C, ...], stats [C, 3])`` with stats (summed loss,
          correct, samples seen).
        """
        width = rows.labels.shape[1]
        carry, orders, step_keys = jax.vmap(
            lambda pc, ps, n, k: self.client_start(pc, ps, n, k, width)
        )(params_c, params_s, counts, keys)
        step_fn = jax.vmap(self.client_step, in_axes=(0, 0, 0, 0, 0, 0, None))
        num_steps = jnp.max(local_steps(counts, self.batch_size, self.local_epochs))
        carry = jax.lax.fori_loop(
            0,
            num_steps,
            lambda t, carry: step_fn(carry, rows, counts, orders, up_bits, step_keys, t),
            carry,
        )
        return self.client_result(carry)


PROTOCOL = Protocol(
    name="sflam",
    make=SFLV1,
    costs=Costs(model=sflam_round_costs, split=True),
    quantized_cut=True,
    aqt=True,
    allocators=tuple(IN_GRAPH),
    optimizes_bits=True,
)
