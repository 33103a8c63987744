"""Per-call cost of mtcoll.Comm against plain mpi4py, side by side (a benchmark, not a test).

    mpiexec -n 2 python -m mpi4py bench/dropin_overhead.py
    mpiexec -n 4 python -m mpi4py bench/dropin_overhead.py [--rounds 15] [--iters 100] [--json F]

For each case -- every collective mtcoll defines (``Allreduce``, ``Iallreduce`` completed by
``MPI.Request.Waitall``, ``Allgather``, ``Reduce_scatter_block``) at 8 B, 4 KiB and 64 KiB of
float64 (the bytes of ``recvbuf``), in place and not, and ``grad-step``: a data-parallel MLP's
gradient step, 14 in-place float32 ``Iallreduce`` of its layer shapes (784-128x6-10: 40 B to
401,408 B) then one ``MPI.Request.Waitall`` -- it times, in interleaved rounds on the same
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
``mpi4py`` in the same run. Every result is checked against ``mpi4py``'s. Rank 0 prints the
table; ``--json`` writes the figures too.
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

SIZES = (8, 4096, 65536)
CALLS = ("Allreduce", "Iallreduce+Waitall", "Allgather", "Reduce_scatter_block")
CASES = tuple((call, nbytes, inplace) for call in CALLS for nbytes in SIZES
              for inplace in (False, True)) + (("grad-step", 0, True),)

# float32 elements of the MLP's gradients: weights and biases of 784-128-...-128-10, 7 layers
GRAD_SHAPES = ((784 * 128, 128) + (128 * 128, 128) * 5 + (128 * 10, 10))


def _buffers(comm, call, nbytes, inplace):
    """(send, recv, refill) for one case: refill() restores the input an in-place call
    overwrote."""
    size, rank = comm.Get_size(), comm.Get_rank()
    if call == "grad-step":
        grads = [np.full(n, rank + 1.0, np.float32) for n in GRAD_SHAPES]
        return None, grads, lambda: [g.fill(rank + 1.0) for g in grads]
    n = max(1, nbytes // 8)
    if call == "Allgather":
        k = max(1, n // size)
        recv = np.zeros(k * size)
        send = np.full(k, rank + 1.0)
        if inplace:
            def refill():
                recv[rank * k:(rank + 1) * k] = rank + 1.0
            refill()
            return MPI.IN_PLACE, recv, refill
        return send, recv, lambda: None
    if call == "Reduce_scatter_block":
        k = max(1, n // size)
        if inplace:
            recv = np.zeros(k * size)
            return MPI.IN_PLACE, recv, lambda: recv.fill(rank + 1.0)
        return np.full(k * size, rank + 1.0), np.zeros(k), lambda: None
    if inplace:
        recv = np.zeros(n)
        return MPI.IN_PLACE, recv, lambda: recv.fill(rank + 1.0)
    return np.full(n, rank + 1.0), np.zeros(n), lambda: None


def _call(comm, call, send, recv):
    if call == "Allreduce":
        comm.Allreduce(send, recv, op=MPI.SUM)
    elif call == "Iallreduce+Waitall":
        MPI.Request.Waitall([comm.Iallreduce(send, recv, op=MPI.SUM)])
    elif call == "Allgather":
        comm.Allgather(send, recv)
    elif call == "Reduce_scatter_block":
        comm.Reduce_scatter_block(send, recv, op=MPI.SUM)
    else:  # grad-step
        MPI.Request.Waitall([comm.Iallreduce(MPI.IN_PLACE, g, op=MPI.SUM) for g in recv])


def _round(comm, call, send, recv, refill, iters):
    world = MPI.COMM_WORLD
    world.Barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        _call(comm, call, send, recv)
    dt = time.perf_counter() - t0
    refill()
    return world.allreduce(dt, op=MPI.MAX) / iters


def _result(comm, call, send, recv, refill):
    refill()
    _call(comm, call, send, recv)
    out = [g.copy() for g in recv] if call == "grad-step" else recv.copy()
    refill()
    return out


def run(rounds, iters):
    world = MPI.COMM_WORLD
    comms = {"mpi4py": world,
             "native": mtcoll.Comm(world, algorithm="native"),
             "auto": mtcoll.Comm(world)}
    rows = []
    for call, nbytes, inplace in CASES:
        send, recv, refill = _buffers(world, call, nbytes, inplace)
        want = _result(world, call, send, recv, refill)
        times = {name: [] for name in comms}
        n = iters if call != "grad-step" else max(1, iters // 10)
        for name, c in comms.items():  # warm up (plans, caches, the progress thread), check
            got = _result(c, call, send, recv, refill)
            assert np.array_equal(np.concatenate(got) if call == "grad-step" else got,
                                  np.concatenate(want) if call == "grad-step" else want), \
                (name, call, nbytes, inplace)
            _round(c, call, send, recv, refill, max(1, n // 10))
        for _ in range(rounds):
            for name, c in comms.items():
                times[name].append(_round(c, call, send, recv, refill, n))
        med = {name: statistics.median(t) for name, t in times.items()}
        best = {name: min(t) for name, t in times.items()}
        rows.append({"call": call, "bytes": nbytes if call != "grad-step" else
                     4 * sum(GRAD_SHAPES), "in_place": inplace,
                     "seconds": med, "best_seconds": best,
                     "ratio": {name: med[name] / med["mpi4py"] for name in comms},
                     "best_ratio": {name: best[name] / best["mpi4py"] for name in comms}})
    for c in comms.values():
        if c is not world:
            c.Free()
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
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
    head = f"{'call':<20} {'bytes':>7} {'place':>5} {'mpi4py us':>10} {'native us':>10} {'ratio':>6} " \
           f"{'(best)':>7} {'auto us':>10} {'ratio':>6} {'(best)':>7}"
    print(head)
    for r in rows:
        s, q, b = r["seconds"], r["ratio"], r["best_ratio"]
        print(f"{r['call']:<20} {r['bytes']:>7} {'in' if r['in_place'] else 'out':>5} "
              f"{s['mpi4py'] * 1e6:>10.2f} "
              f"{s['native'] * 1e6:>10.2f} {q['native']:>6.2f} {'(%.2f)' % b['native']:>7} "
              f"{s['auto'] * 1e6:>10.2f} {q['auto']:>6.2f} {'(%.2f)' % b['auto']:>7}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ranks": world.Get_size(), "rounds": args.rounds, "iters": args.iters,
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
