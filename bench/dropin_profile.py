"""Where the drop-in overhead of a call handed to MPI goes (a benchmark, not a test).

    mpiexec -n 2 python -m mpi4py bench/dropin_profile.py [--bytes 8] [--rounds 201] [--iters 50]

Two measurements, on rank 0's figures:

1. **Side by side, wall time** (interleaved rounds, the slowest rank's round time per call,
   median and the ratio of the best rounds against ``MPI.COMM_WORLD``): plain ``COMM_WORLD``;
   ``class Bare(MPI.Intracomm): pass`` around it (does a Python subclass slow mpi4py's own
   ``Allreduce``?); the bound ``Allreduce`` of mtcoll's private duplicate (the communicator
   the fast path calls: its cost without mtcoll's Python); ``mtcoll.Comm(algorithm="native")``.
   ``--progress-thread`` starts mtcoll's progress thread first (it then parks on an event:
   nothing of mtcoll's is in flight).
2. **CPU time of mtcoll's Python per call** (``time.thread_time``, so other load on a shared
   machine does not count): ``Comm.Allreduce`` with the library call replaced by a no-op,
   against a bare no-op call -- what the fast path itself costs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
from mpi4py import MPI

import mtcoll
from mtcoll.comm import _progress


class Bare(MPI.Intracomm):
    pass


def _loop(expr, **env):
    ns = dict(env)
    exec(f"def f(iters):\n    for _ in range(iters):\n        {expr}\n", ns)
    return ns["f"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bytes", type=int, default=8)
    p.add_argument("--rounds", type=int, default=201)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--progress-thread", action="store_true")
    args = p.parse_args(argv)
    world = MPI.COMM_WORLD
    if args.progress_thread:
        _progress.wake()
    n = max(args.bytes // 8, 1)
    send, recv = np.full(n, float(world.Get_rank())), np.zeros(n)
    mt = mtcoll.Comm(world, algorithm="native")
    mt.Allreduce(send, recv)  # the first call caches the choice: later ones take the fast path
    env = dict(world=world, bare=Bare(world), lib=mt._lib_allreduce, mt=mt, send=send,
               recv=recv, SUM=MPI.SUM)
    loops = {"COMM_WORLD": _loop("world.Allreduce(send, recv, op=SUM)", **env),
             "Bare(COMM_WORLD)": _loop("bare.Allreduce(send, recv, op=SUM)", **env),
             "mtcoll's duplicate": _loop("lib(send, recv, SUM)", **env),
             "mtcoll.Comm": _loop("mt.Allreduce(send, recv, op=SUM)", **env)}
    times = {k: [] for k in loops}
    for f in loops.values():
        f(10)
    for _ in range(args.rounds):
        for k, f in loops.items():
            world.Barrier()
            t0 = time.perf_counter()
            f(args.iters)
            times[k].append(world.allreduce(time.perf_counter() - t0, op=MPI.MAX) / args.iters)
    # 2. CPU time of the Python around the library call, with the call a no-op
    noop = lambda s, r, o: None  # noqa: E731
    mt._lib_allreduce = noop
    cpu = {"no-op call": _loop("noop(send, recv, SUM)", noop=noop, **env),
           "Comm.Allreduce, library call a no-op": _loop("mt.Allreduce(send, recv, op=SUM)",
                                                         **env),
           "the same, MPI.IN_PLACE": _loop("mt.Allreduce(IN_PLACE, recv, op=SUM)",
                                           IN_PLACE=MPI.IN_PLACE, **env)}
    best = {}
    if world.Get_rank() == 0:
        for k, f in cpu.items():
            b = float("inf")
            for _ in range(9):
                t0 = time.thread_time_ns()
                f(100_000)
                b = min(b, (time.thread_time_ns() - t0) / 100_000)
            best[k] = b
    world.Barrier()
    mt._lib_allreduce = mt._dup.Allreduce
    mt.Free()
    if world.Get_rank() != 0:
        return 0
    ref, bref = statistics.median(times["COMM_WORLD"]), min(times["COMM_WORLD"])
    print(f"# {args.bytes} B Allreduce, {world.Get_size()} ranks, {args.rounds} rounds x "
          f"{args.iters} calls; progress thread running: {_progress.thread_running()}")
    print(f"{'wall time per call':<38} {'us':>8} {'ratio':>6} {'(best)':>7}")
    for k, t in times.items():
        m = statistics.median(t)
        print(f"{k:<38} {m * 1e6:>8.2f} {m / ref:>6.2f} {'(%.2f)' % (min(t) / bref):>7}")
    print(f"{'CPU time per call (best of 9 x 1e5)':<38} {'ns':>8}")
    for k, v in best.items():
        print(f"{k:<38} {v:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
