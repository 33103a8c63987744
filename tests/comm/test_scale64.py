"""Every algorithm at 64 ranks (the default network, an 8x8 torus) through the per-rank path:
rank 0 plans and scatters each rank its part, each rank runs it, and the result equals the MPI
library's ``Allreduce`` bit for bit.

The suite's mpiexec passes stop at 16 ranks, where each schedule has a few hundred transfers;
at 64 a MultiTree schedule has 8,064 and a rank's part is a small slice of it, so the slicing,
the scatter and the executor meet sizes the smaller passes do not. One serial test launches
``mpiexec -n 64`` itself: on two cores the ranks take about 12 s to start, and the script runs
every algorithm in that one launch.
"""

from __future__ import annotations

import pytest

import _mpirun

NRANKS = 64

SCRIPT = r"""
import sys
import numpy as np
from mpi4py import MPI
import mtcoll
from mtcoll.comm import _planning
from mtcoll.plan import ALGORITHMS

comm = MPI.COMM_WORLD
rank = comm.Get_rank()
ran = []
for name in ALGORITHMS:
    c = mtcoll.Comm(comm, algorithm=name, wait="sleep")
    try:
        part = _planning.rank_schedule(c, name)
    except ValueError as e:
        if rank == 0:
            print("skip", name, e, flush=True)
        c.Free()
        continue
    assert part.rank == rank and part.nranks == comm.Get_size()
    assert not c._schedules, "the whole schedule reached a rank"
    for count, dtype in ((7, "int64"), (10_007, "float64"), (65_537, "float32")):
        rng = np.random.default_rng([2026, rank, count])
        # small integers: every order of summation gives the same bits, so the result must
        # equal the library's exactly
        x = rng.integers(-1000, 1000, count).astype(dtype)
        want = np.empty_like(x)
        comm.Allreduce(x, want)
        out = np.empty_like(x)
        c.Allreduce(x, out)
        bad = int(np.count_nonzero(out != want))
        bad = comm.allreduce(bad)
        assert bad == 0, f"{name} {count} {dtype}: {bad} elements differ from the library's"
    ran.append(name)
    c.Free()
if rank == 0:
    print("ran", " ".join(ran), flush=True)
"""


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_every_algorithm_at_64_ranks_equals_the_library(tmp_path):
    script = tmp_path / "scale64.py"
    script.write_text(SCRIPT)
    p = _mpirun.run(NRANKS, [str(script)], timeout=220, MTCOLL_WAIT="sleep")
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    ran = [ln for ln in p.stdout.splitlines() if ln.startswith("ran ")]
    assert ran, p.stdout[-2000:]
    # the 8x8 torus fits every planner
    from mtcoll.plan import ALGORITHMS

    assert ran[0].split()[1:] == list(ALGORITHMS), p.stdout[-2000:]
