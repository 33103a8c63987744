"""What the ranks of a :class:`mtcoll.Comm` settle together before calls run: the private
duplicate, the wait mode, the algorithm check, the tuning table, and each algorithm's schedule
on its first use -- computed on rank 0 (or agreed) and broadcast, polled so that mtcoll's calls
in flight advance meanwhile and ``MTCOLL_TIMEOUT`` can give up -- and the executors built on
the schedules.

An executor runs on its rank's part of a schedule (:class:`~mtcoll.schedule.RankSchedule`):
rank 0 plans, cuts the schedule into one part per rank and scatters them, so a rank holds
O(its own transfers) and rank 0 sends O(all transfers) in total, where broadcasting the whole
schedule sent it to every rank. :func:`schedule` (``Comm.schedule``) still gives the whole
schedule, by a broadcast of its own, to the callers who ask for it.

Functions of the communicator, called by :class:`mtcoll.Comm` (construction),
:mod:`mtcoll.comm._dispatch` and ``auto`` (the calls), :mod:`mtcoll._calibrate`. They read and
fill of the Comm: ``_rank``/``_size``, ``_dup``, ``network``, ``algorithm``, ``wait``,
``segment_bytes``/``max_segments``, ``_alive``, and its caches ``_schedules``,
``_rank_schedules`` and ``_executors`` (one entry per algorithm).
"""

from __future__ import annotations

import io
import math
import os
import pickle
import time

import numpy as np
from mpi4py import MPI

from .. import _tuning, execute
from .._env import env_timeout
from ..schedule import RankSchedule, Schedule
from ._errors import ABANDONED, StallError
from ._progress import poll

SPECIAL_ALGORITHMS = ("auto", "native")  # algorithm names that are no schedule


def auto_wait(ranks_here):
    """The wait mode ``wait="auto"`` picks on a host running ``ranks_here`` ranks: ``"sleep"``
    when that is more ranks than the host has cores, else ``"busy"``. (:class:`mtcoll.Comm`
    then agrees on it: sleep if any rank sleeps.)"""
    return "sleep" if ranks_here > (os.cpu_count() or 1) else "busy"


def duplicate(comm, rank):
    # comm.Dup() as its nonblocking twin, polled: the running mtcoll calls advance meanwhile
    # (another rank may need one of them finished before it gets here), and with
    # MTCOLL_TIMEOUT a rank that never constructs the Comm is not waited for forever. Once
    # the duplicate exists every rank is in here, so the blocking collectives after it wait
    # for no absent rank (unless one gave up just as the last rank joined: the window the
    # second Test below narrows, not closes).
    try:
        timeout = env_timeout()
    except ValueError:
        timeout = None  # a bad value is reported by the first call, on this rank
    dup, req = comm.Idup()
    deadline = math.inf if timeout is None else time.monotonic() + timeout
    try:
        done = poll(req.Test, deadline, sleep=True)
    except BaseException:  # e.g. KeyboardInterrupt: MPI may still complete the duplicate
        ABANDONED.append((dup, req))
        raise
    if not done:
        done = req.Test()  # the last rank may have joined just now: narrow the window
    if not done:
        ABANDONED.append((dup, req))
        raise StallError(
            f"mtcoll.Comm on rank {rank}: not every rank of the communicator constructed an "
            f"mtcoll.Comm within MTCOLL_TIMEOUT={timeout:g} s (constructing one is "
            f"collective: every rank must, in the same order as its other collectives on "
            f"that communicator)", None, timeout, [])
    return dup


def check_algorithm(comm, name, source):
    # Only rank 0 imports the planner (it may pull in numba); the verdict is broadcast.
    verdict = None
    if comm._dup.Get_rank() == 0:
        try:
            from ..plan import ALGORITHMS
            allowed = SPECIAL_ALGORITHMS + tuple(ALGORITHMS)
            if name not in allowed:
                what = "environment variable MTCOLL_ALGO" if source == "MTCOLL_ALGO" \
                    else "algorithm"
                verdict = f"{what}={name!r} is not one of {', '.join(allowed)}"
        except ImportError as e:
            verdict = ImportError(f"cannot import mtcoll.plan: {e}")
    gate(comm)
    verdict = comm._dup.bcast(verdict, root=0)
    if isinstance(verdict, ImportError):
        raise verdict
    if verdict:
        raise ValueError(f"{verdict} (rank {comm._dup.Get_rank()})")


def gate(comm):
    # Before a broadcast of what rank 0 alone computes (imports, plans, files): with more
    # ranks than cores, the others wait sleeping rather than polling in the broadcast,
    # which would leave rank 0 a sliver of a core (64 ranks on 2 cores: the first Comm
    # took 13.5 s that way, 1.9 s this way).
    if getattr(comm, "wait", "busy") != "sleep":
        return
    poll(comm._dup.Ibarrier().Test, sleep=True)


