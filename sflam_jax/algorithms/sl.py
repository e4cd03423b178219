"""SL: vanilla split learning, devices one after another (SPEC section 1).

The client segment is handed from device to device and the server segment is shared
(``algorithms.sfl_v2.SharedServer`` with ``relay_client=True``); the round's result is the last
device's pair of segments. Costed with the whole band and the whole server per device, in series.
"""

import functools

from sflam_jax.algorithms.base import baseline
from sflam_jax.algorithms.sfl_v2 import SharedServer
from sflam_jax.wireless.costs import sl_round_costs

PROTOCOL = baseline(
    name="sl",
    make=functools.partial(SharedServer, relay_client=True),
    cost_model=sl_round_costs,
    cost_split=False,
)
