"""Allreduce schedules as immutable values.

A :class:`Schedule` says who sends which part of the buffer to whom at each step of an
allreduce. It is pure data (numpy arrays): it knows nothing of MPI, of the network it was
planned for, or of the message size. The size enters only at execution, when
:meth:`Schedule.chunk_bounds` cuts a buffer of ``count`` elements into ``nchunks`` chunks.

The allreduce runs in two phases:

* phase 0, **reduce** (reduce-scatter): the receiver combines the incoming data into its own
  partial result with the reduction operator. At the end of the phase, chunk ``c`` is fully
  reduced on rank ``owner[c]``.
* phase 1, **gather** (all-gather): the receiver overwrites its copy with the incoming data.
  At the end of the phase every rank holds every fully reduced chunk.

Each transfer moves a contiguous range of chunks ``[lo, hi)`` from ``src`` to ``dst`` at a
``step`` of its phase, along ``route`` (an index into the topology's alternative routes from
``src`` to ``dst``; 0, the default route, unless the planner picked another on a switched
network). A transfer at step ``t`` carries the sender's data as it stood at the end
of step ``t - 1``; what is received at step ``t`` is there from the end of step ``t`` on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

__all__ = ["Schedule", "RankSchedule", "RankView", "REDUCE", "GATHER", "SEND", "RECV"]

REDUCE = 0  #: phase 0: the receiver reduces what it receives into its partial result
GATHER = 1  #: phase 1: the receiver stores what it receives
SEND = 0  #: RankView.kind of an outgoing transfer
RECV = 1  #: RankView.kind of an incoming transfer

_FIELDS = ("phase", "step", "src", "dst", "lo", "hi", "route")


def _frozen(a, dtype, copy=True):
    a = np.array(a, dtype=dtype, copy=True) if copy else np.asarray(a, dtype=dtype)
    a.setflags(write=False)
    return a


def _sorted_by_phase_step(ph, st):
    if len(ph) < 2:
        return True
    dp = np.diff(ph)
    if (dp < 0).any():
        return False
    same = dp == 0
    return bool((st[1:][same] >= st[:-1][same]).all())


class Schedule:
    """An allreduce schedule over ``nranks`` ranks and ``nchunks`` chunks.

    Parameters
    ----------
    algorithm, topology : str
        Names recorded for reports (the algorithm that made it, the topology spec it was
        planned on).
    nranks, nchunks : int
        Ranks taking part, and the number of pieces the buffer is cut into.
    owner : array of int, shape (nchunks,)
        Rank on which each chunk is fully reduced at the end of the reduce phase.
    phase, step, src, dst, lo, hi : arrays of int, one entry per transfer
        See the module docstring.
    route : array of int, optional
        Route index per transfer (default: all 0).
    meta : dict, optional
        Extra JSON-serialisable facts from the planner (ports, planning options).
    copy : bool
        False hands the arrays over: those already of the stored dtype are kept (and made
        read-only) instead of copied. Planners use it for schedules of millions of transfers.

    Notes
    -----
    The arrays are copied and made read-only; a schedule never changes after construction.
    Transfers are kept sorted by (phase, step), stably: within a step, the planner's order. Only the structure is checked
    here (ranges, shapes); whether the schedule computes an allreduce is the validator's job
    (:func:`mtcoll.plan.validate`).
    """

    def __init__(self, algorithm, topology, nranks, nchunks, owner,
                 phase, step, src, dst, lo, hi, route=None, meta=None, copy=True):
        self.algorithm = str(algorithm)
        self.topology = str(topology)
        self.nranks = int(nranks)
        self.nchunks = int(nchunks)
        self.meta = dict(meta or {})
        if self.nranks < 1:
            raise ValueError(f"nranks must be at least 1, got {self.nranks}")
        if self.nchunks < 1:
            raise ValueError(f"nchunks must be at least 1, got {self.nchunks}")
        cols = [np.asarray(x).ravel() for x in (phase, step, src, dst, lo, hi)]
        n = len(cols[0])
        if any(len(c) != n for c in cols) or (route is not None and np.size(route) != n):
            raise ValueError("phase, step, src, dst, lo, hi and route must have one entry "
                             "per transfer")
        ph, st, s, d, l, h = cols
        rt = np.zeros(n, np.int8) if route is None else np.asarray(route).ravel()
        bad = []
        if n:
            if ph.min() < REDUCE or ph.max() > GATHER:
                bad.append("phase must be 0 (reduce) or 1 (gather)")
            if st.min() < 0:
                bad.append("steps must be >= 0")
            if min(s.min(), d.min()) < 0 or max(s.max(), d.max()) >= self.nranks:
                bad.append(f"src and dst must be ranks in [0, {self.nranks})")
            if (s == d).any():
                bad.append("a transfer from a rank to itself")
            if l.min() < 0 or h.max() > self.nchunks or (h <= l).any():
                bad.append(f"chunk ranges must satisfy 0 <= lo < hi <= {self.nchunks}")
            if rt.min() < 0 or rt.max() > 127:
                bad.append("route must be in [0, 127]")
        own = np.asarray(owner).ravel()
        if own.shape != (self.nchunks,):
            bad.append(f"owner must have one entry per chunk ({self.nchunks})")
        elif own.size and (own.min() < 0 or own.max() >= self.nranks):
            bad.append(f"owner must name ranks in [0, {self.nranks})")
        if bad:
            raise ValueError(f"malformed {self.algorithm} schedule: " + "; ".join(bad))
        # (phase, step) order, stable; planners emit it already, so usually no sort is needed
        if _sorted_by_phase_step(ph, st):
            pick = (lambda a: a)  # noqa: E731
        else:
            order = np.argsort(ph.astype(np.int64) * (int(st.max()) + 1) + st, kind="stable")
            pick = (lambda a: a[order])  # noqa: E731
            copy = False  # a[order] is a fresh array already
        keep = (lambda a, t: _frozen(a, t, copy))  # noqa: E731
        self.owner = _frozen(own, np.int32)
        self.phase = keep(pick(ph), np.int8)
        self.step = keep(pick(st), np.int32)
        self.src = keep(pick(s), np.int32)
        self.dst = keep(pick(d), np.int32)
        self.lo = keep(pick(l), np.int32)
        self.hi = keep(pick(h), np.int32)
        self.route = keep(pick(rt), np.int8)
        self._views = {}

    # -- facts -------------------------------------------------------------------------------

    @property
    def ntransfers(self):
        return len(self.step)

    @property
    def steps(self):
        """Number of steps of each phase, as ``(reduce_steps, gather_steps)``."""
        out = []
        for p in (REDUCE, GATHER):
            sel = self.step[self.phase == p]
            out.append(int(sel.max()) + 1 if sel.size else 0)
        return tuple(out)

    def step_cost(self):
        """Per phase, the steps weighted by their largest transfer, in units of 1/nranks of the
        buffer: a step whose largest transfer carries k of the nchunks chunks costs
        ``k * nranks / nchunks``. For one-chunk-per-transfer schedules with ``nchunks == nranks``
        (MultiTree, ring) this is the step count; it is the quantity the step lower bound
        ``max(diameter, ceil((N-1)/ports))`` speaks of."""
        out = []
        width = self.hi - self.lo
        for p in (REDUCE, GATHER):
            a, b = np.searchsorted(self.phase, (p, p + 1))  # sorted by (phase, step)
            if a == b:
                out.append(0.0)
                continue
            st = self.step[a:b]
            starts = np.concatenate(([0], np.flatnonzero(np.diff(st)) + 1))
            biggest = np.maximum.reduceat(width[a:b], starts)
            out.append(float(biggest.astype(np.int64).sum()) * self.nranks / self.nchunks)
        return tuple(out)

    def chunk_bounds(self, count):
        """Element offsets of the chunks for a buffer of ``count`` elements.

        Returns an int64 array of ``nchunks + 1`` offsets: chunk ``c`` is elements
        ``[b[c], b[c+1])``. The first ``count % nchunks`` chunks get one element more, so any
        count works, including counts smaller than ``nchunks`` (some chunks are then empty).
        """
        count = int(count)
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        base, extra = divmod(count, self.nchunks)
        sizes = np.full(self.nchunks, base, dtype=np.int64)
        sizes[:extra] += 1
        return np.concatenate(([0], np.cumsum(sizes)))

    # -- per-rank view -----------------------------------------------------------------------

    def rank_view(self, rank):
        """The transfers of one rank, in program order (see :class:`RankView`)."""
        rank = int(rank)
        if not 0 <= rank < self.nranks:
            raise ValueError(f"rank must be in [0, {self.nranks}), got {rank}")
        view = self._views.get(rank)
        if view is None:
            view = self._views[rank] = RankView._of(self, rank)
        return view

    # -- persistence -------------------------------------------------------------------------

    def save(self, path):
        """Write the schedule to ``path`` (a ``.npz`` file)."""
        head = dict(algorithm=self.algorithm, topology=self.topology, nranks=self.nranks,
                    nchunks=self.nchunks, meta=self.meta)
        np.savez_compressed(path, header=np.array(json.dumps(head)), owner=self.owner,
                            **{f: getattr(self, f) for f in _FIELDS})

    @classmethod
    def load(cls, path):
        """Read a schedule written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as z:
            head = json.loads(str(z["header"]))
            return cls(head["algorithm"], head["topology"], head["nranks"], head["nchunks"],
                       z["owner"], *(z[f] for f in _FIELDS), meta=head.get("meta"))

    def __eq__(self, other):
        if not isinstance(other, Schedule):
            return NotImplemented
        return (self.nranks == other.nranks and self.nchunks == other.nchunks
                and self.ntransfers == other.ntransfers
                and np.array_equal(self.owner, other.owner)
                and all(np.array_equal(getattr(self, f), getattr(other, f)) for f in _FIELDS))

    __hash__ = None

    def __repr__(self):
        r, g = self.steps
        return (f"Schedule({self.algorithm!r} on {self.topology!r}: {self.nranks} ranks, "
                f"{self.nchunks} chunks, {self.ntransfers} transfers, steps {r}+{g})")