def _bcast_within(comm, payload, timeout, what):
    # bcast(payload, root=0) that advances mtcoll's running calls while it waits (a rank
    # may still need one of them finished before it makes this call) and gives up after
    # ``timeout`` seconds (MTCOLL_TIMEOUT; None: never): the planning on a call's first use
    # must not hold the other ranks for ever in a blocking broadcast when a rank never
    # makes the call, or makes a different one.
    deadline = math.inf if timeout is None else time.monotonic() + timeout
    data = pickle.dumps(payload) if comm._rank == 0 else b""
    size = np.array([len(data)], dtype=np.int64)
    for step in (0, 1):
        if step:
            data = bytearray(int(size[0])) if comm._rank else data
            req = comm._dup.Ibcast(data, root=0)
        else:
            req = comm._dup.Ibcast(size, root=0)
        _await(comm, req, (req, data, size), deadline, timeout, what)
    return pickle.loads(data) if comm._rank else payload


def _await(comm, req, keep, deadline, timeout, what):
    # a set-up collective's request, polled (see _bcast_within); ``keep``: what MPI may
    # still read or write if this rank gives up
    try:
        done = poll(req.Test, deadline, comm.wait == "sleep")
    except BaseException:  # e.g. another call's error, raised by the progress made
        ABANDONED.append(keep)
        comm._break(f"{what} interrupted on rank {comm._rank}")
        raise
    if not done:
        ABANDONED.append(keep)
        comm._break(f"{what} timed out on rank {comm._rank}")
        raise StallError(
            f"{what} on rank {comm._rank}: not every rank took part within "
            f"MTCOLL_TIMEOUT={timeout:g} s (the first call with an algorithm plans its "
            f"schedule on rank 0 and broadcasts it; a rank may not have made this "
            f"call, or made a different one). The Comm is now broken: free it and make "
            f"a new one, or end the job", None, timeout, [])


def _scatter_within(comm, parts, timeout, what):
    # Scatterv from rank 0 of ``parts`` = (the ranks' bytes one after another, each
    # rank's length; None elsewhere), polled like _bcast_within; returns this rank's
    deadline = math.inf if timeout is None else time.monotonic() + timeout
    size = np.zeros(1, np.int64)
    if comm._rank == 0:
        blob, lengths = parts
        counts = np.array(lengths, np.int64)
        displs = np.concatenate(([0], np.cumsum(counts)[:-1]))
        whole = np.frombuffer(blob, np.uint8)
    else:
        counts = displs = whole = None
    req = comm._dup.Iscatter([counts, MPI.INT64_T] if comm._rank == 0 else None,
                             [size, MPI.INT64_T], root=0)
    _await(comm, req, (req, counts, size), deadline, timeout, what)
    mine = bytearray(int(size[0]))
    send = [whole, (counts.astype(np.int32), displs.astype(np.int32)), MPI.BYTE] \
        if comm._rank == 0 else None
    req = comm._dup.Iscatterv(send, [mine, MPI.BYTE], root=0)
    _await(comm, req, (req, send, mine), deadline, timeout, what)
    return mine


def wait_mode(comm, wait, ranks_here, threaded):
    # "sleep" when a host runs more ranks than it has cores: a rank waiting for a message
    # then gives its core to one with work instead of polling (see mtcoll.execute.WAIT).
    # The ranks agree (sleep if any rank asks for it): the mode also sets the segment
    # defaults, and every rank must cut messages the same way.
    env = os.environ.get("MTCOLL_WAIT", "").strip().lower()
    mode = env or (wait or "auto").strip().lower()
    bad = None
    if mode not in ("auto", "busy", "sleep"):
        where = f"environment variable MTCOLL_WAIT={os.environ['MTCOLL_WAIT']!r}" if env \
            else f"wait={wait!r}"
        bad = f"{where} (rank {comm._dup.Get_rank()}) is not one of auto, busy, sleep"
    if mode == "auto":
        mode = auto_wait(ranks_here)
    if threaded is None:
        bad = f"environment variable MTCOLL_PROGRESS={os.environ['MTCOLL_PROGRESS']!r} " \
              f"(rank {comm._dup.Get_rank()}) is not one of thread, off"
    # and whether every rank runs the progress thread: only then do blocking calls handed
    # to the library run as the library's blocking calls (the same call on every rank)
    flags = comm._dup.allreduce((mode == "sleep") | (bad is not None) << 1
                                | (not threaded) << 2, op=MPI.BOR)
    if flags & 2:
        raise ValueError(bad or "MTCOLL_WAIT, MTCOLL_PROGRESS or wait is not valid "
                                "on some rank")
    return ("sleep" if flags & 1 else "busy"), not flags & 4


