"""What ``algorithm="auto"`` runs: every candidate's predicted time, calibrated on the
communicator it serves.

The candidates are the MPI library's own ``Allreduce`` (``"native"``) and every mtcoll
algorithm that plans on the communicator's network. A short collective **probe** times them
on that communicator, through the same calls users make (``Comm.Allreduce`` with the algorithm
forced, so a faster executor or a faster MPI library shows up in what it measures). Rank 0
fits the model and broadcasts it; :func:`mtcoll.comm.choose` is then a pure function of it,
the same on every rank. Three files:

``_model.py``: the model
    A candidate the probe measured at two sizes or more is predicted from its own points:
    straight lines between them, the end segments' lines beyond (its measured fixed cost and
    cost per byte; on a network whose links are the bottleneck, the bytes dominate at the
    large size and the steps at the small one, so both are measured, not guessed). The others
    (measured at one size, or not at all, when the budget ran out) are predicted by a model of
    the schedule, ``sigma * steps + mu * messages(n) + beta * bytes(n) + lam * links(n)``
    (``links``: per step the longest route's latency and the busiest link's bytes, so
    contention and multi-hop routes count), or ``a + b * n + lam * links(n)`` for the
    library, fitted (non-negative least squares on relative error) to every point, times the
    candidate's measured/modelled ratio. ``auto`` takes the fastest predicted candidate
    **among those the probe measured near that size** (within a factor :data:`REACH`, or at
    its largest size for larger calls; below the smallest size's reach, the MPI library
    alone), and an mtcoll algorithm only if it beats the library's prediction by
    :data:`MARGIN`. The schedule model also says where messages are the cost
    (:meth:`Calibration.message_share`, in the debug line).

``_probe.py``: the probe
    Sizes :func:`probe_sizes`: 16 KiB and a large size of 4 MiB, halved until it times the
    ranks is at most 256 MiB (4 MiB up to 64 ranks), and their middle. Batches in
    :func:`probe_batches`' order: the library, rhd (the fewest messages) and MultiTree at the
    large size, then at the small (the minimum, :data:`MIN_BATCHES`), then the others at both,
    then the middle size, while :data:`BUDGET` seconds (``MTCOLL_PROBE_SECONDS``) last. A
    candidate is planned when the probe first reaches it; candidates never reached are not
    candidates of this calibration. A batch: one untimed call of each candidate, then
    :data:`REPEATS` rounds of one call of each in turn, each from a barrier; a call's time is
    the mean over the ranks, a point's the median of its calls; after two rounds a candidate
    slower than the best by :data:`DOMINATED` is not timed again. The compiled engine's
    one-time load comes first, outside the budget (its own phase in the debug line).

``_cache.py``: the cache
    One JSON file per key in :func:`cache_dir` (``MTCOLL_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/mtcoll``, else ``~/.cache/mtcoll``). The key: rank count, host layout
    (how many ranks share each host, in rank order), the MPI library's version line, the mtcoll
    version and a hash of the package's code (:func:`engine_id`: a faster engine measures
    anew), the network spec, the wait mode and segmenting, the machine (CPU count and
    architecture of rank 0's host), and the file's format. A missing, unreadable or read-only
    cache directory costs a probe per Comm, never an error (``MTCOLL_DEBUG`` says why).
    The file is also where ``auto`` records what it learned on the real calls
    (:mod:`mtcoll.comm._learn`, its ``learned`` entries). ``MTCOLL_CALIBRATE=off`` turns
    calibration and learning off (``auto`` then follows the built-in rule of
    :func:`mtcoll.comm.choose`); ``refresh`` ignores the cached prior, learns anew and rewrites
    the file.

A ``Comm`` never probes: it reads the file as the **prior** of its learning (:func:`prior`).
The probe runs when asked for, by :func:`calibrate` (``python -m mtcoll --calibrate``).
"""

from __future__ import annotations

import sys
import time

from ._cache import (FORMAT, cache_dir, cache_path, engine_id, host_layout, key, lookup, mode,
                     segmenting, store)
from ._fit import MARGIN, REACH, Calibration, features, link_terms
from ._probe import (BUDGET, DOMINATED, MIN_BATCHES, ORDER, REPEATS, dominated, probe_batches,
                     probe_sizes, time_batch)
from ..comm import _planning
from . import _probe