# the phase sets an executor runs: allreduce, reduce-scatter alone, all-gather alone
_PHASE_SETS = ((REDUCE, GATHER), (REDUCE,), (GATHER,))
_DTYPES = dict(phase=np.int8, step=np.int32, src=np.int32, dst=np.int32, lo=np.int32,
               hi=np.int32, route=np.int8)
_MAGIC = b"MTRS1"


def _narrow(a):
    for t in (np.int8, np.int16):
        if a.dtype.itemsize > np.dtype(t).itemsize and (
                not a.size or np.iinfo(t).min <= a.min() and a.max() <= np.iinfo(t).max):
            return a.astype(t)
    return a


def _stream_summary(s):
    """What every rank must know of the whole schedule to agree on message counts: per phase
    set, the (transfers, widest range) of each rank pair, as the pairs on the upper-right front
    (no other pair has both more transfers and a wider range); per phase, the transfers of each
    range width. Small: a handful of rows."""
    width = (s.hi - s.lo).astype(np.int64)
    fronts = []
    for code, phases in enumerate(_PHASE_SETS):
        sel = np.isin(s.phase, phases)
        if not sel.any():
            continue
        pair = s.src[sel].astype(np.int64) * s.nranks + s.dst[sel]
        order = np.argsort(pair, kind="stable")  # one sort (ufunc.at is slow on millions)
        pair = pair[order]
        starts = np.concatenate(([0], np.flatnonzero(np.diff(pair)) + 1))
        cnt = np.diff(np.append(starts, len(pair)))
        wmax = np.maximum.reduceat(width[sel][order], starts)
        for n, w in set(zip(cnt.tolist(), wmax.tolist())):
            if not ((cnt >= n) & (wmax >= w) & ((cnt > n) | (wmax > w))).any():
                fronts.append((code, n, w))
    hist = []
    for p in (REDUCE, GATHER):
        w, c = np.unique(width[s.phase == p], return_counts=True)
        hist += [(p, int(a), int(b)) for a, b in zip(w, c)]
    return (np.array(sorted(fronts), np.int64).reshape(-1, 3),
            np.array(hist, np.int64).reshape(-1, 3))


