"""The run's random streams, in one table: which key every random draw of a run comes from.

``key(seed)`` splits in two: the first half initialises the model (``init_key``), the second is
the run key (``run_key``). Rounds fold their index into the run key (``round_key``); the named
streams below are ``fold_in(parent, constant)`` of the key named in their comment. The constants
are arbitrary but fixed: changing one changes every number a run draws from that stream.
"""

from __future__ import annotations

import jax

# fold_in constants, with the key each one is folded into.
PROTOCOL_PARAMS = 0x9707  # init key: parameters a protocol adds (SFPrompt's prompts)
ADAPTERS = 0x10A  # init key: the LoRA adapters' A (fold_in the segment, 0 device, 1 server)
SYSTEM = 0x5157  # round key: channel draws of the round's devices (engine.round_plan)
MEMORY = 0x3E3  # round key: ESFL's per-device memory limits; run key: FTTE's device memories
DISPATCH = 0xD15  # run key: an event engine's dispatches (fold_in the dispatch counter next)
TRAIN = 0x7A1  # run key: an event engine's client training (fold_in the client's number next)
STRAGGLER = 0x5106  # run key: which devices are stragglers
EL2N_CUT = 0xE12  # client key: SFPrompt's quantized crossings when it scores through the body


def init_key(seed) -> jax.Array:
    """The model's initialisation key: the first half of ``split(key(seed))``."""
    return jax.random.split(jax.random.key(seed))[0]


def run_key(seed) -> jax.Array:
    """The run's key: the second half of ``split(key(seed))``; rounds fold their index into it,
    the event engine its dispatch and client counters."""
    return jax.random.split(jax.random.key(seed))[1]


def round_key(seed, r) -> jax.Array:
    """The key of round ``r`` (0-based): ``fold_in(run_key, r)``, traced inside the jitted round
    so every process derives it from the same two integers."""
    return jax.random.fold_in(run_key(seed), r)


def stream(key: jax.Array, constant: int) -> jax.Array:
    """The named stream ``constant`` (above) of ``key``."""
    return jax.random.fold_in(key, constant)
