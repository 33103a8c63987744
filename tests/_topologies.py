"""Topology specs by family for the MPI tests (shared by test_allreduce and test_fuzz)."""

from __future__ import annotations

import math


def family_spec(family, n):
    """A topology spec of ``family`` with ``n`` ranks, or None if none fits."""
    pairs = [(a, n // a) for a in range(2, math.isqrt(n) + 1) if n % a == 0]
    if family == "auto":
        return "auto"
    if family in ("ring", "full"):
        return f"{family}:{n}"
    if family in ("torus", "mesh"):
        return f"{family}:{pairs[-1][0]}x{pairs[-1][1]}" if pairs else None
    if family in ("fattree", "hier"):
        return f"{family}:2x{n // 2}" if n % 2 == 0 and n >= 4 else None
    if family == "bigraph":
        return f"bigraph:{n // 2}x2" if n % 2 == 0 and n >= 2 else None
    raise AssertionError(family)
