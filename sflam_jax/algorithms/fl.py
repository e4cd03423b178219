"""FL: FedAvg with the whole model trained on each device (SPEC section 1).

Trained by the float SFL-V1 round: with the identity quantizer every client's server copy and
device segment train exactly as the unsplit model would, so the global model is FedAvg of the
whole ViT (tested against a loop over the unsplit model). Costed as FL: the devices compute both
segments and move the whole model once each way per round.
"""

from sflam_jax.algorithms.base import baseline
from sflam_jax.algorithms.sflam import SFLV1
from sflam_jax.wireless.costs import fl_round_costs

PROTOCOL = baseline(
    name="fl",
    make=SFLV1,
    cost_model=fl_round_costs,
    cost_split=False,
)
