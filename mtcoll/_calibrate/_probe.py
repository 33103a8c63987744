"""The probe behind the calibrated ``auto`` (see :mod:`mtcoll._calibrate`): which candidates it
times at which sizes, in which order, and how one batch of calls is timed."""

from __future__ import annotations

import math
import os
import time

import numpy as np

from ..comm import _planning
from ._fit import REF, features, link_terms

#: the smallest size the probe measures (bytes per rank, float32 elements)
SMALL = 16 * 1024
#: the largest size it measures, at most; and that size times the ranks at most
#: :data:`PROBE_BYTES`: 4 MiB up to 64 ranks (a 4 MiB call of 64 ranks on 2 cores takes
#: 0.2-0.3 s). Not less there: in the main job (64 ranks on 2 cores) the library wins up to
#: 1 MiB and rhd, MultiTree and ring2d win from 4 MiB (1.09-1.31x, 1.76-1.89x at 16 MiB), so a
#: point at 512 KiB, on the library's side of that crossing, sent 16 MiB to the library too.
LARGE = 4 * 1024 * 1024
PROBE_BYTES = 256 * 1024 * 1024
#: seconds the probe may take after its minimum (``MTCOLL_PROBE_SECONDS``)
BUDGET = 0.5
#: batches always measured, whatever the budget: the library, rhd and MultiTree at the
#: largest and the smallest size (each candidate's fixed cost and cost per byte)
MIN_BATCHES = 2
#: timed calls per probe point (after one untimed call); the point's time is their median
#: (one call in three that found a rank descheduled, 10-30x the others with more ranks than
#: cores, does not decide it), each call's time the mean over the ranks
REPEATS = 3
#: after two timed calls, a candidate whose fastest is this many times the slowest of the
#: batch's best is not timed again: it loses at this size by more than any noise
DOMINATED = 2.0
#: the mtcoll candidates in the order the probe reaches them: the fewest messages first (rhd:
#: 2 log2 N per rank), MultiTree (the topology-aware one), then the rest, timed (planned for
#: the links' speeds) first among them
ORDER = ("rhd", "multitree", "timed", "dbtree", "ring2d", "ring")


def probe_sizes(nranks):
    """``(small, mid, large)``: :data:`SMALL`, :data:`LARGE` halved until ``large * nranks``
    is at most :data:`PROBE_BYTES` (but not below ``16 * SMALL``), and their geometric middle
    (a power of two)."""
    large = LARGE
    while large > 16 * SMALL and large * nranks > PROBE_BYTES:
        large //= 2
    mid = 2 ** round((math.log2(SMALL) + math.log2(large)) / 2)
    return SMALL, int(mid), large


def probe_batches(nranks):
    """The probe's batches ``(nbytes, candidates)``, most telling first; the first
    :data:`MIN_BATCHES` are the minimum. Candidates that do not plan on the network are
    skipped when the probe reaches them."""
    small, mid, large = probe_sizes(nranks)
    core, rest = ["native", ORDER[0], ORDER[1]], list(ORDER[2:])
    return [(large, core), (small, core), (large, rest), (small, rest), (mid, core),
            (mid, rest)]


def dominated(calls, factor=None):
    """The candidates of ``calls`` (``{candidate: [seconds of each timed call]}``) whose
    fastest call took more than ``factor`` (:data:`DOMINATED`) times the slowest call of the
    candidate with the lowest median."""
    factor = DOMINATED if factor is None else factor
    timed = {a: v for a, v in calls.items() if v}
    if len(timed) < 2:
        return set()
    best = min(timed, key=lambda a: float(np.median(timed[a])))
    return {a for a, v in timed.items() if min(v) > factor * max(timed[best])}


def _barrier(comm):
    # the start line of a timed call. In sleep mode (more ranks than cores) the waiting ranks
    # sleep instead of spinning, which would starve the ranks still on their way to it
    if comm.wait == "sleep":
        from ..comm._progress import poll

        poll(comm._dup.Ibarrier().Test, sleep=True)
    else:
        comm._dup.Barrier()


