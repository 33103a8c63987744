"""Run a :class:`~mtcoll.schedule.Schedule` with nonblocking point-to-point messages.

The executor knows nothing of topologies or planners: it takes any schedule, a communicator of
the schedule's size and a working buffer, and carries out this rank's part of the schedule.

How a call runs
---------------
1. **Pieces.** Every operation of this rank's :class:`~mtcoll.schedule.RankView` (a send or a
   receive of the chunk range ``[lo, hi)``) covers an element interval of the buffer, which is
   cut into *pieces*, one MPI message each: ``ceil(bytes / segment_bytes)`` pieces, at most
   ``max_segments`` of them, but never a message of more than :data:`MAX_MESSAGE_ELEMENTS`
   elements. Sender and receiver cut a transfer the same way, since both know its size.
2. **Dependencies**, in program order (the order of the RankView): a send piece reading
   ``acc[a:b]`` waits until every earlier receive piece overlapping ``[a, b)`` has been applied;
   a receive piece writing ``acc[a:b]`` waits until every earlier overlapping piece is done
   (sends completed, receives applied). Nothing else orders them, so a piece moves on as soon as
   its own data is ready: the segments of one transfer pipeline through the steps of the
   schedule, and there is no barrier between steps.
3. **Receives.** A reduce-phase piece lands in a scratch buffer and is combined into the
   working buffer with the ufunc, ``ufunc(acc[a:b], tmp, out=acc[a:b])``, once its dependencies
   are met. These receives are posted ahead in program order, at most :data:`RECV_WINDOW`
   outstanding at a time. A gather-phase piece is received straight into the working buffer,
   posted when its dependencies are met (nothing else may touch that region meanwhile).
4. **The input.** For an out-of-place call the caller passes its input as ``src``: a send, or
   a combine, of elements that no receive has written yet reads ``src`` directly
   (``ufunc(src[a:b], tmp, out=acc[a:b])``), so the input is never copied into the working
   buffer as a whole (:attr:`Layout.src_read`, :attr:`Layout.precopy`).
5. **Progress.** All outstanding requests of all running executions are tested together; each
   completion releases the pieces that depend on it. A blocking wait either blocks in
   ``MPI.Request.Waitsome`` (``wait="busy"``) or tests with ``Testsome`` and sleeps between
   tests (``wait="sleep"``, for more ranks than cores; see :data:`WAIT`).
6. **Errors.** When MPI reports a failed message (say a receive truncated because the ranks
   disagree on the count), the execution it belongs to fails: it is abandoned (its receives
   cancelled) and :attr:`Execution.error` set, to be raised by its own ``wait``/``test``. The
   other running executions, whose completions in the same test are kept, go on: an error is
   charged to the call it happened in, not to whichever call was being waited for.

Because overlapping receives are applied in program order, every run of the same schedule on
the same inputs performs the same floating-point operations in the same order: the result is
reproducible bitwise. The gather phase copies each owner's reduced chunk, so every rank ends
with the same bits.

Tags
----
The pieces sent from one rank to another in one call are numbered ``0, 1, ...`` in program
order (the receiver numbers its receives from that rank the same way). A call also gets a slot,
its sequence number modulo :data:`TAG_SLOTS`; the tag is ``number * TAG_SLOTS + slot``. Calls
in flight at the same time on one communicator thus never match each other's messages, as long
as fewer than :data:`TAG_SLOTS` calls are in flight (the caller, :class:`mtcoll.Comm`, waits for
the oldest before reusing its slot). A layout needing tags above the communicator's
``MPI.TAG_UB`` is reported by :meth:`Executor.fits_tags`; the caller then uses the MPI library.

Progress happens when :func:`progress` is called: inside mtcoll calls (``Wait``, ``Test``,
starting another call) and from the progress thread of :mod:`mtcoll.comm._progress`, which
serialises every call into this module with one lock (nothing here is thread-safe by itself).
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict, deque

import numpy as np
from mpi4py import MPI

from ..schedule import GATHER, RECV, REDUCE, SEND
from . import _limits, _state
from ._state import running, scratch_cached

__all__ = ["Executor", "Execution", "Layout", "progress", "running", "scratch_cached"]

_LAYOUT_CACHE = 32  # shapes remembered per executor


def _npieces(sizes, itemsize, segment_bytes, max_segments, max_elements):
    sizes = np.asarray(sizes, dtype=np.int64)
    k = -(-(sizes * itemsize) // segment_bytes)
    k = np.clip(k, 1, max_segments)
    k = np.maximum(k, -(-sizes // max_elements))
    return np.where(sizes > 0, k, 0)


def _streams(s, bounds, phases, itemsize, segment_bytes, max_segments, max_elements):
    # the longest stream of pieces between two ranks, and all pieces, of a whole schedule
    sel = np.isin(s.phase, phases)
    k_all = _npieces(bounds[s.hi[sel]] - bounds[s.lo[sel]], itemsize, segment_bytes,
                     max_segments, max_elements)
    if not k_all.size:
        return 0, 0
    pair = s.src[sel].astype(np.int64) * s.nranks + s.dst[sel]
    return int(np.bincount(pair, weights=k_all).max()), int(k_all.sum())


class Layout:
    """The pieces of one rank's part of a schedule for one buffer shape, and their dependencies.

    Built by :meth:`Executor.layout` and cached there; read-only afterwards. Per piece ``p``
    (in program order): ``kind[p]`` (SEND or RECV), ``phase[p]``, ``peer[p]``, element interval
    ``a[p]:b[p]``, ``tagnum[p]`` (its number in the stream of pieces between this rank and the
    peer), ``scratch[p]`` (offset in the scratch buffer for a reduce-phase receive, else -1),
    ``npending[p]`` (pieces it waits for) and ``dependents[p]`` (pieces waiting for it).
    """

    def __init__(self, schedule, rank, count, itemsize, phases, segment_bytes, max_segments,
                 max_elements):
        s = schedule
        self.count = int(count)
        self.itemsize = int(itemsize)
        self.phases = tuple(phases)
        bounds = s.chunk_bounds(count)
        self.bounds = bounds
        cut = (itemsize, segment_bytes, max_segments, max_elements)
        self.max_stream, self.nmessages = self._stream_bounds(s, bounds, self.phases, cut)
        kind, phase, peer, a, b, tagnum, scratch, nscratch = self._pieces(
            s.rank_view(rank), bounds, self.phases, cut)
        npieces = len(kind)
        pts, ea, eb = self._elementary(a, b)
        npending, dependents = self._dependencies(kind, ea, eb, len(pts))
        src_read, precopy = self._src_reads(kind, phase, ea, eb, len(pts))
        runs = self._precopy_runs(precopy, pts, count, npieces)
        self.src_read = tuple(src_read)
        self.precopy = tuple((a_, b_) for a_, b_ in runs if b_ > a_)

        self.npieces = npieces
        self.kind = tuple(kind)
        self.phase = tuple(phase)
        self.peer = tuple(peer)
        self.a = tuple(a)
        self.b = tuple(b)
        self.tagnum = tuple(tagnum)
        self.scratch = tuple(scratch)
        self.scratch_size = nscratch
        self.npending = tuple(npending)
        self.dependents = tuple(tuple(sorted(d)) for d in dependents)
        self.reduce_recvs = tuple(p for p in range(npieces)
                                  if kind[p] == RECV and phase[p] == REDUCE)
        # Pieces ready at the start, other than reduce-phase receives (posted separately).
        self.ready = tuple(p for p in range(npieces) if npending[p] == 0
                           and not (kind[p] == RECV and phase[p] == REDUCE))
        self.max_message = max((y - x for x, y in zip(a, b)), default=0)

    @staticmethod
    def _stream_bounds(s, bounds, phases, cut):
        """(longest stream of pieces between two ranks, all pieces) of the whole schedule: the
        tag range every rank must agree on, so a rank's part alone does not decide it."""
        if hasattr(s, "stream_bounds"):  # a RankSchedule: the bound every rank derives alike
            return s.stream_bounds(phases, lambda w: _npieces(bounds[w] - bounds[0], *cut))
        return _streams(s, bounds, phases, *cut)

    @staticmethod
    def _pieces(view, bounds, phases, cut):
        """This rank's operations cut into pieces in program order, as the peer cuts them too:
        the per-piece lists (kind, phase, peer, a, b, tagnum, scratch) and the scratch size."""
        ops = np.flatnonzero(np.isin(view.phase, phases))
        lo = bounds[view.lo[ops]]
        hi = bounds[view.hi[ops]]
        kv = _npieces(hi - lo, *cut)

        kind, phase, peer, a, b, tagnum, scratch = [], [], [], [], [], [], []
        stream = {}
        nscratch = 0
        for i, op in enumerate(ops.tolist()):
            n = int(kv[i])
            if n == 0:
                continue
            kd, pr, ph = int(view.kind[op]), int(view.peer[op]), int(view.phase[op])
            t0 = stream.get((kd, pr), 0)
            stream[(kd, pr)] = t0 + n
            start, size = int(lo[i]), int(hi[i] - lo[i])
            base, extra = divmod(size, n)
            for j in range(n):
                end = start + base + (j < extra)
                kind.append(kd)
                phase.append(ph)
                peer.append(pr)
                a.append(start)
                b.append(end)
                tagnum.append(t0 + j)
                if kd == RECV and ph == REDUCE:
                    scratch.append(nscratch)
                    nscratch += end - start
                else:
                    scratch.append(-1)
                start = end
        return kind, phase, peer, a, b, tagnum, scratch, nscratch

    @staticmethod
    def _elementary(a, b):
        """The piece boundaries, and each piece as a range ``ea[p]:eb[p]`` of the elementary
        intervals between them: the unit both the dependencies and the input reads work on."""
        pts = np.unique(np.asarray(a + b, dtype=np.int64))
        ea = np.searchsorted(pts, np.asarray(a, dtype=np.int64)).tolist()
        eb = np.searchsorted(pts, np.asarray(b, dtype=np.int64)).tolist()
        return pts, ea, eb

    @staticmethod
    def _dependencies(kind, ea, eb, nelem):
        """(npending, dependents) per piece, in program order."""
        # Dependencies over elementary intervals (between consecutive piece boundaries): on each,
        # a piece waits for the last receive before it and, if it is a receive, for the sends
        # since that receive. Earlier pieces are covered transitively: that last receive itself
        # waited for them.
        npieces = len(kind)
        last_recv = [-1] * nelem
        sends_since = [None] * nelem
        npending = [0] * npieces
        dependents = [[] for _ in range(npieces)]
        for p in range(npieces):
            deps = set()
            is_send = kind[p] == SEND
            for e in range(ea[p], eb[p]):
                if last_recv[e] >= 0:
                    deps.add(last_recv[e])
                if is_send:
                    if sends_since[e] is None:
                        sends_since[e] = [p]
                    else:
                        sends_since[e].append(p)
                else:
                    if sends_since[e]:
                        deps.update(sends_since[e])
                        sends_since[e] = None
                    last_recv[e] = p
            npending[p] = len(deps)
            for q in deps:
                dependents[q].append(p)
        return npending, dependents

    @staticmethod
    def _src_reads(kind, phase, ea, eb, nelem):
        """(src_read per piece, the elementary intervals to copy from the input up front)."""
        # Which pieces may read the caller's input buffer directly (``src_read``): a send, or
        # a reduce-phase combine, whose elements no earlier receive has written. This spares
        # copying the input into the working buffer first. Elements read partly from each (only
        # when pieces of different transfers are cut at different points), and elements no
        # receive ever writes, are copied up front instead (``precopy``).
        npieces = len(kind)
        written = [False] * nelem
        precopy = set()
        src_read = [False] * npieces
        for p in range(npieces):
            span = range(ea[p], eb[p])
            if kind[p] == SEND or phase[p] == REDUCE:
                done = [written[e] for e in span]
                if not any(done):
                    src_read[p] = True
                elif not all(done):
                    precopy.update(e for e in span if not written[e])
            if kind[p] == RECV:
                for e in span:
                    written[e] = True
        precopy.update(e for e in range(nelem - 1) if not written[e])
        return src_read, precopy

    @staticmethod
    def _precopy_runs(precopy, pts, count, npieces):
        """The elementary intervals to copy up front as merged ``[lo, hi]`` element runs, with
        the elements outside every piece, which hold the input too."""
        runs = []
        for e in sorted(precopy):
            lo_e, hi_e = int(pts[e]), int(pts[e + 1])
            if runs and runs[-1][1] == lo_e:
                runs[-1][1] = hi_e
            else:
                runs.append([lo_e, hi_e])
        lo_all = int(pts[0]) if len(pts) else 0
        hi_all = int(pts[-1]) if len(pts) else 0
        # elements outside every piece (none for an allreduce over N > 1 ranks) hold the input
        if lo_all > 0:
            runs.insert(0, [0, lo_all])
        if hi_all < count and npieces:
            runs.append([hi_all, int(count)])
        if not npieces and count:
            runs = [[0, int(count)]]
        return runs

    def __repr__(self):
        return (f"Layout(count={self.count}, itemsize={self.itemsize}, pieces={self.npieces}, "
                f"scratch={self.scratch_size}, max_stream={self.max_stream})")


