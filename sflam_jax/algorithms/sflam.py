"""SFLAM: SFL-V1 with quantized cut-layer traffic (SPEC sections 1 and 2).

One round, for the S sampled clients:

1. every client starts from the global client segment ``w_c`` and its own copy of the global
   server segment ``w_s``;
2. ``tau_k = E * ceil(n_k / B)`` local steps: device forward, uplink quantization ``Q_{b_k}``,
   server forward and backward on the client's server copy, downlink quantization of
   ``dL/da_hat``, device backward (straight through the quantizer), an optimizer step on each side;
3. data-weighted FedAvg of both segments with ``rho_k = n_k / sum_j n_j``.

Step 2 runs for C clients side by side under ``jax.vmap`` (the engine's lanes, or
``SplitTraining.train_chunk``); the engine (``sflam_jax.engine``) samples the clients, plans the
round's resources, places them on the mesh and does step 3. Clients that are done earlier than
the others keep their parameters (masked update).
"""

from __future__ import annotations

import dataclasses

from sflam_jax.algorithms.base import Costs, Protocol, SplitTraining
from sflam_jax.allocation import IN_GRAPH
from sflam_jax.wireless.costs import sflam_round_costs


@dataclasses.dataclass(frozen=True)
class SFLV1(SplitTraining):
    """SFL-V1 local training: every client against its own server copy; fields as
    ``SplitTraining``. The engine averages the results (FedAvg)."""

    parallel = True


PROTOCOL = Protocol(
    name="sflam",
    make=SFLV1,
    costs=Costs(model=sflam_round_costs, split=True),
    quantized_cut=True,
    aqt=True,
    allocators=tuple(IN_GRAPH),
    optimizes_bits=True,
    adapters=True,
)
