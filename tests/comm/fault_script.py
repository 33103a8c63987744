"""A rank that fails in the middle of a collective (tests/comm/test_faults.py, docs/reliability.md).

Run as ``mpiexec -n 4 python -m mpi4py tests/comm/fault_script.py MODE [TOKEN]``. Every rank starts
a MultiTree ``Iallreduce`` of 4 MiB and waits for it; rank 1 fails inside its executor, after
it has combined the first received piece (so its peers have messages in flight to and from
it). MODE says how it fails:

``raise``      raises RuntimeError (under ``python -m mpi4py``: MPI_Abort of the whole job)
``exit``       ``os._exit(3)``, without MPI_Finalize
``sigkill``    kills itself with SIGKILL
``between``    raises RuntimeError after ``Iallreduce`` returned, before ``Wait`` (its
               progress thread off, so that its part of the call stays undone)
``none``       does not fail (the control: the job ends with status 0)

TOKEN is ignored; the tests pass a unique one to find leftover processes by command line.
Rank 1 prints ``rank 1 fails ...`` to stderr just before it fails; ranks that finish print
``finished RANK``.
"""

import os
import signal
import sys

import numpy as np
from mpi4py import MPI

import mtcoll
from mtcoll import execute

mode = sys.argv[1]
if mode not in ("raise", "exit", "sigkill", "between", "none"):
    raise SystemExit(f"unknown MODE {mode!r}")
world = MPI.COMM_WORLD
rank = world.Get_rank()
if rank == 1 and mode == "between":
    # no progress thread on the failing rank: it would carry rank 1's part of the call to the
    # end in the background while the main thread raises, and the others could finish first
    os.environ["MTCOLL_PROGRESS"] = "off"
comm = mtcoll.Comm(world, algorithm="multitree")

if rank == 1 and mode in ("raise", "exit", "sigkill"):
    apply = execute.Execution._apply

    def failing_apply(self, p):
        apply(self, p)
        print(f"rank 1 fails mid-collective ({mode})", file=sys.stderr, flush=True)
        if mode == "raise":
            raise RuntimeError("rank 1 fails in the middle of the allreduce")
        if mode == "exit":
            os._exit(3)
        os.kill(os.getpid(), signal.SIGKILL)

    execute.Execution._apply = failing_apply

n = 1 << 19  # float64: 4 MiB, many messages per rank
out = np.zeros(n)
req = comm.Iallreduce(np.full(n, float(rank)), out)
if rank == 1 and mode == "between":
    print(f"rank 1 fails mid-collective ({mode})", file=sys.stderr, flush=True)
    raise RuntimeError("rank 1 fails between Iallreduce and Wait")
req.Wait()
assert np.all(out == world.Get_size() * (world.Get_size() - 1) / 2)
comm.Free()
print(f"finished {rank}", flush=True)
