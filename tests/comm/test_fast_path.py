"""The fast path to the MPI library for every collective mtcoll defines: after the first call
of a (call, size, dtype, op) the library ran, like calls go straight to it; the results are
mpi4py's, and whatever the fast path must not take (other sizes, dtypes, overlaps) goes the
slow way, which checks and raises as before."""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

import mtcoll


@pytest.fixture
def spied(comm, monkeypatch):
    """A native mtcoll Comm, and the list of calls that went through mtcoll's slow path."""
    monkeypatch.setenv("MTCOLL_CHECK", "0")  # (the tests' default is on: no fast path)
    slow = []
    real = mtcoll.comm._dispatch.start
    monkeypatch.setattr(mtcoll.comm._dispatch, "start",
                        lambda self, kind, *a, **kw: (slow.append(kind), real(self, kind, *a,
                                                                               **kw))[1])
    with mtcoll.Comm(comm, algorithm="native") as c:
        if not c._threaded:
            pytest.skip("no fast path without the progress thread")
        yield c, slow


def _case(comm, call, inplace, k):
    size, rank = comm.Get_size(), comm.Get_rank()
    if call == "Allgather":
        recv = np.zeros(k * size)
        if inplace:
            recv[rank * k:(rank + 1) * k] = np.arange(k) + rank
            return MPI.IN_PLACE, recv
        return np.arange(k, dtype=np.float64) + rank, recv
    if inplace:
        return MPI.IN_PLACE, np.arange(k * size, dtype=np.float64) * (rank + 1)
    return np.arange(k * size, dtype=np.float64) * (rank + 1), np.zeros(k)


def _run(c, call, send, recv):
    if call == "Allgather":
        c.Allgather(send, recv)
    else:
        c.Reduce_scatter_block(send, recv, op=MPI.SUM)
    return recv[:recv.size if call == "Allgather" or send is not MPI.IN_PLACE else
                recv.size // c.Get_size()].copy()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("call", ["Allgather", "Reduce_scatter_block"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "in-place"])
@pytest.mark.parametrize("k", [1, 512, 8192])
def test_block_calls_take_the_fast_path_with_mpi4py_results(comm, spied, call, inplace, k):
    c, slow = spied
    want = _run(comm, call, *_case(comm, call, inplace, k))
    for i in range(4):
        got = _run(c, call, *_case(comm, call, inplace, k))
        assert np.array_equal(got, want), i
    assert slow == [call], slow  # the first call only


@pytest.mark.mpi(min_size=2)
def test_what_the_fast_path_must_not_take_goes_the_slow_way(comm, spied):
    c, slow = spied
    size = comm.Get_size()
    send, recv = np.ones(4), np.zeros(4 * size)
    c.Allgather(send, recv)
    c.Allgather(send, recv)
    assert slow == ["Allgather"]
    with pytest.raises(ValueError, match=r"recvbuf \(rank \d+\)"):
        c.Allgather(np.ones(3), recv)  # a send of another size: the slow path's error
    with pytest.raises(ValueError, match="overlap"):
        c.Allgather(recv[:4], recv)  # a view into the receive buffer
    with pytest.raises(ValueError):
        c.Allgather(recv, recv)  # the same object is not in place for Allgather
    with pytest.raises(ValueError):
        c.Allgather(np.ones(4, np.float32), recv)  # another dtype
    rsb_send, rsb_recv = np.ones(2 * size), np.zeros(2)
    c.Reduce_scatter_block(rsb_send, rsb_recv, op=MPI.SUM)
    c.Reduce_scatter_block(rsb_send, rsb_recv, op=MPI.SUM)
    with pytest.raises(ValueError):
        c.Reduce_scatter_block(np.ones(2 * size + 1), rsb_recv, op=MPI.SUM)
    assert np.all(rsb_recv == size)
    assert slow.count("Reduce_scatter_block") == 2, slow
