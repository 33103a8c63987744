"""What one call of K small messages costs each engine, side by side (a benchmark, not a test).

    mpiexec -n 2 python -m mpi4py bench/engine_overhead.py
    mpiexec -n 4 python -m mpi4py bench/engine_overhead.py [--ks 64,256,1024] [--rounds 15]
                                                           [--wait auto|busy|sleep]

One call is a ring allreduce of float64 on ``MPI.COMM_WORLD``, cut into one-element (8-byte)
messages (``segment_bytes=8``), with a count chosen so that each rank sends about K messages
(and receives as many); the table gives the exact number. It is run by

* ``compiled`` -- the executor with the compiled engine (``MTCOLL_ENGINE=compiled``);
* ``python``   -- the executor's Python twin (``MTCOLL_ENGINE=python``);
* ``mpi4py``   -- a plain mpi4py loop over the same messages (the layout's pieces: same peers,
  tags, buffers): every ``Irecv`` and ``Isend`` posted at once, then ``MPI.Request.Waitall``.
  It has no dependencies to respect and no reduction to apply, so it is a lower bound on what
  any Python code posting these messages through mpi4py costs.

The three run in interleaved rounds on the same ranks and buffers; a round's time per call is
the slowest rank's (a MAX reduction), the table the median over rounds. Ratios are against
``mpi4py`` in the same run (target: compiled at most 0.5x), medians and, last column, the
best rounds' (the least disturbed by other load on a shared machine). Rank 0 prints the table.
The engines wait as an :class:`mtcoll.Comm` on this host would make them (``--wait auto``:
``"sleep"`` when the host runs more ranks than it has cores, else ``"busy"``; the header says
which); ``--wait busy`` or ``sleep`` forces one. The mpi4py loop always waits in ``Waitall``.
``--phase gather`` times the ring's all-gather phase alone: at 2 ranks one step, so no
message waits for another and the engines post everything at once, as the mpi4py loop does --
the engines' per-message cost without the latency of the allreduce's dependency chain.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
from mpi4py import MPI

from mtcoll import execute
from mtcoll.comm._planning import auto_wait
from mtcoll.plan import plan
from mtcoll.schedule import GATHER, RECV, REDUCE, SEND
from mtcoll.topology import host_leaders, parse

METHODS = ("compiled", "python", "mpi4py")


def _plain(comm, lay, acc, tmp, slot):
    """The layout's messages as a plain mpi4py loop: post all, Waitall."""
    reqs = []
    for p in range(lay.npieces):
        a, b, peer = lay.a[p], lay.b[p], lay.peer[p]
        tag = lay.tagnum[p] * execute.TAG_SLOTS + slot
        if lay.kind[p] == SEND:
            reqs.append(comm.Isend(acc[a:b], peer, tag))
        else:
            reqs.append(comm.Irecv(tmp[p:p + b - a], peer, tag))
    MPI.Request.Waitall(reqs)


def _round(comm, ex, method, count, seq, iters, phases):
    acc = np.ones(count)
    lay = ex.layout(count, 8, phases)
    tmp = np.empty(lay.npieces + count)
    os.environ["MTCOLL_ENGINE"] = "python" if method == "python" else "compiled"
    comm.Barrier()
    t0 = time.perf_counter()
    for i in range(iters):
        if method == "mpi4py":
            _plain(comm, lay, acc, tmp, (seq + i) % execute.TAG_SLOTS)
        else:
            ex.run(acc, np.add, seq + i, phases)
    dt = time.perf_counter() - t0
    return comm.allreduce(dt, op=MPI.MAX) / iters


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", default="64,256,1024", help="messages sent per rank per call")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--iters", type=int, default=20, help="calls per round")
    ap.add_argument("--phase", choices=("allreduce", "gather"), default="allreduce",
                    help="gather: only the ring's all-gather phase (at 2 ranks a single step, "
                         "no dependencies: every message can be posted at once, as mpi4py's)")
    ap.add_argument("--wait", choices=("auto", "busy", "sleep"), default="auto",
                    help="how the engines wait; auto: as an mtcoll.Comm on this host would "
                         "(sleep with more ranks than cores)")
    args = ap.parse_args()
    phases = (REDUCE, GATHER) if args.phase == "allreduce" else (GATHER,)
    steps = 2 if args.phase == "allreduce" else 1
    comm = MPI.COMM_WORLD.Dup()
    n, rank = comm.Get_size(), comm.Get_rank()
    wait = args.wait
    if wait == "auto":  # the Comm's rule, agreed as the Comm agrees it: sleep if any rank does
        leaders = host_leaders(comm)
        mine = auto_wait(leaders.count(leaders[rank])) == "sleep"
        wait = "sleep" if comm.allreduce(mine, op=MPI.LOR) else "busy"
    ex = execute.Executor(comm, plan(parse(f"ring:{n}"), "ring"), segment_bytes=8,
                          max_segments=1 << 20, wait=wait)
    from mtcoll.execute import _engine
    why = _engine.warm()
    rows = []
    seq = 0
    for k in (int(x) for x in args.ks.split(",")):
        # ring: 2(n-1) (all-gather: n-1) chunks of count/n sent
        count = max(n, round(k * n / (steps * (n - 1))))
        lay = ex.layout(count, 8, phases)
        sends = sum(1 for kd in lay.kind if kd == SEND)
        recvs = sum(1 for kd in lay.kind if kd == RECV)
        times = {m: [] for m in METHODS}
        for m in METHODS:  # one untimed round each: layouts, scratch, compilation
            _round(comm, ex, m, count, seq, 2, phases)
            seq += 2
        for _ in range(args.rounds):
            for m in METHODS:
                times[m].append(_round(comm, ex, m, count, seq, args.iters, phases))
                seq += args.iters
        med = {m: statistics.median(times[m]) for m in METHODS}
        best = {m: min(times[m]) for m in METHODS}
        rows.append((k, sends, recvs, med, best))
    os.environ.pop("MTCOLL_ENGINE", None)
    if rank == 0:
        lib = MPI.Get_library_version().splitlines()[0].strip()
        print(f"engine overhead: {n} ranks ({os.cpu_count()} cores here), ring {args.phase} "
              f"of 8-byte messages, wait={wait}" + (" (auto)" if args.wait == "auto" else "")
              + f", {lib}, compiled engine: {why or 'in use'}")
        print(f"{'K':>6} {'sent':>5} {'recv':>5} {'compiled us':>12} {'python us':>10} "
              f"{'mpi4py us':>10} {'compiled/mpi4py':>16} {'python/mpi4py':>14} "
              f"{'best rounds c/m':>16}")
        for k, sends, recvs, med, best in rows:
            c, p, m = (med[x] * 1e6 for x in METHODS)
            print(f"{k:>6} {sends:>5} {recvs:>5} {c:>12.1f} {p:>10.1f} {m:>10.1f} "
                  f"{c / m:>16.2f} {p / m:>14.2f} "
                  f"{best['compiled'] / best['mpi4py']:>16.2f}")
    comm.Free()


if __name__ == "__main__":
    main()
