"""Checks of config fields: the one set of validators that the config validation and every
protocol's block use. A bad value raises ``ConfigError`` in one line that names the field, the
value and what is allowed."""

from __future__ import annotations

from sflam_jax.errors import ConfigError


def fail(field: str, value, allowed: str):
    """Raises ``ConfigError``: ``"<field>=<value> is invalid: <allowed>"``."""
    raise ConfigError(f"{field}={value!r} is invalid: {allowed}")


def value(cfg, field: str):
    """The value of a dotted field (``"ftte.concurrency"``) of a ConfigDict."""
    node = cfg
    for part in field.split("."):
        node = node[part]
    return node


def _is_int(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, int)


def _is_number(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, int | float)


def integer(cfg, field: str, lo: int | None = None, hi=None, hi_name: str | None = None) -> int:
    """An integer in ``[lo, hi]`` (either bound may be None); ``hi_name`` names the bound when
    it comes from another field (``"train.clients_per_round=10"``)."""
    v = value(cfg, field)
    ok = _is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi)
    if not ok:
        if lo is None and hi is None:
            fail(field, v, "must be an integer")
        elif hi is None:
            fail(field, v, f"must be an integer >= {lo}")
        else:
            fail(field, v, f"must be an integer in [{lo}, {hi_name or hi}]")
    return v


def number(cfg, field: str, lo=None, hi=None, open_lo: bool = False, why: str = "") -> float:
    """A number (not a bool) in ``[lo, hi]``, or ``(lo, hi]`` with ``open_lo``; ``why`` is added
    to the message in parentheses."""
    v = value(cfg, field)
    ok = _is_number(v)
    if ok and lo is not None:
        ok = v > lo if open_lo else v >= lo
    if ok and hi is not None:
        ok = v <= hi
    if not ok:
        if lo is None and hi is None:
            allowed = "must be a number"
        elif hi is None:
            allowed = f"must be a number {'>' if open_lo else '>='} {lo}"
        else:
            allowed = f"must be in {'(' if open_lo else '['}{lo}, {hi}]"
        fail(field, v, allowed + (f" ({why})" if why else ""))
    return v


def positive(cfg, field: str) -> float:
    """A number > 0."""
    return number(cfg, field, 0, open_lo=True)


def boolean(cfg, field: str) -> bool:
    v = value(cfg, field)
    if not isinstance(v, bool):
        fail(field, v, "must be a bool")
    return v


def choice(cfg, field: str, allowed):
    """One of ``allowed``."""
    v = value(cfg, field)
    if v not in allowed:
        fail(field, v, f"allowed: {', '.join(map(repr, allowed))}")
    return v