class Executor:
    """Runs one schedule on one communicator, for the calling rank.

    Parameters
    ----------
    comm : MPI.Intracomm
        A communicator of ``schedule.nranks`` ranks reserved for mtcoll (its tags are ours).
    schedule : Schedule or RankSchedule
        Any valid schedule, or this rank's part of one (what :class:`mtcoll.Comm` passes);
        ``rank_view(comm.Get_rank())`` is this rank's part. A part bounds the messages between
        two ranks from its stream summary (:meth:`RankSchedule.stream_bounds`), so
        :meth:`fits_tags` may refuse a layout the whole schedule would just fit.
    segment_bytes, max_segments : int, optional
        Pipelining: target bytes per message and most pieces per transfer (defaults
        :data:`SEGMENT_BYTES`, :data:`MAX_SEGMENTS`, or :data:`SLEEP_SEGMENT_BYTES`,
        :data:`SLEEP_MAX_SEGMENTS` with ``wait="sleep"``; read when a shape is first laid out).
        Every rank must use the same settings: they decide how transfers are cut into messages.
    wait : {"busy", "sleep"}, optional
        How blocking waits wait (default :data:`WAIT`). Ranks may differ, but the segment
        defaults follow it, so pass explicit segment settings if they do.

    Notes
    -----
    Layouts (pieces and dependency tables) are cached per (count, itemsize, phases, segment
    settings, :data:`MAX_MESSAGE_ELEMENTS`), so repeated calls of one shape skip the planning.
    """

    def __init__(self, comm, schedule, segment_bytes=None, max_segments=None, wait=None):
        if wait not in (None, "busy", "sleep"):
            raise ValueError(f"wait must be 'busy' or 'sleep', got {wait!r}")
        if comm.Get_size() != schedule.nranks:
            raise ValueError(f"schedule {schedule!r} is for {schedule.nranks} ranks but the "
                             f"communicator has {comm.Get_size()}")
        if segment_bytes is not None and int(segment_bytes) < 1:
            raise ValueError(f"segment_bytes must be positive, got {segment_bytes!r}")
        if max_segments is not None and int(max_segments) < 1:
            raise ValueError(f"max_segments must be positive, got {max_segments!r}")
        self.comm = comm
        self.schedule = schedule
        self.rank = comm.Get_rank()
        self.segment_bytes = segment_bytes
        self.max_segments = max_segments
        tag_ub = comm.Get_attr(MPI.TAG_UB)
        if tag_ub is None:  # MPI caches it on MPI_COMM_WORLD; Open MPI only there (Create_group)
            tag_ub = MPI.COMM_WORLD.Get_attr(MPI.TAG_UB)
        self.tag_ub = int(tag_ub)
        self.sleep = (wait or _limits.WAIT) == "sleep"
        self._layouts = OrderedDict()

    def layout(self, count, itemsize, phases=(REDUCE, GATHER)):
        """The (cached) :class:`Layout` of a buffer of ``count`` elements of ``itemsize`` bytes."""
        seg, nseg = self.segmenting()
        limit = int(_limits.MAX_MESSAGE_ELEMENTS)
        key = (int(count), int(itemsize), tuple(phases), seg, nseg, limit)
        lay = self._layouts.get(key)
        if lay is None:
            lay = Layout(self.schedule, self.rank, count, itemsize, phases, seg, nseg, limit)
            self._layouts[key] = lay
            if len(self._layouts) > _LAYOUT_CACHE:
                self._layouts.popitem(last=False)
        else:
            self._layouts.move_to_end(key)
        return lay

    def segmenting(self):
        """``(segment_bytes, max_segments)`` in effect: the executor's own settings, else the
        module defaults (:data:`SEGMENT_BYTES`, :data:`MAX_SEGMENTS`, or their ``SLEEP_``
        twins when the executor sleeps while waiting)."""
        lim = _limits
        seg = self.segment_bytes or (lim.SLEEP_SEGMENT_BYTES if self.sleep else lim.SEGMENT_BYTES)
        nseg = self.max_segments or (lim.SLEEP_MAX_SEGMENTS if self.sleep else lim.MAX_SEGMENTS)
        return int(seg), int(nseg)

    def fits_tags(self, layout):
        """Whether every tag of ``layout`` stays within the communicator's ``MPI.TAG_UB``."""
        return layout.max_stream * _limits.TAG_SLOTS - 1 <= self.tag_ub

    def start(self, acc, ufunc, seq, phases=(REDUCE, GATHER), src=None, blocking=False,
              debug=False):
        """Start this rank's part of the schedule on ``acc``; returns an :class:`Execution`
        (or, for a ``blocking`` call the compiled engine serves, its
        :class:`mtcoll.execute._engine.CompiledExecution`).

        Parameters
        ----------
        acc : numpy.ndarray
            1-D, C-contiguous, writable: holds this rank's contribution on entry (unless
            ``src`` is given) and the result on completion. It must not be touched until the
            execution is complete.
        src : numpy.ndarray, optional
            This rank's contribution, when it is not in ``acc`` (an out-of-place allreduce):
            same dtype and size as ``acc``, not overlapping it, unmodified until completion.
            Pieces read it directly until a receive has written their elements, which saves
            copying it into ``acc`` first.
        ufunc : numpy.ufunc or None
            The reduction (``ufunc(x, y, out=x)``); may be None when ``phases`` is only GATHER.
        seq : int
            Sequence number of the call on this communicator, the same on every rank.
        phases : tuple
            ``(REDUCE, GATHER)`` for an allreduce, ``(REDUCE,)`` for the reduce-scatter part,
            ``(GATHER,)`` for the all-gather part.
        blocking : bool
            The caller waits for the execution right away, advancing nothing else meanwhile:
            the compiled engine (:mod:`mtcoll.execute._engine`, see ``MTCOLL_ENGINE``) may run it.
            Nonblocking executions always run here, advanced by :func:`progress`.
        debug : bool
            Rank 0 prints which engine runs the call (``MTCOLL_DEBUG`` of a call the user
            made; :class:`mtcoll.Comm` passes False for its own calls, such as the probe's).

        Every rank of the communicator must start the same schedule with the same count,
        dtype, phases and seq. Raises RuntimeError if the layout needs tags beyond
        ``MPI.TAG_UB`` (check :meth:`fits_tags` first).
        """
        if acc.ndim != 1 or not acc.flags.c_contiguous or not acc.flags.writeable:
            raise ValueError("the working buffer must be 1-D, C-contiguous and writable")
        lay = self.layout(acc.size, acc.itemsize, phases)
        if not self.fits_tags(lay):
            raise RuntimeError(f"{lay.max_stream} messages between two ranks need tags beyond "
                               f"MPI.TAG_UB={self.tag_ub}; raise the segment size")
        if REDUCE in phases and lay.reduce_recvs and ufunc is None:
            raise ValueError("a reduce phase needs a ufunc")
        if src is not None and (src.shape != acc.shape or src.dtype != acc.dtype
                                or not src.flags.c_contiguous):
            raise ValueError("src must be 1-D, C-contiguous and of acc's dtype and size")
        slot = int(seq) % _limits.TAG_SLOTS
        from . import _engine  # the compiled engine, if it serves this call
        compiled = _engine.start(self, lay, acc, ufunc, slot, src, blocking, debug)
        if compiled is not None:
            return compiled
        return Execution(self, lay, acc, ufunc, slot, src)

    def run(self, acc, ufunc, seq, phases=(REDUCE, GATHER), src=None):
        """:meth:`start` (a blocking call) and wait for completion."""
        self.start(acc, ufunc, seq, phases, src, blocking=True).wait()


