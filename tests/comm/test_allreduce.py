"""Allreduce through mtcoll.Comm against the MPI library's own, over the feature grid.

Grid: algorithm x topology family (whatever fits the communicator size) x count x dtype,
in place and out of place; op x dtype on one schedule; a few large counts; Hypothesis-drawn
calls. Every result must equal native ``comm.Allreduce`` (exactly: the data are chosen so that
any summation order gives the same bits) and be bitwise identical on every rank.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mpi4py import MPI

import mtcoll
import mtcoll.execute
from mtcoll import _ops
from mtcoll.plan import ALGORITHMS

from _comms import native as library, planned_or_skip
from _topologies import family_spec

FAMILIES = ("auto", "ring", "full", "torus", "mesh", "fattree", "bigraph", "hier")
DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "float32", "float64", "longdouble", "complex64", "complex128",
          "clongdouble")
OPS = {name: getattr(MPI, name) for name in _ops.OP_NAMES}


@pytest.fixture(autouse=True, scope="module")
def clean_env():
    """The tests choose algorithm and topology themselves: no environment overrides."""
    with pytest.MonkeyPatch.context() as mp:
        for var in ("MTCOLL_ALGO", "MTCOLL_TOPOLOGY", "MTCOLL_DEBUG"):
            mp.delenv(var, raising=False)
        yield


def make_comm(comm, spec, algorithm, **kw):
    """An mtcoll.Comm whose schedule is planned, or a skip (the same on every rank) when the
    algorithm does not fit the topology."""
    return planned_or_skip(mtcoll.Comm(comm, topology=spec, algorithm=algorithm, **kw),
                           algorithm, spec)


def assert_same_everywhere(comm, arr):
    digest = hashlib.sha256(np.ascontiguousarray(arr).view(np.uint8).tobytes()).hexdigest()
    everyone = comm.allgather(digest)
    assert len(set(everyone)) == 1, f"ranks hold different results: {everyone}"


def data(op, dtype, count, rank, seed=0):
    """Per-rank input whose reduction is exact in any order (so it must equal native's)."""
    dtype = np.dtype(dtype)
    rng = np.random.default_rng([seed, rank, count, dtype.num])
    kind = dtype.kind
    if kind == "b":
        return rng.integers(0, 2, count).astype(bool)
    if kind not in "iu" and op in ("BAND", "BOR", "BXOR"):
        return np.ones(count, dtype)  # MPI leaves these undefined: only the TypeError matters
    if op in ("BAND", "BOR", "BXOR") or (op in ("MIN", "MAX") and kind in "iu"):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, count, dtype=dtype, endpoint=True)
    if op in ("LAND", "LOR", "LXOR"):
        return rng.choice(np.array([0, 1, 2, 0, 3], dtype=dtype), count)
    if op in ("MIN", "MAX"):
        return rng.standard_normal(count).astype(dtype)
    if op == "PROD":
        if kind == "c":
            return rng.choice(np.array([1, -1, 1j, -1j], dtype=dtype), count)
        vals = [1, 2, 1] if kind == "u" else [1, -1, 1]
        x = rng.choice(np.array(vals, dtype=dtype), count)
        if rank >= 3:  # keep floats exact: at most 2**3 from the factors of 2
            x[x == 2] = 1
        return x
    # SUM: small integers (floats stay exactly representable in any order)
    if kind == "u":
        return rng.integers(0, 4, count).astype(dtype)
    x = rng.integers(-3, 4, count).astype(dtype)
    if kind == "c":
        x = x + 1j * rng.integers(-3, 4, count)
    return x.astype(dtype)


def native(comm, x, op="SUM"):
    return library(comm, x, OPS[op])


def counts_for(n):
    return sorted({0, 1, max(n - 1, 0), n + 1, 1000})