def load_tuning(comm):
    # Rank 0 reads the file and broadcasts the table for this communicator: every rank must
    # choose the same algorithm for a call, or the call deadlocks.
    payload = None
    if comm._dup.Get_rank() == 0:
        try:
            path, required = _tuning.resolve_path()
            if path is None or (not required and not path.is_file()):
                payload = ("ok", None, None)
            else:
                from ..plan import ALGORITHMS
                table = _tuning.load(path, ALGORITHMS)
                key = (comm._dup.Get_size(), comm.network.spec.strip().lower())
                mine = {key: table[key]} if key in table else None
                payload = ("ok", mine, str(path))
        except (ValueError, ImportError) as e:
            payload = ("error", str(e))
    gate(comm)
    payload = comm._dup.bcast(payload, root=0)
    if payload[0] == "error":
        raise ValueError(f"{payload[1]} (read on rank 0, for rank {comm._dup.Get_rank()}; "
                         f"MTCOLL_TUNING=off ignores tuning files)")
    return payload[1], payload[2]

# -- schedules ---------------------------------------------------------------------------


def schedule(comm, algorithm=None):
    """The :class:`~mtcoll.schedule.Schedule` of ``algorithm`` (default: this Comm's).

    Collective on first use of an algorithm: rank 0 plans, the others receive the result.
    Raises ValueError (on every rank) when the algorithm does not fit the topology.
    """
    comm._alive()
    name = (algorithm or comm.algorithm).strip().lower()
    if name in SPECIAL_ALGORITHMS:
        raise ValueError(f"{name!r} names no schedule; pass an algorithm such as "
                         f"'multitree'")
    got = comm._schedules.get(name)
    if got is None:
        payload = None
        if comm._rank == 0:
            try:
                from ..plan import plan
                sched = plan(comm.network, name)
                out = io.BytesIO()
                sched.save(out)
                payload = ("ok", out.getvalue())
            except Exception as e:  # every rank must raise, not only rank 0
                payload = ("error", type(e).__name__, str(e))
        # nonblocking and polled on every rank (the same calls everywhere: whether calls are
        # running differs between ranks), sleeping in sleep mode like _gate
        payload = _bcast_within(comm, payload, env_timeout(),
                                     f"planning {name!r} on first use")
        if payload[0] == "ok":
            got = sched if comm._rank == 0 else Schedule.load(io.BytesIO(payload[1]))
            if got.nranks != comm._size:
                raise ValueError(f"plan({comm.network.spec!r}, {name!r}) gave a schedule "
                                 f"for {got.nranks} ranks, not {comm._size}")
        else:
            got = payload[1:]
        comm._schedules[name] = got
    if isinstance(got, tuple):
        kind, message = got
        cls = {"ValueError": ValueError, "TypeError": TypeError}.get(kind, RuntimeError)
        raise cls(f"planning {name!r} on {comm.network.spec!r}: {message}")
    return got


def rank_schedule(comm, name):
    """This rank's :class:`~mtcoll.schedule.RankSchedule` of ``name`` (collective on first
    use: rank 0 plans and scatters the parts). Raises like :meth:`schedule`."""
    comm._alive()
    name = name.strip().lower()
    parts = comm._rank_schedules
    got = parts.get(name)
    if got is None and isinstance(comm._schedules.get(name), Schedule):
        got = RankSchedule.of(comm._schedules[name], comm._rank)
    if got is None:
        if name in SPECIAL_ALGORITHMS:
            raise ValueError(f"{name!r} names no schedule; pass an algorithm such as "
                             f"'multitree'")
        cut = status = None
        if comm._rank == 0:
            try:
                from ..plan import rank_parts
                if comm.network.nranks != comm._size:
                    raise ValueError(f"the schedule is for {comm.network.nranks} ranks, not "
                                     f"{comm._size}")
                blob, lengths = bytearray(), []  # one buffer: no list of parts to join
                for part in rank_parts(comm.network, name):
                    data = part.to_bytes()
                    lengths.append(len(data))
                    blob += data
                if len(blob) > 2**31 - 1:  # Scatterv's int displacements
                    raise ValueError("its parts exceed 2 GiB in total")
                cut = (blob, lengths)
                status = ("ok",)
            except Exception as e:  # every rank must raise, not only rank 0
                status = ("error", type(e).__name__, str(e))
        what = f"planning {name!r} on first use"
        status = _bcast_within(comm, status, env_timeout(), what)
        if status[0] == "ok":
            got = RankSchedule.from_bytes(_scatter_within(comm, cut, env_timeout(), what))
        else:
            got = status[1:]
        parts[name] = got
    if isinstance(got, tuple):
        kind, message = got
        cls = {"ValueError": ValueError, "TypeError": TypeError}.get(kind, RuntimeError)
        raise cls(f"planning {name!r} on {comm.network.spec!r}: {message}")
    return got


def executor(comm, name):
    ex = comm._executors.get(name)
    if ex is None:
        ex = comm._executors[name] = execute.Executor(
            comm._dup, rank_schedule(comm, name), comm.segment_bytes, comm.max_segments,
            comm.wait)
    return ex

