"""A call's path after its arguments are checked and its algorithm chosen: started under the
lock (the agreement check, retiring old calls), then run trivially, in the MPI library (its
blocking call, or its nonblocking twin) or on a schedule by the executor, and a
:class:`~mtcoll.comm._requests.Request` returned.

Functions of the communicator: :func:`start` is what ``Comm.Allreduce`` and the other calls run
(after their fast path declines). They read of the :class:`mtcoll.Comm`: ``_prepare`` (the
arguments checked, :mod:`mtcoll.comm._buffers`, and the ``auto`` choice), ``_alive``,
``_auto``, ``_probing``, ``_env_algorithm``, its sizes ``_rank``/``_size``, its private
duplicate ``_dup``, the running calls ``_requests`` and counters ``_seq``/``_ncalls``, and
``_threaded``; and the schedules and executors of :mod:`mtcoll.comm._planning`.
"""

from __future__ import annotations

import sys
from collections import deque

import numpy as np
from mpi4py import MPI

from .. import _ops, execute
from .._env import env_flag, env_quiet, env_timeout
from ..schedule import GATHER, REDUCE
from . import _planning
from ._agreement import agree
from ._errors import StallError
from ._progress import LOCK, reraise, wake
from ._requests import Request

_FAST_CACHE = 256  # (call, nbytes, dtype, op) choices remembered per Comm
#: the calls with a fast path (Comm._fast_path), Iallreduce under Allreduce's name
FAST_KINDS = ("Allreduce", "Reduce_scatter_block", "Allgather")
_FAST_KIND = {"Allreduce": FAST_KINDS[0], "Iallreduce": FAST_KINDS[0],
              "Reduce_scatter_block": FAST_KINDS[1], "Allgather": FAST_KINDS[2]}


def fast_key(c):
    """The fast path's key of a prepared call: (kind, recvbuf bytes, dtype number, op
    handle or 0)."""
    return (_FAST_KIND[c.kind], c.recv.flat.nbytes, c.dtype.num,
            0 if c.op is None else c.op.handle)
_COMPLETE = Request()  # what a blocking call the library ran returns: nothing to wait for
#: Calls rank 0 has printed a debug line for (``MTCOLL_DEBUG``: every call the user made on an
#: mtcoll communicator of this process; ``python -m mtcoll.run`` reports it at the end).
shown = 0


def start(comm, kind, sendbuf, recvbuf, op, blocking):
    reraise()  # what the progress thread hit, in this thread
    comm._alive()
    check = env_flag("MTCOLL_CHECK")
    debug = env_flag("MTCOLL_DEBUG") and not comm._probing  # (the calibration probe)
    timeout = env_timeout()
    call, err = None, None
    try:
        call = comm._prepare(kind, sendbuf, recvbuf, op)
    except (ValueError, TypeError, BufferError) as e:
        err = e
    with LOCK:
        if check:
            agree(comm, kind, call, err, timeout)
        elif err is not None:
            raise err
        _retire(comm)
        comm._alive()  # the progress made above may have broken it (another call's error)
        try:
            req = _launch(comm, call, blocking, debug, timeout)
        except StallError as e:  # from planning on first use, which does not know the call
            e.call = kind
            e.args = (f"mtcoll {kind}: {e.args[0]}",)
            raise
        comm._ncalls += 1
        if type(req) is not tuple:
            req._comm, req._timeout, req._kind = comm, timeout, kind
            req._threaded, req._number = comm._threaded, comm._ncalls
            if not req._done():
                comm._requests.append(req)
                if req._greq is not None and comm._threaded and not blocking:
                    wake()  # (a blocking call's own Wait advances it)
            return req
    # the library's blocking call, outside the lock: the progress thread must be able to
    # advance mtcoll's calls in flight meanwhile
    run, done = req
    run()
    for fn in done:
        fn()
    return _COMPLETE


