"""The protocols, by ``config.algorithm``: the one place that maps a name to what it is.

Adding a protocol is one module under ``sflam_jax/algorithms/`` that defines its ``PROTOCOL``
(``algorithms.base.Protocol``), one entry below, its config block and its tests.
"""

from __future__ import annotations

from sflam_jax.algorithms import esfl, fl, ftte, gsfl, sfl, sfl_v2, sflam, sfprompt, sl
from sflam_jax.algorithms.base import Protocol
from sflam_jax.errors import ConfigError

PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        sflam.PROTOCOL,
        sfl.PROTOCOL,
        sfl_v2.PROTOCOL,
        sl.PROTOCOL,
        fl.PROTOCOL,
        gsfl.PROTOCOL,
        sfprompt.PROTOCOL,
        esfl.PROTOCOL,
        ftte.PROTOCOL,
        ftte.FEDBUFF,
    )
}


def get(name: str) -> Protocol:
    """The protocol registered as ``name``.

    Raises:
      ConfigError: no protocol has that name (the message lists them).
    """
    try:
        return PROTOCOLS[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"algorithm={name!r} is invalid: allowed: {', '.join(map(repr, PROTOCOLS))}"
        ) from None


def baselines() -> tuple[Protocol, ...]:
    """The protocols whose costs every run reports next to its own (SPEC section 3)."""
    return tuple(p for p in PROTOCOLS.values() if p.baseline)


def with_adapters() -> tuple[str, ...]:
    """The protocols that train LoRA adapters (``lora.rank > 0``)."""
    return tuple(name for name, p in PROTOCOLS.items() if p.adapters)
