"""SFL: SFL-V1 with float32 cut-layer traffic, full power and equal bandwidth (SPEC section 1).

The same round as SFLAM (``algorithms.sflam.SFLV1``) without its quantizer, AQT matmuls or
resource optimisation: the baseline that isolates what SFLAM's quantization and allocation buy.
"""

from sflam_jax.algorithms.base import baseline
from sflam_jax.algorithms.sflam import SFLV1
from sflam_jax.wireless.costs import sflam_round_costs

PROTOCOL = baseline(
    name="sfl",
    make=SFLV1,
    cost_model=sflam_round_costs,
    cost_split=True,
    adapters=True,
)