@pytest.mark.mpi
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_algorithm_topology_grid(comm, algorithm, family):
    n = comm.Get_size()
    spec = family_spec(family, n)
    if spec is None:
        pytest.skip(f"no {family} topology with {n} ranks")
    with make_comm(comm, spec, algorithm) as c:
        for i, count in enumerate(counts_for(n)):
            for dtype in ("int64", "float64"):
                x = data("SUM", dtype, count, comm.Get_rank(), seed=i)
                want = native(comm, x)
                if (i + (dtype == "float64")) % 2:
                    got = x.copy()
                    c.Allreduce(MPI.IN_PLACE, got)
                else:
                    got = np.full_like(x, 77)
                    c.Allreduce(x, got)
                    assert np.array_equal(x, data("SUM", dtype, count, comm.Get_rank(), seed=i))
                assert np.array_equal(got, want), (algorithm, spec, count, dtype)
                assert_same_everywhere(comm, got)


def _rated_specs(n):
    """Networks with unequal links and hosts for ``n`` ranks (the timed planner's cases)."""
    hosts = f"ring:2/per-host={n // 2}/20mbit" if n % 2 == 0 else f"full:1/per-host={n}/shm=1gbit"
    return [f"ring:{n}/10mbit/0-1=1mbit", f"full:{n}/1gbit/0-1=10mbit", hosts]


@pytest.mark.mpi
@pytest.mark.parametrize("which", range(3))
def test_timed_on_unequal_links_and_hosts(comm, which):
    n = comm.Get_size()
    if n < 2:
        pytest.skip("one rank has no links")
    spec = _rated_specs(n)[which]
    with make_comm(comm, spec, "timed") as c:
        for i, count in enumerate(counts_for(n) + [3 * n * 4 + 1]):
            for dtype in ("int64", "float64"):
                x = data("SUM", dtype, count, comm.Get_rank(), seed=i)
                want = native(comm, x)
                got = np.full_like(x, 77)
                c.Allreduce(x, got)
                assert np.array_equal(got, want), (spec, count, dtype)
                assert_same_everywhere(comm, got)


@pytest.mark.mpi
@pytest.mark.mpi_short
@pytest.mark.parametrize("op", _ops.OP_NAMES)
def test_ops_and_dtypes(comm, op):
    """Every op on every dtype: MPI's result where MPI defines it, TypeError where it does not."""
    n, rank = comm.Get_size(), comm.Get_rank()
    # the heavily oversubscribed 16-rank run gets one dtype per kind and width class
    dtypes = DTYPES if n <= 8 else ("bool", "int8", "uint32", "float16", "float64",
                                    "complex64")
    with make_comm(comm, "auto", "multitree") as c:
        for dtype in dtypes:
            count = 1000 if n <= 8 else n + 1
            x = data(op, dtype, count, rank)
            got = np.zeros_like(x)
            try:
                _ops.lookup(OPS[op], x.dtype)
            except TypeError:
                with pytest.raises(TypeError, match=rf"MPI\.{op} .*{x.dtype.name}"):
                    c.Allreduce(x, got, op=OPS[op])
                continue
            c.Allreduce(x, got, op=OPS[op])
            want = native(comm, x, op)
            assert np.array_equal(got, want), (op, dtype, got[:8], want[:8])
            assert_same_everywhere(comm, got)


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_large_count(comm, algorithm):
    """2**20 + 3 elements: many pieces per transfer, pipelined."""
    count = 2**20 + 3
    with make_comm(comm, "auto", algorithm) as c:
        x = data("SUM", "float32", count, comm.Get_rank())
        want = native(comm, x)
        c.Allreduce(MPI.IN_PLACE, x)
        assert np.array_equal(x, want)
        assert_same_everywhere(comm, x)


@pytest.mark.mpi
@pytest.mark.mpi_short
def test_reproducible_floats(comm):
    """Random floats: close to native, bitwise equal across ranks and across repeated runs."""
    rank = comm.Get_rank()
    with make_comm(comm, "auto", "multitree", segment_bytes=1024) as c:
        x = np.random.default_rng(rank).standard_normal(10_000)
        first = np.empty_like(x)
        c.Allreduce(x, first)
        np.testing.assert_allclose(first, native(comm, x), rtol=1e-12, atol=1e-12)
        assert_same_everywhere(comm, first)
        for _ in range(2):
            again = np.empty_like(x)
            c.Allreduce(x, again)
            assert again.tobytes() == first.tobytes()


