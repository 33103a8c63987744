"""Cross-check against SimGrid: the same schedule, platform and parameters, replayed there.

SimGrid is optional. Its Python bindings are usually Debian's ``python3-simgrid``, a module of
the system interpreter, not of our virtualenv; so the replay runs as a subprocess of whichever
interpreter can import ``simgrid`` (:func:`find_python`), reading one JSON file:

``nranks``; ``links``: [bandwidth, latency + router delay] per link id; ``overhead``;
``routes``: ``"src,dst"`` -> link ids, one route per ordered pair; per transfer ``src``,
``dst``, ``bytes``, ``step`` (ordinal step over both phases); ``nsteps``; ``mode``; in dataflow
mode ``deps``: per transfer, the transfers it waits for (:func:`_replay.dataflow_deps`).

SimGrid's full routing zone holds one route per ordered pair of hosts, so a schedule that sends
between the same two ranks over two different routes (possible on fat trees and BiGraphs)
cannot be replayed there; :func:`replay` raises ValueError for it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from ..topology import parse
from ._flatten import ITEMSIZE, OVERHEAD, ROUTER_DELAY, route_table, step_index, transfer_bytes

SCRIPT = Path(__file__).with_name("_simgrid_replay.py")
_CANDIDATES = ("/usr/bin/python3",)
_found = {}


def _can_import(python):
    try:
        r = subprocess.run([python, "-c", "import simgrid"], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def find_python():
    """Path of an interpreter that imports ``simgrid``, or None (result cached)."""
    if "python" in _found:
        return _found["python"]
    cands = []
    env = os.environ.get("MTCOLL_SIMGRID_PYTHON")
    if env:
        cands.append(env)
    cands.append(sys.executable)
    cands += [c for c in _CANDIDATES if os.path.exists(c)]
    cands += [c for c in (shutil.which("python3"),) if c]
    found = next((c for c in dict.fromkeys(cands) if _can_import(c)), None)
    _found["python"] = found
    return found


def job(schedule, topology, nbytes, mode, itemsize, router_delay, overhead):
    """The JSON-able input of the replay script."""
    topo = parse(schedule.topology if topology is None else topology, nranks=schedule.nranks)
    rptr, rlinks = route_table(schedule, topo)
    routes = {}
    for i, (s, d) in enumerate(zip(schedule.src.tolist(), schedule.dst.tolist())):
        r = rlinks[rptr[i]:rptr[i + 1]].tolist()
        old = routes.setdefault(f"{s},{d}", r)
        if old != r:
            raise ValueError(f"SimGrid's full zone has one route per pair, but the schedule "
                             f"sends {s}->{d} over two routes ({old} and {r})")
    k, nsteps = step_index(schedule)
    out = {
        "mode": mode, "nranks": schedule.nranks, "overhead": float(overhead),
        "links": [[float(b), float(l) + float(router_delay)]
                  for b, l in zip(topo.bandwidth, topo.latency)],
        "routes": routes,
        "src": schedule.src.tolist(), "dst": schedule.dst.tolist(),
        "bytes": [int(x) for x in transfer_bytes(schedule, nbytes, itemsize)],
        "step": k.tolist(), "nsteps": nsteps,
    }
    if mode == "dataflow":
        from ._replay import dataflow_deps

        before, after = dataflow_deps(schedule.phase, schedule.step, schedule.src, schedule.dst,
                                      schedule.lo, schedule.hi, schedule.nranks, schedule.nchunks)
        deps = [[] for _ in range(schedule.ntransfers)]
        for b, a in zip(before.tolist(), after.tolist()):
            deps[a].append(b)
        out["deps"] = deps
    elif mode != "step":
        raise ValueError(f"mode must be 'step' or 'dataflow', got {mode!r}")
    return out


def replay(schedule, topology=None, nbytes=1 << 20, mode="step", itemsize=None,
           router_delay=None, overhead=None, python=None, timeout=600):
    """Replay in SimGrid; returns the script's output (``time``, ``step_ends`` in step mode,
    ``simgrid_version``) plus ``cpu_s`` (the subprocess's CPU time)."""
    python = python or find_python()
    if python is None:
        raise RuntimeError("SimGrid's Python bindings were not found: install them (Debian: "
                           "apt-get install python3-simgrid) or name an interpreter that has "
                           "them in MTCOLL_SIMGRID_PYTHON")
    spec = job(schedule, topology, nbytes, mode,
               ITEMSIZE if itemsize is None else itemsize,
               ROUTER_DELAY if router_delay is None else router_delay,
               OVERHEAD if overhead is None else overhead)
    with tempfile.TemporaryDirectory(prefix="mtcoll-simgrid-") as tmp:
        inp, outp = Path(tmp, "in.json"), Path(tmp, "out.json")
        inp.write_text(json.dumps(spec))
        before = os.times()
        r = subprocess.run([python, str(SCRIPT), str(inp), str(outp)], capture_output=True,
                           text=True, timeout=timeout)
        after = os.times()
        if r.returncode != 0 or not outp.exists():
            raise RuntimeError(f"SimGrid replay failed (exit {r.returncode}):\n"
                               f"{r.stderr[-2000:]}")
        out = json.loads(outp.read_text())
    out["cpu_s"] = (after.children_user - before.children_user
                    + after.children_system - before.children_system)
    if "step_ends" in out:
        out["step_times"] = np.diff(np.concatenate(([0.0], out["step_ends"]))).tolist()
    return out