def _retire(comm):
    # Drop finished calls; wait for any call old enough that a new one would reuse its tag
    # slot (the same decision on every rank: sequence numbers agree). Calls the MPI library
    # runs (no sequence number) use no slot: an unfinished one must not hide older
    # schedule calls behind it.
    reqs = comm._requests
    if not reqs:
        return
    oldest = comm._seq + 1 - execute.TAG_SLOTS
    for r in [r for r in reqs if r.seq is not None and r.seq <= oldest]:
        r.Wait()
    if any(r._done() for r in reqs):
        comm._requests = deque(r for r in reqs if not r._done())


def _launch(comm, c, blocking, debug, timeout):
    kind = c.kind
    size = comm._size
    # (one rank and the library's choice: the library's call, so that like calls take the
    # fast path to it; a schedule forced on one rank has nothing to exchange)
    if c.dtype is not None and (c.count == 0 or size == 1 and c.algorithm != "native"):
        if debug and comm._rank == 0:
            _debug(comm, c, "algorithm=none (nothing to exchange)")
        return _trivial(comm, c)
    if c.algorithm != "native" and kind in ("Allreduce", "Iallreduce"):
        try:
            _planning.rank_schedule(comm, c.algorithm)
        except ValueError as e:
            if c.algorithm != comm._env_algorithm:
                raise
            comm._auto(c, f"MTCOLL_ALGO={c.algorithm} does not fit: {e}; ")
    if c.algorithm != "native":
        if kind in ("Allreduce", "Iallreduce"):
            ex = _planning.executor(comm, c.algorithm)
            phases = (REDUCE, GATHER)
        else:
            ex = _block_executor(comm, c.algorithm)
            phases = (REDUCE,) if kind == "Reduce_scatter_block" else (GATHER,)
        if ex is None:
            c.why = "no schedule with one chunk per rank"
        else:
            lay = ex.layout(c.count, c.dtype.itemsize, phases)
            if not ex.fits_tags(lay):
                c.why = f"{lay.max_stream} messages per rank pair exceed MPI.TAG_UB"
            else:
                if debug and comm._rank == 0:
                    _debug(comm, c, (
                        f"algorithm={ex.schedule.algorithm} steps={ex.schedule.steps} "
                        f"segment={ex.segmenting()[0]}Bx{ex.segmenting()[1]} "
                        f"wait={comm.wait} "
                        f"messages={lay.nmessages}"
                        + (f" ({c.why})" if c.why else "")))
                return _run_schedule(comm, c, ex, phases, blocking, debug)
    if debug and comm._rank == 0:
        _debug(comm, c, f"algorithm=native ({c.why})")
    comm._alive()  # planning a schedule above advanced the running calls: one may have failed
    return _native(comm, c, blocking and comm._threaded and timeout is None)


def _debug(comm, c, how):
    global shown
    shown += 1
    op = _ops.op_name(c.op) or "user-defined" if c.op is not None else "-"
    print(f"mtcoll[rank 0]: {c.kind} count={c.count} "
          f"dtype={getattr(c.dtype, 'name', 'derived')} op={op} bytes={c.nbytes} "
          f"topology={comm.network.spec} {how}", file=sys.stderr, flush=True)


def _block_executor(comm, name):
    """An executor whose schedule has one chunk per rank, each owned by another rank."""
    for cand in dict.fromkeys((name, "multitree", "ring")):
        try:
            sched = _planning.rank_schedule(comm, cand)
        except ValueError:
            continue
        if sched.nchunks == comm._size and \
                np.array_equal(np.sort(sched.owner), np.arange(comm._size)):
            return _planning.executor(comm, cand)
    return None


def _trivial(comm, c):
    # Nothing to exchange: no elements, or a single rank.
    if c.count and c.send is not None:
        np.copyto(c.recv.flat, c.send.flat)
    c.recv.copy_back()
    return Request()