@pytest.mark.mpi
@pytest.mark.parametrize("segment_bytes,max_segments", [(8, 3), (40, 1000)])
def test_segmenting(comm, segment_bytes, max_segments):
    """Tiny segments: every transfer cut into many pipelined pieces."""
    with make_comm(comm, "auto", "ring", segment_bytes=segment_bytes,
                   max_segments=max_segments) as c:
        for count in (comm.Get_size() + 1, 1001):
            x = data("SUM", "int32", count, comm.Get_rank())
            got = np.empty_like(x)
            c.Allreduce(x, got)
            assert np.array_equal(got, native(comm, x))


@pytest.mark.mpi
def test_message_limit_splits(comm, monkeypatch):
    """No message exceeds MAX_MESSAGE_ELEMENTS (lowered here to 7); results unchanged."""
    monkeypatch.setattr(mtcoll.execute._limits, "MAX_MESSAGE_ELEMENTS", 7)
    for algorithm in ("multitree", "ring"):
        with make_comm(comm, "auto", algorithm, max_segments=1) as c:
            # only lays the call out, sends nothing
            ex = mtcoll.execute.Executor(comm, c.schedule(), max_segments=1)
            count = 1000
            lay = ex.layout(count, 8)
            if comm.Get_size() > 1:
                assert 1 <= lay.max_message <= 7
            x = data("SUM", "int64", count, comm.Get_rank())
            got = np.empty_like(x)
            c.Allreduce(x, got)
            assert np.array_equal(got, native(comm, x))


class FakeComm:
    """Enough of a communicator for laying out a schedule: rank, size and TAG_UB."""

    def __init__(self, n, r):
        self.n, self.r = n, r

    def Get_size(self):
        return self.n

    def Get_rank(self):
        return self.r

    def Get_attr(self, key):
        return 2**29 - 1


def test_layout_of_huge_count():
    """Counts above 2**31 are laid out in messages within the limit, covering every element
    (planned only: no buffer of that size is allocated)."""
    from mtcoll.plan import plan

    count = 2**31 + 5
    sched = plan("ring:4", "ring")
    bounds = sched.chunk_bounds(count)
    for r in range(4):
        ex = mtcoll.execute.Executor(FakeComm(4, r), sched, max_segments=1)
        lay = ex.layout(count, 1)
        assert 0 < lay.max_message <= mtcoll.execute.MAX_MESSAGE_ELEMENTS
        view = sched.rank_view(r)
        # the pieces of each operation tile its element range exactly
        total = sum(int(bounds[h] - bounds[l]) for l, h in zip(view.lo, view.hi))
        assert sum(b - a for a, b in zip(lay.a, lay.b)) == total
        assert ex.fits_tags(lay)


@pytest.mark.mpi
@pytest.mark.mpi_short
def test_concurrent_iallreduce(comm):
    """Several nonblocking calls on several Comms in flight at once, completed out of order."""
    rank = comm.Get_rank()
    comms = [make_comm(comm, "auto", a) for a in ("multitree", "ring")]
    comms.append(mtcoll.Comm(comm, algorithm="native"))
    try:
        calls = []
        for i in range(9):
            c = comms[i % 3]
            x = data("SUM", "int32", 500 + i, rank, seed=i)
            out = np.empty_like(x)
            calls.append((c.Iallreduce(x, out), x, out))
        # ranks complete them in different orders: waiting on one advances all
        order = reversed(calls) if rank % 2 else calls[1::2] + calls[::2]
        for req, x, out in order:
            assert req.Wait() is True
        for req, x, out in calls:
            assert req.Test() is True
            assert np.array_equal(out, native(comm, x))
    finally:
        for c in comms:
            c.Free()


