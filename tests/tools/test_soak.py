"""The soak of bench/soak.py, shortened: a few hundred nonblocking allreduces of every
algorithm, up to 8 in flight per rank, with user point-to-point traffic on the same MPI
communicator. Every result is checked exactly; nothing may be left pending or in flight."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from _mpirun import ROOT


def _load():
    spec = importlib.util.spec_from_file_location("mtcoll_bench_soak", ROOT / "bench" / "soak.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


soak = _load()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("MTCOLL_ALGO", "MTCOLL_TOPOLOGY", "MTCOLL_DEBUG", "MTCOLL_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.mpi
@pytest.mark.timeout(240)
@pytest.mark.parametrize("complete, check, buffers", [("wait", "1", "pooled"),
                                                      ("test", "0", "pooled"),
                                                      ("wait", "0", "fresh")])
def test_soak_short(comm, monkeypatch, complete, check, buffers):
    """Each rank completes its calls in its own order (Wait on any of them, native or not), with
    and without the agreement check: nothing may deadlock -- a waiting rank keeps every running
    mtcoll call moving. With the harness's reused output buffers (the default) and with a new
    one per call."""
    monkeypatch.setenv("MTCOLL_CHECK", check)
    n = comm.Get_size()
    calls = 300 if n <= 5 else 200
    if buffers == "fresh":
        calls //= 2
    res = soak.soak(comm, calls=calls, inflight=8, seed=n, max_bytes=256 * 1024, block=100,
                    complete=complete, buffers=buffers)
    assert res["checked"] == calls * n
    assert res["wrong"] == 0, res["first_wrong"]
    assert res["pending_after"] == 0 and res["active_after"] == 0
    assert res["stray_messages"] == 0
    assert res["dup_congruent"]
    if n > 1:
        assert res["user_sent"] > 0
    assert res["user_received"] == res["user_sent"] and res["user_bad"] == 0
    # every algorithm that fits ran (auto and native always fit)
    assert {"multitree", "ring", "auto", "native"} <= set(res["algorithms"])
    assert all(res["by_algorithm"][a] > 0 for a in res["algorithms"])


def test_expected_is_exact_in_any_order():
    """The soak's oracle: the pools reduce to the same bits in any order (so a wrong chunk,
    a lost or a doubled contribution shows, and a reordering does not)."""
    import numpy as np

    pools = soak._Pools(0, 20000)
    for dtype in soak.DTYPES:
        for op in soak._ops_for(dtype):
            call = dict(dtype=dtype, op=op, count=5000, offset=7, step=13)
            want = soak.expected(pools, call, 16)
            pool = pools.get(dtype, op)
            parts = [soak._slice(pool, call, r) for r in range(16)]
            got = parts[15].copy()
            for p in reversed(parts[:15]):
                soak._UFUNC[op](p, got, out=got)
            assert np.array_equal(got, want), (dtype, op)
            # dropping one rank's contribution changes the result (the oracle can fail)
            short = soak.expected(pools, call, 15)
            if op in ("SUM", "BXOR"):
                assert not np.array_equal(short, want), (dtype, op)


def test_expected_into_a_buffer_and_the_comparison():
    """The reused-buffer oracle equals the allocating one, and its comparison is
    ``np.array_equal``'s: one wrong element fails it, the sign of a zero does not."""
    pools = soak._Pools(1, 20000)
    bufs = soak._Buffers(2, 20000 * 16)
    for dtype in soak.DTYPES:
        for op in soak._ops_for(dtype):
            call = dict(dtype=dtype, op=op, count=3000, offset=5, step=11)
            want = soak.expected(pools, call, 8)
            got = soak.expected(pools, call, 8, bufs.expected_into(dtype, 3000))
            assert got.base is not None and np.shares_memory(got, bufs.expect)
            assert soak.equal_into(got, want, bufs.same), (dtype, op)
            bad = want.copy()
            bad[1234] += 1
            assert not soak.equal_into(bad, want, bufs.same), (dtype, op)
    z = np.zeros(4, dtype=np.complex128)
    assert soak.equal_into(z, -z, bufs.same) == np.array_equal(z, -z)
    assert not soak.equal_into(z, z[:3], bufs.same)


def test_buffers_are_not_handed_out_twice():
    bufs = soak._Buffers(2, 64)
    a, ra = bufs.take("float64", 8)
    b, rb = bufs.take("int32", 3)
    assert not np.shares_memory(ra, rb) and a.dtype.name == "float64" and b.shape == (3,)
    with pytest.raises(RuntimeError, match="more than 2"):
        bufs.take("float32", 1)
    with pytest.raises(ValueError, match="exceeds"):
        soak._Buffers(1, 64).take("complex128", 5)
    bufs.give(ra)
    with pytest.raises(RuntimeError, match="twice"):
        bufs.give(ra)


def test_pooled_check_catches_an_element_not_written(monkeypatch):
    """With reused buffers an out-of-place result's buffer is poisoned first: a call that leaves
    the last element unwritten (here, a Comm made to reduce all but it) is counted wrong every
    time, not passed by a stale right answer of an earlier call."""
    from mpi4py import MPI

    import mtcoll

    real = mtcoll.Comm.Iallreduce

    def short(self, sendbuf, recvbuf, op=MPI.SUM):
        if sendbuf is MPI.IN_PLACE or recvbuf.size == 0:
            return real(self, sendbuf, recvbuf, op)
        return real(self, sendbuf[:-1], recvbuf[:-1], op)

    monkeypatch.setattr(mtcoll.Comm, "Iallreduce", short)
    calls = 200
    res = soak.soak(MPI.COMM_SELF, calls=calls, inflight=8, seed=4, max_bytes=4096, block=100,
                    algorithms=("ring", "native"))
    names = tuple(res["algorithms"])
    out_of_place = sum(1 for i in range(calls)
                       if not (c := soak.draw_call(4, i, names, 4096))["in_place"] and c["count"])
    assert res["checked"] == calls
    assert out_of_place > 50
    assert res["wrong"] == out_of_place
