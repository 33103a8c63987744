"""Zero-size messages as mpi4py writes them (``[None, MPI.INT]``, ``[None, 0, MPI.INT]``, empty
arrays): every collective mtcoll defines takes them as plain mpi4py does, on every algorithm."""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from _comms import with_algorithm
from mtcoll.plan import ALGORITHMS

SPECS = {"none-datatype": lambda: [None, MPI.INT],
         "none-count-datatype": lambda: [None, 0, MPI.INT],
         "empty-array": lambda: np.zeros(0, np.intc)}


@pytest.fixture(params=("auto", "native") + tuple(ALGORITHMS))
def mt(request, comm):
    c = with_algorithm(comm, request.param)
    yield c
    c.Free()


def _calls(c, spec):
    c.Allreduce(spec(), spec(), op=MPI.SUM)
    MPI.Request.Waitall([c.Iallreduce(spec(), spec(), op=MPI.MAX)])
    c.Reduce_scatter_block(spec(), spec(), op=MPI.SUM)
    c.Allgather(spec(), spec())
    c.Allreduce(MPI.IN_PLACE, spec(), op=MPI.SUM)
    c.Allgather(MPI.IN_PLACE, spec())


@pytest.mark.mpi
@pytest.mark.mpi_short
@pytest.mark.parametrize("spec", sorted(SPECS))
def test_zero_size_messages_pass_as_in_mpi4py(comm, mt, spec):
    _calls(comm, SPECS[spec])  # what plain mpi4py accepts...
    _calls(mt, SPECS[spec])  # ...mtcoll accepts, and every rank comes back
    x = np.full(3, comm.Get_rank(), np.intc)
    mt.Allreduce(MPI.IN_PLACE, x, op=MPI.SUM)
    assert np.all(x == comm.Get_size() * (comm.Get_size() - 1) // 2)
