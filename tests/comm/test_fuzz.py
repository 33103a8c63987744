"""Hypothesis fuzzing of Allreduce against native ``comm.Allreduce``.

Each example draws a sub-communicator size N (``comm.Split`` of the first N ranks, so one
``mpiexec`` size covers several N), a topology family that fits N, an algorithm, a count (0 to
about 100k, biased small), a dtype, an op and in-place or not. Every rank draws the same
examples (tests/conftest.py loads a derandomized profile under MPI) and rank 0's draw is
broadcast besides. Per-rank data come from a generator seeded by (example, rank). Integer
results must equal native's exactly; floating-point ones within a tight tolerance (the
summation order differs), and every rank must hold the same bits.

The examples actually run are counted; the last test asserts the count for this size, so the
suite's total over its MPI sizes (2, 3, 4, 5, 8: 5 x 130 = 650 examples, of which at least
5 x 100 = 500 compared with native) is checked, not assumed.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from mpi4py import MPI

import mtcoll
from mtcoll import _ops
from mtcoll.plan import ALGORITHMS

from _topologies import family_spec

EXAMPLES = 130
# compared with native at least this many times per size (the rest are op/dtype pairs MPI leaves
# undefined, checked to raise): 5 sizes x 100 = 500 comparisons in the suite
COMPARED = 100
FAMILIES = ("auto", "ring", "full", "torus", "mesh", "fattree", "bigraph", "hier")
DTYPES = ("int8", "int32", "int64", "uint16", "uint64", "float32", "float64", "complex64",
          "complex128", "bool")
OPS = {name: getattr(MPI, name) for name in _ops.OP_NAMES}
_RAN = {"examples": 0, "compared": 0, "rejected": 0, "outside": 0}
_DRAWS = []
_COMMS = {}


@pytest.fixture(autouse=True, scope="module")
def clean_env():
    with pytest.MonkeyPatch.context() as mp:
        for var in ("MTCOLL_ALGO", "MTCOLL_TOPOLOGY", "MTCOLL_DEBUG"):
            mp.delenv(var, raising=False)
        yield
    for c in _COMMS.values():
        if c is not None:
            c.Free()
    for sub in _SUBS.values():
        if sub != MPI.COMM_NULL:
            sub.Free()


_SUBS = {}


def _sub(comm, n):
    """The communicator of the first n ranks (COMM_NULL on the others); made once per n."""
    if n not in _SUBS:
        _SUBS[n] = comm.Split(0 if comm.Get_rank() < n else MPI.UNDEFINED, comm.Get_rank())
    return _SUBS[n]


def _mtcomm(sub, n, spec, algorithm):
    key = (n, spec, algorithm)
    if key not in _COMMS:
        c = mtcoll.Comm(sub, topology=spec, algorithm=algorithm)
        try:
            c.schedule()
        except ValueError:  # the algorithm does not fit this topology (same on every rank)
            c.Free()
            c = None
        _COMMS[key] = c
    return _COMMS[key]


def _data(dtype, count, op, seed, rank):
    rng = np.random.default_rng([seed, rank])
    dt = np.dtype(dtype)
    if dt.kind == "b":
        return rng.integers(0, 2, count).astype(bool)
    if dt.kind in "iu":
        if op in ("SUM", "PROD"):  # wrap-around is exact too, but keep PROD from zeroing
            return rng.integers(-3 if dt.kind == "i" else 0, 4, count).astype(dt)
        info = np.iinfo(dt)
        return rng.integers(info.min, info.max, count, dtype=dt, endpoint=True)
    x = rng.standard_normal(count) * 10 ** rng.uniform(-3, 3)
    if op == "PROD":
        x = 1 + rng.standard_normal(count) / 8
    if dt.kind == "c":
        x = x + 1j * rng.standard_normal(count)
    return x.astype(dt)


def _defined(op, dtype):
    try:
        _ops.lookup(OPS[op], np.dtype(dtype))
    except TypeError:
        return False
    return True


@pytest.mark.mpi
@pytest.mark.timeout(600)
# Seeded by the job size, not derandomized: every rank of a job draws the same examples, and
# each MPI size of the suite draws different ones (so the 5 x 130 are not one list repeated).
@seed(MPI.COMM_WORLD.Get_size())
@settings(max_examples=EXAMPLES, deadline=None, derandomize=False, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(n=st.integers(1, 8), family=st.sampled_from(FAMILIES),
       algorithm=st.sampled_from(ALGORITHMS + ("auto", "native")),
       count=st.one_of(st.integers(0, 16), st.integers(0, 2000), st.integers(0, 100_000)),
       dtype=st.sampled_from(DTYPES), op=st.sampled_from(_ops.OP_NAMES),
       in_place=st.booleans(), data_seed=st.integers(0, 2**31), keep_undefined=st.integers(0, 4))
def test_fuzz_allreduce(comm, n, family, algorithm, count, dtype, op, in_place, data_seed,
                        keep_undefined):
    if not _defined(op, dtype) and keep_undefined:
        # most op/dtype pairs MPI leaves undefined become a defined op, so that most examples
        # are compared with native; one in five is kept and must raise TypeError
        ops = [o for o in _ops.OP_NAMES if _defined(o, dtype)]
        op = ops[data_seed % len(ops)]
    draw = (n, family, algorithm, count, dtype, op, in_place, data_seed)
    n, family, algorithm, count, dtype, op, in_place, data_seed = comm.bcast(draw, root=0)
    _DRAWS.append(draw)
    n = min(n, comm.Get_size())
    _RAN["examples"] += 1
    spec = family_spec(family, n) or "auto"
    sub = _sub(comm, n)
    if sub == MPI.COMM_NULL:
        _RAN["outside"] += 1  # this rank is not among the first n
        return
    c = _mtcomm(sub, n, spec, algorithm)
    if c is None:
        c = _mtcomm(sub, n, spec, "multitree")
    rank = sub.Get_rank()
    x = _data(dtype, count, op, data_seed, rank)
    try:
        _ops.lookup(OPS[op], x.dtype)
    except TypeError:
        with pytest.raises(TypeError, match=rf"MPI\.{op} is not defined"):
            c.Allreduce(x, np.empty_like(x), op=OPS[op])
        _RAN["rejected"] += 1
        return
    want = np.empty_like(x)
    sub.Allreduce(x, want, op=OPS[op])
    if in_place:
        got = x.copy()
        c.Allreduce(MPI.IN_PLACE, got, op=OPS[op])
    else:
        got = np.empty_like(x)
        c.Allreduce(x, got, op=OPS[op])
        assert np.array_equal(x, _data(dtype, count, op, data_seed, rank))  # input untouched
    if x.dtype.kind in "fc" and op in ("SUM", "PROD"):
        tol = 1e-4 if x.dtype in (np.float32, np.complex64) else 1e-12
        scale = np.abs(want).max() if count else 0
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale)
    else:
        assert np.array_equal(got, want)
    digest = hashlib.sha256(got.view(np.uint8).tobytes()).hexdigest()
    assert len(set(sub.allgather(digest))) == 1
    _RAN["compared"] += 1


@pytest.mark.mpi
def test_fuzz_count(comm):
    """The fuzz ran its examples at this size (run after test_fuzz_allreduce, file order)."""
    assert _RAN["examples"] >= EXAMPLES, _RAN
    assert _RAN["examples"] == _RAN["compared"] + _RAN["rejected"] + _RAN["outside"], _RAN
    if comm.Get_rank() == 0:  # rank 0 is in every example's sub-communicator
        assert _RAN["outside"] == 0 and _RAN["compared"] >= COMPARED, _RAN
    # the examples of this size, as a fingerprint: the suite log shows they differ by size
    fingerprint = hashlib.sha256(repr(comm.bcast(_DRAWS, root=0)).encode()).hexdigest()[:12]
    total = comm.bcast(_RAN["examples"], root=0)
    if comm.Get_rank() == 0:
        print(f"fuzz: {total} examples at {comm.Get_size()} ranks "
              f"({_RAN['compared']} compared, {_RAN['rejected']} rejected op/dtype pairs; "
              f"draws {fingerprint})")
