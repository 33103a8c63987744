"""A job for tests/testbed/test_testbed.py: ``python [-m mpi4py] tests/testbed/testbed_script.py loop ALGO SIZE
COUNT`` makes COUNT ``mtcoll.Comm(algorithm=ALGO).Allreduce`` calls of SIZE bytes (float32 ones,
checked). A StallError is printed as ``stall at <unix time> rank R ranks [..]: <message>`` on
stderr and raised again (under ``python -m mpi4py``: MPI_Abort). Mode ``links`` does the same
with ``measure_links=True`` and rank 0 prints what was measured as one JSON line on stdout
(``Comm.measured_links.as_dict()`` and the construction's seconds)."""

import json
import sys
import time

import numpy as np
from mpi4py import MPI

import mtcoll
from mtcoll.bench import parse_size

mode, algo, size, count = sys.argv[1], sys.argv[2], parse_size(sys.argv[3]), int(sys.argv[4])
if mode not in ("loop", "links"):
    raise SystemExit(f"unknown mode {mode!r}")
world = MPI.COMM_WORLD
t0 = time.perf_counter()
comm = mtcoll.Comm(world, algorithm=algo, measure_links=mode == "links")
if mode == "links" and world.Get_rank() == 0:
    print(json.dumps(dict(comm.measured_links.as_dict(), construct_seconds=time.perf_counter() - t0,
                          network=comm.network.spec)), flush=True)
x = np.ones(size // 4, np.float32)
y = np.empty_like(x)
try:
    for i in range(count):
        comm.Allreduce(x, y)
        if not (y == world.Get_size()).all():
            raise RuntimeError(f"rank {world.Get_rank()}: wrong result in call {i}")
except mtcoll.StallError as e:
    print(f"stall at {time.time():.3f} rank {world.Get_rank()} ranks {e.ranks}: {e}",
          file=sys.stderr, flush=True)
    raise
comm.Free()
