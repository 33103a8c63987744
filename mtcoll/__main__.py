"""``python -m mtcoll --info``: what this installation is and what mtcoll would do here.

Prints the versions of mtcoll, mpi4py, the MPI library, numba and numpy; the topology
``auto`` chooses for the communicator it runs on (so run it under ``mpiexec -n N`` to see
what N ranks get); where the tuning table and numba's compiled-kernel cache live; the
prior ``algorithm="auto"`` starts from (:mod:`mtcoll._calibrate`: where it is cached, what a
probe measured and under which load, what auto would pick per size from it) and what auto
learned on earlier runs' calls (:mod:`mtcoll.comm._learn`: per class its choice, the prior's
prediction, the time observed and how many calls decided it) and the measured links of this
network (``measure_links``, :mod:`mtcoll.comm._links`) when they are cached, read from the cache by
constructing a ``Comm`` (collective; no probe). ``--calibrate`` runs the full probe first and
caches it. Only rank 0 prints. ``--json`` follows the tools' convention.
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
    from .comm import Comm, _links

    with Comm(comm) as c:  # reads the cache (collective; no probe)
        links = _measured_links(c, _links)
        if links:
            out["measured_links"] = links
        lrn = c._learner
        if lrn is None:
            out["calibration_source"] = "tuning table" if c.tuning else "none (algorithm set)"
            return out
        out["auto_prior"] = lrn.source + (f", {lrn.path}" if lrn.path else "")
        cal = c.calibration
        if cal is not None:
            out["calibration_source"] = cal.source
            out["calibration_file"] = cal.path
            out["calibration_probe_s"] = round(cal.data["probe_seconds"], 3)
            out["calibration_load"] = _load(cal.data.get("load"))
            out["calibration_model"] = cal.describe()[2:]
            sizes = [8] + [4 ** k for k in range(5, 14)]
            out["auto_choices"] = [f"{b} B: {cal.choose(b)[0]}" for b in sizes]
        out["auto_classes"] = [_learned_line(name, e, cal) for name, e in
                               sorted(lrn.learned.items(), key=lambda x: int(x[0].split("B")[0]))]
    return out


def _measured_links(c, _links):
    # the measured spec of this network: this Comm's (MTCOLL_MEASURE_LINKS=1), else the
    # cached one (collective: where the ranks run is part of the key)
    if c.measured_links is not None:
        return c.measured_links.describe()
    got = _links.cached(c, c.network)
    if got is None:
        return None
    return f"{got['spec']} (cached {got.get('created', '?')}, {got['path']})"


def _load(load):
    if not load:
        return "not recorded"
    avg = load.get("loadavg")
    return (f"load average {' '.join(f'{x:.2f}' for x in avg) if avg else '?'}, "
            f"ranks' CPU share {load.get('cpu_share', 0):.0%}")


def _learned_line(name, e, cal):
    # one class auto learned: its choice, the prior's prediction, what was observed, the calls
    nbytes = int(name.split("B")[0])
    pred = cal.predict(nbytes).get(e["algorithm"]) if cal is not None else None
    return (f"{name}: {e['algorithm']}, predicted "
            + ("-" if pred is None else f"{pred * 1e3:.3g} ms")
            + f", observed {e['seconds'] * 1e3:.3g} ms, decided by {e['calls']} calls ("
            + ", ".join(f"{a} {t * 1e3:.3g} ms" for a, t in e.get("candidates", {}).items())
            + f"), {_load({'loadavg': e.get('loadavg'), 'cpu_share': e.get('cpu_share', 0)})}"
            + f", {e.get('created', '?')}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mtcoll", description=__doc__.splitlines()[0])
    p.add_argument("--info", action="store_true", help="print versions, topology and paths")
    p.add_argument("--calibrate", action="store_true",
                   help="run the full calibration probe (collective) and cache it as auto's "
                        "prior, then print --info")
    add_json_option(p)
    args = p.parse_args(argv)
    if not (args.info or args.calibrate):
        p.print_help()
        return 0
    from mpi4py import MPI

    if args.calibrate:
        from . import _calibrate
        from ._env import env_flag
        from .comm import Comm

        with Comm(MPI.COMM_WORLD) as c:
            if c._size > 1:
                _calibrate.calibrate(c, env_flag("MTCOLL_DEBUG"), force=True)

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