_ARRIVED, _APPLIED = 1, 2  # states of a reduce-phase receive (0: not arrived)


class Execution:
    """One running call of an :class:`Executor` (see :meth:`Executor.start`).

    ``done`` tells whether it completed; :meth:`test` and :meth:`wait` advance it -- and every
    other running execution, since a peer may be waiting for one of those.
    ``on_done`` callbacks run once, when it completes.
    """

    def __init__(self, executor, layout, acc, ufunc, slot, src=None):
        nbytes = _state.take_inputs(self, executor, layout, acc, slot, src)
        self.ufunc = ufunc
        # MPI requests of this execution and the piece of each. Testsome turns completed ones
        # into MPI.REQUEST_NULL in place, which later tests skip; the lists are compacted only
        # when such holes make up most of them, so that a completion costs O(1), not O(list).
        self.reqs = []
        self._req_piece = []
        self._seen = bytearray()  # per request: its completion has been handled
        self._active_reqs = 0
        self._pending = list(layout.npending)
        self._state = bytearray(layout.npieces)  # of reduce-phase receives
        self._remaining = layout.npieces
        self._next_recv = 0
        self._recvs_out = 0
        self._comm = executor.comm
        self._tmp = None if self._raw is None else self._raw[:nbytes].view(acc.dtype)
        self.done = layout.npieces == 0
        if not self.done:
            _state.active.append(self)
            self._post_recvs()
            self._run(deque(layout.ready))

    # -- posting -----------------------------------------------------------------------------

    def _post_recvs(self):
        lay = self.layout
        order = lay.reduce_recvs
        while self._recvs_out < _limits.RECV_WINDOW and self._next_recv < len(order):
            p = order[self._next_recv]
            self._next_recv += 1
            off = lay.scratch[p]
            buf = self._tmp[off:off + lay.b[p] - lay.a[p]]
            self.reqs.append(self._comm.Irecv(buf, lay.peer[p], lay.tagnum[p] * _limits.TAG_SLOTS
                                              + self.slot))
            self._req_piece.append(p)
            self._seen.append(0)
            self._active_reqs += 1
            self._recvs_out += 1

    def _run(self, work):
        """Act on pieces whose dependencies are all met."""
        lay = self.layout
        acc = self.acc
        comm = self._comm
        while work:
            p = work.popleft()
            if lay.kind[p] == SEND:
                buf = self.src if lay.src_read[p] else acc
                req = comm.Isend(buf[lay.a[p]:lay.b[p]], lay.peer[p],
                                 lay.tagnum[p] * _limits.TAG_SLOTS + self.slot)
            elif lay.phase[p] == GATHER:
                req = comm.Irecv(acc[lay.a[p]:lay.b[p]], lay.peer[p],
                                 lay.tagnum[p] * _limits.TAG_SLOTS + self.slot)
            else:
                # a reduce-phase receive: combine it once it has arrived (it may be queued
                # twice, by its last dependency and by its arrival: the state says)
                if self._state[p] == _ARRIVED:
                    self._state[p] = _APPLIED
                    self._apply(p)
                    self._finish(p, work)
                continue
            self.reqs.append(req)
            self._req_piece.append(p)
            self._seen.append(0)
            self._active_reqs += 1

    def _apply(self, p):
        lay = self.layout
        a, b = lay.a[p], lay.b[p]
        off = lay.scratch[p]
        x = self.acc[a:b]
        mine = self.src[a:b] if lay.src_read[p] else x
        self.ufunc(mine, self._tmp[off:off + b - a], out=x)

    def _finish(self, p, work):
        self._remaining -= 1
        pending = self._pending
        for q in self.layout.dependents[p]:
            pending[q] -= 1
            if pending[q] == 0:
                work.append(q)

    # -- completion --------------------------------------------------------------------------

    def _complete(self, indices):
        """Requests ``indices`` (positions in :attr:`reqs`) have completed."""
        lay = self.layout
        work = deque()
        kind, phase, pieces = lay.kind, lay.phase, self._req_piece
        self._active_reqs -= len(indices)
        seen = self._seen
        for i in indices:
            seen[i] = 1
            p = pieces[i]
            if kind[p] == RECV and phase[p] == REDUCE:
                self._state[p] = _ARRIVED
                self._recvs_out -= 1
                if self._pending[p] == 0:
                    work.append(p)
            else:
                self._finish(p, work)
        if len(self.reqs) > 2 * self._active_reqs + 16:
            # compact: drop the completed requests (MPI.REQUEST_NULL by now)
            keep = [i for i, r in enumerate(self.reqs) if r]
            self.reqs = [self.reqs[i] for i in keep]
            self._req_piece = [pieces[i] for i in keep]
            self._seen = bytearray(len(keep))
        self._run(work)
        self._post_recvs()
        if self._remaining == 0:
            self._close()
        elif not self._active_reqs:
            self._close()
            raise RuntimeError(f"mtcoll executor stalled on rank {self.executor.rank} with "
                               f"{self._remaining} pieces left: the schedule "
                               f"{self.executor.schedule!r} is inconsistent")

    def _close(self):
        self.done = True
        if self in _state.active:
            _state.active.remove(self)
        if self._tmp is not None:
            _state.put_scratch(self._raw)
            self._tmp = self._raw = None
        callbacks, self.on_done = self.on_done, []
        for fn in callbacks:
            fn()

    def _unseen(self):
        # positions of requests that completed (MPI.REQUEST_NULL now) but were not handled:
        # the ones a Testsome/Waitsome that raised completed
        return [i for i, (r, s) in enumerate(zip(self.reqs, self._seen)) if not r and not s]

    def _fail(self, error):
        _state.fail(self, error)

    def test(self):
        """Advance all running executions without blocking; True once this one is complete.

        Raises the ``MPI.Exception`` of a failed message of this execution (:attr:`error`).
        """
        if not self.done:
            progress(block=False)
        if self.error is not None:
            raise self.error
        return self.done

    def wait(self, timeout=None):
        """Advance all running executions until this one is complete; returns True.

        With ``timeout`` (seconds), return False instead once no message of any running
        execution has completed for that long (a stall); the execution is then still running
        (see :meth:`outstanding`, :meth:`abandon`). Raises the ``MPI.Exception`` of a failed
        message of this execution (:attr:`error`).
        """
        while not self.done:
            deadline = None if timeout is None else time.monotonic() + timeout
            if not progress(block=True, deadline=deadline) and deadline is not None \
                    and time.monotonic() >= deadline:
                return False
        if self.error is not None:
            raise self.error
        return True

    def outstanding(self):
        """``(recv_from, send_to)``: sorted peer ranks of this execution's posted messages that
        have not completed (receives not arrived, sends not yet taken by their receiver)."""
        recv, send = set(), set()
        lay = self.layout
        for r, p in zip(self.reqs, self._req_piece):
            if r:  # completed requests are MPI.REQUEST_NULL
                (send if lay.kind[p] == SEND else recv).add(lay.peer[p])
        return sorted(recv), sorted(send)

    def abandon(self):
        """Stop this execution without completing it: cancel its posted receives (so nothing
        writes into its buffers any more) and drop it from the running executions. Its sends
        stay posted and keep their buffers alive through :attr:`reqs`. It counts as ``done``
        from then on (so waits return), but ``on_done`` never runs.
        """
        if self.done:
            return
        self.done = True
        if self in _state.active:
            _state.active.remove(self)
        lay = self.layout
        for r, p in zip(self.reqs, self._req_piece):
            if r and lay.kind[p] == RECV:
                try:
                    r.Cancel()
                    r.Wait()
                except MPI.Exception:
                    pass  # e.g. it arrived, truncated: either way it is over


