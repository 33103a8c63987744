"""Constructing ``mtcoll.Comm(MPI.COMM_WORLD)`` in a loop: MPI communicators, memory and time
per construction (a benchmark, not a test).

    mpiexec -n 2 python -m mpi4py bench/construct_loop.py [--count 100000] [--checkpoints 4]
    mpiexec -n 4 python -m mpi4py bench/construct_loop.py --json construct.json

A program that builds its communicator in an accessor called every step does this. The first
construction sets the Comm up (collective); every later one should find it on the
communicator (an attribute lookup, no collective, no MPI communicator). At the start and at
each checkpoint every rank measures:

* ``free_comms`` -- how many more communicators MPI can make: ``MPI.COMM_WORLD.Dup()`` until
  MPI refuses (out of context ids), then all of them freed. A construction that leaks a
  communicator lowers it by one; a constant figure is a constant number of communicators;
* ``rss_kib`` -- the resident set size (``/proc/self/statm``), and ``objects`` -- the number of
  objects the garbage collector tracks.

Time per repeated construction is the slowest rank's mean over blocks of ``--block``
constructions; the table shows the median and the worst block, and the median of the main
thread's CPU time (``time.thread_time``) per construction: with more ranks than cores the wall
time includes the time a rank waits for a core. Rank 0 prints; ``--json``
writes the figures too.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

from mpi4py import MPI

import mtcoll


def free_comms(limit=20000):
    """How many communicators MPI can still create (collective over ``MPI.COMM_WORLD``)."""
    made = []
    try:
        while len(made) < limit:
            made.append(MPI.COMM_WORLD.Dup())
    except MPI.Exception:
        pass  # out of context ids: the same answer on every rank (MPI agrees on them)
    finally:
        for c in made:
            c.Free()
    return len(made)


def rss_kib():
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def _state():
    gc.collect()
    return dict(free_comms=free_comms(), rss_kib=rss_kib(), objects=len(gc.get_objects()))


def run(count, checkpoints, block):
    world = MPI.COMM_WORLD
    before = _state()
    t0 = time.perf_counter()
    first = mtcoll.Comm(world)
    first_s = world.allreduce(time.perf_counter() - t0, op=MPI.MAX)
    points = [dict(constructions=0, **before), dict(constructions=1, **_state())]
    blocks, cpu_blocks, done = [], [], 1
    every = max(1, (count - 1) // checkpoints)
    while done < count:
        n = min(block, count - done)
        t, cpu = time.perf_counter(), time.thread_time()
        for _ in range(n):
            c = mtcoll.Comm(world)
        blocks.append((time.perf_counter() - t) / n)
        cpu_blocks.append((time.thread_time() - cpu) / n)
        if c is not first:
            raise RuntimeError(f"rank {world.Get_rank()}: construction {done} made a new Comm")
        done += n
        if done // every != (done - n) // every or done == count:
            points.append(dict(constructions=done, **_state()))
    per = world.allreduce(blocks, op=_max_lists)
    cpu = world.allreduce(cpu_blocks, op=_max_lists)
    first.Free()
    return dict(ranks=world.Get_size(), count=count, first_construction_s=first_s,
                per_construction_us_median=statistics.median(per) * 1e6,
                per_construction_us_worst_block=max(per) * 1e6,
                cpu_us_median=statistics.median(cpu) * 1e6,
                checkpoints=[_worst(world, p) for p in points])


def _max_lists(a, b, datatype=None):
    return [max(x, y) for x, y in zip(a, b)]


def _worst(world, point):
    # the rank with the fewest free communicators and the most memory
    return dict(constructions=point["constructions"],
                free_comms=world.allreduce(point["free_comms"], op=MPI.MIN),
                rss_kib=world.allreduce(point["rss_kib"], op=MPI.MAX),
                objects=world.allreduce(point["objects"], op=MPI.MAX))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=100_000, help="constructions (default 100000)")
    ap.add_argument("--checkpoints", type=int, default=4,
                    help="measurements of communicators and memory during the loop (default 4)")
    ap.add_argument("--block", type=int, default=1000,
                    help="constructions per timed block (default 1000)")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = ap.parse_args(argv)
    if args.count < 1 or args.checkpoints < 1 or args.block < 1:
        ap.error("--count, --checkpoints and --block must be positive")
    out = run(args.count, args.checkpoints, args.block)
    if MPI.COMM_WORLD.Get_rank() == 0:
        print(f"mtcoll.Comm(MPI.COMM_WORLD) x {out['count']} at {out['ranks']} ranks: first "
              f"{out['first_construction_s'] * 1e3:.1f} ms, then "
              f"{out['per_construction_us_median']:.2f} us per construction (median block; "
              f"worst block {out['per_construction_us_worst_block']:.2f} us; CPU time "
              f"{out['cpu_us_median']:.2f} us)")
        print(f"{'constructions':>13} {'free MPI comms':>14} {'RSS KiB':>9} {'GC objects':>10}")
        for p in out["checkpoints"]:
            print(f"{p['constructions']:>13} {p['free_comms']:>14} {p['rss_kib']:>9} "
                  f"{p['objects']:>10}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
