"""What ``algorithm="auto"`` runs: every candidate's predicted time, calibrated on the
communicator it serves.

The candidates are the MPI library's own ``Allreduce`` (``"native"``) and every mtcoll
algorithm that plans on the communicator's network. Each has a cost model whose parameters a
short collective **probe** measures on that communicator, through the same calls users make
(the probe runs ``Comm.Allreduce`` with the algorithm forced, so a faster executor or a faster
MPI library shows up in what it measures). Rank 0 times the probe, fits the model and
broadcasts the result; :func:`mtcoll.comm.choose` is then a pure function of it, the same on
every rank.

The model
---------
For an mtcoll algorithm ``a`` on a buffer of ``n`` bytes (per rank)::

    t_a(n) = sigma * S_a + mu * M_a(n) + beta * X_a * n + lam * L_a(n)

``S_a`` its schedule's steps (both phases), ``M_a(n)`` the messages its busiest rank sends and
receives (each transfer cut into segments as the executor cuts it), ``X_a`` the bytes that rank
sends and receives per byte of buffer, and ``L_a(n)`` the schedule's time on the network's links
(:func:`link_terms`: per step, the longest route's latency and the busiest link's bytes, so
multi-hop routes and transfers sharing a link, contention, both count). For the MPI library::

    t_native(n) = a + b * n + lam * L_native(n)

with ``L_native`` the same of :mod:`mtcoll.simulate._native`'s model of MPICH's algorithm.
The executor's ``sigma, mu, beta, lam`` and the library's ``a, b, lam`` are fitted (least
squares on relative error, non-negative, the fewest terms that fit within 10 %, bytes before
links on a tie) to the probe's measurements. On top of the model,
every candidate the probe measured carries a **correction**: measured / modelled at each probe
size, interpolated in log(size), held constant below the smallest, and added (measured minus
modelled, a fixed cost) above the largest, where the model's own growth carries on; an mtcoll
algorithm the probe did not measure takes the geometric mean of the measured ones' corrections.

``auto`` takes the fastest predicted candidate **among those the probe measured near that size**
(within a factor :data:`REACH`, or at its largest size for larger calls; below the smallest
size's reach, the MPI library alone), and an mtcoll
algorithm only if it beats the MPI library's prediction by :data:`MARGIN`. A shared-memory
machine with more ranks than cores is not a network of links (its cost is CPU and scheduling,
which the terms above only approximate), so there the choice rests on the measured candidates'
own times; the model carries them between and beyond the probe's sizes, and says where
messages are the cost (:meth:`Calibration.message_share`): where they are, the probe's
algorithm with the fewest messages, or the library, wins. On a network whose links are the
bottleneck the links term does the telling, and the probe measures MultiTree at the largest
size, where it would win.

The probe
---------
Sizes :data:`PROBE_SIZES`; batches in :func:`probe_batches`' order: the MPI library, the
mtcoll algorithm with the fewest messages (rhd) and MultiTree at the largest size; the library
and rhd at the smallest (these five points are the minimum); then the middle size, MultiTree
small, the rest of :data:`ORDER`; then all of them once more, each point keeping its faster
time. A candidate is planned when the probe first reaches it (so a short budget plans little);
candidates never reached are not candidates of this calibration. A batch's candidates are
measured together: one untimed call of each, then
:data:`REPEATS` rounds of one call of each in turn, each call between a barrier and the end of
rank 0's call; a point's time is the mean of its timed calls. The probe stops after
:data:`MIN_POINTS` points once :data:`BUDGET` seconds (``MTCOLL_PROBE_SECONDS``) are spent.

The cache
---------
One JSON file per key, in :func:`cache_dir` (``MTCOLL_CACHE_DIR``, else
``$XDG_CACHE_HOME/mtcoll``, else ``~/.cache/mtcoll``). The key: rank count, host layout (how
many ranks share each host, in rank order), the MPI library's version line, the mtcoll version
and a hash of the executor's code (:func:`engine_id`: a faster engine measures anew), the
network spec, the wait mode and segmenting, and the machine (CPU count and architecture of
rank 0's host). A missing, unreadable or read-only cache directory costs a probe per Comm,
never an error (``MTCOLL_DEBUG`` says why). ``MTCOLL_CALIBRATE=off`` turns calibration off
(``auto`` then follows the built-in rule of :func:`mtcoll.comm.choose`); ``refresh`` probes
again and rewrites the cache.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
import sys
import time
from itertools import combinations
from pathlib import Path

import numpy as np

__all__ = ["Calibration", "cache_dir", "cache_path", "engine_id", "key", "calibrate",
           "probe_batches", "ORDER", "mode", "PROBE_SIZES", "BUDGET", "MIN_POINTS", "FORMAT"]

FORMAT = 1
#: bytes per rank the probe measures at (float32 elements)
PROBE_SIZES = (16 * 1024, 256 * 1024, 4 * 1024 * 1024)
#: seconds the probe may take (``MTCOLL_PROBE_SECONDS``); it always measures MIN_POINTS points
BUDGET = 0.5
MIN_POINTS = 5
#: an mtcoll algorithm is chosen over the MPI library only if predicted this much faster.
#: Generous on purpose: a probe is a few calls, and on a machine whose ranks share cores the
#: same call's time moves by more than 5 % from one minute to the next (docs/performance.md),
#: while the gains auto exists for (MultiTree on contended links: 3-5x) are far above it.
MARGIN = 0.25
#: a candidate measured at s bytes may be chosen for calls of s / REACH to s * REACH bytes
REACH = 16
#: timed calls per probe point (after one untimed call); the point's time is their median
#: (one call in three that found a rank descheduled, 10-30x the others with more ranks than
#: cores, does not decide it), averaged over the ranks
REPEATS = 3
_OFF = ("off", "none", "0", "false", "no")
_EXEC_TERMS = ("steps", "messages", "bytes", "links")
_NATIVE_TERMS = ("call", "bytes", "links")
_REF = 1 << 20  # bytes at which the link replay's slope is taken


# -- where, and under which key --------------------------------------------------------------

def mode():
    """``"on"``, ``"off"`` or ``"refresh"``, from ``MTCOLL_CALIBRATE`` (default on)."""
    raw = os.environ.get("MTCOLL_CALIBRATE", "").strip().lower()
    if raw in _OFF:
        return "off"
    if raw == "refresh":
        return "refresh"
    if raw in ("", "on", "1", "yes", "true"):
        return "on"
    raise ValueError(f"environment variable MTCOLL_CALIBRATE={raw!r} is not one of on, off, "
                     f"refresh")


def cache_dir():
    """``MTCOLL_CACHE_DIR``, else ``$XDG_CACHE_HOME/mtcoll``, else ``~/.cache/mtcoll``."""
    env = os.environ.get("MTCOLL_CACHE_DIR", "").strip()
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base) if base else Path.home() / ".cache") / "mtcoll"


@functools.lru_cache(maxsize=1)
def engine_id():
    """A hash of the code a call runs through (the executor, the requests and progress, the
    communicator's call path): any change to it, a compiled engine included, measures anew."""
    pkg = Path(__file__).resolve().parent
    h = hashlib.sha1(_version().encode())
    files = sorted(pkg.glob("*.py")) + sorted(pkg.glob("_*/**/*.py")) \
        + sorted(pkg.glob("execute/**/*.py"))
    for p in files:
        if p.name in ("__main__.py", "_cli.py", "_tuning.py"):
            continue
        try:
            h.update(p.name.encode() + p.read_bytes())
        except OSError:
            pass
    return h.hexdigest()[:16]


def key(nranks, layout, network, wait, segmenting):
    """The facts a calibration is valid for (see the module notes), as a dict."""
    from mpi4py import MPI

    return {"format": FORMAT, "nranks": int(nranks), "hosts": [int(x) for x in layout],
            "mpi_library": " ".join(MPI.Get_library_version().splitlines()[0].split()),
            "mtcoll": _version(), "engine": engine_id(), "network": str(network),
            "wait": str(wait), "segmenting": [int(x) for x in segmenting],
            "machine": [os.cpu_count() or 0, platform.machine()]}


def _version():
    from importlib import metadata

    try:
        return metadata.version("mtcoll")
    except metadata.PackageNotFoundError:
        return "unknown"


def segmenting(comm):
    """``(segment_bytes, max_segments)`` the Comm's executors cut transfers by."""
    from . import execute

    sleep = comm.wait == "sleep"
    seg = comm.segment_bytes or (execute.SLEEP_SEGMENT_BYTES if sleep else execute.SEGMENT_BYTES)
    nseg = comm.max_segments or (execute.SLEEP_MAX_SEGMENTS if sleep else execute.MAX_SEGMENTS)
    return int(seg), int(nseg)


def cache_path(k):
    """The cache file of key ``k``."""
    digest = hashlib.sha1(json.dumps(k, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / f"calibration-{k['nranks']}r-{digest}.json"


def host_layout(leaders):
    """Ranks per host, hosts in order of their lowest rank (``host_leaders``' output)."""
    counts = {}
    for lead in leaders:
        counts[lead] = counts.get(lead, 0) + 1
    return [counts[lead] for lead in sorted(counts)]


# -- the model --------------------------------------------------------------------------------

def features(schedule, network, segmenting):
    """The schedule facts the model needs, as a JSON-able dict (see the module notes)."""
    n = schedule.nranks
    load = np.bincount(schedule.src, minlength=n) + np.bincount(schedule.dst, minlength=n)
    busiest = int(np.argmax(load))
    mine = (schedule.src == busiest) | (schedule.dst == busiest)
    frac = (schedule.hi[mine] - schedule.lo[mine]) / float(schedule.nchunks)
    links = link_terms(schedule, network)
    return {"steps": int(sum(schedule.steps)), "fractions": [float(f) for f in frac],
            "bytes": float(frac.sum()), "links": links,
            "segmenting": [int(x) for x in segmenting], "transfers": int(schedule.ntransfers)}


def link_terms(schedule, network):
    """``[l0, l1]``: the schedule's time on the network's links, ``l0 + l1 * nbytes``, step by
    step: each step takes its longest route's latency plus the bytes of its busiest link (every
    transfer of the step that crosses a link loads it: contention and multi-hop routes both
    count) over that link's bandwidth. The step-synchronous bound of
    :func:`mtcoll.simulate.simulate`'s replay, in milliseconds instead of a replay."""
    from .plan._graph import route_ids

    if schedule.ntransfers == 0:
        return [0.0, 0.0]
    q, ptr, rl = route_ids(schedule, network)
    first, lens = ptr[q], ptr[q + 1] - ptr[q]
    tid = np.repeat(np.arange(schedule.ntransfers), lens)
    starts = np.cumsum(lens) - lens
    links = rl[np.repeat(first, lens) + np.arange(int(lens.sum())) - np.repeat(starts, lens)]
    key = schedule.phase.astype(np.int64) * (int(schedule.step.max()) + 1) + schedule.step
    _, k = np.unique(key, return_inverse=True)
    k = k.ravel()
    nsteps, nlinks = int(k.max()) + 1, int(network.nlinks)
    frac = (schedule.hi - schedule.lo) / float(schedule.nchunks)
    load = np.zeros(nsteps * nlinks)
    np.add.at(load, k[tid] * nlinks + links, frac[tid] / network.bandwidth[links])
    lat = np.zeros(schedule.ntransfers)
    np.add.at(lat, tid, network.latency[links])
    step_lat = np.zeros(nsteps)
    np.maximum.at(step_lat, k, lat)
    return [float(step_lat.sum()), float(load.reshape(nsteps, nlinks).max(axis=1).sum())]


def _row(feat, nbytes):
    if feat.get("native"):
        l0, l1 = feat["links"]
        return np.array([1.0, float(nbytes), l0 + l1 * nbytes])
    seg, nseg = feat["segmenting"]
    piece = np.asarray(feat["fractions"]) * nbytes
    msgs = np.clip(np.ceil(piece / seg), 1, nseg).sum()
    l0, l1 = feat["links"]
    return np.array([float(feat["steps"]), float(msgs), feat["bytes"] * nbytes,
                     l0 + l1 * nbytes])


def _nnls(a, y, tol=0.1):
    """Non-negative least squares on relative error, by trying every subset of columns (at
    most four): the fewest columns whose RMS relative error is within ``tol`` (the probe's own
    noise; more columns would fit the noise), the lowest error among those, earlier columns
    first on a tie; else the best fit of all."""
    w = 1.0 / np.maximum(y, 1e-12)
    aw, yw = a * w[:, None], y * w
    best, best_res = np.zeros(a.shape[1]), float(yw @ yw)
    for k in range(1, a.shape[1] + 1):
        for cols in combinations(range(a.shape[1]), k):
            sub = aw[:, cols]
            if not np.any(sub):
                continue
            x, *_ = np.linalg.lstsq(sub, yw, rcond=None)
            if np.any(x < 0):
                continue
            full = np.zeros(a.shape[1])
            full[list(cols)] = x
            r = yw - aw @ full
            res = float(r @ r)
            if res < best_res * (1 - 1e-6) - 1e-12:  # (exact fits tie: the earlier stays)
                best, best_res = full, res
        if best_res <= tol * tol * len(y):
            break
    return best


class Calibration:
    """A fitted model: per candidate, its predicted time at any size.

    Built from the JSON-able ``data`` that :func:`calibrate` broadcasts and caches: ``key``,
    ``features`` (per candidate), ``measured`` (per candidate, ``[[nbytes, seconds], ...]``),
    ``probe_seconds``, ``created``. Everything else is derived here, the same on every rank.
    """

    def __init__(self, data, path=None, source="probe"):
        self.data = data
        self.path = path  # the cache file, or None
        self.source = source  # "probe", "cache", or "probe (not cached: why)"
        self.seconds = None  # what obtaining it took this Comm (cache read or probe)
        feats = data["features"]
        meas = {}
        for a, pts in data["measured"].items():  # a point measured twice: its faster time
            best = {}
            for b, t in pts:
                best[int(b)] = min(float(t), best.get(int(b), math.inf))
            meas[a] = sorted(best.items())
        self.candidates = list(feats)
        self.params = {}
        for engine, terms in (("executor", _EXEC_TERMS), ("native", _NATIVE_TERMS)):
            rows, ys = [], []
            for a, pts in meas.items():
                if bool(feats[a].get("native")) != (engine == "native"):
                    continue
                for b, t in pts:
                    rows.append(_row(feats[a], b))
                    ys.append(t)
            x = _nnls(np.array(rows), np.array(ys)) if rows else np.zeros(len(terms))
            self.params[engine] = x
        self._corr = {}
        for a, pts in meas.items():
            sizes = np.log([max(b, 1) for b, _ in sorted(pts)])
            ratio = [math.log(max(t, 1e-9) / max(self.model(a, b), 1e-9)) for b, t in sorted(pts)]
            self._corr[a] = (sizes, np.array(ratio))
        self._top = {a: max(pts) for a, pts in meas.items()}  # (largest size, its time)
        self._cache = {}

    def model(self, algorithm, nbytes):
        """The fitted model's time (seconds) before any correction."""
        feat = self.data["features"][algorithm]
        x = self.params["native" if feat.get("native") else "executor"]
        return float(_row(feat, nbytes) @ x)

    def predict(self, nbytes):
        """``{candidate: predicted seconds}`` for a call of ``nbytes`` bytes per rank."""
        x = math.log(max(nbytes, 1))
        logc = {a: float(np.interp(x, *c)) for a, c in self._corr.items()}
        # an executor candidate the probe did not measure takes the mean correction of those
        # it did: what the model gets wrong about this executor on this machine
        measured = [v for a, v in logc.items() if not self.data["features"][a].get("native")]
        mean = sum(measured) / len(measured) if measured else 0.0
        out = {}
        for a in self.candidates:
            t = self.model(a, nbytes)
            top = self._top.get(a)
            if top is not None and nbytes > top[0]:
                # above its largest measured size the misfit is carried as a constant (the
                # call's fixed cost), not as a factor on the bytes still to come
                out[a] = max(t + top[1] - self.model(a, top[0]), top[1])
            else:
                out[a] = t * math.exp(logc.get(a, 0.0 if a == "native" else mean))
        return out

    def choose(self, nbytes):
        """``(algorithm, why)``: the fastest predicted candidate and the prediction (cached per
        size). Only candidates the probe measured within a factor :data:`REACH` of this size
        are chosen (or at its largest size, for a larger call; below the probe's reach only
        the MPI library): the model alone is not trusted to rank a candidate it never saw run at about
        this size here; the others are predicted, for the record. An mtcoll
        algorithm must beat the MPI library's prediction by :data:`MARGIN`: within the model's
        error, the library's own call is the safer bet."""
        got = self._cache.get(nbytes)
        if got is None:
            pred = self.predict(nbytes)
            ok = [a for a in self.candidates if self._measured_near(a, nbytes)] \
                or self.candidates
            best = min(ok, key=lambda a: (pred[a] * (1 + MARGIN) if a != "native" else
                                          pred[a], self.candidates.index(a)))
            parts = []
            for a in sorted(pred, key=pred.get):
                share = self.message_share(a, nbytes)
                notes = ([] if share is None else [f"{share:.0%} messages"]) \
                    + ([] if a in ok else ["not measured near this size"])
                parts.append(f"{a} {pred[a] * 1e3:.3g}ms"
                             + (f" ({', '.join(notes)})" if notes else ""))
            got = (best, "calibrated: " + ", ".join(parts))
            if len(self._cache) < 1024:
                self._cache[nbytes] = got
        return got

    def _measured_near(self, algorithm, nbytes):
        # measured within a factor REACH of nbytes, or at the probe's largest size for calls
        # above every probe size; below the probe's reach only the MPI library: a call that
        # small is latency, where one library call beats any schedule of messages posted from
        # Python, and the model's fixed costs, fitted at 16 KiB and up, cannot rank it (a
        # quiet 2-rank run chose MultiTree at 8 B: 57 us against the library's 2 us)
        corr = self._corr.get(algorithm)
        if corr is None:
            return False
        sizes = np.exp(corr[0])
        near = np.any((sizes * REACH >= nbytes) & (sizes <= nbytes * REACH))
        return bool(near or (nbytes >= max(PROBE_SIZES) and sizes.max() >= max(PROBE_SIZES))
                    or (algorithm == "native" and nbytes <= min(PROBE_SIZES)))

    def message_share(self, algorithm, nbytes):
        """For an mtcoll algorithm, the part of its modelled time that is per-step and
        per-message cost (None for the MPI library): where this is large, messages are the
        cost, and auto picks an algorithm that sends fewer (or the library)."""
        feat = self.data["features"][algorithm]
        if feat.get("native"):
            return None
        terms = _row(feat, nbytes) * self.params["executor"]
        total = terms.sum()
        return float((terms[0] + terms[1]) / total) if total > 0 else None

    def describe(self):
        """Lines for ``--info`` and the debug trace."""
        d = self.data
        ex = ", ".join(f"{t}={v:.3g}" for t, v in zip(_EXEC_TERMS, self.params["executor"]))
        na = ", ".join(f"{t}={v:.3g}" for t, v in zip(_NATIVE_TERMS, self.params["native"]))
        ph = ", ".join(f"{k} {v:.3f} s" for k, v in d.get("phases", {}).items())
        took = "" if self.seconds is None else f" (this time: {self.seconds:.3f} s)"
        lines = [f"source {self.source}" + (f", {self.path}" if self.path else "") + took,
                 f"probe {d['probe_seconds']:.3f} s ({ph}) at {d['created']}, "
                 f"{sum(len(v) for v in d['measured'].values())} points",
                 f"executor: {ex}", f"native: {na}"]
        for a, pts in d["measured"].items():
            lines.append(f"measured {a}: " + ", ".join(f"{b} B {t * 1e3:.3g} ms" for b, t in pts))
        return lines


# -- the probe --------------------------------------------------------------------------------

#: the mtcoll candidates in the order the probe reaches them: the fewest messages first (rhd:
#: 2 log2 N per rank), MultiTree (the topology-aware one), then the rest
ORDER = ("rhd", "multitree", "dbtree", "ring2d", "ring")


def probe_batches():
    """The probe's batches ``(nbytes, candidates)``, most telling first (see the module notes);
    the first two are the minimum. Candidates that do not plan on the network are skipped
    when the probe reaches them."""
    small, mid, large = PROBE_SIZES
    lean, tree, rest = ORDER[0], ORDER[1], list(ORDER[2:])
    once = [(large, ["native", lean, tree]), (small, ["native", lean]), (mid, ["native", lean]),
            (small, [tree]), (large, rest), (small, rest)]
    return once + once  # a second pass, where the budget allows, keeps each point's faster time


def _time_batch(comm, algorithms, nbytes, repeats=None):
    """The mean of ``repeats`` (:data:`REPEATS`) timed ``Allreduce`` calls of each of
    ``algorithms``, through ``comm``'s own call path with the algorithm forced, after one
    untimed call of each (first-use costs: scratch pages, the library's buffers). The timed
    calls go round the algorithms in turn, so that a change in the machine's load falls on all
    of them alike. Every rank calls; the time is the mean over the ranks. The mean, not the fastest: with more
    ranks than cores the library's own waits make its times spread far more than the
    executor's (a fastest call would flatter it), and the mean is what a user's calls cost."""
    from mpi4py import MPI

    from .schedule import GATHER, REDUCE

    count = max(nbytes // 4, 1)
    send = np.ones(count, np.float32)
    recv = np.empty_like(send)
    total = {a: [] for a in algorithms}
    n = REPEATS if repeats is None else repeats
    saved = comm.algorithm
    try:
        for rnd in range(1 + n):
            for a in algorithms:
                comm.algorithm = a  # (the fast path follows: the library's calls take it)
                if rnd == 0:
                    if a != "native":
                        comm._executor(a).layout(count, 4, (REDUCE, GATHER))
                    comm.Allreduce(send, recv, MPI.SUM)
                    continue
                comm._dup.Barrier()
                t0 = time.perf_counter()
                comm.Allreduce(send, recv, MPI.SUM)
                total[a].append(time.perf_counter() - t0)
    finally:
        comm.algorithm = saved
    # the mean over the ranks, as mtcoll.bench reports: rank 0's own times alone flattered the
    # schedules (8 ranks on 2 cores: ring at 16 KiB 0.17 ms on rank 0, 1.7 ms per call in the
    # benchmark), since the rank that leaves the Barrier last waits least for the others
    mine = np.array([float(np.median(total[a])) if total[a] else 0.0 for a in algorithms])
    mean = np.empty_like(mine)
    comm._dup.Allreduce(mine, mean, MPI.SUM)
    return {a: float(t) / comm._dup.Get_size() for a, t in zip(algorithms, mean)}


def calibrate(comm, debug=False):
    """The :class:`Calibration` of an mtcoll ``Comm`` (collective): from the cache when it
    holds this key, else by probing (and caching what was measured). Rank 0 decides; every
    rank gets the same."""
    comm._gate()  # every rank is here: what follows is the calibration's own time
    start = time.perf_counter()
    rank = comm._dup.Get_rank()
    payload = None
    if rank == 0:
        try:
            payload = _lookup(comm)
        except Exception as e:  # noqa: BLE001 -- every rank must hear of it
            payload = ("error", f"{type(e).__name__}: {e}")
    comm._gate()
    payload = comm._dup.bcast(payload, root=0)
    if payload[0] == "error":
        raise ValueError(f"mtcoll calibration (rank 0, for rank {rank}): {payload[1]}")
    if payload[0] == "cached":
        _, data, path = payload
        cal = Calibration(data, path, "cache")
    else:
        _, k, feats, path, why = payload
        data = _probe(comm, k, feats)
        cal = None
        if rank == 0:
            saved, why = _store(path, data) if path is not None else (False, why)
            source = "probe" if saved else f"probe (not cached: {why})"
            cal = Calibration(data, path if saved else None, source)
        comm._gate()
        cal = comm._dup.bcast(cal, root=0)
    cal.seconds = time.perf_counter() - start  # what this Comm spent on it (rank 0's is printed)
    if debug and rank == 0:
        for line in cal.describe():
            print(f"mtcoll[rank 0]: calibration {line}", file=sys.stderr, flush=True)
    return cal


def _lookup(comm):
    # rank 0: ("cached", data, path) or ("probe", key, features, path or None, why)
    seg = segmenting(comm)
    k = key(comm._size, host_layout(comm._leaders), comm.network.spec, comm.wait, seg)
    path, why = None, None
    try:
        path = cache_path(k)
    except (OSError, RuntimeError) as e:  # no home directory, say
        why = f"no cache directory: {e}"
    if path is not None and mode() != "refresh":
        try:
            data = json.loads(path.read_text())
            if data.get("key") == k:
                return ("cached", data, str(path))
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            why = f"unreadable {path}: {e}"
    return ("probe", k, None, None if path is None else str(path), why)


def _probe(comm, k, feats):
    # collective: every rank plans a candidate when the probe first reaches it (rank 0 plans,
    # the rest receive; only those reached are planned), rank 0 computes the model's facts and
    # times the points
    from .simulate._native import native_schedule

    start = time.perf_counter()
    rank = comm._dup.Get_rank()
    net, seg = comm.network, segmenting(comm)
    phases = {"plan": 0.0, "model": 0.0}
    feats, planned, failed = {}, {"native"}, set()
    if rank == 0:  # MPICH's large-message algorithm: the one whose bytes count
        feats["native"] = {"native": True, "links": link_terms(native_schedule(net, _REF), net)}

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

    budget = _budget()
    measured = {}
    done = 0
    for nbytes, names in probe_batches():
        algos = [a for a in names if ready(a)]
        if not algos:
            continue
        times = _time_batch(comm, algos, nbytes)
        done += len(algos)
        go = None
        if rank == 0:
            for a in algos:
                measured.setdefault(a, []).append([nbytes, times[a]])
            go = done < MIN_POINTS or time.perf_counter() - start < budget
        if not comm._dup.bcast(go, root=0):
            break
    data = None
    if rank == 0:
        total = time.perf_counter() - start
        data = {"key": k, "features": {a: feats[a] for a in ["native", *ORDER] if a in feats},
                "measured": measured, "probe_seconds": total,
                "phases": {**phases, "points": total - sum(phases.values())},
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return data


def _budget():
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


def _store(path, data):
    # (saved, why not): a read-only or missing directory costs the cache, never the call
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
        return True, None
    except OSError as e:
        return False, f"{type(e).__name__}: {e}"