def progress(block=False, deadline=None):
    """Advance every running execution once.

    With ``block``, wait until at least one outstanding message completes: in one
    ``MPI.Request.Waitsome`` over the requests of all running executions, or, when one of them
    asks to sleep (``wait="sleep"``, see :data:`WAIT`), by testing and sleeping in turn.
    Otherwise only test (``Testsome``). With a ``deadline`` (a ``time.monotonic()`` value) a
    blocking wait gives up at that time: it tests (``Testsome``) instead of blocking in
    ``Waitsome``. Returns True if anything completed (or failed).

    A failed message fails its own execution (:meth:`Execution.wait` raises the error there);
    the others go on. An error MPI reports without saying which request failed is raised here.
    """
    execs = list(_state.active)
    if not execs:
        return False
    if len(execs) == 1:
        allreqs, offsets = execs[0].reqs, [0]
    else:
        allreqs, offsets = [], []
        for e in execs:
            offsets.append(len(allreqs))
            allreqs.extend(e.reqs)
    if not any(e._active_reqs for e in execs):
        raise RuntimeError("mtcoll executor stalled with no outstanding message")
    statuses = []  # filled with the completed requests' statuses (read only on an error)
    try:
        idx = _some(allreqs, block, any(e.executor.sleep for e in execs), deadline, statuses)
    except MPI.Exception as error:
        idx = _charge(execs, error, statuses)
        if not idx:
            return True  # only failures: those executions are done
    if not idx:
        return False
    if len(execs) == 1:
        if not execs[0].done:
            execs[0]._complete(idx)
        return True
    idx = sorted(idx)
    j = 0
    for k, e in enumerate(execs):
        end = offsets[k] + len(e.reqs)
        mine = []
        while j < len(idx) and idx[j] < end:
            mine.append(idx[j] - offsets[k])
            j += 1
        if mine and not e.done:  # done: failed, or abandoned by a failure's callback
            e._complete(mine)
    return True


