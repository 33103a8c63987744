"""What the MPI test modules share: the MPI library's result (the oracle every mtcoll result is
compared with), and a Comm whose schedule is planned or a skip."""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from mtcoll.comm import _planning


def native(comm, x, op=MPI.SUM):
    """``x`` reduced with ``op`` by the MPI library's own ``Allreduce`` on ``comm``."""
    out = np.empty_like(x)
    comm.Allreduce(x, out, op)
    return out


def planned_or_skip(c, algorithm, spec):
    """``c`` once its schedule is planned and each rank holds its part (the path calls take);
    where ``algorithm`` does not fit the network, ``c`` freed and the test skipped (the same on
    every rank: the planner's verdict is broadcast)."""
    try:
        _planning.rank_schedule(c, c.algorithm)
    except ValueError as e:
        c.Free()
        pytest.skip(f"{algorithm} on {spec}: {e}")
    return c


def with_algorithm(comm, algorithm):
    """An mtcoll Comm of ``comm`` running ``algorithm`` ("auto", "native" or a planner name);
    where a planner's algorithm does not fit the network, freed and the test skipped (on every
    rank alike)."""
    import mtcoll

    c = mtcoll.Comm(comm, algorithm="auto")
    if algorithm not in ("auto", "native"):
        try:
            c.schedule(algorithm)
        except ValueError:
            c.Free()
            pytest.skip(f"{algorithm} does not fit {c.network.spec}")
    c.algorithm = algorithm
    return c