__all__ = ["Calibration", "Prior", "prior", "cache_dir", "cache_path", "engine_id", "key", "calibrate",
           "probe_batches", "probe_sizes", "ORDER", "mode", "BUDGET", "MIN_BATCHES", "FORMAT",
           "MARGIN", "REACH", "REPEATS", "DOMINATED", "dominated", "features", "link_terms",
           "host_layout", "segmenting", "time_batch"]


class Prior:
    """What ``auto`` starts from (:func:`prior`): ``calibration`` (a :class:`Calibration`, or
    None), ``learned`` (``{class name: entry}`` that earlier runs learned), ``path`` (the cache
    file, or None), ``data`` (rank 0: the file's contents, to add to and rewrite; else None),
    ``source`` (``"cache"``, ``"none"`` or ``"none (why)"``), ``seconds`` (the read's time)."""

    def __init__(self, calibration, learned, path, data, source, seconds):
        self.calibration, self.learned, self.path = calibration, learned, path
        self.data, self.source, self.seconds = data, source, seconds


def _looked_up(comm, force):
    """``(rank, payload)``: rank 0's look-up of this Comm's cache file (as if missing with
    ``force``), broadcast; a failure raises on every rank. Collective."""
    _planning.gate(comm)  # every rank is here: what follows is the calibration's own time
    rank = comm._dup.Get_rank()
    payload = None
    if rank == 0:
        try:
            payload = lookup(comm)
            if force and payload[0] == "cached":
                payload = ("probe", payload[1]["key"], None, payload[2], None)
        except Exception as e:  # noqa: BLE001 -- every rank must hear of it
            payload = ("error", f"{type(e).__name__}: {e}")
    _planning.gate(comm)
    payload = comm._dup.bcast(payload, root=0)
    if payload[0] == "error":
        raise ValueError(f"mtcoll calibration (rank 0, for rank {rank}): {payload[1]}")
    return rank, payload


def prior(comm, debug=False):
    """The :class:`Prior` of an mtcoll ``Comm`` (collective, no probe): rank 0 reads the cache
    file of this key (not with ``MTCOLL_CALIBRATE=refresh``) and broadcasts it."""
    start = time.perf_counter()
    rank, payload = _looked_up(comm, force=False)
    if payload[0] == "cached":
        _, data, path = payload
        cal = None
        if data.get("measured") and data.get("features"):
            cal = Calibration(data, path, "cache")
        pri = Prior(cal, dict(data.get("learned", {})), path, data if rank == 0 else None,
                    "cache", 0.0)
    else:
        _, k, _, path, why = payload
        pri = Prior(None, {}, path, {"key": k, "learned": {}} if rank == 0 else None,
                    "none" if why is None else f"none ({why})", 0.0)
    pri.seconds = time.perf_counter() - start
    if debug and rank == 0:
        print(f"mtcoll[rank 0]: auto prior from {pri.source}"
              + (f", {pri.path}" if pri.path else "")
              + f": calibration {'yes' if pri.calibration else 'no'}, "
              f"{len(pri.learned)} learned classes ({pri.seconds:.3f} s)",
              file=sys.stderr, flush=True)
    return pri


def calibrate(comm, debug=False, force=False):
    """The :class:`Calibration` of an mtcoll ``Comm`` by the full probe (collective): from the
    cache when it holds this key (not with ``force``), else by probing (and caching what was
    measured). Rank 0 decides; every rank gets the same. A ``Comm`` does not call it (its
    ``auto`` learns on the calls, :mod:`mtcoll.comm._learn`); ``python -m mtcoll --calibrate``
    does."""
    start = time.perf_counter()
    rank, payload = _looked_up(comm, force)
    if payload[0] == "cached":
        _, data, path = payload
        cal = Calibration(data, path, "cache")
    else:
        _, k, _, path, why = payload
        probing, comm._probing = comm._probing, True  # (its calls print no debug lines)
        try:
            data = _probe.run(comm, k)
        finally:
            comm._probing = probing
        cal = None
        if rank == 0:
            saved, why = store(path, data) if path is not None else (False, why)
            source = "probe" if saved else f"probe (not cached: {why})"
            cal = Calibration(data, path if saved else None, source)
        _planning.gate(comm)
        cal = comm._dup.bcast(cal, root=0)
    cal.seconds = time.perf_counter() - start  # what this Comm spent on it (rank 0's is printed)
    if debug and rank == 0:
        for line in cal.describe():
            print(f"mtcoll[rank 0]: calibration {line}", file=sys.stderr, flush=True)
    return cal