class RankSchedule:
    """One rank's part of a :class:`Schedule`: what an executor of that rank needs, and no more.

    It holds the transfers the rank sends or receives (the same fields as a Schedule, in the
    whole schedule's order), the chunk owners, the step counts, and a summary of the whole
    schedule's streams (:attr:`pair_front`, :attr:`width_counts`) from which every rank derives
    the same bound on the messages between two ranks. Its size is O(the rank's transfers +
    nchunks), against O(all transfers) for the whole schedule: at 4,096 ranks of MultiTree, a
    few hundred kB instead of hundreds of MB.

    Made by :meth:`of` (from the whole schedule, on the rank that planned it) or
    :meth:`from_bytes` (from :meth:`to_bytes`, as rank 0 scatters it). :meth:`rank_view` of its
    own rank equals the whole schedule's; other ranks' views it cannot give.
    """

    def __init__(self, algorithm, topology, nranks, nchunks, rank, owner, steps, transfers,
                 pair_front, width_counts, meta=None):
        self.algorithm = str(algorithm)
        self.topology = str(topology)
        self.nranks = int(nranks)
        self.nchunks = int(nchunks)
        self.rank = int(rank)
        self.meta = dict(meta or {})
        self.owner = _frozen(owner, np.int32)
        self.steps = tuple(int(x) for x in steps)
        for f in _FIELDS:
            setattr(self, f, _frozen(transfers[f], _DTYPES[f]))
        mine = (self.src == self.rank) | (self.dst == self.rank)
        if not mine.all():
            raise ValueError(f"a part of rank {self.rank} holds transfers of other ranks")
        self.pair_front = _frozen(pair_front, np.int64).reshape(-1, 3)
        self.width_counts = _frozen(width_counts, np.int64).reshape(-1, 3)
        self._view = None

    @classmethod
    def of(cls, schedule, rank, summary=None):
        """The part of ``rank`` in ``schedule`` (``summary``: :func:`_stream_summary` of it,
        when the caller cuts many parts)."""
        s = schedule
        idx = np.flatnonzero((s.src == rank) | (s.dst == rank))
        return cls._cut(s, rank, idx, summary or _stream_summary(s), s.steps)

    @classmethod
    def _cut(cls, s, rank, idx, summary, steps, table=None):
        # table: the fields as one record per transfer, so that a part's scattered rows are
        # fetched once each rather than once per field
        rows = {f: getattr(s, f)[idx] for f in _FIELDS} if table is None else table[idx]
        return cls(s.algorithm, s.topology, s.nranks, s.nchunks, rank, s.owner, steps,
                   {f: rows[f] for f in _FIELDS}, *summary, meta=s.meta)

    @classmethod
    def split(cls, schedule):
        """The parts of every rank, in rank order (one pass over the schedule: O(transfers))."""
        s = schedule
        summary = _stream_summary(s)
        steps = s.steps  # a property that scans every transfer: once, not once per part
        n = s.nranks
        by_src = np.argsort(s.src, kind="stable")
        by_dst = np.argsort(s.dst, kind="stable")
        ps = np.concatenate(([0], np.cumsum(np.bincount(s.src, minlength=n))))
        pd = np.concatenate(([0], np.cumsum(np.bincount(s.dst, minlength=n))))
        table = np.empty(s.ntransfers, np.dtype([(f, _DTYPES[f]) for f in _FIELDS]))
        for f in _FIELDS:
            table[f] = getattr(s, f)
        for r in range(n):
            idx = np.sort(np.concatenate((by_src[ps[r]:ps[r + 1]], by_dst[pd[r]:pd[r + 1]])))
            yield cls._cut(s, r, idx, summary, steps, table)

    @property
    def ntransfers(self):
        return len(self.step)

    chunk_bounds = Schedule.chunk_bounds

    def rank_view(self, rank):
        """The transfers of this part's rank, in program order (see :class:`RankView`)."""
        if int(rank) != self.rank:
            raise ValueError(f"this is the part of rank {self.rank}, not of rank {rank}")
        if self._view is None:
            self._view = RankView._of(self, self.rank)
        return self._view

    def stream_bounds(self, phases, pieces):
        """``(max_stream, nmessages)`` over the whole schedule for the phases run, where
        ``pieces(w)`` is the messages of the widest range of ``w`` chunks: the most pieces
        between two ranks, and all pieces, bounded from above by taking every range of width w
        as the widest (exact when chunks are of one size). Every rank gets the same numbers."""
        code = _PHASE_SETS.index(tuple(phases))
        front = self.pair_front[self.pair_front[:, 0] == code]
        most = max((int(n) * int(pieces(int(w))) for _, n, w in front), default=0)
        sel = np.isin(self.width_counts[:, 0], phases)
        total = sum(int(c) * int(pieces(int(w))) for _, w, c in self.width_counts[sel])
        return most, total

    def to_bytes(self):
        """A compact serialisation (a JSON header, then the raw arrays); see :meth:`from_bytes`."""
        identity = bool(np.array_equal(self.owner, np.arange(self.nchunks)))
        arrays = [] if identity else [self.owner]
        # each field in the narrowest integer type its values fit (int16 up to 32,767 ranks)
        fields = [_narrow(getattr(self, f)) for f in _FIELDS]
        arrays += fields + [self.pair_front, self.width_counts]
        head = json.dumps(dict(algorithm=self.algorithm, topology=self.topology,
                               nranks=self.nranks, nchunks=self.nchunks, rank=self.rank,
                               steps=self.steps, meta=self.meta, identity=identity,
                               n=self.ntransfers, front=len(self.pair_front),
                               widths=len(self.width_counts),
                               dtypes=[a.dtype.str for a in fields])).encode()
        return b"".join([_MAGIC, len(head).to_bytes(4, "little"), head]
                        + [np.ascontiguousarray(a).tobytes() for a in arrays])

    @classmethod
    def from_bytes(cls, data):
        """Rebuild a part from :meth:`to_bytes`."""
        data = memoryview(data)
        if bytes(data[:len(_MAGIC)]) != _MAGIC:
            raise ValueError("not a serialised RankSchedule")
        at = len(_MAGIC) + 4
        end = at + int.from_bytes(data[len(_MAGIC):at], "little")
        head = json.loads(bytes(data[at:end]))
        at = end

        def take(dtype, count):
            nonlocal at
            a = np.frombuffer(data, dtype, count, at).copy()
            at += a.nbytes
            return a

        owner = np.arange(head["nchunks"]) if head["identity"] else take(np.int32,
                                                                         head["nchunks"])
        transfers = {f: take(np.dtype(t), head["n"]) for f, t in zip(_FIELDS, head["dtypes"])}
        front = take(np.int64, 3 * head["front"])
        widths = take(np.int64, 3 * head["widths"])
        return cls(head["algorithm"], head["topology"], head["nranks"], head["nchunks"],
                   head["rank"], owner, head["steps"], transfers, front, widths,
                   meta=head["meta"])

    def __eq__(self, other):
        if not isinstance(other, RankSchedule):
            return NotImplemented
        return (self.rank == other.rank and self.nranks == other.nranks
                and self.nchunks == other.nchunks and self.steps == other.steps
                and self.ntransfers == other.ntransfers
                and np.array_equal(self.owner, other.owner)
                and np.array_equal(self.pair_front, other.pair_front)
                and np.array_equal(self.width_counts, other.width_counts)
                and all(np.array_equal(getattr(self, f), getattr(other, f)) for f in _FIELDS))

    __hash__ = None

    def __repr__(self):
        r, g = self.steps
        return (f"RankSchedule({self.algorithm!r} on {self.topology!r}: rank {self.rank} of "
                f"{self.nranks}, {self.ntransfers} transfers, steps {r}+{g})")