@pytest.mark.mpi
def test_more_calls_in_flight_than_tag_slots(comm, monkeypatch):
    """With 3 tag slots, 10 calls in flight: the oldest are completed before a slot is reused."""
    monkeypatch.setattr(mtcoll.execute._limits, "TAG_SLOTS", 3)
    rank = comm.Get_rank()
    with make_comm(comm, "auto", "multitree") as c:
        calls = []
        for i in range(10):
            x = data("SUM", "int64", 100 + i, rank, seed=i)
            out = np.empty_like(x)
            calls.append((c.Iallreduce(x, out), x, out))
        mtcoll.waitall([req for req, _, _ in calls])
        for _, x, out in calls:
            assert np.array_equal(out, native(comm, x))


@pytest.mark.mpi(min_size=2)  # one rank has nothing to exchange: no schedule call, no slot
def test_tag_slots_freed_behind_an_unfinished_native_call(comm, monkeypatch):
    """An unfinished call of the MPI library (it has no tag slot) ahead of the schedule calls
    does not keep the oldest of those from completing before their slot is reused."""
    monkeypatch.setattr(mtcoll.execute._limits, "TAG_SLOTS", 3)
    monkeypatch.setenv("MTCOLL_CHECK", "0")  # the check's waits would advance the calls anyway
    rank = comm.Get_rank()

    def add(a, b, datatype):
        np.frombuffer(b, np.float64)[...] += np.frombuffer(a, np.float64)

    user_sum = MPI.Op.Create(add, commute=True)  # user-defined: the MPI library runs the call
    try:
        with make_comm(comm, "auto", "multitree") as c:
            y, yout = np.full(2, float(rank)), np.zeros(2)
            head = c.Iallreduce(y, yout, user_sum)
            calls = []
            for i in range(8):
                x = data("SUM", "int64", 100 + i, rank, seed=i)
                out = np.empty_like(x)
                calls.append((c.Iallreduce(x, out), x, out))
                old = [req for req, _, _ in calls if req.seq <= c._seq - 3]
                assert all(req._complete for req in old), [req.seq for req in old]
            mtcoll.waitall([head] + [req for req, _, _ in calls])
            assert np.array_equal(yout, np.full(2, comm.allreduce(rank)))
            for _, x, out in calls:
                assert np.array_equal(out, native(comm, x))
    finally:
        user_sum.Free()


_HYP_COMMS = {}


@pytest.mark.mpi
@settings(max_examples=25, deadline=None)
@given(count=st.integers(0, 3000), dtype=st.sampled_from(DTYPES),
       op=st.sampled_from(_ops.OP_NAMES), in_place=st.booleans(),
       algorithm=st.sampled_from(ALGORITHMS), segment_bytes=st.sampled_from([None, 64, 4096]))
def test_hypothesis_calls(comm, count, dtype, op, in_place, algorithm, segment_bytes):
    # Every rank must make the same call: take rank 0's draw (hypothesis is derandomized under
    # MPI by tests/conftest.py, so they agree anyway).
    count, dtype, op, in_place, algorithm, segment_bytes = comm.bcast(
        (count, dtype, op, in_place, algorithm, segment_bytes), root=0)
    key = (algorithm, segment_bytes)
    if key not in _HYP_COMMS:
        c = mtcoll.Comm(comm, topology="auto", algorithm=algorithm, segment_bytes=segment_bytes)
        try:
            c.schedule()
        except ValueError:  # algorithm does not fit this size: use MultiTree instead
            c.Free()
            c = mtcoll.Comm(comm, algorithm="multitree", segment_bytes=segment_bytes)
        _HYP_COMMS[key] = c
    c = _HYP_COMMS[key]
    x = data(op, dtype, count, comm.Get_rank())
    try:
        _ops.lookup(OPS[op], x.dtype)
    except TypeError:
        with pytest.raises(TypeError):
            c.Allreduce(x, np.empty_like(x), op=OPS[op])
        return
    want = native(comm, x, op)
    if in_place:
        got = x.copy()
        c.Allreduce(MPI.IN_PLACE, got, op=OPS[op])
    else:
        got = np.empty_like(x)
        c.Allreduce(x, got, op=OPS[op])
    assert np.array_equal(got, want)
    assert_same_everywhere(comm, got)


