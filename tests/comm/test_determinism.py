"""Determinism: for every algorithm, the result is bitwise identical on every rank, across
repeated calls in one process, and across two separate ``mpiexec`` launches.

The data are floats of mixed magnitudes, whose sums depend on the order of the additions (the
test checks that they do), so a change of order between ranks, calls or runs would show.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

import mtcoll
from mtcoll.plan import ALGORITHMS

import _mpirun

COUNT = 30_011  # odd, so chunks are uneven


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("MTCOLL_ALGO", "MTCOLL_TOPOLOGY", "MTCOLL_DEBUG"):
        monkeypatch.delenv(var, raising=False)


def inputs(rank, count=COUNT, dtype="float64"):
    rng = np.random.default_rng([2026, rank])
    return (rng.standard_normal(count) * 10.0 ** rng.integers(-8, 9, count)).astype(dtype)


def digest(a):
    return hashlib.sha256(np.ascontiguousarray(a).view(np.uint8).tobytes()).hexdigest()


def test_data_is_order_sensitive():
    """Summing the inputs of 8 ranks in two orders gives different bits (else the test is blind)."""
    xs = [inputs(r) for r in range(8)]
    fwd = xs[0].copy()
    for x in xs[1:]:
        fwd += x
    rev = xs[7].copy()
    for x in reversed(xs[:7]):
        rev += x
    pairs = (xs[0] + xs[1]) + (xs[2] + xs[3]) + ((xs[4] + xs[5]) + (xs[6] + xs[7]))
    assert (fwd != rev).sum() > COUNT // 100
    assert (fwd != pairs).sum() > COUNT // 100


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_bitwise_same_on_every_rank_and_every_call(comm, algorithm, dtype):
    c = mtcoll.Comm(comm, algorithm=algorithm)
    try:
        c.schedule()
    except ValueError as e:
        c.Free()
        pytest.skip(f"{algorithm}: {e}")
    with c:
        x = inputs(comm.Get_rank(), dtype=dtype)
        seen = set()
        for k in range(3):  # blocking, in place, nonblocking
            out = np.empty_like(x)
            if k == 0:
                c.Allreduce(x, out)
            elif k == 1:
                out[...] = x
                c.Allreduce(MPI.IN_PLACE, out)
            else:
                c.Iallreduce(x, out).Wait()
            seen.add(digest(out))
        assert len(seen) == 1, f"{algorithm}: repeated calls differ on rank {comm.Get_rank()}"
        everyone = comm.allgather(seen.pop())
        assert len(set(everyone)) == 1, f"{algorithm}: ranks differ: {everyone}"
        # and the result is the sum (up to rounding), not merely the same everywhere
        want = np.empty_like(x)
        comm.Allreduce(x, want)
        tol = 1e-5 if dtype == "float32" else 1e-12
        np.testing.assert_allclose(out, want, rtol=tol, atol=tol * np.abs(want).max())


SCRIPT = r"""
import hashlib, sys
import numpy as np
from mpi4py import MPI
import mtcoll
sys.path[:0] = sys.argv[1:]  # this test's folder, the tests' helpers
from test_determinism import inputs, digest
from mtcoll.plan import ALGORITHMS
comm = MPI.COMM_WORLD
for name in ALGORITHMS:
    c = mtcoll.Comm(comm, algorithm=name)
    try:
        c.schedule()
    except ValueError:
        c.Free()
        continue
    x = inputs(comm.Get_rank())
    out = np.empty_like(x)
    c.Allreduce(x, out)
    h = comm.gather(digest(out), root=0)
    if comm.Get_rank() == 0:
        print(name, " ".join(h))
    c.Free()
"""


@pytest.mark.timeout(300)
def test_same_bits_across_launches(tmp_path):
    """Two separate 4-rank launches print the same hashes, per algorithm and rank."""
    script = tmp_path / "det.py"
    script.write_text(SCRIPT)
    here = Path(__file__).resolve().parent
    dirs = [str(here), str(here.parent)]
    runs = []
    for _ in range(2):
        p = _mpirun.run(4, [str(script), *dirs], timeout=240)
        assert p.returncode == 0, p.stderr[-2000:]
        runs.append(sorted(p.stdout.split("\n")))
    lines = [ln for ln in runs[0] if ln]
    assert len(lines) >= 4, runs[0]  # multitree, ring, ring2d (2x2), dbtree, rhd
    assert runs[0] == runs[1]
    for ln in lines:  # and within a run, every rank printed the same hash
        name, *hashes = ln.split()
        assert len(hashes) == 4 and len(set(hashes)) == 1, ln
