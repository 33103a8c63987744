"""mtcoll.Comm as an API: buffers and bad input, nonblocking requests, passthrough, lifetime,
Reduce_scatter_block and Allgather, the module-level calls, environment variables, fallbacks."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

import mtcoll
import mtcoll.comm._calls
import mtcoll.comm
from mtcoll import _ops

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("MTCOLL_ALGO", "MTCOLL_TOPOLOGY", "MTCOLL_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MTCOLL_CHECK", "1")


@pytest.fixture
def mt(comm):
    """A MultiTree Comm on the world communicator, freed afterwards."""
    with mtcoll.Comm(comm, algorithm="multitree") as c:
        yield c


def ranks_sum(comm, count, dtype="float64"):
    n = comm.Get_size()
    return np.full(count, n * (n - 1) // 2, dtype=dtype)


# -- buffers -------------------------------------------------------------------------------------

@pytest.mark.mpi
@pytest.mark.mpi_short
def test_buffer_specs(comm, mt):
    r, count = comm.Get_rank(), 300
    want = ranks_sum(comm, count)
    x = np.full(count, r, dtype="float64")
    for spec in ([x, MPI.DOUBLE], [x, count, MPI.DOUBLE], [x, (count, 0), MPI.DOUBLE]):
        out = np.zeros(count)
        mt.Allreduce(spec, [out, MPI.DOUBLE])
        assert np.array_equal(out, want)
    # part of a buffer, given by count and displacement
    big = np.full(count + 10, r, dtype="float64")
    out = np.full(count + 10, -1.0)
    mt.Allreduce([big, (count, 5), MPI.DOUBLE], [out, (count, 10), MPI.DOUBLE])
    assert np.array_equal(out[10:], want) and (out[:10] == -1).all()
    # a non-numpy buffer, typed by the datatype
    raw = bytearray(np.full(count, r, dtype=np.int32).tobytes())
    res = bytearray(4 * count)
    mt.Allreduce([raw, MPI.INT], [res, MPI.INT])
    assert np.array_equal(np.frombuffer(res, np.int32), want.astype(np.int32))


@pytest.mark.mpi
@pytest.mark.mpi_short
def test_noncontiguous_and_shaped(comm, mt):
    r = comm.Get_rank()
    a = np.arange(60.0).reshape(10, 6) + r
    out = np.full((10, 6), -1.0)
    mt.Allreduce(a[:, ::2], out[:, 1::2])  # both strided
    n = comm.Get_size()
    want = n * np.arange(60.0).reshape(10, 6)[:, ::2] + n * (n - 1) / 2
    assert np.array_equal(out[:, 1::2], want)
    assert (out[:, ::2] == -1).all()  # the rest of the array untouched
    f = np.asfortranarray(a)
    g = np.empty_like(f)
    mt.Allreduce(f, g)
    assert np.array_equal(g, n * np.arange(60.0).reshape(10, 6) + n * (n - 1) / 2)
    s = a[:, 3].copy()  # in place on a strided view
    view = np.zeros((10, 6))
    view[:, 3] = s
    mt.Allreduce(MPI.IN_PLACE, view[:, 3])
    assert np.array_equal(view[:, 3], n * np.arange(60.0).reshape(10, 6)[:, 3] + n * (n - 1) / 2)


@pytest.mark.mpi
@pytest.mark.mpi_short
def test_bad_input_names_argument_and_rank(comm, mt):
    r = comm.Get_rank()
    x = np.ones(10)
    ro = np.zeros(10)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match=rf"recvbuf \(rank {r}\) is read-only"):
        mt.Allreduce(x, ro)
    with pytest.raises(ValueError, match=rf"recvbuf \(rank {r}\) is too small"):
        mt.Allreduce(x, np.zeros(9))
    with pytest.raises(ValueError, match=rf"recvbuf \(rank {r}\) is too large"):
        mt.Allreduce(x, np.zeros(11))
    with pytest.raises(TypeError, match=rf"recvbuf \(rank {r}\) has dtype float32"):
        mt.Allreduce(x, np.zeros(10, np.float32))
    with pytest.raises(ValueError, match="overlap"):
        mt.Allreduce(x[:6], x[4:])  # (x, x) is in place, as in mpi4py >= 4.2
    with pytest.raises(TypeError, match=r"op \(rank"):
        mt.Allreduce(x, np.zeros(10), op="sum")
    with pytest.raises(TypeError, match=r"sendbuf \(rank .*expected a buffer"):
        mt.Allreduce(object(), np.zeros(10))
    with pytest.raises(TypeError, match=r"MPI\.MIN is not defined for dtype complex128"):
        mt.Allreduce(np.ones(10, complex), np.zeros(10, complex), op=MPI.MIN)
    with pytest.raises(TypeError, match=r"MPI\.SUM is not defined for dtype bool"):
        mt.Allreduce(np.ones(10, bool), np.zeros(10, bool))
    # the communicator is still in a good state
    out = np.zeros(10)
    mt.Allreduce(np.full(10, float(r)), out)
    assert np.array_equal(out, ranks_sum(comm, 10))


@pytest.mark.mpi(min_size=2)
@pytest.mark.mpi_short
def test_one_bad_rank_raises_everywhere(comm, mt):
    """With MTCOLL_CHECK=1 a rank's bad argument is an error on every rank, not a hang."""
    r, last = comm.Get_rank(), comm.Get_size() - 1
    out = np.zeros(5) if r == last else np.zeros(10)
    with pytest.raises(ValueError, match=rf"recvbuf \(rank {last}\) is too small"):
        mt.Allreduce(np.ones(10), out)


