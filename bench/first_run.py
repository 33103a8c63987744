"""First run against second run of each tool, with an empty numba cache.

    python bench/first_run.py [--json FILE]

For each command below, points ``NUMBA_CACHE_DIR`` at a new empty directory (the project's
own cache beside the modules is neither read nor touched), then runs it twice in a row and prints
the wall time of both runs: the first compiles every numba kernel the command needs and
writes it to the cache, the second loads it. Run from the project root with the venv's
python; the MPI commands use the ``mpiexec`` beside it. docs/performance.md has the figures.
"""

from __future__ import annotations

import argparse
import json
import os
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


def timed(cmd, env):
    t = time.perf_counter()
    out = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr}")
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    args = p.parse_args()
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpus": os.cpu_count(), "rows": rows}, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
