"""``auto`` recovering from a poisoned prior: per-step time against plain mpi4py.

    mpiexec -n 4 python -m mpi4py bench/auto_learning.py [--cache DIR] [--poison 15]
        [--steps 100] [--rounds 3] [--json FILE]

The prior: the calibration file of this rank count in ``--cache`` (``MTCOLL_CACHE_DIR``; a
full probe is run and cached first when there is none), rewritten with every time the probe
measured for the MPI library multiplied by ``--poison``, and without what earlier runs
learned, before each round (so every round starts from the same poisoned prior). Two
workloads, each a fresh ``mtcoll.Comm`` per round: the gradient step of a data-parallel MLP
(784-128-128x5-10: 14 in-place float32 ``Iallreduce`` of its layer shapes, then
``MPI.Request.Waitall``) and a single blocking 401,408 B float32 ``Allreduce``. Each step
runs on plain mpi4py (a ``Dup`` of the world) and on mtcoll side by side, in alternating
order, each from a barrier; a step's time is the slowest rank's. Printed per round: the first
step from which the median ratio mtcoll/mpi4py of the next :data:`WINDOW` steps is at most
1.2 (``back at``), the ratio of the medians over the last half of the steps, and what auto
chose per class. Rank 0 prints.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

#: steps over which the ratio is taken when finding where it is back at 1.2x
WINDOW = 10
LAYERS = [784 * 128, 128] + [128 * 128, 128] * 5 + [128 * 10, 10]
SINGLE = 401408 // 4


def _poison(world, cache, factor):
    """Rank 0: the poisoned prior's file contents (probing first when there is none)."""
    import mtcoll
    from mtcoll import _calibrate

    os.environ["MTCOLL_CACHE_DIR"] = str(cache)
    with mtcoll.Comm(world) as c:
        path = c._learner.path if c._learner else None
        if c._learner is None or c.calibration is None:
            _calibrate.calibrate(c, force=True)
    if world.rank != 0:
        return None, None
    data = json.loads(Path(path).read_text())
    data.pop("learned", None)
    data["measured"]["native"] = [[b, t * factor] for b, t in data["measured"]["native"]]
    return path, data


def _steps(world, make_step, nsteps):
    """Per step, the slowest rank's time on mpi4py and on mtcoll (alternating order)."""
    import mtcoll

    plain = world.Dup()
    c = mtcoll.Comm(world)
    run_plain, run_mt = make_step(plain, False), make_step(c, True)
    t = np.zeros((2, nsteps))
    for s in range(nsteps):
        order = (0, 1) if s % 2 == 0 else (1, 0)
        for which in order:
            world.Barrier()
            t0 = time.perf_counter()
            (run_plain if which == 0 else run_mt)()
            t[which, s] = time.perf_counter() - t0
    world.Allreduce(MPI.IN_PLACE, t, MPI.MAX)
    report = c._learner.report() if c._learner else {}
    c.Free()
    plain.Free()
    return t, report


def mlp(comm, is_mtcoll):
    bufs = [np.zeros(n, np.float32) for n in LAYERS]  # (in place: zeros stay finite)

    def step():
        reqs = [comm.Iallreduce(MPI.IN_PLACE, b, MPI.SUM) for b in bufs]
        MPI.Request.Waitall(reqs)
    return step


def single(comm, is_mtcoll):
    x = np.ones(SINGLE, np.float32)
    y = np.empty_like(x)

    def step():
        comm.Allreduce(x, y, MPI.SUM)
    return step


def back_at(ratio, limit=1.2):
    """The first step from which the median ratio of the next WINDOW steps is <= limit."""
    for s in range(len(ratio) - WINDOW + 1):
        if np.median(ratio[s:s + WINDOW]) <= limit:
            return s
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", default=None, help="MTCOLL_CACHE_DIR (default: a new one)")
    p.add_argument("--poison", type=float, default=15.0,
                   help="factor on the library's probed times (default 15)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=None, help="write the results there")
    args = p.parse_args(argv)
    world = MPI.COMM_WORLD
    cache = args.cache
    if cache is None:
        import tempfile
        cache = world.bcast(tempfile.mkdtemp(prefix="mtcoll-learn-") if world.rank == 0
                            else None)
    os.environ.pop("MTCOLL_CALIBRATE", None)
    path, data = _poison(world, cache, args.poison)
    out = []
    for rnd in range(args.rounds):
        for name, make in (("mlp step", mlp), ("401408 B", single)):
            if world.rank == 0:
                Path(path).write_text(json.dumps(data))
            world.Barrier()
            t, report = _steps(world, make, args.steps)
            ratio = t[1] / t[0]
            half = args.steps // 2
            r = {"round": rnd, "workload": name, "back_at": back_at(ratio),
                 "ratio_last_half": float(np.median(t[1, half:]) / np.median(t[0, half:])),
                 "ratio_first_10": float(np.median(t[1, :10]) / np.median(t[0, :10])),
                 "mpi4py_ms": float(np.median(t[0, half:]) * 1e3),
                 "mtcoll_ms": float(np.median(t[1, half:]) * 1e3),
                 "choices": {k: v["choice"] for k, v in report.items()}}
            out.append(r)
            if world.rank == 0:
                print(f"round {rnd} {name:>9}: back at <= 1.2x from step {r['back_at']}, "
                      f"first 10 steps {r['ratio_first_10']:.2f}x, last {half} steps "
                      f"{r['ratio_last_half']:.2f}x (mtcoll {r['mtcoll_ms']:.3f} ms, mpi4py "
                      f"{r['mpi4py_ms']:.3f} ms); auto chose "
                      + ", ".join(f"{k} {v}" for k, v in r["choices"].items()), flush=True)
    if world.rank == 0 and args.json:
        Path(args.json).write_text(json.dumps({"poison": args.poison, "nranks": world.size,
                                               "results": out}, indent=1))


if __name__ == "__main__":
    main()