@pytest.mark.mpi(min_size=2)
@pytest.mark.mpi_short
def test_check_names_disagreeing_ranks(comm, mt):
    r, last = comm.Get_rank(), comm.Get_size() - 1
    count = 11 if r == last else 10
    with pytest.raises(ValueError, match=rf"disagree on count: rank 0 has 10 but ranks "
                                         rf"\[{last}\] differ \(rank {last}: 11\)"):
        mt.Allreduce(np.ones(count), np.zeros(count))
    dtype = np.float32 if r == 0 else np.float64
    with pytest.raises(ValueError, match=r"disagree on datatype: rank 0 has 'float32'"):
        mt.Allreduce(np.ones(4, dtype), np.zeros(4, dtype))
    op = MPI.MAX if r == last else MPI.SUM
    with pytest.raises(ValueError, match=rf"disagree on op: .*rank {last}: 'MAX'"):
        mt.Allreduce(np.ones(4), np.zeros(4), op=op)
    out = np.zeros(3)
    mt.Allreduce(np.full(3, float(r)), out)  # still usable
    assert np.array_equal(out, ranks_sum(comm, 3))


# -- nonblocking ---------------------------------------------------------------------------------

@pytest.mark.mpi
@pytest.mark.mpi_short
def test_iallreduce_test_and_wait(comm, mt):
    r = comm.Get_rank()
    x = np.full(100_000, float(r))
    out = np.zeros_like(x)
    req = mt.Iallreduce(x, out)
    assert isinstance(req, mtcoll.Request)
    while not req.Test():
        pass
    assert req.Test() is True and req.Wait() is True
    assert np.array_equal(out, ranks_sum(comm, x.size))
    # the request keeps its buffers alive: drop our references before waiting
    req = mt.Iallreduce(np.full(5000, float(r)), np.zeros(5000))
    import gc
    gc.collect()
    assert req.Wait() is True


@pytest.mark.mpi
@pytest.mark.mpi_short
def test_waitall_mixed(comm, mt):
    r = comm.Get_rank()
    outs, reqs = [], []
    with mtcoll.Comm(comm, algorithm="native") as nat:
        for i, c in enumerate((mt, nat, mt)):
            out = np.zeros(1000 + i)
            reqs.append(c.Iallreduce(np.full(1000 + i, float(r)), out))
            outs.append(out)
        plain = np.zeros(7)
        reqs.append(comm.Iallreduce(np.full(7, float(r)), plain))  # an MPI.Request too
        assert mtcoll.waitall(reqs) is True
    for out in outs + [plain]:
        assert np.array_equal(out, ranks_sum(comm, out.size))