def time_batch(comm, algorithms, nbytes, repeats=None):
    """``{candidate: seconds}`` of ``algorithms`` at ``nbytes``: through ``comm``'s own call
    path with the algorithm forced, one untimed call of each (first-use costs: layouts,
    scratch pages, the library's buffers), then up to ``repeats`` (:data:`REPEATS`) rounds of
    one timed call of each in turn, each from a barrier, so that a change in the machine's
    load falls on all of them alike. A call's time is the mean over the ranks (rank 0's own
    flattered the schedules: the rank that leaves the barrier last waits least for the
    others); a candidate's, the median of its calls. After the second round a
    :func:`dominated` candidate is not timed again. Collective."""
    from mpi4py import MPI

    from ..schedule import GATHER, REDUCE

    count = max(nbytes // 4, 1)
    send = np.ones(count, np.float32)
    recv = np.empty_like(send)
    n = REPEATS if repeats is None else repeats
    live = list(algorithms)
    calls = {a: [] for a in live}
    saved = comm.algorithm
    try:
        for a in live:
            comm.algorithm = a
            if a != "native":
                _planning.executor(comm, a).layout(count, 4, (REDUCE, GATHER))
            comm.Allreduce(send, recv, MPI.SUM)
        pending = []
        for rnd in range(n):
            for a in live:
                comm.algorithm = a
                _barrier(comm)
                t0 = time.perf_counter()
                comm.Allreduce(send, recv, MPI.SUM)
                pending.append((a, time.perf_counter() - t0))
            if rnd == 1 or rnd == n - 1:  # every rank learns the same times, and agrees
                # (in whole nanoseconds: an integer sum is the same on every rank, a floating
                # one need not be, and ranks disagreeing on who is dominated would hang)
                mine = np.array([round(t * 1e9) for _, t in pending], dtype=np.int64)
                total = np.empty_like(mine)
                comm._dup.Allreduce(mine, total, MPI.SUM)
                for (a, _), t in zip(pending, total / (1e9 * comm._dup.Get_size())):
                    calls[a].append(float(t))
                pending = []
                out = dominated(calls)
                live = [a for a in live if a not in out]
    finally:
        comm.algorithm = saved
    return {a: float(np.median(v)) if v else 0.0 for a, v in calls.items()}


def budget():
    """``MTCOLL_PROBE_SECONDS``, default :data:`BUDGET`."""
    raw = os.environ.get("MTCOLL_PROBE_SECONDS", "").strip()
    if not raw:
        return BUDGET
    try:
        v = float(raw)
    except ValueError:
        v = -1.0
    if not v >= 0:
        raise ValueError(f"environment variable MTCOLL_PROBE_SECONDS={raw!r} is not a "
                         f"non-negative number of seconds")
    return v


def _warm_engine():
    # the compiled engine's one-time load (numba and its cached kernel: seconds of CPU per
    # process, which a process's second schedule call would wait for), outside the points' timing
    from ..execute import _engine

    try:
        if _engine.engine_setting() == "compiled":
            _engine.warm()
    except Exception:  # noqa: BLE001 -- the calls then say why (MTCOLL_DEBUG)
        pass


def run(comm, k):
    """The probe (collective): every rank plans a candidate when the probe first reaches it
    (rank 0 plans, the rest receive; only those reached are planned), rank 0 computes the
    model's facts; every rank times the points. Rank 0 returns the calibration's data, the
    others None."""
    from ..simulate._native import native_schedule
    from ._cache import segmenting

    start = time.perf_counter()
    cpu = time.process_time()
    rank = comm._dup.Get_rank()
    net, seg = comm.network, segmenting(comm)
    _warm_engine()
    _planning.gate(comm)
    phases = {"engine": time.perf_counter() - start, "plan": 0.0, "model": 0.0}
    feats, planned, failed = {}, {"native"}, set()
    if rank == 0:  # MPICH's large-message algorithm: the one whose bytes count
        feats["native"] = {"native": True, "links": link_terms(native_schedule(net, REF), net)}

    def ready(a):  # collective; the same answer on every rank
        if a in planned or a in failed:
            return a in planned
        t0 = time.perf_counter()
        try:
            sched = comm.schedule(a)  # rank 0 plans, every rank gets it (or the error)
        except ValueError:
            failed.add(a)
            return False
        planned.add(a)
        t1 = time.perf_counter()
        if rank == 0:
            feats[a] = features(sched, net, seg)
        phases["plan"] += t1 - t0
        phases["model"] += time.perf_counter() - t1
        return True

    allowed = budget()
    counted = time.perf_counter()  # the budget: the probe's own time, not the engine's load
    measured = {}
    for done, (nbytes, names) in enumerate(probe_batches(comm._size), 1):
        algos = [a for a in names if ready(a)]
        if algos:
            times = time_batch(comm, algos, nbytes)
            if rank == 0:
                for a in algos:
                    measured.setdefault(a, []).append([nbytes, times[a]])
        go = done < MIN_BATCHES or time.perf_counter() - counted < allowed
        if not comm._dup.bcast(go, root=0):
            break
    # how loaded the machine was: a probe under load is marked as such in the cache
    share = comm._dup.allreduce((time.process_time() - cpu)
                                / max(time.perf_counter() - start, 1e-9)) / comm._size
    data = None
    if rank == 0:
        total = time.perf_counter() - start
        try:
            loadavg = list(os.getloadavg())
        except OSError:
            loadavg = None
        data = {"key": k, "features": {a: feats[a] for a in ["native", *ORDER] if a in feats},
                "measured": measured, "probe_seconds": total,
                "phases": {**phases, "points": total - sum(phases.values())},
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "load": {"loadavg": loadavg, "cpu_share": share}}
    return data