@dataclass(frozen=True)
class RankView:
    """The transfers one rank takes part in, in program order.

    Program order sorts by (phase, step) and, within a step, puts sends before receives: a send
    at step ``t`` carries data as it stood at the end of step ``t - 1``, which a receive of the
    same step must not have touched yet. Executing the operations in this order, one at a time,
    computes the allreduce; an executor may overlap them as long as it keeps the order of any two
    operations whose chunk ranges overlap and at least one of which writes (a receive).

    All arrays have one entry per operation: ``kind`` (SEND or RECV), ``peer`` (the other rank),
    ``lo``/``hi`` (chunk range), ``phase`` (REDUCE: combine into the buffer; GATHER: overwrite),
    ``step``.
    """

    rank: int
    nranks: int
    nchunks: int
    kind: np.ndarray
    peer: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    phase: np.ndarray
    step: np.ndarray

    @classmethod
    def _of(cls, s, rank):
        out_ = s.src == rank
        in_ = s.dst == rank
        idx = np.concatenate((np.flatnonzero(out_), np.flatnonzero(in_)))
        kind = np.concatenate((np.full(out_.sum(), SEND, np.int8), np.full(in_.sum(), RECV, np.int8)))
        peer = np.concatenate((s.dst[out_], s.src[in_]))
        order = np.lexsort((s.lo[idx], peer, kind, s.step[idx], s.phase[idx]))
        idx, kind, peer = idx[order], kind[order], peer[order]
        arrays = [_frozen(a, np.int32) for a in (peer, s.lo[idx], s.hi[idx])]
        return cls(rank, s.nranks, s.nchunks, _frozen(kind, np.int8), *arrays,
                   _frozen(s.phase[idx], np.int8), _frozen(s.step[idx], np.int32))

    def __len__(self):
        return len(self.kind)
