"""The cost model behind the calibrated ``auto`` (see :mod:`mtcoll._calibrate`): the schedule
facts each candidate's model needs, the fit, and :class:`Calibration`, which predicts and
chooses."""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np

#: an mtcoll algorithm is chosen over the MPI library only if predicted this much faster.
#: Generous on purpose: a probe is a few calls, and on a machine whose ranks share cores the
#: same call's time moves by more than 5 % from one minute to the next (docs/performance.md),
#: while the gains auto exists for (MultiTree on contended links: 3-5x) are far above it.
MARGIN = 0.25
#: a candidate measured at s bytes may be chosen for calls of s / REACH to s * REACH bytes
REACH = 16
_EXEC_TERMS = ("steps", "messages", "bytes", "links")
_NATIVE_TERMS = ("call", "bytes", "links")
REF = 1 << 20  # bytes at which the link replay's slope is taken


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
    from ..plan._graph import route_ids

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



def _through(pts, nbytes):
    """The time at ``nbytes`` of a candidate measured at two sizes or more (``pts``: sorted
    ``(size, seconds)``): straight lines between its measured points, and beyond them the end
    segment's line. So each candidate's own fixed cost and cost per byte, as measured, carry it
    between and beyond the probe's sizes; below the smallest, the fixed cost is never taken
    below zero (the slope there at most ``t0 / n0``), above the largest, the cost per byte
    never below zero."""
    (b0, t0), (b1, t1) = pts[0], pts[1]
    if nbytes <= b0:
        slope = min(max((t1 - t0) / (b1 - b0), 0.0), t0 / b0)
        return t0 - slope * (b0 - nbytes)
    (ba, ta), (bz, tz) = pts[-2], pts[-1]
    if nbytes >= bz:
        return tz + max((tz - ta) / (bz - ba), 0.0) * (nbytes - bz)
    return float(np.interp(nbytes, [b for b, _ in pts], [t for _, t in pts]))


class Calibration:
    """A fitted model: per candidate, its predicted time at any size.

    Built from the JSON-able ``data`` that :func:`mtcoll._calibrate.calibrate` broadcasts and
    caches: ``key``, ``features`` (per candidate), ``measured`` (per candidate, ``[[nbytes,
    seconds], ...]``), ``probe_seconds``, ``phases``, ``created``. Everything else is derived
    here, the same on every rank.

    A candidate the probe measured at two sizes or more is predicted from its own points
    (:func:`_through`: its measured fixed cost and cost per byte). One measured at a single
    size, or not at all, is predicted by the schedule model (``steps, messages, bytes, links``
    for mtcoll's, ``call, bytes, links`` for the library) fitted to every point, times the
    candidate's measured/modelled ratio (a candidate never measured takes the geometric mean
    of the measured mtcoll candidates'); above its one size the misfit is carried as a fixed
    cost. The schedule model also gives the debug line's share of per-message cost.
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
        self._meas = meas
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
            sizes = np.log([max(b, 1) for b, _ in pts])
            ratio = [math.log(max(t, 1e-9) / max(self.model(a, b), 1e-9)) for b, t in pts]
            self._corr[a] = (sizes, np.array(ratio))
        sizes = sorted({b for pts in meas.values() for b, _ in pts})
        self._smallest = sizes[0] if sizes else 0
        self._largest = sizes[-1] if sizes else 0
        self._cache = {}

    def model(self, algorithm, nbytes):
        """The fitted schedule model's time (seconds) before any correction."""
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
            pts = self._meas.get(a, ())
            if len(pts) >= 2:
                out[a] = _through(pts, nbytes)
                continue
            t = self.model(a, nbytes)
            if pts and nbytes > pts[0][0]:
                # above its one measured size the misfit is carried as a constant (the call's
                # fixed cost), not as a factor on the bytes still to come
                b, tb = pts[0]
                out[a] = max(t + tb - self.model(a, b), tb)
            else:
                out[a] = t * math.exp(logc.get(a, 0.0 if a == "native" else mean))
        return out

    def choose(self, nbytes):
        """``(algorithm, why)``: the fastest predicted candidate and the prediction (cached per
        size). Only candidates the probe measured within a factor :data:`REACH` of this size
        are chosen (or at its largest size, for a larger call; below the probe's reach only
        the MPI library): the model alone is not trusted to rank a candidate it never saw run
        at about this size here; the others are predicted, for the record. An mtcoll
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
        pts = self._meas.get(algorithm)
        if not pts:
            return False
        sizes = np.array([b for b, _ in pts], dtype=float)
        near = np.any((sizes * REACH >= nbytes) & (sizes <= nbytes * REACH))
        return bool(near or (nbytes >= self._largest and sizes.max() >= self._largest)
                    or (algorithm == "native" and nbytes <= self._smallest))

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
        """Lines for ``--info`` and the debug trace (``--info`` shows them from the third)."""
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
            line = f"measured {a}: " + ", ".join(f"{b} B {t * 1e3:.3g} ms" for b, t in pts)
            own = self._meas.get(a, ())
            if len(own) >= 2:  # what it carries beyond: its end segments' fixed cost, per MiB
                (b0, t0), (b1, t1) = own[-2], own[-1]
                per = (t1 - t0) / (b1 - b0)
                line += f" (above: {(t1 - per * b1) * 1e3:.3g} ms + {per * 2**20 * 1e3:.3g} ms/MiB)"
            lines.append(line)
        return lines
