"""What things cost the first time: each tool's first run, and a process's first call.

    python bench/first_run.py [--only tools|calls] [--ranks 4] [--repeats 3] [--json FILE]

**Tools** (``--only tools``): for each command below, points ``NUMBA_CACHE_DIR`` at a new empty
directory (the project's own cache beside the modules is neither read nor touched), then runs
it twice in a row and prints the wall time of both runs: the first compiles every numba kernel
the command needs and writes it to the cache, the second loads it.

**Calls** (``--only calls``): ``mpiexec -n RANKS python bench/first_run.py --worker`` in a new
process each repeat, with the numba cache as installed (``make`` compiles the kernels): for
each algorithm of :data:`CALL_ALGORITHMS` in turn, a ``Comm`` with that algorithm forced and
:data:`CALLS` ``Allreduce`` calls of :data:`CALL_BYTES` in place, each from a barrier, a call's
time the slowest rank's. The first algorithm's first call is the process's first schedule call
(the planning and broadcast of its schedule, the executor's layout, and what the compiled
engine's load costs it); the second algorithm's first call has the engine loaded. Printed: the
first call's seconds against :data:`TARGET_FIRST_CALL` (the ratio; at most 1 meets it), the
second call's, the median of the last half of the calls, the sum of the first ten (where a cost
moved off the first call shows) and how many calls the compiled engine ran on rank 0. With
``--gap S`` each Comm's first call is followed by ``S`` seconds of work (:func:`compute`), as
a program's own step between two calls.

Run from the project root with the venv's python; the MPI commands use the ``mpiexec`` beside
it. docs/performance.md has the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(sys.executable))
PY = sys.executable
MPIEXEC = os.path.join(HERE, "mpiexec")

#: (tool, command): what a new user runs first, from the README
COMMANDS = [
    ("plan", [PY, "-m", "mtcoll.plan", "--topology", "torus:8x8"]),
    ("plan", [PY, "-m", "mtcoll.plan", "--topology", "torus:16x16"]),
    ("simulate", [PY, "-m", "mtcoll.simulate", "--topology", "torus:4x4", "--sizes", "1M"]),
    ("simulate", [PY, "-m", "mtcoll.simulate", "--topology", "torus:8x8"]),
    ("bench", [MPIEXEC, "-n", "2", PY, "-m", "mtcoll.bench", "--sizes", "1K,64K,4M"]),
    ("train", [MPIEXEC, "-n", "2", PY, "-m", "mtcoll.train", "--stages", "2", "--epochs", "1"]),
]


#: The first call of an algorithm at 4 ranks should take at most this long (seconds).
TARGET_FIRST_CALL = 0.3
#: The calls' algorithms, in order (a process's first and second schedule), their size in
#: bytes (float32, in place) and how many each Comm makes.
CALL_ALGORITHMS = ("multitree", "ring")
CALL_BYTES = 1 << 20
CALLS = 20


def timed(cmd, env):
    t = time.perf_counter()
    out = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr}")
    return time.perf_counter() - t


def compute(seconds):
    """Work for ``seconds`` between two calls, as a program's own step would: numpy on 8 MiB
    arrays in a Python loop (the interpreter and a core busy)."""
    import numpy as np

    y = np.zeros(1 << 20)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        y += 1.0


def worker(algorithms, gap=0.0):
    """One process of the calls' measurement (under mpiexec): rank 0 prints one JSON line."""
    import numpy as np
    from mpi4py import MPI

    import mtcoll
    from mtcoll.execute import _engine

    world = MPI.COMM_WORLD
    x = np.ones(CALL_BYTES // 4, dtype=np.float32)
    rows = []
    for name in algorithms:
        comm = mtcoll.Comm(world, algorithm=name)
        times = np.zeros(CALLS)
        served = _engine.served
        for i in range(CALLS):
            world.Barrier()
            t = time.perf_counter()
            comm.Allreduce(MPI.IN_PLACE, x)
            times[i] = time.perf_counter() - t
            if i == 0 and gap:
                compute(gap)
        compiled = _engine.served - served
        comm.Free()
        world.Allreduce(MPI.IN_PLACE, times, op=MPI.MAX)  # a call ends with its slowest rank
        rows.append({"algorithm": name, "first_s": float(times[0]), "second_s": float(times[1]),
                     "later_median_s": float(np.median(times[CALLS // 2:])),
                     "first_ten_s": float(times[:10].sum()), "compiled_calls_rank0": compiled})
    if world.Get_rank() == 0:
        print(json.dumps(rows), flush=True)


def calls(ranks, repeats, gap=0.0):
    """The calls' measurement: ``repeats`` new processes of ``ranks`` ranks; their rows."""
    env = dict(os.environ, MTCOLL_TUNING="off", MTCOLL_CALIBRATE="off")
    for var in ("MTCOLL_ALGO", "MTCOLL_DEBUG", "MTCOLL_CHECK", "MTCOLL_TIMEOUT", "MTCOLL_ENGINE"):
        env.pop(var, None)
    cmd = [MPIEXEC, "-n", str(ranks), PY, os.path.abspath(__file__), "--worker",
           ",".join(CALL_ALGORITHMS), "--gap", str(gap)]
    print(f"first calls at {ranks} ranks, {CALL_BYTES} B float32 in place, {CALLS} calls per "
          f"algorithm" + (f", {gap:g} s of work after the first" if gap else "")
          + f", target {TARGET_FIRST_CALL} s for the first:", flush=True)
    print(f"{'repeat':>6} {'algorithm':<10} {'first (s)':>9} {'/target':>7} {'second (s)':>10} "
          f"{'later (ms)':>10} {'first 10 (s)':>12} {'compiled':>8}", flush=True)
    rows = []
    for rep in range(repeats):
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr}")
        for row in json.loads(out.stdout.strip().splitlines()[-1]):
            row["repeat"] = rep
            rows.append(row)
            print(f"{rep:>6} {row['algorithm']:<10} {row['first_s']:>9.3f} "
                  f"{row['first_s'] / TARGET_FIRST_CALL:>7.2f} {row['second_s']:>10.3f} "
                  f"{row['later_median_s'] * 1e3:>10.2f} {row['first_ten_s']:>12.3f} "
                  f"{row['compiled_calls_rank0']:>8}", flush=True)
    first = [r["first_s"] for r in rows if r["algorithm"] == CALL_ALGORITHMS[0]]
    worst = max(first)
    print(f"the process's first call: median {statistics.median(first):.3f} s, worst "
          f"{worst:.3f} s = {worst / TARGET_FIRST_CALL:.2f} x the target "
          f"({'meets' if worst <= TARGET_FIRST_CALL else 'misses'} it)", flush=True)
    return rows


def tools():
    rows = []
    print(f"{'tool':<9} {'first (s)':>9} {'second (s)':>10}  command", flush=True)
    for tool, cmd in COMMANDS:
        with tempfile.TemporaryDirectory(prefix="mtcoll-numba-") as cache:
            env = dict(os.environ, NUMBA_CACHE_DIR=cache)
            first, second = timed(cmd, env), timed(cmd, env)
            shown = " ".join(os.path.basename(c) if c in (PY, MPIEXEC) else c for c in cmd)
        rows.append({"tool": tool, "command": shown, "first_s": round(first, 2),
                     "second_s": round(second, 2)})
        print(f"{tool:<9} {first:>9.2f} {second:>10.2f}  {shown}", flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="--only tools: each tool's first and second run with an empty numba cache; "
               "--only calls: a process's first Allreduce calls under mpiexec (see the "
               "module's docstring). Both by default.")
    p.add_argument("--only", choices=("tools", "calls"), help="measure only this part")
    p.add_argument("--ranks", type=int, default=4, help="ranks of the calls (default 4)")
    p.add_argument("--repeats", type=int, default=3,
                   help="new processes for the calls (default 3)")
    p.add_argument("--gap", type=float, default=0.0, metavar="SECONDS",
                   help="work (numpy in a Python loop) between each Comm's first and second "
                        "call (default 0: a tight loop of calls)")
    p.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    p.add_argument("--worker", metavar="ALGORITHMS", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker.split(","), args.gap)
    if args.ranks < 1 or args.repeats < 1 or not args.gap >= 0:
        p.error("--ranks and --repeats must be at least 1, --gap at least 0")
    result = {"cpus": os.cpu_count()}
    if args.only in (None, "tools"):
        result["rows"] = tools()
    if args.only in (None, "calls"):
        result["calls"] = {"ranks": args.ranks, "bytes": CALL_BYTES, "calls": CALLS,
                           "gap_s": args.gap, "target_first_s": TARGET_FIRST_CALL,
                           "rows": calls(args.ranks, args.repeats, args.gap)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
