"""Per-call cost of mtcoll.Comm against plain mpi4py, side by side (a benchmark, not a test).

    mpiexec -n 2 python -m mpi4py bench/dropin_overhead.py
    mpiexec -n 4 python -m mpi4py bench/dropin_overhead.py [--rounds 15] [--iters 200] [--json F]

For each case (a blocking ``Allreduce`` of 8 B, 4 KiB and 64 KiB of float64, and a 64 KiB
``Iallreduce`` completed by ``MPI.Request.Waitall``) it times, in interleaved rounds on the same
ranks and buffers:

* ``mpi4py``   -- ``MPI.COMM_WORLD``'s own call (the reference);
* ``native``   -- ``mtcoll.Comm(..., algorithm="native")``: every call handed to the MPI library,
  so the difference is mtcoll's own overhead (target: at most 1.2x);
* ``auto``     -- ``mtcoll.Comm(...)`` as a drop-in user gets it (auto picks by its calibration,
  or a tuning table; with ``MTCOLL_CALIBRATE=off``, the MPI library below 64 KiB and MultiTree
  from 64 KiB on).

Per-call time is (round time / iterations), the round time being the slowest rank's (a MAX
reduction after each round); the table shows the median over rounds and, in brackets, the ratio
of the best rounds (the least disturbed by other load on a shared machine). Ratios are against
``mpi4py`` in the same run. Rank 0 prints the table; ``--json`` writes the figures too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
from mpi4py import MPI

import mtcoll

CASES = (("Allreduce", 8), ("Allreduce", 4096), ("Allreduce", 65536),
         ("Iallreduce+Waitall", 65536))


def _round(comm, kind, send, recv, iters):
    world = MPI.COMM_WORLD
    world.Barrier()
    t0 = time.perf_counter()
    if kind == "Allreduce":
        for _ in range(iters):
            comm.Allreduce(send, recv, op=MPI.SUM)
    else:
        for _ in range(iters):
            req = comm.Iallreduce(send, recv, op=MPI.SUM)
            MPI.Request.Waitall([req])
    dt = time.perf_counter() - t0
    return world.allreduce(dt, op=MPI.MAX) / iters


def run(rounds, iters):
    world = MPI.COMM_WORLD
    comms = {"mpi4py": world,
             "native": mtcoll.Comm(world, algorithm="native"),
             "auto": mtcoll.Comm(world)}
    rows = []
    for kind, nbytes in CASES:
        n = nbytes // 8
        send = np.full(n, float(world.Get_rank()))
        recv = np.zeros(n)
        want = np.zeros(n)
        world.Allreduce(send, want)
        times = {name: [] for name in comms}
        for name, c in comms.items():  # warm up: plans, caches, the progress thread
            _round(c, kind, send, recv, max(1, iters // 10))
            assert np.array_equal(recv, want), (name, kind, nbytes)
        for _ in range(rounds):
            for name, c in comms.items():
                times[name].append(_round(c, kind, send, recv, iters))
        assert np.array_equal(recv, want)
        med = {name: statistics.median(t) for name, t in times.items()}
        best = {name: min(t) for name, t in times.items()}
        rows.append({"call": kind, "bytes": nbytes,
                     "seconds": med, "best_seconds": best,
                     "ratio": {name: med[name] / med["mpi4py"] for name in comms},
                     "best_ratio": {name: best[name] / best["mpi4py"] for name in comms}})
    for c in comms.values():
        if c is not world:
            c.Free()
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=41)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    world = MPI.COMM_WORLD
    rows = run(args.rounds, args.iters)
    if world.Get_rank() != 0:
        return 0
    print(f"# mtcoll drop-in overhead: {world.Get_size()} ranks, {args.rounds} rounds x "
          f"{args.iters} calls, median per-call time (slowest rank)")
    print(f"# {MPI.Get_library_version().splitlines()[0].strip()}, mpi4py "
          f"{__import__('mpi4py').__version__}, thread level {MPI.Query_thread()}")
    head = f"{'call':<20} {'bytes':>7} {'mpi4py us':>10} {'native us':>10} {'ratio':>6} " \
           f"{'(best)':>7} {'auto us':>10} {'ratio':>6} {'(best)':>7}"
    print(head)
    for r in rows:
        s, q, b = r["seconds"], r["ratio"], r["best_ratio"]
        print(f"{r['call']:<20} {r['bytes']:>7} {s['mpi4py'] * 1e6:>10.2f} "
              f"{s['native'] * 1e6:>10.2f} {q['native']:>6.2f} {'(%.2f)' % b['native']:>7} "
              f"{s['auto'] * 1e6:>10.2f} {q['auto']:>6.2f} {'(%.2f)' % b['auto']:>7}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ranks": world.Get_size(), "rounds": args.rounds, "iters": args.iters,
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