@pytest.mark.mpi
def test_iallreduce_noncontiguous_copied_back_on_completion(comm, mt):
    r = comm.Get_rank()
    out = np.zeros((100, 3))
    req = mt.Iallreduce(np.full(100, float(r)), out[:, 1])
    req.Wait()
    assert np.array_equal(out[:, 1], ranks_sum(comm, 100)) and (out[:, [0, 2]] == 0).all()


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
@pytest.mark.parametrize("check", ["0", "1"])
@pytest.mark.parametrize("second", ["native", "native, Test", "native, blocking", "first use",
                                    "mpi request", "new Comm"])
def test_ranks_complete_calls_in_different_orders(comm, monkeypatch, check, second):
    """Calls are started in the same order everywhere but completed in different orders: rank 0
    waits for the second call first, the others finish the first call before they even start
    the second. Rank 0 must keep the first call moving while it waits (in the MPI library's
    Wait, in the agreement check, in the first use's planning broadcast, in constructing a new
    Comm), or every rank hangs -- the per-test timeout then fails the run."""
    monkeypatch.setenv("MTCOLL_CHECK", check)
    r, n = comm.Get_rank(), 1 << 16
    # communicators of their own: mtcoll.Comm(c) of a communicator that already has a Comm
    # with these options is that Comm, already set up (and already planned)
    base, fresh = comm.Dup(), comm.Dup()
    with mtcoll.Comm(base, algorithm="multitree") as first, \
            mtcoll.Comm(base, algorithm="native" if "native" in second else "ring") as other:
        if second == "first use":
            assert "ring" not in other._schedules  # its first call plans, collectively
        a, b = np.zeros(n), np.zeros(n)
        made = []

        def start_second():
            if second == "new Comm":  # constructing a Comm is a collective too
                made.append(mtcoll.Comm(fresh, algorithm="multitree"))
                return made[-1].Iallreduce(np.full(n, float(r)), b)
            if second == "mpi request":
                return comm.Ibarrier()
            if second == "native, blocking":  # a blocking call the MPI library runs
                other.Allreduce(np.full(n, float(r)), b)
                return None
            return other.Iallreduce(np.full(n, float(r)), b)

        ra = first.Iallreduce(np.full(n, float(r)), a)
        if r == 0:
            rb = start_second()
            if rb is None:
                pass
            elif second == "mpi request":
                mtcoll.waitall([rb])
            elif second == "native, Test":
                while not rb.Test():  # Test too keeps the first call moving
                    pass
            else:
                rb.Wait()
            ra.Wait()
        else:
            ra.Wait()
            rb = start_second()
            if rb is not None:
                mtcoll.waitall([rb])
        for c in made:
            c.Free()
    base.Free()
    fresh.Free()
    assert np.array_equal(a, ranks_sum(comm, n))
    if second != "mpi request":
        assert np.array_equal(b, ranks_sum(comm, n))


# -- the communicator ----------------------------------------------------------------------------

@pytest.mark.mpi
@pytest.mark.mpi_short
def test_passthrough(comm, mt):
    assert mt.Get_rank() == comm.Get_rank() and mt.rank == comm.rank
    assert mt.Get_size() == comm.Get_size() and mt.size == comm.size
    assert mt.comm is comm
    mt.Barrier()
    assert mt.bcast("hello" if comm.rank == 0 else None, root=0) == "hello"
    buf = np.arange(4.0) if comm.rank == 0 else np.zeros(4)
    mt.Bcast(buf, root=0)
    assert np.array_equal(buf, np.arange(4.0))
    assert mt.allreduce(1) == comm.Get_size()  # mpi4py's pickle-based call, the wrapped comm's
    with pytest.raises(AttributeError):
        mt.no_such_method


