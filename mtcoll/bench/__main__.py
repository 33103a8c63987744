"""``mpiexec -n N python -m mtcoll.bench``: time mtcoll's allreduce algorithms against the MPI
library's, side by side, and print one table on rank 0 (``--json`` for JSON).

See :mod:`mtcoll.bench` for the method and ``--help`` for the options.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import numpy as np
from mpi4py import MPI

import mtcoll

from . import (ALGORITHMS, DEFAULT_SIZES, DEFAULT_TIME_PER_SIZE, MIN_ITERS, OPS, ROUNDS,
               format_size,
               format_table, memory_cap, meta_for, parse_sizes, plot, run, tuning_table)
from .. import _ops, _tuning
from .._cli import add_json_option, entry, report, say


class _Exit(Exception):
    def __init__(self, code, message=""):
        super().__init__(message)
        self.code, self.message = code, message


class _Parser(argparse.ArgumentParser):
    # every rank parses the same arguments; only rank 0 speaks
    def _print_message(self, message, file=None):
        if MPI.COMM_WORLD.Get_rank() == 0 and message:
            (file or sys.stderr).write(message)
            (file or sys.stderr).flush()

    def exit(self, status=0, message=None):
        if message:
            self._print_message(message, sys.stderr)
        raise _Exit(status)


def parser():
    p = _Parser(
        prog="python -m mtcoll.bench",
        description="Allreduce benchmark: mtcoll's algorithms against the MPI library's "
                    "Allreduce (run under mpiexec; rank 0 prints the table, progress goes to "
                    "stderr).",
        epilog="busbw = algbw * 2(N-1)/N (nccl-tests). #wrong counts elements of each "
               "algorithm's first call that differ from the MPI library's result.")
    p.add_argument("--sizes", default=DEFAULT_SIZES,
                   help="message sizes in bytes: LO:HI[:FACTOR] (LO, the powers of FACTOR "
                        "between, HI; FACTOR defaults to 4) or a comma list such as 1K,64K,4M "
                        f"(default {DEFAULT_SIZES}; sizes whose buffers would not fit in half "
                        "the machine's memory are left out)")
    p.add_argument("--algorithms", default=",".join(ALGORITHMS),
                   help="comma list (default: %(default)s; ring2d only where it applies)")
    p.add_argument("--topology", default="auto",
                   help="topology spec for mtcoll (default: auto; MTCOLL_TOPOLOGY overrides)")
    p.add_argument("--ports", type=int, default=None, help="port budget per rank for planning")
    p.add_argument("--dtype", default="float32", help="numpy dtype (default: %(default)s)")
    p.add_argument("--op", default="sum", choices=sorted(OPS), help="default: %(default)s")
    p.add_argument("--inplace", action="store_true", help="MPI.IN_PLACE instead of two buffers")
    p.add_argument("--iters", type=int, default=None,
                   help="timed calls per size and algorithm (default: as many as fit in "
                        "--time-per-size, at least %d)" % MIN_ITERS)
    p.add_argument("--time-per-size", type=float, default=DEFAULT_TIME_PER_SIZE,
                   help="seconds of timed calls per size and algorithm (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=ROUNDS,
                   help="the timed calls of a size are made in this many rounds, each "
                        "visiting every algorithm in turn (default: %(default)s)")
    p.add_argument("--segment-bytes", type=int, default=None,
                   help="mtcoll.Comm segment_bytes (pipelining)")
    p.add_argument("--max-segments", type=int, default=None,
                   help="mtcoll.Comm max_segments (pipelining)")
    add_json_option(p)
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="plot busbw against size per algorithm (needs mtcoll[plot])")
    p.add_argument("--tune", nargs="?", const="", default=None, metavar="FILE",
                   help="write the fastest algorithm per size (lowest median time; the MPI "
                        "library unless beaten by 5%%) as the tuning table that "
                        "algorithm='auto' reads, merged into FILE (default: $MTCOLL_TUNING, "
                        "else ~/.cache/mtcoll/tuning.json)")
    return p


def _say(rank, text):
    if rank == 0:
        say(f"mtcoll.bench: {text}")


def _tune_path(arg):
    if arg:
        return arg
    path, _ = _tuning.resolve_path()
    return str(path or _tuning.default_path())


def main(argv=None):
    world = MPI.COMM_WORLD
    rank, nranks = world.Get_rank(), world.Get_size()
    start = time.perf_counter()
    args = parser().parse_args(argv)

    try:
        sizes = parse_sizes(args.sizes)
        dtype = np.dtype(args.dtype)
        _ops.lookup(OPS[args.op], dtype)  # TypeError where MPI leaves op on dtype undefined
    except (ValueError, TypeError) as e:
        raise _Exit(2, f"mtcoll.bench: error: {e}") from None
    names = [a.strip().lower() for a in args.algorithms.split(",") if a.strip()]
    names = list(dict.fromkeys(names))
    if not names:
        raise _Exit(2, "mtcoll.bench: error: --algorithms is empty")
    if args.plot and rank == 0:
        if importlib.util.find_spec("matplotlib") is None:  # fail now, not after measuring
            world.bcast(False, root=0)
            raise _Exit(2, "mtcoll.bench: error: --plot needs matplotlib: "
                           "pip install 'mtcoll[plot]'") from None
        world.bcast(True, root=0)
    elif args.plot and not world.bcast(None, root=0):
        raise _Exit(2)
    if os.environ.get("MTCOLL_ALGO", "").strip():
        _say(rank, f"MTCOLL_ALGO={os.environ['MTCOLL_ALGO']} ignored: the benchmark sets the "
                   f"algorithm per row (--algorithms)")
        del os.environ["MTCOLL_ALGO"]

    # one Comm per algorithm; ring2d (or any planner) that does not fit is left out
    options = dict(topology=args.topology, ports=args.ports, segment_bytes=args.segment_bytes,
                   max_segments=args.max_segments)
    comms = {}
    try:
        for name in names:
            c = mtcoll.Comm(world, algorithm=name, **options)
            options["topology"] = c.network  # the others skip detecting it again
            if name not in ("auto", "native"):
                try:
                    c.schedule(name)
                except ValueError as e:
                    _say(rank, f"{name} left out: {e}")
                    c.Free()
                    continue
            comms[name] = c
        if not comms:
            raise _Exit(2, "mtcoll.bench: error: no algorithm left to run")
        first = next(iter(comms.values()))
        meta = meta_for(world, first, {
            "dtype": dtype.name, "op": args.op, "inplace": args.inplace, "iters": args.iters,
            "time_per_size": args.time_per_size, "min_iters": MIN_ITERS, "rounds": args.rounds,
            "algorithms": list(comms), "argv": list(sys.argv[1:] if argv is None else argv),
        })
        # memory: buffers of all ranks under half of MemTotal
        nmt = sum(1 for n in comms if n != "native")
        cap = memory_cap(nranks, nmt)
        if cap is not None:
            dropped = [s for s in sizes if s > cap]
            sizes = [s for s in sizes if s <= cap]
            if dropped:
                _say(rank, f"sizes {','.join(format_size(s) for s in dropped)} left out: "
                           f"{nranks} ranks would need more than half of this machine's "
                           f"memory (largest size allowed {cap} B)")
            if not sizes:
                raise _Exit(2, "mtcoll.bench: error: no size fits in memory")
        meta["sizes"] = sizes
        meta["memory_cap_bytes"] = cap
        _say(rank, f"{nranks} ranks, {meta['topology']}, {len(sizes)} sizes "
                   f"{format_size(sizes[0])}..{format_size(sizes[-1])}, "
                   f"{', '.join(comms)}; set-up {time.perf_counter() - start:.1f} s")

        t_run = time.perf_counter()
        records = run(world, comms, sizes, dtype=dtype, opname=args.op, inplace=args.inplace,
                      iters=args.iters, time_per_size=args.time_per_size, rounds=args.rounds,
                      progress=(lambda line: _say(
                          rank, f"[{time.perf_counter() - start:6.1f} s] {line}")))
        meta["elapsed_s"] = round(time.perf_counter() - t_run, 2)
    finally:
        for c in comms.values():
            c.Free()

    if rank == 0:
        wrong = sum(r["wrong"] for r in records)
        report({"meta": meta, "results": records}, args.json,
               lambda: sys.stdout.write(format_table(meta, records)), "mtcoll.bench")
        if args.plot:
            plot(args.plot, meta, records)
            _say(rank, f"plot written to {args.plot}")
        if args.tune is not None:
            path = _tune_path(args.tune)
            _tuning.merge(path, tuning_table(meta, records))
            _say(rank, f"tuning table for {nranks} ranks on {meta['topology']} written to "
                       f"{path}")
        _say(rank, f"done in {time.perf_counter() - start:.1f} s, #wrong total {wrong}")
        return 1 if wrong else 0
    return 0


def _main():
    try:
        return main()
    except _Exit as e:
        if e.message and MPI.COMM_WORLD.Get_rank() == 0:
            say(e.message)
        return e.code
    except (ValueError, TypeError) as e:
        # raised on every rank alike (bad topology, algorithm, dtype/op combination, ...)
        if MPI.COMM_WORLD.Get_rank() == 0:
            say(f"mtcoll.bench: error: {e}")
        return 2


def _entry():
    entry(_main)


if __name__ == "__main__":
    _entry()
