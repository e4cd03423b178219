"""Vectorised scalar searches used by the allocators (fixed iteration counts, jit-friendly)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

GOLDEN = 0.6180339887498949


def bisect(pred, lo, hi, iters: int, log: bool):
    """Vectorised bisection: ``pred`` False at ``lo``, True at ``hi``; returns the True end."""
    f = jnp.log if log else (lambda x: x)
    g = jnp.exp if log else (lambda x: x)
    lo, hi = f(lo), f(hi)

    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        ok = pred(g(mid))
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    _, hi = jax.lax.fori_loop(0, iters, body, (lo, hi))
    return g(hi)


def golden_section(f, lo, hi, iters: int):
    """Bracket ``[lo, hi]`` of the minimum of a convex scalar ``f``, one evaluation per step."""
    x1, x2 = hi - GOLDEN * (hi - lo), lo + GOLDEN * (hi - lo)

    def step(_, state):
        lo, hi, x1, x2, f1, f2 = state
        left = f1 <= f2
        lo, hi = jnp.where(left, lo, x1), jnp.where(left, x2, hi)
        x = jnp.where(left, hi - GOLDEN * (hi - lo), lo + GOLDEN * (hi - lo))
        fx = f(x)
        return (
            lo,
            hi,
            jnp.where(left, x, x2),
            jnp.where(left, x1, x),
            jnp.where(left, fx, f2),
            jnp.where(left, f1, fx),
        )

    lo, hi, *_ = jax.lax.fori_loop(0, iters, step, (lo, hi, x1, x2, f(x1), f(x2)))
    return lo, hi