def test_layout_reads_the_input_in_place():
    """Out of place, the executor reads the input where no receive has written yet, instead of
    copying it first. A piece reading the working buffer finds every element there (written by
    an earlier receive, or copied up front); every element ends written; MultiTree copies
    nothing up front (planned only, serial)."""
    from mtcoll.plan import plan
    from mtcoll.schedule import RECV, REDUCE, SEND

    for spec, algorithm in [("torus:4x4", "multitree"), ("ring:6", "rhd"),
                            ("torus:2x3", "dbtree"), ("torus:2x3", "ring2d")]:
        sched = plan(spec, algorithm)
        n = sched.nranks
        for count in (n - 1, 1000):
            for r in range(n):
                lay = mtcoll.execute.Executor(FakeComm(n, r), sched, segment_bytes=64,
                                              max_segments=3).layout(count, 8)
                received = np.zeros(count, bool)
                in_acc = np.zeros(count, bool)
                for a, b in lay.precopy:
                    in_acc[a:b] = True
                for p in range(lay.npieces):
                    a, b = lay.a[p], lay.b[p]
                    if lay.kind[p] == SEND or lay.phase[p] == REDUCE:
                        if lay.src_read[p]:
                            assert not received[a:b].any(), (spec, r, p)
                        else:
                            assert (received[a:b] | in_acc[a:b]).all(), (spec, r, p)
                    if lay.kind[p] == RECV:
                        received[a:b] = True
                        in_acc[a:b] = True
                assert in_acc.all(), (spec, algorithm, r, count)
                if algorithm == "multitree":
                    assert lay.precopy == ()
    # A send that covers a received chunk and one not yet received (no planner makes one
    # today): the unreceived part is copied up front and the send reads the working buffer.
    from mtcoll.schedule import Schedule

    odd = Schedule("handmade", "ring:2", 2, 2, [0, 1], phase=[0, 0, 1], step=[0, 1, 2],
                   src=[1, 0, 1], dst=[0, 1, 0], lo=[0, 0, 1], hi=[1, 2, 2])
    lay = mtcoll.execute.Executor(FakeComm(2, 0), odd, max_segments=1).layout(10, 8)
    assert lay.kind == (RECV, SEND, RECV) and lay.src_read == (True, False, False)
    assert lay.precopy == ((5, 10),)


def test_scratch_pool_is_bounded_in_bytes(monkeypatch):
    """The scratch pool (mtcoll.execute._state): best fit within a factor 2, bounded by SCRATCH_BUDGET
    over the whole process with the oldest dropped first, the newest kept even when larger than
    the budget; large buffers are anonymous mmaps, not heap memory."""
    ex = mtcoll.execute._state
    monkeypatch.setattr(ex, "_pool", [])
    monkeypatch.setattr(mtcoll.execute._limits, "SCRATCH_BUDGET", 3 << 20)
    mib = 1 << 20
    bufs = [ex.get_scratch(n) for n in (mib, mib, 2 * mib)]
    assert all(isinstance(b.base, memoryview) for b in bufs)  # mmapped
    assert isinstance(ex.get_scratch(1000).base, (type(None), np.ndarray))  # small: heap
    for b in bufs:
        ex.put_scratch(b)
    # 4 MiB offered to a 3 MiB budget: the oldest 1 MiB buffer went
    assert ex.scratch_cached() == 3 * mib and ex._pool[0] is bufs[1]
    got = ex.get_scratch(900 * 1024)  # the 1 MiB one fits within a factor 2; 2 MiB does not
    assert got is bufs[1]
    assert ex.get_scratch(600 * 1024) is not bufs[2]  # 2 MiB wastes more than half: new one
    huge = ex.get_scratch(8 * mib)
    ex.put_scratch(huge)  # alone over the budget: kept, everything older dropped
    assert ex._pool == [huge] and ex.scratch_cached() == 8 * mib
    assert ex.get_scratch(5 * mib) is huge
    for _ in range(40):  # many small buffers: the pool keeps at most _SCRATCH_COUNT of them
        ex.put_scratch(np.empty(1024, dtype=np.uint8))
    assert len(ex._pool) == ex._SCRATCH_COUNT
