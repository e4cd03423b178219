"""Resource allocation (SPEC section 4): one signature, ``allocate(problem, bits=None)``.

``bits=None`` lets the solver choose integer cut-layer bits that meet the learning budget; an
``[S]`` array fixes them. Every solver returns ``(Allocation, diagnostics)``.
"""

from sflam_jax.allocation import baselines, bcd, pgd

# Solvers that run inside a jitted round (pure JAX, fixed shapes). ``exact`` (float64, the test
# oracle) runs outside.
IN_GRAPH = {
    "pgd": pgd.allocate,
    "bcd": bcd.allocate,
    "equal": baselines.equal,
    "max_power": baselines.max_power,
}
