"""mtcoll.Comm as a drop-in for an mpi4py communicator, in the idioms of published numpy/mpi4py
programs.

Each test forces every algorithm through ``MTCOLL_ALGO`` where the algorithm matters and
compares every result with plain mpi4py on ``MPI.COMM_WORLD`` (or a plain ``Split`` of it). Runs
serially (one rank) and under ``mpiexec`` at every suite size. What they hold:

- a numpy scalar inside a buffer spec (the CG and psum idioms; a Jacobi loop's LAND test);
- requests that ``MPI.Request.Waitall`` & co. accept, ``Wait(status)``, ``wait()``/``test()``;
- DLPack and ``__cuda_array_interface__`` exporters (host memory);
- ``sendbuf=None`` and ``sendbuf is recvbuf`` in place;
- the Comm is an ``MPI.Intracomm`` (``isinstance``, ``==``, ``Win.Create``, pkl5, ``topology``);
- derived communicators are mtcoll communicators (and ``Create_cart`` gives the grid's model);
- a call handed to MPI goes straight to the library (fast path), its slow twin agrees;
- no sleeping on the main thread for a library call while a schedule is in flight;
- one rank's bad input: the others' StallError names it; run commands use ``python -m mpi4py``.

Plus the idioms that worked before (0-d arrays, tuple specs, keyword arguments, float16,
complex, bool LOR, bytearray, array.array, the pickle-based lowercase calls).
"""

from __future__ import annotations

import array
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI
from mpi4py.util import pkl5

import mtcoll
from mtcoll.comm._errors import StallError
from mtcoll.plan import ALGORITHMS

from _comms import native, planned_or_skip

