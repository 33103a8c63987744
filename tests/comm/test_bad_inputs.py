"""Every bad (or odd) input in the table of docs/sharp-bits.md, one test per row.

The rows' ids are the parametrization; ``test_table_matches_rows`` checks that the table and
the parametrization hold the same ids, so a row without a test (or a test without a row) fails.
Errors must name the argument and the rank; accepted odd inputs must give native's result.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from mpi4py import MPI

import mtcoll
from _comms import native
from _mpirun import ROOT

ROWS = {}


def row(rid):
    def deco(fn):
        ROWS[rid] = fn
        return fn
    return deco


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("MTCOLL_ALGO", "MTCOLL_TOPOLOGY", "MTCOLL_DEBUG", "MTCOLL_WAIT",
                "MTCOLL_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MTCOLL_TUNING", "off")


@pytest.fixture(scope="module")
def mt():
    c = mtcoll.Comm(MPI.COMM_WORLD, algorithm="multitree")
    yield c
    c.Free()


def raises(cls, what, rank):
    """pytest.raises for an error naming ``what`` (the argument) and the rank."""
    return pytest.raises(cls, match=rf"{what}.*\(rank {rank}\b|{what} \(rank {rank}\b")


# -- shapes and layouts ---------------------------------------------------------------------------

@row("nd-c-order")
def _(comm, mt, r):
    x = np.arange(24.0).reshape(2, 3, 4) + r
    out = np.empty_like(x)
    mt.Allreduce(x, out)
    assert out.shape == (2, 3, 4) and np.array_equal(out, native(comm, x))


@row("nd-fortran-order")
def _(comm, mt, r):
    x = np.asfortranarray(np.arange(24.0).reshape(4, 6) + r)
    out = np.asfortranarray(np.empty((4, 6)))
    mt.Allreduce(x, out)
    assert np.array_equal(out, native(comm, x))


@row("mixed-orders")
def _(comm, mt, r):
    # sendbuf Fortran, recvbuf C: elements pair up in memory order, as in MPI
    x = np.asfortranarray(np.arange(12.0).reshape(3, 4) * (r + 1))
    out, want = np.empty((3, 4)), np.empty((3, 4))
    mt.Allreduce(x, out)
    comm.Allreduce(x, want)
    assert np.array_equal(out, want)
    assert not np.array_equal(out, native(comm, np.ascontiguousarray(x)))


@row("non-contiguous")
def _(comm, mt, r):
    a = np.arange(60.0).reshape(10, 6) + r
    out = np.full((10, 6), -1.0)
    mt.Allreduce(a[::2, 1::3], out[1::2, ::3])
    assert np.array_equal(out[1::2, ::3], native(comm, a[::2, 1::3].copy()))
    out[1::2, ::3] = -1
    assert (out == -1).all()  # nothing else written


@row("zero-d")
def _(comm, mt, r):
    out = np.zeros(())
    mt.Allreduce(np.array(float(r)), out)
    assert out == sum(range(comm.Get_size()))


@row("zero-count")
def _(comm, mt, r):
    out = np.zeros(0)
    mt.Allreduce(np.zeros(0), out)
    assert out.size == 0


@row("not-a-buffer")
def _(comm, mt, r):
    with raises(TypeError, "sendbuf", r):
        mt.Allreduce([1.0, 2.0], np.zeros(2))
    with raises(TypeError, "sendbuf", r):
        mt.Allreduce("abc", np.zeros(2))


# -- writability ----------------------------------------------------------------------------------

def _readonly(x):
    x.flags.writeable = False
    return x


@row("readonly-recvbuf")
def _(comm, mt, r):
    with raises(ValueError, "recvbuf", r):
        mt.Allreduce(np.ones(4), _readonly(np.zeros(4)))


@row("readonly-inplace")
def _(comm, mt, r):
    with raises(ValueError, "recvbuf", r):
        mt.Allreduce(MPI.IN_PLACE, _readonly(np.zeros(4)))


@row("readonly-sendbuf")
def _(comm, mt, r):
    x = _readonly(np.full(4, float(r)))
    out = np.zeros(4)
    mt.Allreduce(x, out)
    assert np.array_equal(out, native(comm, x))


# -- dtypes and ops -------------------------------------------------------------------------------

@row("dtype-mismatch")
def _(comm, mt, r):
    with raises(TypeError, "recvbuf", r):
        mt.Allreduce(np.ones(4, "f4"), np.zeros(4))


@row("typed-spec-reinterprets")
def _(comm, mt, r):
    # [buf, MPI.DOUBLE] on float32 memory: the bytes are read as doubles, as MPI does
    x = np.arange(4, dtype="f4") + r
    out, want = np.zeros(2), np.zeros(2)
    mt.Allreduce([x, MPI.DOUBLE], out)
    comm.Allreduce([x, MPI.DOUBLE], want)
    assert np.array_equal(out, want, equal_nan=True)


@row("spec-bytes-not-whole")
def _(comm, mt, r):
    with raises(ValueError, "sendbuf", r):
        mt.Allreduce([np.ones(5, "u1"), MPI.DOUBLE], np.zeros(1))


@row("object-dtype")
def _(comm, mt, r):
    with raises(TypeError, "recvbuf", r):
        mt.Allreduce(np.array([1, 2], dtype=object), np.empty(2, dtype=object))


@row("structured-dtype")
def _(comm, mt, r):
    st = np.dtype([("a", "i4"), ("b", "f8")])
    with raises(TypeError, "recvbuf", r):
        mt.Allreduce(np.zeros(2, st), np.zeros(2, st))


@row("byteswapped-dtype")
def _(comm, mt, r):
    with raises(TypeError, "sendbuf", r):
        mt.Allreduce(np.ones(3, ">f8"), np.zeros(3))


@row("bool-sum")
def _(comm, mt, r):
    with pytest.raises(TypeError, match=r"MPI\.SUM is not defined for dtype bool"):
        mt.Allreduce(np.ones(3, bool), np.zeros(3, bool))


@row("bool-logical")
def _(comm, mt, r):
    x = np.array([r == 0, True, False])
    out = np.zeros(3, bool)
    mt.Allreduce(x, out, MPI.LOR)
    assert np.array_equal(out, native(comm, x, MPI.LOR))


@row("undefined-op-dtype")
def _(comm, mt, r):
    with pytest.raises(TypeError, match=r"MPI\.MIN is not defined for dtype complex128"):
        mt.Allreduce(np.ones(3, complex), np.zeros(3, complex), MPI.MIN)
    with pytest.raises(TypeError, match=r"MPI\.BAND is not defined for dtype float64"):
        mt.Allreduce(np.ones(3), np.zeros(3), MPI.BAND)


@row("op-not-an-op")
def _(comm, mt, r):
    with raises(TypeError, "op", r):
        mt.Allreduce(np.ones(3), np.zeros(3), "sum")


def _specials(r, n):
    vals = np.array([np.nan, np.inf, -np.inf, 1.0, -1.0, 0.0])
    # every pattern of specials over the ranks, different per element
    idx = (np.arange(6 ** 2)[:, None] // 6 ** np.arange(2)) % 6  # 36 x 2 digits
    return vals[idx[:, r % 2]] if r < 2 else np.ones(36)


@row("nan-inf-sum-prod")
def _(comm, mt, r):
    x = _specials(r, comm.Get_size())
    for op in (MPI.SUM, MPI.PROD):
        out = np.empty_like(x)
        with np.errstate(invalid="ignore"):
            mt.Allreduce(x, out, op)
        assert np.array_equal(out, native(comm, x, op), equal_nan=True)


@row("nan-min-max")
def _(comm, mt, r):
    x = _specials(r, comm.Get_size())
    everyone = np.array(comm.allgather(x))
    for op, fn in ((MPI.MAX, np.max), (MPI.MIN, np.min)):
        out = np.empty_like(x)
        mt.Allreduce(x, out, op)
        # NaN wherever any rank has NaN (numpy's maximum/minimum), in any order
        assert np.array_equal(out, fn(everyone, axis=0), equal_nan=True)
        clean = ~np.isnan(everyone).any(axis=0)
        assert np.array_equal(out[clean], native(comm, x, op)[clean])


# -- sizes ----------------------------------------------------------------------------------------

@row("recvbuf-too-small")
def _(comm, mt, r):
    with raises(ValueError, "recvbuf", r):
        mt.Allreduce(np.ones(5), np.zeros(4))


@row("recvbuf-too-large")
def _(comm, mt, r):
    with raises(ValueError, "recvbuf", r):
        mt.Allreduce(np.ones(5), np.zeros(6))


@row("huge-count-spec")
def _(comm, mt, r):
    with raises(ValueError, "sendbuf", r):
        mt.Allreduce([np.ones(3), 2**31 + 1, MPI.DOUBLE], np.zeros(3))
    with raises(ValueError, "sendbuf", r):
        mt.Allreduce([np.ones(3), -1, MPI.DOUBLE], np.zeros(3))


@row("huge-count-messages")
def _(comm, mt, r):
    # more than 2**31 elements: laid out (not allocated) in messages within the limit
    import mtcoll.execute as ex

    class Fake:
        def __init__(self, n, rank):
            self.n, self.rank = n, rank

        def Get_size(self):
            return self.n

        def Get_rank(self):
            return self.rank

        def Get_attr(self, key):
            return 2**29 - 1

    from mtcoll.plan import plan
    sched = plan("ring:4", "multitree")
    lay = ex.Executor(Fake(4, 1), sched).layout(2**31 + 7, 1)
    assert 0 < lay.max_message <= ex.MAX_MESSAGE_ELEMENTS


# -- None and IN_PLACE ------------------------------------------------------------------------------

@row("none-sendbuf")
def _(comm, mt, r):
    # mpi4py's InPlace: None is MPI.IN_PLACE
    out = np.full(2, float(r))
    mt.Allreduce(None, out)
    assert np.array_equal(out, native(comm, np.full(2, float(r))))


@row("none-recvbuf")
def _(comm, mt, r):
    with raises(TypeError, "recvbuf", r):
        mt.Allreduce(np.ones(2), None)


@row("in-place-as-recvbuf")
def _(comm, mt, r):
    with raises(TypeError, "recvbuf", r):
        mt.Allreduce(np.ones(2), MPI.IN_PLACE)


@row("overlapping-buffers")
def _(comm, mt, r):
    a = np.ones(10)
    with raises(ValueError, "sendbuf and recvbuf", r):
        mt.Allreduce(a[:6], a[4:])


# -- construction arguments -------------------------------------------------------------------------

def _comm_error(comm, cls, what, r, **kw):
    with raises(cls, what, r):
        mtcoll.Comm(comm, **kw)


@row("topology-wrong-size")
def _(comm, mt, r):
    n = comm.Get_size()
    spec = "torus:3x3" if n != 9 else "torus:2x2"
    _comm_error(comm, ValueError, "topology=", r, topology=spec)


@row("topology-zero-side")
def _(comm, mt, r):
    _comm_error(comm, ValueError, "topology=", r, topology="torus:0x4")


@row("topology-bogus")
def _(comm, mt, r):
    _comm_error(comm, ValueError, "topology=", r, topology="bogus")
    _comm_error(comm, ValueError, "topology=", r, topology=None)


@row("bad-algorithm")
def _(comm, mt, r):
    _comm_error(comm, ValueError, "algorithm='bogus'.*", r, algorithm="bogus")


@row("bad-ports")
def _(comm, mt, r):
    for bad in (0, -1, 1.5, "x"):
        _comm_error(comm, ValueError, "ports", r, ports=bad)


@row("bad-segments")
def _(comm, mt, r):
    _comm_error(comm, ValueError, "segment_bytes", r, segment_bytes=0)
    _comm_error(comm, ValueError, "max_segments", r, max_segments=-2)


@row("bad-wait")
def _(comm, mt, r):
    _comm_error(comm, ValueError, "wait='nap'", r, wait="nap")


@row("bad-comm")
def _(comm, mt, r):
    with pytest.raises(TypeError, match="comm must be an MPI intracommunicator"):
        mtcoll.Comm("world")


# -- environment ----------------------------------------------------------------------------------

def _env_case(monkeypatch, comm, name, value, cls, r, at_call=False):
    monkeypatch.setenv(name, value)
    what = f"environment variable {name}={value!r}"
    if at_call:
        with mtcoll.Comm(comm) as c:
            with raises(cls, re.escape(what), r):
                c.Allreduce(np.ones(2), np.zeros(2))
    else:
        with raises(cls, re.escape(what), r):
            mtcoll.Comm(comm)


@row("env-algo")
def _(comm, mt, r, mp):
    _env_case(mp, comm, "MTCOLL_ALGO", "bogus", ValueError, r)


@row("env-topology")
def _(comm, mt, r, mp):
    _env_case(mp, comm, "MTCOLL_TOPOLOGY", "bad", ValueError, r)


@row("env-wait")
def _(comm, mt, r, mp):
    _env_case(mp, comm, "MTCOLL_WAIT", "nap", ValueError, r)


@row("env-check")
def _(comm, mt, r, mp):
    _env_case(mp, comm, "MTCOLL_CHECK", "2", ValueError, r, at_call=True)


@row("env-debug")
def _(comm, mt, r, mp):
    _env_case(mp, comm, "MTCOLL_DEBUG", "yes please", ValueError, r, at_call=True)


@row("env-timeout")
def _(comm, mt, r, mp):
    _env_case(mp, comm, "MTCOLL_TIMEOUT", "-1", ValueError, r, at_call=True)


@row("env-tuning")
def _(comm, mt, r, mp):
    mp.setenv("MTCOLL_TUNING", "/no/such/file")
    with pytest.raises(ValueError, match=rf"/no/such/file.*rank {r}\b"):
        mtcoll.Comm(comm)


# -- the tests ------------------------------------------------------------------------------------

@pytest.mark.mpi
@pytest.mark.mpi_short
@pytest.mark.parametrize("rid", list(ROWS))
def test_bad_input(comm, mt, rid, monkeypatch):
    fn = ROWS[rid]
    args = (comm, mt, comm.Get_rank())
    if fn.__code__.co_argcount == 4:
        args += (monkeypatch,)
    fn(*args)


def test_table_matches_rows():
    text = (ROOT / "docs" / "sharp-bits.md").read_text()
    section = text.split("## Bad inputs", 1)[1]
    ids = re.findall(r"^\| `([a-z0-9-]+)` \|", section, flags=re.M)
    assert ids, "no table rows found"
    assert len(ids) == len(set(ids)), "duplicate ids in the table"
    assert set(ids) == set(ROWS), (sorted(set(ids) - set(ROWS)), sorted(set(ROWS) - set(ids)))
