"""The soak of bench/soak.py, shortened: a few hundred nonblocking allreduces of every
algorithm, up to 8 in flight per rank, with user point-to-point traffic on the same MPI
communicator. Every result is checked exactly; nothing may be left pending or in flight."""

from __future__ import annotations

import importlib.util

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
@pytest.mark.parametrize("complete, check", [("wait", "1"), ("test", "0")])
def test_soak_short(comm, monkeypatch, complete, check):
    """Each rank completes its calls in its own order (Wait on any of them, native or not), with
    and without the agreement check: nothing may deadlock -- a waiting rank keeps every running
    mtcoll call moving."""
    monkeypatch.setenv("MTCOLL_CHECK", check)
    n = comm.Get_size()
    calls = 300 if n <= 5 else 200
    res = soak.soak(comm, calls=calls, inflight=8, seed=n, max_bytes=256 * 1024, block=100,
                    complete=complete)
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
