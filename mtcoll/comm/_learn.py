"""``algorithm="auto"`` that learns from the calls it runs.

How a class is decided
    A call's **class** is its size class (the power of two at or above its bytes per rank),
    dtype and op; ``Allreduce`` and ``Iallreduce`` of a class share it. The **prior** (the
    cached calibration or what earlier runs learned, :func:`mtcoll._calibrate.prior`; without
    either, the built-in rule) names the class's **candidates** at its first call
    (:meth:`Learner.candidates`): the MPI library (``"native"``) always, so that a prior that
    over-predicts the library is caught, plus the mtcoll algorithms the prior cannot separate
    from the best (predicted within :data:`SPREAD`, at most :data:`MAX_OTHERS`). A class with
    the library alone is settled at once. Otherwise its first ``(1 + ROUNDS) * len(candidates)``
    calls run the candidates in turn, round after round (a change in the machine's load falls
    on all of them alike); the first round is not timed (first-use costs: planning, layouts).
    A blocking trial call is timed as it runs. A timed ``Iallreduce`` is timed from its start to
    its completion as it runs among the program's other calls (the progress thread or a
    ``Wait`` stamps it; the library's request is handed back wrapped in one of mtcoll's so that
    its completion is seen): waited for alone, the library's call would be priced as a lone
    blocking wait, while a gradient step's requests progress together inside one ``Waitall``.
    (Without the progress thread it is waited for where it starts and a completed request
    returned.)

    At the last trial call, which every rank reaches at the same call, the timed calls still
    running are finished (not freed) and the ranks add up their times (one ``Allreduce`` of
    integer nanoseconds on mtcoll's private communicator, after the calls in flight are
    finished): a trial call's time is the mean over the ranks, a
    candidate's the median of its calls. The fastest wins; an mtcoll algorithm must beat the
    library by :data:`MARGIN`. The same integers on every rank give the same choice on every
    rank. Rank 0 then records the class in the cache file (the next run's prior), with the
    load average and the ranks' CPU share during the trial.

Once settled
    A class settled on the library goes to the fast path (``Comm._fast``): not observed, no
    cost. A class settled on an mtcoll algorithm times every :data:`SAMPLE`-th call (like a
    trial call); every :data:`WINDOW` samples the ranks add them up
    as above (the same call on every rank), and when their median is outside
    ``[settled / DRIFT, settled * DRIFT]`` the class is measured again on the next calls.

:data:`timing` is the test hook: when set, ``timing(rank, algorithm, nbytes, seconds)``
replaces each measured time.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
from mpi4py import MPI

from . import _dispatch, _planning
from ._dispatch import fast_key

#: timed rounds of the candidates in a class's trial (after one untimed round)
ROUNDS = 3
#: the mtcoll algorithms a prior predicts within this factor of the best are tried
SPREAD = 3.0
#: at most this many mtcoll algorithms are tried beside the library
MAX_OTHERS = 2
#: an mtcoll algorithm is chosen over the library only if this much faster on the real calls
MARGIN = 0.05
#: a settled class on an mtcoll algorithm times one call in this many
SAMPLE = 16
#: samples per comparison with the settled time
WINDOW = 8
#: observed / settled outside [1 / DRIFT, DRIFT]: measured again
DRIFT = 1.5
#: without a prior, calls below this many bytes are the library's alone (latency: one library
#: call beats any schedule of messages posted from Python)
SMALL = 16 * 1024
#: the mtcoll algorithms tried without a prior, in order
DEFAULT_OTHERS = ("rhd", "multitree")
#: the test hook (see the module notes)
timing = None


def size_class(nbytes):
    """The power of two at or above ``nbytes`` (1 for 0 and 1)."""
    return 1 << max(int(nbytes) - 1, 0).bit_length()


def class_name(key):
    """``"<bytes>B:<dtype>:<op>"`` of a class key, as the cache and ``--info`` name it."""
    b, dt, op = key
    return f"{b}B:{dt}:{op}"


class _Class:
    __slots__ = ("cands", "calls", "times", "state", "choice", "settled", "predicted",
                 "decided_by", "samples", "observed", "since", "cpu0", "wall0", "relearned",
                 "medians", "inflight")

    def __init__(self, cands, predicted):
        self.cands = cands
        self.predicted = predicted  # {candidate: the prior's seconds}, or {}
        self.relearned = 0
        self.observed = None
        self._reset()

    def _reset(self):
        self.calls = 0  # calls of this class since its trial began
        self.times = {a: [] for a in self.cands}
        self.state = "settled" if len(self.cands) == 1 else "trial"
        self.choice = self.cands[0] if len(self.cands) == 1 else None
        self.settled = None
        self.decided_by = 0
        self.samples = []
        self.inflight = []  # (algorithm, t0, request, stamp) of timed Iallreduce calls running
        self.since = 0
        self.medians = {}
        self.cpu0 = self.wall0 = None


class Learner:
    """The learning state of one :class:`mtcoll.Comm` with ``algorithm="auto"``: its classes,
    its prior. Every rank holds the same state (same calls, same integers)."""

    def __init__(self, comm, prior):
        self.comm = comm
        self.calibration = prior.calibration
        self.learned = prior.learned  # {class name: entry} from the cache file
        self.path = prior.path  # the cache file rank 0 writes (None: not cached)
        self.data = prior.data  # rank 0: the file's contents to rewrite
        self.source = prior.source
        self.classes = {}
        self.pending = None  # (class, algorithm, timed) of the call being started

    # -- choosing -------------------------------------------------------------------------------

    def candidates(self, c):
        """``(candidates, predicted)`` of the class of call ``c`` (collective at the class's
        first call: a candidate not planned yet is planned)."""
        key = self.key(c)
        name = class_name(key)
        comm = self.comm
        predicted = {}
        entry = self.learned.get(name)
        if entry is not None:
            order = ["native", entry["algorithm"]]
            predicted = {entry["algorithm"]: float(entry["seconds"])}
        elif self.calibration is not None:
            cal = self.calibration
            predicted = cal.predict(key[0])
            near = [a for a in cal.candidates
                    if a != "native" and cal._measured_near(a, key[0])]
            best = min([predicted[a] for a in near] + [predicted["native"]])
            others = sorted((a for a in near if predicted[a] <= SPREAD * best),
                            key=lambda a: predicted[a])[:MAX_OTHERS]
            order = ["native", *others]
        else:
            order = ["native"] + (list(DEFAULT_OTHERS) if key[0] >= SMALL else [])
        cands = []
        for a in dict.fromkeys(order):
            if a == "native":
                cands.append(a)
                continue
            try:
                # collective, the same verdict everywhere; the part
                _planning.rank_schedule(comm, a)
                # the trial calls then run (the whole Schedule would be a second plan)
            except ValueError:
                continue
            cands.append(a)
        return cands, predicted

    @staticmethod
    def key(c):
        return (size_class(c.nbytes), c.dtype.name, _op_name(c.op))

    def choose(self, c):
        """``(algorithm, why)`` for call ``c`` (an Allreduce or Iallreduce the executor could
        run); sets :attr:`pending` when the call is to be timed."""
        key = self.key(c)
        cl = self.classes.get(key)
        if cl is None:
            cands, predicted = self.candidates(c)
            cl = self.classes[key] = _Class(cands, predicted)
            if cl.state == "settled":
                cl.decided_by = 0
        n = len(cl.cands)
        if cl.state == "trial":
            i = cl.calls
            cl.calls += 1
            algo = cl.cands[i % n]
            if i == 0:
                cl.cpu0, cl.wall0 = time.process_time(), time.perf_counter()
            # every trial call is waited for where it starts; the first round is not timed
            self.pending = (key, algo, i >= n, fast_key(c))
            why = f"learning: call {i + 1} of {(1 + ROUNDS) * n} trying {', '.join(cl.cands)}"
            return algo, why + self._prior_note(cl)
        cl.calls += 1
        if cl.choice != "native":
            cl.since += 1
            if cl.since % SAMPLE == 0:
                self.pending = (key, cl.choice, True, fast_key(c))
        return cl.choice, self.describe(key, cl)

    def _prior_note(self, cl):
        if not cl.predicted:
            return " (prior: built-in rule)"
        return " (prior: " + ", ".join(f"{a} {t * 1e3:.3g}ms" for a, t in
                                       sorted(cl.predicted.items(), key=lambda x: x[1])) + ")"

    def describe(self, key, cl):
        """The debug line's account of a settled class."""
        pred = cl.predicted.get(cl.choice)
        parts = [f"learned: {cl.choice}"]
        if pred is not None:
            parts.append(f"predicted {pred * 1e3:.3g}ms")
        if cl.settled is not None:
            parts.append(f"measured {cl.settled * 1e3:.3g}ms")
        if cl.observed is not None:
            parts.append(f"observed {cl.observed * 1e3:.3g}ms")
        parts.append(f"decided by {cl.decided_by} calls" if cl.decided_by else
                     "the only candidate")
        return ", ".join(parts) + (self._prior_note(cl) if cl.predicted else "")

    # -- measuring ------------------------------------------------------------------------------

    def record(self, pending, seconds):
        """A waited-for call of ``pending`` took ``seconds`` here; decide when due (collective
        at the same call on every rank)."""
        key, algo, timed, fast = pending
        cl = self.classes[key]
        if timed:
            seconds = self._timed(algo, fast[0], seconds)
            (cl.times[algo] if cl.state == "trial" else cl.samples).append(seconds)
        self._due(key, cl)

    def started(self, pending, t0, request, stamp):
        """A timed ``Iallreduce`` of ``pending`` started at ``t0`` runs; ``stamp[0]`` will be
        the time it completed. Decide when due."""
        key, algo, timed, fast = pending
        cl = self.classes[key]
        cl.inflight.append((algo, fast[0], t0, request, stamp))
        self._due(key, cl)

    def _timed(self, algo, nbytes, seconds):
        return seconds if timing is None else float(timing(self.comm._rank, algo, nbytes,
                                                           seconds))

    def _due(self, key, cl):
        # the same decision on every rank: the counts are the same
        if cl.state == "trial":
            if cl.calls == (1 + ROUNDS) * len(cl.cands):
                self._collect(cl)
                self._settle(key, cl)
        elif len(cl.samples) + len(cl.inflight) >= WINDOW:
            self._collect(cl)
            self._compare(key, cl)

    def _collect(self, cl):
        # the running timed calls, finished (not freed: the caller's Wait or Waitall frees
        # them) and their times taken, start to completion
        from ._progress import LOCK, poll, unwatch

        def test(r):
            # under the lock, as the progress thread tests it (a Wait outside the lock on the
            # library's request would race the thread's Test, which frees it)
            with LOCK:
                if not r._complete and r._native.Test():
                    unwatch(r)
                    r._finish()
                return r._complete

        for algo, nbytes, t0, r, stamp in cl.inflight:
            if not r._complete:
                if r._exec is not None:
                    with LOCK:
                        r._wait_execution()
                else:
                    poll(lambda: test(r), sleep=self.comm.wait == "sleep")
            t = self._timed(algo, nbytes, stamp[0] - t0)
            (cl.times[algo] if cl.state == "trial" else cl.samples).append(t)
        cl.inflight = []

    def _sum(self, values):
        # every rank's values, added up, in integer nanoseconds: the same on every rank
        comm = self.comm
        from ._progress import LOCK

        # a rank in MPI_Allreduce advances none of its schedules in flight, which a peer may
        # need finished first: finish them (completed, not freed: the caller's Wait or
        # MPI.Request.Waitall frees them; the library's requests progress inside MPI)
        for r in list(comm._requests):
            if r._exec is not None and not r._complete:
                with LOCK:
                    r._wait_execution()
        mine = np.array([round(v * 1e9) for v in values], dtype=np.int64)
        total = np.empty_like(mine)
        comm._dup.Allreduce(mine, total, MPI.SUM)
        return total / (1e9 * comm._size)

    def _settle(self, key, cl):
        order = [(a, i) for a in cl.cands for i in range(len(cl.times[a]))]
        share = (time.process_time() - cl.cpu0) / max(time.perf_counter() - cl.wall0, 1e-9)
        mean = self._sum([cl.times[a][i] for a, i in order] + [share])
        per = {a: [] for a in cl.cands}
        for (a, _), t in zip(order, mean[:-1]):
            per[a].append(float(t))
        med = {a: float(np.median(v)) for a, v in per.items()}
        best = min(cl.cands, key=lambda a: (med[a] * (1 + MARGIN) if a != "native" else med[a],
                                            cl.cands.index(a)))
        cl.state, cl.choice, cl.settled, cl.medians = "settled", best, med[best], med
        cl.decided_by, cl.since, cl.samples = cl.calls, 0, []
        cl.observed = med[best]
        self._store(key, cl, float(mean[-1]))

    def _compare(self, key, cl):
        obs = float(np.median(self._sum(cl.samples)))
        cl.samples = []
        cl.observed = obs
        if obs > cl.settled * DRIFT or obs * DRIFT < cl.settled:
            if env_debug() and self.comm._rank == 0:
                print(f"mtcoll[rank 0]: auto class {class_name(key)}: {cl.choice} observed "
                      f"{obs * 1e3:.3g}ms, settled at {cl.settled * 1e3:.3g}ms: measuring "
                      f"again", file=sys.stderr, flush=True)
            cl.relearned += 1
            relearned, observed = cl.relearned, cl.observed
            if "native" not in cl.cands:
                cl.cands = ["native", *cl.cands]
            cl._reset()
            cl.relearned, cl.observed = relearned, observed

    def _store(self, key, cl, share):
        # rank 0 records the class in the cache file: the next run's prior
        if self.comm._rank != 0 or self.path is None or self.data is None:
            return
        from .._calibrate import store

        try:
            load = list(os.getloadavg())
        except OSError:
            load = None
        self.data.setdefault("learned", {})[class_name(key)] = {
            "algorithm": cl.choice, "seconds": cl.settled, "candidates": cl.medians,
            "calls": cl.decided_by, "loadavg": load, "cpu_share": share,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        saved, why = store(self.path, self.data)
        if not saved and env_debug():
            print(f"mtcoll[rank 0]: auto could not cache what it learned: {why}",
                  file=sys.stderr, flush=True)

    def report(self):
        """Per class: its choice, the prior's prediction, the measured and observed times and
        how many calls decided it (``--info``, tests)."""
        out = {}
        for key, cl in sorted(self.classes.items()):
            out[class_name(key)] = {
                "state": cl.state, "choice": cl.choice, "candidates": list(cl.cands),
                "predicted": cl.predicted.get(cl.choice) if cl.choice else None,
                "measured": cl.settled, "observed": cl.observed, "calls": cl.decided_by,
                "relearned": cl.relearned}
        return out


def env_debug():
    from .._env import env_flag

    return env_flag("MTCOLL_DEBUG")


def _op_name(op):
    from .. import _ops

    return _ops.op_name(op) or f"op{op.handle}"


def call(comm, kind, sendbuf, recvbuf, op, blocking):
    """A call of ``kind`` that ``auto`` may be learning from: started, and when the learner
    asked for it, waited for and timed here (see the module notes)."""
    lrn = comm._learner
    lrn.pending = None
    t0 = time.perf_counter()
    req = _dispatch.start(comm, kind, sendbuf, recvbuf, op, blocking)
    p = lrn.pending
    if p is None:
        if blocking:
            req.Wait()
        return req
    lrn.pending = None
    if lrn.classes[p[0]].state == "trial":
        # the library ran a trial call: not the fast path's yet (the class is not settled)
        comm._fast.discard(p[3])
    if not blocking and comm._threaded:
        # timed as it runs among the program's other calls, from its start to its completion
        # (a lone waited-for Iallreduce prices the library's call as a lone blocking wait,
        # while a gradient step's requests progress together inside one Waitall)
        if not p[2]:
            return req
        out, stamp = _stamped(comm, req)
        lrn.started(p, t0, out, stamp)
        return out
    req.Wait()
    dt = time.perf_counter() - t0
    lrn.record(p, dt)
    return req if blocking else _completed(comm, req)


def _stamped(comm, req):
    # ``(request, stamp)``: the request to hand back and a cell that gets the time it
    # completes, whoever completes it (the progress thread, a Wait). The library's own
    # request is wrapped in one of mtcoll's, which the progress thread completes
    from ._progress import LOCK, wake
    from ._requests import Request

    stamp = [None]

    def done():
        stamp[0] = time.perf_counter()

    with LOCK:
        if req._done():
            done()
            return req, stamp
        if req._greq is None:
            out = Request(native=MPI.Request(req), on_done=[done], keep=req._keep)
            out._comm, out._timeout, out._kind = comm, req._timeout, req._kind
            out._threaded, out._number = req._threaded, req._number
            reqs = comm._requests
            if reqs and reqs[-1] is req:
                reqs.pop()
            reqs.append(out)
        else:
            req._on_done.append(done)
            out = req
    wake()
    return out, stamp


def _completed(comm, req):
    # What a waited-for Iallreduce returns: a request that is complete and that MPI frees when
    # it is waited for, a generalized request completed at once (not the null request a
    # waited-for request becomes: MPICH 5.0's MPI_Waitall asserts on a null request beside a
    # pending generalized one, as in a gradient step's MPI.Request.Waitall of every layer's)
    from ._requests import Request, collective_cancel, collective_free, collective_query

    handle = MPI.Grequest.Start(collective_query, collective_free, collective_cancel)
    out = MPI.Request.__new__(Request, handle)
    out.__dict__.update(_greq=handle, _exec=None, _native=None, _on_done=[], _keep=None,
                        seq=None, _comm=comm, _timeout=None, _kind=req._kind,
                        _threaded=req._threaded, _number=req._number, _complete=True)
    handle.Complete()
    return out