@pytest.mark.mpi
@pytest.mark.mpi_short
def test_free_and_context_manager(comm):
    with mtcoll.Comm(comm, algorithm="multitree") as c:
        req = c.Iallreduce(np.ones(3000), np.zeros(3000))
    # leaving the block waited for the request and freed the duplicate, not the user's comm
    assert req.Test()
    with pytest.raises(RuntimeError, match="freed"):
        c.Allreduce(np.ones(3), np.zeros(3))
    c.Free()  # twice is fine
    assert comm.allreduce(1) == comm.Get_size()
    c2 = mtcoll.Comm(comm)
    c2.Free()


@pytest.mark.mpi
@pytest.mark.mpi_short
@pytest.mark.parametrize("algorithm", ["auto", "multitree", "ring", "native"])
def test_reduce_scatter_block(comm, algorithm):
    r, n = comm.Get_rank(), comm.Get_size()
    with mtcoll.Comm(comm, algorithm=algorithm) as c:
        for k in (0, 1, 5, 20_000):
            x = (np.arange(n * k) * (r + 1)).astype(np.int64)
            got, want = np.full(k, -1, np.int64), np.empty(k, np.int64)
            c.Reduce_scatter_block(x, got, op=MPI.SUM)
            comm.Reduce_scatter_block(x, want, op=MPI.SUM)
            assert np.array_equal(got, want)
            inplace = x.copy()
            c.Reduce_scatter_block(MPI.IN_PLACE, inplace, op=MPI.MAX)
            comm.Reduce_scatter_block(x, want, op=MPI.MAX)
            assert np.array_equal(inplace[:k], want)
        with pytest.raises(ValueError, match=r"recvbuf \(rank .*too small"):
            c.Reduce_scatter_block(np.ones(n * 4), np.zeros(3))


@pytest.mark.mpi
@pytest.mark.mpi_short
@pytest.mark.parametrize("algorithm", ["auto", "multitree", "ring", "native"])
def test_allgather(comm, algorithm):
    r, n = comm.Get_rank(), comm.Get_size()
    with mtcoll.Comm(comm, algorithm=algorithm) as c:
        for k in (0, 1, 5, 20_000):
            x = (np.arange(k) + 1000 * r).astype(np.float32)
            got, want = np.full(n * k, -1, np.float32), np.empty(n * k, np.float32)
            c.Allgather(x, got)
            comm.Allgather(x, want)
            assert np.array_equal(got, want)
            inplace = np.zeros(n * k, np.float32)
            inplace[r * k:(r + 1) * k] = x
            c.Allgather(MPI.IN_PLACE, inplace)
            assert np.array_equal(inplace, want)
        with pytest.raises(ValueError, match=r"recvbuf \(rank .*too small"):
            c.Allgather(np.ones(4), np.zeros(4 * n - 1))


@pytest.mark.mpi
@pytest.mark.mpi_short
def test_module_level_calls_cache_one_comm(comm):
    r = comm.Get_rank()
    out = np.zeros(10)
    mtcoll.Allreduce(np.full(10, float(r)), out)
    assert np.array_equal(out, ranks_sum(comm, 10))
    first = mtcoll.comm._calls._comm_for(MPI.COMM_WORLD, {})
    out2 = np.zeros(10)
    mtcoll.Iallreduce(np.full(10, float(r)), out2, op=MPI.MAX).Wait()
    assert np.array_equal(out2, np.full(10, comm.Get_size() - 1.0))
    assert mtcoll.comm._calls._comm_for(MPI.COMM_WORLD, {}) is first
    # other options, other Comm; a user communicator's Comm goes when it is freed
    other = mtcoll.comm._calls._comm_for(MPI.COMM_WORLD, {"algorithm": "ring"})
    assert other is not first and other.algorithm == "ring"
    dup = comm.Dup()
    mtcoll.Allreduce(np.full(10, float(r)), out, comm=dup, algorithm="multitree")
    assert np.array_equal(out, ranks_sum(comm, 10))
    assert dup.Get_attr(mtcoll.comm._registry._KEYVAL)
    dup.Free()


# -- fallbacks -----------------------------------------------------------------------------------

