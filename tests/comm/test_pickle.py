"""Pickling an mtcoll communicator does what mpi4py does with a plain one: a Comm of
``COMM_WORLD`` or ``COMM_SELF`` comes back as the very same Comm (the default options'), and
any other communicator cannot be pickled (mpi4py's ValueError)."""

from __future__ import annotations

import pickle

import pytest
from mpi4py import MPI

import mtcoll


@pytest.mark.mpi
@pytest.mark.mpi_short
@pytest.mark.parametrize("which", ["COMM_WORLD", "COMM_SELF"])
def test_predefined_comm_round_trips_to_itself(comm, which):
    base = getattr(MPI, which)
    c = mtcoll.Comm(base)
    back = pickle.loads(pickle.dumps(c))
    assert back is c
    assert pickle.loads(pickle.dumps(base)) is base  # plain mpi4py, unchanged
    plain = pickle.loads(pickle.dumps(MPI.Intracomm(c)))
    assert plain == base and plain is not c


@pytest.mark.mpi
@pytest.mark.mpi_short
def test_other_comms_refuse_to_pickle_as_mpi4py_does(comm):
    p, d = comm.Dup(), mtcoll.Comm(comm).Dup()
    try:
        with pytest.raises(ValueError):
            pickle.dumps(p)  # what mpi4py says ...
        with pytest.raises(ValueError):
            pickle.dumps(d)  # ... mtcoll says too
    finally:
        p.Free()
        d.Free()
