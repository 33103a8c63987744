"""Predicted allreduce bus bandwidth against rank count: the simulator on tori from 4x4 up.

    python bench/scale_busbw.py [--sides 4 8 16 32 64] [--sizes 1M,64M]
        [--algorithms multitree,ring,ring2d,rhd] [--timeout 600] --json FILE

Each torus runs ``python -m mtcoll.simulate --topology torus:SxS --json`` in a fresh process
(so each size's peak memory is its own), step mode, fixed buffer sizes; the file holds every
record with the process's wall and CPU seconds and peak RSS. A torus that exceeds
``--timeout`` is recorded as such. ``docs/img/scale_busbw.py`` draws the file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one(spec, sizes, algorithms, timeout):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sim.json"
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        try:
            p = subprocess.run([sys.executable, "-m", "mtcoll.simulate", "--topology", spec,
                                "--sizes", sizes, "--algorithms", algorithms, "--json",
                                str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, timeout=timeout, cwd=ROOT)
        except subprocess.TimeoutExpired:
            return {"topology": spec, "error": f"over {timeout} s"}
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        run = {"topology": spec, "wall_s": wall,
               "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
               # RUSAGE_CHILDREN's maxrss is the largest child so far: sides run in
               # increasing size, so it is this one's
               "peak_mib": after.ru_maxrss / 1024}
        if p.returncode:
            run["error"] = p.stderr[-1000:]
            return run
        run["records"] = json.loads(out.read_text())["results"]
        return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sides", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    ap.add_argument("--sizes", default="1M,64M")
    ap.add_argument("--algorithms", default="multitree,ring,ring2d,rhd")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--json", required=True)
    a = ap.parse_args(argv)
    runs = []
    for side in sorted(a.sides):
        spec = f"torus:{side}x{side}"
        print(f"scale_busbw: {spec}", file=sys.stderr, flush=True)
        runs.append(one(spec, a.sizes, a.algorithms, a.timeout))
        r = runs[-1]
        print(f"scale_busbw: {spec} {r.get('wall_s', 0):.1f} s wall, "
              f"{r.get('cpu_s', 0):.1f} s cpu, {r.get('peak_mib', 0):.0f} MiB "
              f"{r.get('error', '')}", file=sys.stderr, flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    meta = {"tool": "bench/scale_busbw.py", "argv": sys.argv[1:], "commit": commit,
            "date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
            "machine": platform.machine(), "cpus": os.cpu_count(),
            "load": os.getloadavg()}
    Path(a.json).write_text(json.dumps({"meta": meta, "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