def _charge(execs, error, statuses):
    """Testsome/Waitsome over ``execs``' requests raised ``error``: fail the executions whose
    messages failed, and return the global indices of the requests that completed normally
    in that call (to be handled as usual).

    MPI says which messages failed only with ``MPI_ERR_IN_STATUS``: the call then completed
    ``outcount`` requests (MPI.REQUEST_NULL now, in index order) and set the error field of the
    first ``outcount`` statuses, in the same order. Any other error is raised as it is.
    """
    if error.Get_error_class() != MPI.ERR_IN_STATUS:
        raise error
    completed, base = [], 0
    for e in execs:
        completed.extend((e, base + i) for i in e._unseen())
        base += len(e.reqs)
    failed = [e for k, (e, _) in enumerate(completed)
              if k < len(statuses) and statuses[k].Get_error() != MPI.SUCCESS]
    if not failed:
        raise error
    for e in dict.fromkeys(failed):
        k = next(k for k, (f, _) in enumerate(completed)
                 if f is e and statuses[k].Get_error() != MPI.SUCCESS)
        e._fail(MPI.Exception(statuses[k].Get_error()))
    return [i for e, i in completed if not e.done]


def _some(reqs, block, sleep, deadline, statuses=None):
    # The completed requests among reqs: tested, or waited for as progress() describes.
    if not block:
        return MPI.Request.Testsome(reqs, statuses)
    if sleep:
        return _test_and_sleep(reqs, deadline, statuses)
    if deadline is None:
        return MPI.Request.Waitsome(reqs, statuses)
    test = MPI.Request.Testsome
    while True:  # busy, but able to give up: poll
        idx = test(reqs, statuses)
        if idx or time.monotonic() >= deadline:
            return idx


def _test_and_sleep(reqs, deadline=None, statuses=None):
    """Indices of completed requests, found by testing and, between tests, sleeping; an empty
    list once ``deadline`` (a ``time.monotonic()`` value) has passed."""
    test = MPI.Request.Testsome
    for _ in range(_limits.SPIN_POLLS):
        idx = test(reqs, statuses)
        if idx:
            return idx
    for _ in range(_limits.YIELD_POLLS):
        os.sched_yield()
        idx = test(reqs, statuses)
        if idx:
            return idx
    delay = _limits.SLEEP_MIN
    while True:
        time.sleep(delay)
        idx = test(reqs, statuses)
        if idx:
            return idx
        if deadline is not None and time.monotonic() >= deadline:
            return []
        delay = min(2 * delay, _limits.SLEEP_MAX)