@pytest.mark.mpi
@pytest.mark.mpi_short
def test_user_op_and_derived_datatype_go_native(comm, mt):
    r, n = comm.Get_rank(), comm.Get_size()

    def add(a, b, datatype):
        y = np.frombuffer(b, dtype=np.float64)
        y += np.frombuffer(a, dtype=np.float64)

    op = MPI.Op.Create(add, commute=True)
    try:
        x = np.full(20, float(r))
        out = np.zeros(20)
        mt.Allreduce(x, out, op=op)  # a user-defined op
        assert np.array_equal(out, ranks_sum(comm, 20))
        vec = MPI.DOUBLE.Create_contiguous(2).Commit()
        try:  # a derived datatype (MPI allows only user ops on those)
            out = np.zeros(20)
            mt.Allreduce([x, 10, vec], [out, 10, vec], op=op)
            assert np.array_equal(out, ranks_sum(comm, 20))
        finally:
            vec.Free()
    finally:
        op.Free()
    # MINLOC on (value, index) pairs: a predefined pair datatype numpy cannot reduce
    pairs = np.zeros(6, dtype=np.dtype([("v", "f8"), ("i", "i4")], align=True))
    pairs["v"] = [(r + j) % n for j in range(6)]
    pairs["i"] = r
    got = np.zeros_like(pairs)
    mt.Allreduce([pairs, MPI.DOUBLE_INT], [got, MPI.DOUBLE_INT], op=MPI.MINLOC)
    want = np.zeros_like(pairs)
    comm.Allreduce([pairs, MPI.DOUBLE_INT], [want, MPI.DOUBLE_INT], op=MPI.MINLOC)
    assert np.array_equal(got["v"], want["v"]) and np.array_equal(got["i"], want["i"])


def test_op_table_matches_mpi():
    """Our TypeError table is MPI's: an op/dtype pair is rejected exactly when the MPI library
    rejects it (checked on COMM_SELF, so it runs anywhere)."""
    for name in _ops.OP_NAMES:
        op = getattr(MPI, name)
        for dtype in ("?", "b", "h", "i", "l", "B", "H", "I", "L", "e", "f", "d", "g",
                      "F", "D", "G"):
            x = np.ones(3, dtype)
            try:
                MPI.COMM_SELF.Allreduce(x, np.empty_like(x), op=op)
                native_ok = True
            except MPI.Exception:
                native_ok = False
            try:
                _ops.lookup(op, x.dtype)
                ours_ok = True
            except TypeError:
                ours_ok = False
            assert ours_ok == native_ok, (name, x.dtype.name)


@pytest.mark.mpi
@pytest.mark.mpi_short
def test_logical_ops_on_integers_give_zero_or_one(comm, mt):
    n = comm.Get_size()
    x = np.full(8, 5, np.int32)
    out = np.zeros(8, np.int32)
    mt.Allreduce(x, out, op=MPI.LAND)
    want = np.empty_like(out)
    comm.Allreduce(x, want, op=MPI.LAND)
    assert np.array_equal(out, want)
    if n > 1:
        assert (out == 1).all()


# -- algorithm choice and environment ------------------------------------------------------------

@pytest.mark.mpi
@pytest.mark.mpi_short
def test_auto_uses_the_choose_hook(comm, monkeypatch):
    seen = []

    def spy(nbytes, nranks, topology):
        seen.append(nbytes)
        return "native" if nbytes < 1000 else "ring"

    monkeypatch.setattr(mtcoll.comm._comm, "choose", spy)
    with mtcoll.Comm(comm) as c:
        assert c.algorithm == "auto"
        for count in (10, 500):
            out = np.zeros(count)
            c.Allreduce(np.ones(count), out)
            assert np.array_equal(out, np.full(count, float(comm.Get_size())))
    assert seen == [80, 4000]


def test_default_choice():
    from mtcoll.topology import parse

    t = parse("torus:2x2")
    assert mtcoll.comm.choose(8, 4, t) == "native"
    assert mtcoll.comm.choose(1 << 24, 4, t) == "multitree"
    assert mtcoll.comm.choose(1 << 24, 1, parse("ring:1")) == "native"


