"""``python -m mtcoll --info``: what this installation is and what mtcoll would do here.

Prints the versions of mtcoll, mpi4py, the MPI library, numba and numpy; the topology
``auto`` chooses for the communicator it runs on (so run it under ``mpiexec -n N`` to see
what N ranks get); where the tuning table and numba's compiled-kernel cache live; the
calibration ``algorithm="auto"`` chooses by (:mod:`mtcoll._calibrate`: where it is cached, what
its probe measured, and what auto picks per size), read from the cache or, on a cold cache,
measured by constructing a ``Comm`` (collective: the probe). Only rank 0 prints. ``--json``
follows the tools' convention.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib import metadata

from ._cli import add_json_option, entry, report


#: the subpackages whose modules hold numba kernels compiled with ``cache=True``
_NUMBA_PACKAGES = ("plan", "simulate")


def info(comm=None):
    """The facts ``--info`` prints, as a dict. Collective over ``comm`` (topology detection)."""
    from mpi4py import MPI

    from . import _calibrate, _tuning
    from .topology import from_comm

    comm = MPI.COMM_WORLD if comm is None else comm

    def version(dist):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    topo = from_comm(comm, "auto")
    tuning, required = _tuning.resolve_path()
    # numba caches compiled kernels in the __pycache__ beside each module that has them (the
    # planner's and the simulator's), unless NUMBA_CACHE_DIR says otherwise
    pkg = os.path.dirname(os.path.abspath(__file__))
    cache_dirs = ([os.environ["NUMBA_CACHE_DIR"]] if os.environ.get("NUMBA_CACHE_DIR") else
                  [os.path.join(pkg, sub, "__pycache__") for sub in _NUMBA_PACKAGES])
    facts = {
        "mtcoll": version("mtcoll"),
        "mpi4py": version("mpi4py"),
        "mpi_library": " ".join(MPI.Get_library_version().splitlines()[0].split()),
        "mpi_standard": "%d.%d" % MPI.Get_version(),
        "numba": version("numba"),
        "numpy": version("numpy"),
        "python": sys.version.split()[0],
        "ranks": comm.Get_size(),
        "auto_topology": topo.spec,
        "ports": sorted(set(topo.ports.tolist())),
        "tuning_file": None if tuning is None else str(tuning),
        "tuning_file_exists": bool(tuning is not None and tuning.is_file()),
        "tuning_source": "MTCOLL_TUNING" if required else ("off" if tuning is None else "default"),
        "numba_cache_dirs": cache_dirs,
        "environment": {k: v for k, v in os.environ.items() if k.startswith("MTCOLL_")},
    }
    facts.update(_calibration(comm, _calibrate))
    return facts


def _calibration(comm, _calibrate):
    try:
        mode = _calibrate.mode()
    except ValueError as e:
        return {"calibration": f"error: {e}"}
    out = {"calibration_dir": str(_calibrate.cache_dir()), "calibration_mode": mode}
    if mode == "off" or comm.Get_size() < 2:
        return out
    from .comm import Comm

    with Comm(comm) as c:  # reads the cache, or probes (collective)
        cal = c.calibration
        if cal is None:
            out["calibration_source"] = "tuning table" if c.tuning else "none (algorithm set)"
            return out
        out["calibration_source"] = cal.source
        out["calibration_file"] = cal.path
        out["calibration_probe_s"] = round(cal.data["probe_seconds"], 3)
        out["calibration_model"] = cal.describe()[2:]
        sizes = [8] + [4 ** k for k in range(5, 14)]
        out["auto_choices"] = [f"{b} B: {cal.choose(b)[0]}" for b in sizes]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mtcoll", description=__doc__.splitlines()[0])
    p.add_argument("--info", action="store_true", help="print versions, topology and paths")
    add_json_option(p)
    args = p.parse_args(argv)
    if not args.info:
        p.print_help()
        return 0
    from mpi4py import MPI

    facts = info()
    if MPI.COMM_WORLD.Get_rank() == 0:
        def table():
            w = max(len(k) for k in facts)
            for k, v in facts.items():
                if isinstance(v, list):
                    v = ", ".join(map(str, v))
                print(f"{k:<{w}}  {v}")
        report(facts, args.json, table, "mtcoll")
    return 0


if __name__ == "__main__":
    entry(main)