ROOT = Path(__file__).resolve().parents[2]
FORCED = ("native",) + tuple(ALGORITHMS)
BIG = 70_000  # float64 elements: above auto's 64 KiB cut-off


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("MTCOLL_ALGO", "MTCOLL_TOPOLOGY", "MTCOLL_DEBUG", "MTCOLL_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(params=FORCED)
def forced(request, comm, monkeypatch):
    """An mtcoll.Comm on COMM_WORLD with ``MTCOLL_ALGO`` forcing each algorithm in turn (skipped,
    on every rank alike, where the algorithm does not fit the auto network)."""
    monkeypatch.setenv("MTCOLL_ALGO", request.param)
    c = mtcoll.Comm(comm, algorithm="auto")
    assert c.algorithm == request.param
    if request.param != "native" and comm.Get_size() > 1:
        planned_or_skip(c, request.param, c.network.spec)
    yield c
    c.Free()


# -- numpy scalars in a spec ---------------------------------------------------------------

@pytest.mark.mpi
@pytest.mark.mpi_short
def test_cg_loop_with_scalar_specs(comm, forced):
    """A distributed conjugate-gradient solve whose dot products are reduced as
    ``[np.dot(r, r), MPI.DOUBLE]`` specs, with mtcoll and with mpi4py: same iterates."""
    rank = comm.Get_rank()
    rng = np.random.default_rng(rank)
    n = 40
    diag = 2.0 + rng.random(n)  # this rank's block of a diagonal SPD matrix
    b = rng.random(n)

    def cg(c):
        x, r = np.zeros(n), b.copy()
        p = r.copy()
        rr = np.zeros(1)
        c.Allreduce([np.dot(r, r), MPI.DOUBLE], [rr, MPI.DOUBLE])
        history = []
        for _ in range(30):
            q = diag * p
            pq = np.zeros(1)
            c.Allreduce([np.dot(p, q), MPI.DOUBLE], [pq, MPI.DOUBLE])
            alpha = rr[0] / pq[0]
            x += alpha * p
            r -= alpha * q
            nu = np.zeros(1)
            c.Allreduce([np.dot(r, r), MPI.DOUBLE], [nu, MPI.DOUBLE])
            history.append(nu[0])
            if nu[0] < 1e-20:
                break
            p = r + (nu[0] / rr[0]) * p
            rr = nu
        return x, history

    x_mt, h_mt = cg(forced)
    x_mpi, h_mpi = cg(comm)
    assert len(h_mt) == len(h_mpi)
    np.testing.assert_allclose(x_mt, x_mpi, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(x_mt, b / diag, rtol=1e-8)
    # the psum idiom, on integer-valued data: exactly mpi4py's result
    a = np.arange(10.0) + rank
    got, want = np.zeros(1), np.zeros(1)
    forced.Allreduce([np.sum(a), MPI.DOUBLE], [got, MPI.DOUBLE])
    comm.Allreduce([np.sum(a), MPI.DOUBLE], [want, MPI.DOUBLE])
    assert got[0] == want[0]
    # a bare numpy scalar as sendbuf, and an int32 one typed by its spec
    out = np.zeros(1, np.int32)
    forced.Allreduce([np.int32(rank + 1), MPI.INT], [out, MPI.INT])
    assert out[0] == sum(range(1, comm.Get_size() + 1))


@pytest.mark.mpi
@pytest.mark.mpi_short
def test_jacobi_with_a_land_convergence_test_every_iteration(comm, forced):
    """The Jacobi idiom: every iteration ends with ``Allreduce`` of the local "converged" flag
    under ``MPI.LAND`` (as a bool array and as a numpy-scalar spec); the loop stops on the same
    iteration, with the same iterate, as with mpi4py."""
    rank = comm.Get_rank()
    n = 30
    diag = 4.0 + (np.arange(n) + rank) % 3  # a diagonally dominant tridiagonal block per rank
    off = np.full(n - 1, 1.0)
    b = 1.0 + (np.arange(n) * (rank + 1)) % 5

    def jacobi(c, scalar):
        x = np.zeros(n)
        for it in range(1, 200):
            new = b.copy()
            new[1:] -= off * x[:-1]
            new[:-1] -= off * x[1:]
            new /= diag
            ok = bool(np.max(np.abs(new - x)) < 1e-10 * (1 + rank))  # differs between ranks
            x = new
            flag = np.zeros(1, dtype=bool)
            if scalar:
                c.Allreduce([np.bool_(ok), MPI.C_BOOL], [flag, MPI.C_BOOL], op=MPI.LAND)
            else:
                c.Allreduce(np.array([ok]), flag, op=MPI.LAND)
            if flag[0]:
                return it, x
        return None, x

    for scalar in (False, True):
        it_mt, x_mt = jacobi(forced, scalar)
        it_mpi, x_mpi = jacobi(comm, scalar)
        assert it_mt is not None and it_mt == it_mpi
        assert np.array_equal(x_mt, x_mpi)


# -- requests MPI accepts --------------------------------------------------------------------

@pytest.mark.mpi
@pytest.mark.mpi_short
def test_iallreduce_on_split_with_mpi_waitall(comm, forced):
    """The data-parallel trainer's idiom: ``Iallreduce`` per gradient on a ``Split``
    communicator, plain mpi4py requests mixed in, completed by ``MPI.Request.Waitall``."""
    rank, size = comm.Get_rank(), comm.Get_size()
    color = rank % 2
    sub = forced.Split(color, rank)
    plain = comm.Split(color, rank)
    try:
        assert isinstance(sub, mtcoll.Comm)
        # the forced algorithm, or auto where it does not fit the subcommunicator's network
        assert sub.algorithm in (forced.algorithm, "auto")
        grads = [np.full(k, float(rank + i)) for i, k in enumerate((5, 3000, BIG))]
        outs = [np.zeros_like(g) for g in grads]
        reqs = [sub.Iallreduce(g, o) for g, o in zip(grads, outs)]
        assert all(isinstance(q, MPI.Request) for q in reqs)
        extra = np.zeros(3)
        reqs.append(comm.Iallreduce(np.full(3, 1.0), extra))  # a plain mpi4py request
        MPI.Request.Waitall(reqs)
        for g, o in zip(grads, outs):
            assert np.array_equal(o, native(plain, g))
        assert np.array_equal(extra, np.full(3, float(size)))
        # Testall, Waitany, Testany, Waitsome
        outs = [np.zeros_like(g) for g in grads]
        reqs = [sub.Iallreduce(g, o) for g, o in zip(grads, outs)]
        while not MPI.Request.Testall(reqs):
            pass
        outs2 = [np.zeros_like(g) for g in grads]
        reqs = [sub.Iallreduce(g, o) for g, o in zip(grads, outs2)]
        MPI.Request.Waitany(reqs)
        while MPI.Request.Waitsome(reqs) is not None:  # None: every request inactive
            pass
        for g, o, o2 in zip(grads, outs, outs2):
            assert np.array_equal(o, native(plain, g)) and np.array_equal(o2, o)
        outs3 = [np.zeros_like(g) for g in grads]
        reqs = [sub.Iallreduce(g, o) for g, o in zip(grads, outs3)]
        left = len(reqs)
        while left:
            index, flag = MPI.Request.Testany(reqs)
            if flag and index != MPI.UNDEFINED:
                left -= 1
            elif flag:
                break  # every request inactive
        assert all(np.array_equal(o3, o) for o3, o in zip(outs3, outs))
        # Wait(status), Test(status), lowercase wait()/test()
        st = MPI.Status()
        o = np.zeros(BIG)
        q = sub.Iallreduce(grads[2], o)
        assert q.Wait(st) is True and not st.Is_cancelled()
        q = sub.Iallreduce(grads[1], outs[1])
        while not q.Test(MPI.Status()):
            pass
        q = sub.Iallreduce(grads[0], outs[0])
        assert q.wait() is None
        q = sub.Iallreduce(grads[0], outs[0])
        while True:
            flag, msg = q.test()
            assert msg is None
            if flag:
                break
        mtcoll.waitall([sub.Iallreduce(grads[1], outs[1]), comm.Ibarrier()])
        assert np.array_equal(outs[1], native(plain, grads[1]))
    finally:
        sub.Free()
        plain.Free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
def test_ranks_waiting_in_different_orders_in_mpi(comm, monkeypatch):
    """Rank 0 waits in ``MPI.Request.Waitall`` for a native request started second while the
    others wait for the schedule started first: the progress thread moves rank 0's part of the
    schedule (no deadlock)."""
    monkeypatch.setenv("MTCOLL_CHECK", "0")
    rank = comm.Get_rank()
    with mtcoll.Comm(comm, algorithm="multitree") as mt, \
            mtcoll.Comm(comm, algorithm="native") as nat:
        a, b = np.zeros(BIG), np.zeros(10)
        ra = mt.Iallreduce(np.full(BIG, float(rank)), a)
        rb = nat.Iallreduce(np.full(10, float(rank)), b)
        if rank == 0:
            time.sleep(0.2)  # let the others block first
            MPI.Request.Waitall([rb])
            MPI.Request.Waitall([ra])
        else:
            MPI.Request.Waitall([ra, rb])
        assert np.array_equal(a, native(comm, np.full(BIG, float(rank))))
        assert np.array_equal(b, native(comm, np.full(10, float(rank))))


# -- DLPack and CAI exporters ------------------------------------------------------------------

class DLPackOnly:
    """Exports DLPack (host memory) and nothing else, like a torch CPU tensor's gradient."""

    def __init__(self, arr):
        self._arr = arr

    def __dlpack__(self, **kwargs):
        return self._arr.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._arr.__dlpack_device__()


class CAIOnly:
    """Exports ``__cuda_array_interface__`` over host memory, as mpi4py accepts it."""

    def __init__(self, arr):
        self._arr = arr
        ai = arr.__array_interface__
        self.__cuda_array_interface__ = {"shape": ai["shape"], "typestr": ai["typestr"],
                                         "data": ai["data"], "strides": None, "version": 3}


@pytest.mark.mpi
@pytest.mark.mpi_short
def test_dlpack_and_cai_exporters(comm, forced):
    rank = comm.Get_rank()
    for n in (7, BIG):
        x = np.full(n, float(rank + 1))
        want = native(comm, x)
        grad = x.copy()
        forced.Allreduce(MPI.IN_PLACE, DLPackOnly(grad))  # comm.Allreduce(IN_PLACE, param.grad)
        assert np.array_equal(grad, want)
        out = np.zeros(n)
        forced.Allreduce(DLPackOnly(x), out)
        assert np.array_equal(out, want)
        out = np.zeros(n)
        forced.Allreduce(CAIOnly(x), CAIOnly(out))
        assert np.array_equal(out, want)
        # and mpi4py itself takes the same objects
        out2 = np.zeros(n)
        comm.Allreduce(CAIOnly(x), CAIOnly(out2))
        assert np.array_equal(out2, out)
    with pytest.raises(TypeError):  # neither buffer, DLPack nor CAI: mpi4py's TypeError too
        forced.Allreduce(object(), np.zeros(3))


# -- None and the same object as in place --------------------------------------------------------

@pytest.mark.mpi
@pytest.mark.mpi_short
def test_none_and_same_object_are_in_place(comm, forced):
    rank, size = comm.Get_rank(), comm.Get_size()
    for n in (4, BIG):
        want = native(comm, np.full(n, float(rank)))
        x = np.full(n, float(rank))
        forced.Allreduce(None, x)
        assert np.array_equal(x, want)
        x = np.full(n, float(rank))
        forced.Allreduce(x, x)
        assert np.array_equal(x, want)
        x = np.full(n, float(rank))
        forced.Iallreduce(None, x).Wait()
        assert np.array_equal(x, want)
    k = 5
    x = (np.arange(size * k) * (rank + 1)).astype(np.int64)
    want = np.empty(k, np.int64)
    comm.Reduce_scatter_block(x, want)
    forced.Reduce_scatter_block(None, x)
    assert np.array_equal(x[:k], want)


# -- an MPI.Intracomm --------------------------------------------------------------------------

@pytest.mark.mpi
@pytest.mark.mpi_short
def test_is_an_mpi_intracomm(comm):
    with mtcoll.Comm(comm) as c:
        assert isinstance(c, MPI.Intracomm) and isinstance(c, mtcoll.Comm)
        assert c == comm and c.topology == comm.topology == MPI.UNDEFINED
        assert c.Get_topology() == MPI.UNDEFINED
        assert c.network.spec  # mtcoll's model, under a name mpi4py does not use
        win = MPI.Win.Create(np.zeros(4), comm=c)
        win.Free()
        assert pkl5.Intracomm(c).allreduce(1) == comm.Get_size()
        assert c.allreduce(1) == comm.Get_size() and c.bcast("x", root=0) == "x"
        key = MPI.Comm.Create_keyval()
        c.Set_attr(key, "mine")
        assert comm.Get_attr(key) == "mine"  # the same communicator
        comm.Delete_attr(key)
        MPI.Comm.Free_keyval(key)
        assert c.Get_errhandler() is not None
        assert "Get_rank" not in type(c).__dict__  # mpi4py's own, not forwarded
    # Free left the user's communicator alone
    assert comm.allreduce(1) == comm.Get_size() and comm != MPI.COMM_NULL


# -- derived communicators ------------------------------------------------------------------------

@pytest.mark.mpi
@pytest.mark.mpi_short
def test_derived_communicators_are_mtcoll(comm, forced, monkeypatch):
    rank, size = comm.Get_rank(), comm.Get_size()
    seen = []
    real = mtcoll.comm._dispatch.start

    def spy(self, kind, *args, **kw):
        seen.append(self)
        return real(self, kind, *args, **kw)

    monkeypatch.setattr(mtcoll.comm._dispatch, "start", spy)  # MTCOLL_CHECK=1: every call gets here
    group = comm.Get_group()
    made = {"Dup": forced.Dup(), "Split": forced.Split(0, size - rank),
            "Split_type": forced.Split_type(MPI.COMM_TYPE_SHARED),
            "Create": forced.Create(group), "Create_group": forced.Create_group(group)}
    group.Free()
    try:
        for name, d in made.items():
            assert isinstance(d, mtcoll.Comm) and isinstance(d, MPI.Intracomm), name
            assert d.algorithm in (forced.algorithm, "auto"), name
            x = np.full(BIG, float(d.Get_rank()))
            out = np.zeros(BIG)
            seen.clear()
            d.Allreduce(x, out)
            assert seen == [d], name  # through mtcoll, not around it
            plain = MPI.Intracomm(d)
            assert np.array_equal(out, native(plain, x)), name
    finally:
        for d in made.values():
            d.Free()
    assert comm.allreduce(1) == size


@pytest.mark.mpi
@pytest.mark.mpi_short
def test_create_cart_gives_the_grid(comm):
    size = comm.Get_size()
    dims = MPI.Compute_dims(size, 2)
    with mtcoll.Comm(comm) as c:
        for periods, kind in (([True, True], "torus"), ([False, False], "mesh")):
            cart = c.Create_cart(dims, periods=periods)
            try:
                assert isinstance(cart, mtcoll.Comm) and isinstance(cart, MPI.Cartcomm)
                assert cart.topology == MPI.CART and list(cart.dims) == dims
                assert cart.network.spec == f"{kind}:{dims[0]}x{dims[1]}"
                assert cart.Get_coords(cart.Get_rank()) == list(
                    np.unravel_index(cart.Get_rank(), dims))
                x = np.full(BIG, float(cart.Get_rank()))
                out = np.zeros(BIG)
                cart.Allreduce(x, out)
                assert np.array_equal(out, native(comm, x))
            finally:
                cart.Free()
        ring = c.Create_cart([size], periods=[True])
        assert ring.network.spec == f"ring:{size}"
        ring.Free()


# -- the fast path ----------------------------------------------------------------------------------

@pytest.mark.mpi
@pytest.mark.mpi_short
@pytest.mark.parametrize("algorithm", ["auto", "native"])
def test_library_calls_go_straight_to_the_library(comm, monkeypatch, algorithm):
    """With nothing to check, a call handed to MPI runs mpi4py's Allreduce (or Iallreduce,
    whose request is returned) on the duplicate after its first call, without mtcoll's
    machinery; the slow twin (MTCOLL_CHECK=1, every call through mtcoll's path) gives the same
    results, and so does plain mpi4py."""
    rank, size = comm.Get_rank(), comm.Get_size()
    calls = []
    real = mtcoll.comm._dispatch.start

    def spy(self, *args, **kw):
        calls.append(args[0])
        return real(self, *args, **kw)

    monkeypatch.setattr(mtcoll.comm._dispatch, "start", spy)
    with mtcoll.Comm(comm, algorithm=algorithm) as c:
        for check in ("0", "1"):
            monkeypatch.setenv("MTCOLL_CHECK", check)
            for n, dtype, op in ((1, np.float64, MPI.SUM), (512, np.int32, MPI.MAX),
                                 (8192 - 1, np.float32, MPI.MIN)):
                x = (np.arange(n) * (rank + 1) % 7).astype(dtype)
                want = native(comm, x, op)
                calls.clear()
                for _ in range(5):
                    out = np.zeros(n, dtype)
                    c.Allreduce(x, out, op)
                    assert np.array_equal(out, want)
                    inplace = x.copy()
                    c.Allreduce(MPI.IN_PLACE, inplace, op)
                    assert np.array_equal(inplace, want)
                    out2 = np.zeros(n, dtype)
                    q = c.Iallreduce(x, out2, op)  # the library's request, handed back
                    MPI.Request.Waitall([q])
                    assert np.array_equal(out2, want)
                if check == "1" or not c._threaded:
                    assert len(calls) == 15, calls  # the slow path, every time
                else:
                    assert len(calls) == 1, calls  # the first call only: then cached
        # what the fast path must leave to the slow one: overlapping views, other dtypes
        monkeypatch.setenv("MTCOLL_CHECK", "0")
        a = np.ones(10)
        with pytest.raises(ValueError, match="overlap"):
            c.Allreduce(a[:6], a[4:])
        with pytest.raises(ValueError, match="dtype"):
            c.Allreduce(np.ones(1, np.float32), np.zeros(1))
        # the fast path remembers the last call's (dtype, op, size): the same array with
        # another dtype in place, or another op, is judged afresh
        b = np.ones(4)
        c.Allreduce(MPI.IN_PLACE, b)
        c.Allreduce(MPI.IN_PLACE, b)
        b.dtype = np.int64
        with pytest.raises(ValueError, match="dtype"):
            c.Allreduce(np.ones(4), b)
        z = np.full(3, 1 + 1j)
        c.Allreduce(MPI.IN_PLACE, z, MPI.SUM)
        with pytest.raises(TypeError, match="MIN"):
            c.Allreduce(MPI.IN_PLACE, z, MPI.MIN)  # not defined on complex
    with pytest.raises(RuntimeError, match="freed"):
        c.Allreduce(x, out, op)  # remembered before Free: forgotten by it


@pytest.mark.mpi(min_size=2)
def test_setting_the_algorithm_moves_the_fast_path(comm, monkeypatch):
    """The fast path remembers the sizes the library ran under the algorithm setting it saw
    them under: after ``c.algorithm = "ring"`` a size the library ran before runs the ring
    (through mtcoll's path, not straight to the library); set back, the library's again."""
    monkeypatch.setenv("MTCOLL_CHECK", "0")
    calls = []
    real = mtcoll.comm._dispatch.start

    def spy(self, *args, **kw):
        calls.append(self.algorithm)
        return real(self, *args, **kw)

    monkeypatch.setattr(mtcoll.comm._dispatch, "start", spy)
    x = np.arange(4096, dtype=np.float32) + comm.Get_rank()
    want = native(comm, x, MPI.SUM)
    with mtcoll.Comm(comm, algorithm="native") as c:
        if not c._threaded:
            pytest.skip("no fast path without the progress thread")
        library = c._lib_allreduce
        ran = []
        c._lib_allreduce = lambda *a: (ran.append(c.algorithm), library(*a))[1]
        for algorithm, slow in (("native", 1), ("ring", 3), ("native", 0), ("ring", 3)):
            c.algorithm = algorithm
            calls.clear()
            for _ in range(3):
                out = np.empty_like(x)
                c.Allreduce(x, out, MPI.SUM)
                assert np.array_equal(out, want), algorithm
            assert calls == [algorithm] * slow, (algorithm, calls)
        assert "ring" not in ran and "native" in ran, ran


# -- no sleep-waiting for library calls -------------------------------------------------------------

@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
def test_no_main_thread_sleep_for_library_calls(comm, monkeypatch):
    """Waiting sleeps (``wait="sleep"``, as with more ranks than cores) and a MultiTree call is
    in flight: the small blocking calls handed to MPI meanwhile never sleep on the main thread
    (they are the library's blocking calls; the progress thread moves the schedule)."""
    monkeypatch.setenv("MTCOLL_CHECK", "0")
    rank = comm.Get_rank()
    slept = []
    real_sleep = time.sleep
    main = threading.main_thread()

    def spy(seconds):
        if threading.current_thread() is main:
            slept.append(seconds)
        real_sleep(seconds)

    with mtcoll.Comm(comm, algorithm="multitree", wait="sleep") as mt, \
            mtcoll.Comm(comm, algorithm="native", wait="sleep") as nat:
        if not nat._threaded:
            pytest.skip("no progress thread (MPI below THREAD_MULTIPLE or MTCOLL_PROGRESS=off)")
        big = np.zeros(1 << 18)
        req = mt.Iallreduce(np.full(1 << 18, float(rank)), big)
        monkeypatch.setattr(time, "sleep", spy)
        x = np.full(4, float(rank))
        for _ in range(50):
            out = np.zeros(4)
            nat.Allreduce(x, out)
            assert np.array_equal(out, native(comm, x))
        monkeypatch.setattr(time, "sleep", real_sleep)
        assert slept == []
        req.Wait()
        assert np.array_equal(big, native(comm, np.full(1 << 18, float(rank))))


# -- one rank's bad input --------------------------------------------------------------------------

@pytest.mark.mpi(min_size=2, max_size=8)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("algorithm", ["native", "multitree"])
def test_stall_names_the_rank_that_did_not_join(comm, monkeypatch, algorithm):
    """Checking off, the last rank's recvbuf is read-only: it raises at once, the others stall
    and their StallError names that rank -- not its neighbours."""
    size, rank = comm.Get_size(), comm.Get_rank()
    last = size - 1
    monkeypatch.setenv("MTCOLL_CHECK", "0")
    monkeypatch.setenv("MTCOLL_TIMEOUT", "2")
    c = mtcoll.Comm(comm, algorithm=algorithm)
    try:
        c.Allreduce(np.ones(BIG), np.zeros(BIG))  # planned and warm
        out = np.zeros(BIG)
        if rank == last:
            out.flags.writeable = False
            with pytest.raises(BufferError, match=rf"recvbuf \(rank {last}\) is read-only"):
                c.Allreduce(np.ones(BIG), out)
            named = None
        else:
            with pytest.raises(StallError) as err:
                c.Allreduce(np.ones(BIG), out)
            named = err.value.ranks
            assert f"rank(s) [{last}] did not join" in str(err.value), str(err.value)
        everyone = comm.allgather(named)
        assert everyone[:last] == [[last]] * last, everyone
    finally:
        c.Free()
    comm.Barrier()
    with mtcoll.Comm(comm, algorithm=algorithm) as c2:  # the world is fine
        out = np.zeros(BIG)
        c2.Allreduce(np.full(BIG, float(rank)), out)
        assert np.array_equal(out, native(comm, np.full(BIG, float(rank))))


def test_run_commands_use_mpi4py():
    """Every ``mpiexec ... python script`` in README and docs runs through ``python -m mpi4py``
    (an uncaught exception then aborts the job instead of leaving the other ranks blocked)."""
    bad = []
    # (performance.md and reliability.md record the commands that measured their figures, and
    # reliability.md shows what happens without -m mpi4py: records, not instructions)
    docs = [p for p in sorted((ROOT / "docs").glob("*.md"))
            if p.name not in ("performance.md", "reliability.md")]
    for path in [ROOT / "README.md", *docs]:
        for line in path.read_text().splitlines():
            for m in re.finditer(r"mpiexec[^`|]*?python3?\b(?P<rest>[^`|]*)", line):
                rest = m.group("rest").strip()
                if not rest.startswith("-m mpi4py"):
                    bad.append(f"{path.name}: {m.group(0)}")
    assert not bad, "\n".join(bad)


# -- the idioms that worked before ----------------------------------------------------------------------

@pytest.mark.mpi
@pytest.mark.mpi_short
def test_idioms_that_worked_before(comm, forced):
    rank, size = comm.Get_rank(), comm.Get_size()
    # a 0-d array
    out = np.zeros(())
    forced.Allreduce(np.array(float(rank)), out)
    assert out == native(comm, np.array(float(rank)))
    # tuple specs and keyword arguments
    x = np.full(6, rank, dtype=np.int64)
    out = np.zeros(6, np.int64)
    forced.Allreduce(sendbuf=(x, MPI.INT64_T), recvbuf=(out, 6, MPI.INT64_T), op=MPI.SUM)
    assert np.array_equal(out, native(comm, x))
    # float16, complex, bool LOR
    for arr, op in ((np.full(9, rank, np.float16), MPI.SUM),
                    (np.full(9, rank + 1j, np.complex128), MPI.PROD),
                    (np.array([rank == 0, False, True]), MPI.LOR)):
        out = np.zeros_like(arr)
        forced.Allreduce(arr, out, op=op)
        assert np.array_equal(out, native(comm, arr, op))
    # bytearray and array.array
    raw = bytearray(np.full(5, rank, np.int32).tobytes())
    res = bytearray(20)
    forced.Allreduce([raw, MPI.INT], [res, MPI.INT])
    assert np.array_equal(np.frombuffer(res, np.int32), native(comm, np.full(5, rank, np.int32)))
    aa = array.array("d", [float(rank)] * 4)
    ab = array.array("d", [0.0] * 4)
    forced.Allreduce(aa, ab)
    assert list(ab) == [float(sum(range(size)))] * 4
    # the pickle-based lowercase calls are mpi4py's
    assert forced.allreduce(rank) == sum(range(size))
    assert forced.allgather(rank) == list(range(size))
    assert forced.bcast({"k": 1} if rank == 0 else None, root=0) == {"k": 1}