@pytest.mark.mpi
@pytest.mark.mpi_short
def test_env_overrides(comm, monkeypatch):
    monkeypatch.setenv("MTCOLL_ALGO", "ring")
    n = comm.Get_size()
    spec = "full:%d" % n
    monkeypatch.setenv("MTCOLL_TOPOLOGY", spec)
    with mtcoll.Comm(comm, algorithm="multitree", topology="auto") as c:
        assert c.algorithm == "ring" and c.network.spec == spec
    monkeypatch.setenv("MTCOLL_ALGO", "fastest")
    with pytest.raises(ValueError, match="MTCOLL_ALGO='fastest'"):
        mtcoll.Comm(comm)
    monkeypatch.setenv("MTCOLL_ALGO", "multitree")
    monkeypatch.setenv("MTCOLL_TOPOLOGY", "donut:3")
    with pytest.raises(ValueError, match="MTCOLL_TOPOLOGY='donut:3'"):
        mtcoll.Comm(comm)
    monkeypatch.delenv("MTCOLL_TOPOLOGY")
    monkeypatch.setenv("MTCOLL_CHECK", "maybe")
    with mtcoll.Comm(comm) as c:
        with pytest.raises(ValueError, match="MTCOLL_CHECK"):
            c.Allreduce(np.ones(2), np.zeros(2))
    with pytest.raises(ValueError, match="algorithm='bogus'"):
        monkeypatch.delenv("MTCOLL_ALGO")
        mtcoll.Comm(comm, algorithm="bogus")


@pytest.mark.mpi
@pytest.mark.mpi_short
def test_debug_prints_on_rank_0(comm, monkeypatch, capfd):
    monkeypatch.setenv("MTCOLL_DEBUG", "1")
    with mtcoll.Comm(comm, algorithm="multitree") as c:
        c.Allreduce(np.ones(1000), np.zeros(1000))
    err = capfd.readouterr().err
    if comm.Get_rank() == 0:
        line = [x for x in err.splitlines() if x.startswith("mtcoll[rank 0]: Allreduce")]
        assert len(line) == 1, err
        if comm.Get_size() > 1:
            assert "algorithm=multitree" in line[0] and f"topology={c.network.spec}" in line[0]
            assert "segment=" in line[0]
    else:
        assert "mtcoll[" not in err


# -- structure -----------------------------------------------------------------------------------

def test_executor_imports_no_topology_or_planner():
    names = set()
    for path in sorted((ROOT / "mtcoll" / "execute").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                names.add(("." * node.level) + (node.module or ""))
    assert names and not any("topology" in x or "plan" in x for x in names), names


def test_import_is_light():
    """``import mtcoll`` pulls in neither numba nor the planner."""
    code = ("import sys, mtcoll; bad = [m for m in ('numba', 'mtcoll.plan') if m in sys.modules];"
            " print(bad)")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "HYDRA_", "MTCOLL_"))}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_public_api():
    assert sorted(mtcoll.__all__) == sorted(
        ["Comm", "Allreduce", "Iallreduce", "waitall", "Request", "StallError", "Schedule"])
    for name in mtcoll.__all__:
        assert getattr(mtcoll, name).__doc__


@pytest.mark.mpi
@pytest.mark.mpi_short
def test_virtual_topology(comm):
    from mtcoll.topology import auto_spec

    with mtcoll.Comm(comm) as c:
        vt = c.virtual_topology
        assert vt.Get_rank() == comm.Get_rank() and vt.Get_size() == comm.Get_size()
        assert c.network.spec == auto_spec(comm.Get_size())
        assert vt.Get_topology() == MPI.CART and list(vt.dims) == list(c.network.dims)
        assert all(vt.periods)
    assert c.virtual_topology is None
    n = comm.Get_size()
    with mtcoll.Comm(comm, topology=f"full:{n}") as c:
        assert c.virtual_topology.Get_topology() == MPI.DIST_GRAPH