def _native(comm, c, direct):
    # The MPI library runs the call, on the duplicate. ``direct``: a blocking call with the
    # progress thread running and no watchdog: the library's blocking call, the same on
    # every rank (MPI matches a blocking collective with a nonblocking one on no rank, so
    # the choice must not depend on what each rank has in flight). Otherwise its
    # nonblocking twin, which Request.Wait waits for while advancing mtcoll's calls (a
    # rank blocked in MPI_Allreduce could not advance them while a peer waits for one of
    # them before it joins) and can give up on after MTCOLL_TIMEOUT.
    dup = comm._dup
    if c.recv is None:
        sendspec, recvspec = c.raw  # derived datatypes: as given
        recv = None
    else:
        sendspec = MPI.IN_PLACE if c.send is None else c.send.flat
        recvspec = c.recv.flat
        recv = c.recv
    done = [recv.copy_back] if recv is not None and recv.orig is not None else []
    if (direct or c.kind == "Iallreduce" and comm._threaded) and not done \
            and c.dtype is not None and env_quiet() and len(comm._fast) < _FAST_CACHE:
        comm._fast.add(fast_key(c))  # the library's, always
    if direct:
        if c.kind == "Allgather":
            return (lambda: dup.Allgather(sendspec, recvspec)), done
        if c.kind == "Reduce_scatter_block":
            return (lambda: dup.Reduce_scatter_block(sendspec, recvspec, c.op)), done
        return (lambda: dup.Allreduce(sendspec, recvspec, c.op)), done
    if c.kind == "Allgather":
        req = dup.Iallgather(sendspec, recvspec)
    elif c.kind == "Reduce_scatter_block":
        req = dup.Ireduce_scatter_block(sendspec, recvspec, c.op)
    else:
        req = dup.Iallreduce(sendspec, recvspec, c.op)
    return Request(native=req, on_done=done, keep=(c.raw, sendspec, recvspec))


def _run_schedule(comm, c, ex, phases, blocking, debug=False):
    comm._alive()  # planning on first use advances the running calls: one may have failed
    comm._seq += 1
    size, rank = comm._size, comm._rank
    recv = c.recv
    sched = ex.schedule
    done = []
    src = None  # the input, when not in acc: the executor reads it without a first copy
    if c.kind in ("Allreduce", "Iallreduce"):
        acc = recv.flat
        if not acc.flags.c_contiguous:  # a 1-element or F-order view: work on a copy
            acc = np.ascontiguousarray(acc)
            done.append(lambda: np.copyto(recv.flat, acc))
        if c.send is not None:
            src = c.send.flat
            if not src.flags.c_contiguous:
                src = np.ascontiguousarray(src)
    else:
        k = c.count // size
        owner = sched.owner
        mine = int(np.flatnonzero(owner == rank)[0])
        if c.kind == "Reduce_scatter_block":
            given = recv.flat if c.send is None else c.send.flat
            acc = np.empty(c.count, dtype=c.dtype)
            # chunk j of the working buffer carries the block of rank owner[j], so that
            # each rank ends up owning its own block
            acc.reshape(size, k)[...] = given.reshape(size, k)[owner]
            out = recv.flat[:k]
            done.append(lambda: np.copyto(out, acc[mine * k:(mine + 1) * k]))
        else:
            identity = np.array_equal(owner, np.arange(size))
            if identity and recv.flat.flags.c_contiguous:
                acc = recv.flat
            else:
                acc = np.empty(c.count, dtype=c.dtype)
                full = recv.flat
                done.append(lambda: full.reshape(size, k).__setitem__(
                    owner, acc.reshape(size, k)))
            own = (recv.flat[rank * k:(rank + 1) * k] if c.send is None else c.send.flat)
            if acc is not recv.flat or c.send is not None:
                acc[mine * k:(mine + 1) * k] = own
    done.append(recv.copy_back)
    execution = ex.start(acc, c.ufunc, comm._seq, phases, src, blocking=blocking,
                         debug=debug)
    return Request(execution=execution, on_done=done, keep=(c.raw, c.send, recv, acc, src),
                   seq=comm._seq)

