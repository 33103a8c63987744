"""The public communicator, :class:`Comm`, and the module-level calls built on it.

A :class:`Comm` wraps an mpi4py intracommunicator. It duplicates it once (its messages never
mix with the caller's), builds the network topology, plans schedules on demand (on rank 0,
broadcast to the others) and runs them with :mod:`mtcoll.execute`. Calls it cannot or should
not run itself go to the MPI library on the duplicate; see :class:`Comm` for the rules.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import sys
import time
import zlib
from collections import deque

import numpy as np
from mpi4py import MPI
from mpi4py.util import dtlib

from . import _ops, _tuning, execute
from .schedule import GATHER, REDUCE, Schedule
from .topology import from_comm, host_leaders, mpi_topology

__all__ = ["Comm", "Request", "Allreduce", "Iallreduce", "waitall", "choose", "StallError",
           "SMALL_MESSAGE_BYTES", "ENV_VARS"]

#: ``algorithm="auto"`` leaves messages below this many bytes to the MPI library.
SMALL_MESSAGE_BYTES = 64 * 1024

#: Environment variables mtcoll reads.
ENV_VARS = ("MTCOLL_ALGO", "MTCOLL_TOPOLOGY", "MTCOLL_TUNING", "MTCOLL_WAIT", "MTCOLL_CHECK",
            "MTCOLL_DEBUG", "MTCOLL_TIMEOUT")

_SPECIAL_ALGORITHMS = ("auto", "native")
_CALLS = ("Allreduce", "Iallreduce", "Reduce_scatter_block", "Allgather")


def choose(nbytes, nranks, topology, tuning=None):
    """The algorithm ``algorithm="auto"`` uses for a call moving ``nbytes`` bytes per rank.

    The tuning hook. A measured tuning table (``tuning``, written by
    ``python -m mtcoll.bench --tune``; see :mod:`mtcoll._tuning`) decides when it has a table
    for ``nranks`` ranks on this topology. Otherwise the built-in rule: the MPI library
    (``"native"``) below :data:`SMALL_MESSAGE_BYTES` -- where a Python executor's per-message
    cost dominates -- and MultiTree above, which fits every topology and every rank count.

    Parameters
    ----------
    nbytes : int
        Size of the buffer being reduced, in bytes (the same on every rank).
    nranks : int
        Size of the communicator.
    topology : mtcoll.topology.Topology or str
        The communicator's topology (or its spec).
    tuning : dict, optional
        A tuning table as :func:`mtcoll._tuning.load` returns it, keyed by
        ``(nranks, topology spec)``. :class:`Comm` passes the table it read at construction.

    Returns
    -------
    str
        ``"native"`` or a name from ``mtcoll.plan.ALGORITHMS``. It must depend only on the
        arguments, so that every rank chooses the same.
    """
    if nranks < 2:
        return "native"
    spec = getattr(topology, "spec", topology)
    tuned = _tuning.lookup(tuning, nbytes, nranks, spec)
    if tuned is not None:
        return tuned
    if nbytes < SMALL_MESSAGE_BYTES:
        return "native"
    return "multitree"


def _env_flag(name):
    raw = os.environ.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"environment variable {name}={os.environ[name]!r} (rank "
                     f"{MPI.COMM_WORLD.Get_rank()} of MPI.COMM_WORLD): expected 0 or 1")


def _positive_int(name, value, rank, per_rank=False):
    # None (the default) or a positive int; ``ports`` may also be one int per rank.
    if value is None:
        return None
    if per_rank and not isinstance(value, (int, np.integer)):
        try:
            values = [int(v) for v in value if isinstance(v, (int, np.integer))]
            ok = len(values) == len(value)
        except TypeError:
            ok = False
        if ok and values and min(values) >= 1:
            return value
    elif isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1:
        return int(value)
    what = "a positive int or one per rank" if per_rank else "a positive int"
    raise ValueError(f"{name} (rank {rank}) must be {what} or None, got {value!r}")


def _env_timeout():
    # MTCOLL_TIMEOUT: seconds (float > 0) for the stall watchdog; unset or empty: none.
    raw = os.environ.get("MTCOLL_TIMEOUT", "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"environment variable MTCOLL_TIMEOUT={os.environ['MTCOLL_TIMEOUT']!r} "
                         f"(rank {MPI.COMM_WORLD.Get_rank()} of MPI.COMM_WORLD): expected a "
                         f"number of seconds > 0, or unset for no timeout")
    return value


class StallError(TimeoutError):
    """An mtcoll call gave up waiting after ``MTCOLL_TIMEOUT`` seconds.

    Raised by the agreement check (``MTCOLL_CHECK=1``) when some ranks did not make the call in
    time, by ``Wait`` (a blocking call, :meth:`Request.Wait`, :func:`waitall`) when no
    message of the running calls completed for that long, and by the broadcast of the schedule
    that an algorithm's first call (or :meth:`Comm.schedule`) plans on rank 0, when not every
    rank took part in time (naming no ranks). The :class:`Comm` is broken
    afterwards (messages of the call may still be in flight): its calls raise RuntimeError;
    free it and make a new one, or end the job.

    Attributes
    ----------
    call : str
        ``"Allreduce"``, ``"Iallreduce"``, ``"Reduce_scatter_block"`` or ``"Allgather"``
        (None when :meth:`Comm.schedule` was called directly).
    timeout : float
        The seconds waited (``MTCOLL_TIMEOUT``).
    ranks : list of int
        The ranks (of the communicator) waited for: those that did not make the call (check),
        or those whose messages had not arrived (data path; empty when the MPI library ran the
        call, which does not say).
    """

    def __init__(self, message, call=None, timeout=None, ranks=()):
        super().__init__(message)
        self.call, self.timeout, self.ranks = call, timeout, list(ranks)

    def __str__(self):
        return self.args[0]


# Whatever a broken Comm leaves behind (requests with their buffers, its communicators): kept
# alive for good, since MPI may still read or write those buffers, and a freed communicator's
# context could be reused by a new one while stale messages for it are in flight.
_ABANDONED = []


def _poll(test, deadline=math.inf, sleep=False):
    """Call ``test()`` until it returns True (then True) or ``deadline`` passes (then False).

    In between, advance mtcoll's running calls (:func:`mtcoll.execute.progress`): another rank
    may be unable to join what we wait for until one of those finishes, since the ranks may
    complete their calls in different orders. And sleep as the executor does in sleep mode, or
    not at all.
    """
    delay = execute.SLEEP_MIN
    while not test():
        if execute.running():
            execute.progress(block=False)
        if time.monotonic() >= deadline:
            return False
        if sleep:
            time.sleep(delay)
            delay = min(2 * delay, execute.SLEEP_MAX)
    return True


def _mpi_error_text(e):
    # MPI_ERR_IN_STATUS (from Waitsome/Testsome) says only "see the status": name the class.
    try:
        cls = e.Get_error_class()
        names = {getattr(MPI, n): n for n in ("ERR_TRUNCATE", "ERR_IN_STATUS", "ERR_OTHER",
                                              "ERR_COUNT", "ERR_TYPE", "ERR_INTERN")}
        return f"{names.get(cls, f'error class {cls}')}: {e.Get_error_string()}"
    except Exception:
        return str(e)


def _code(text):
    return zlib.crc32(str(text).encode()) & 0x7FFFFFFF


# The agreement check's text per rank (UTF-8 JSON, zero-padded): the call's fields, or the error
# its arguments raised, shortened to fit.
_CHECK_TEXT = 1024


def _fit_json(fields, limit):
    """``fields`` (a dict of str, int or None) as JSON in at most ``limit`` bytes: the longest
    string is shortened (ending in "...") until it fits."""
    fields = dict(fields)
    while True:
        data = json.dumps(fields).encode()
        if len(data) <= limit:
            return data
        texts = [k for k, v in fields.items() if isinstance(v, str) and len(v) > 3]
        if not texts:
            return json.dumps({"error": "ValueError", "message": "(too long)"}).encode()
        k = max(texts, key=lambda k: len(fields[k]))
        v = fields[k]
        cut = len(v) - 4
        while cut > 0 and len(json.dumps(v[:cut] + "...").encode()) > \
                len(json.dumps(v).encode()) - (len(data) - limit):
            cut = cut * 3 // 4  # escaped characters take up to 6 bytes each
        fields[k] = v[:max(0, cut)] + "..."


def _unfit_json(row):
    data = row.tobytes().rstrip(b"\0")
    try:
        return json.loads(data.decode())
    except ValueError:
        return {}


# -- buffers -------------------------------------------------------------------------------------

class _Buf:
    """A buffer argument as a flat array (``flat``); ``orig`` is set when ``flat`` is a copy
    of a non-contiguous array, which :meth:`copy_back` refreshes."""

    __slots__ = ("flat", "orig", "full")

    def __init__(self, flat, orig=None, full=None):
        self.flat, self.orig, self.full = flat, orig, full

    def copy_back(self):
        if self.orig is not None:
            self.orig[...] = self.full.reshape(self.orig.shape)


def _buffer(spec, name, rank, writable):
    """Parse an mpi4py buffer spec (``buf``, ``[buf, datatype]``, ``[buf, count, datatype]``,
    ``[buf, (count, displ), datatype]``). Returns a :class:`_Buf`, or None when only the MPI
    library can handle it (a derived or pair datatype)."""
    where = f"{name} (rank {rank})"
    buf, count, displ, dt = spec, None, 0, None
    if isinstance(spec, (list, tuple)):
        if not 1 <= len(spec) <= 3:
            raise TypeError(f"{where}: a buffer spec is buf, [buf, datatype] or "
                            f"[buf, count, datatype], got a sequence of {len(spec)}")
        if isinstance(spec[0], (int, float, complex, np.number)):
            raise TypeError(f"{where}: expected a buffer (numpy array, bytearray, "
                            f"memoryview...), got a {type(spec).__name__} of numbers")
        buf, rest = spec[0], list(spec[1:])
        if len(rest) == 2:
            count, dt = rest
        elif len(rest) == 1:
            if isinstance(rest[0], (int, np.integer, tuple, list)):
                count = rest[0]
            else:
                dt = rest[0]
        if isinstance(count, (tuple, list)):
            if len(count) != 2:
                raise TypeError(f"{where}: expected (count, displacement), got {count!r}")
            count, displ = count
    npdt = None
    if dt is not None:
        if isinstance(dt, MPI.Datatype):
            if dt == MPI.DATATYPE_NULL:
                raise TypeError(f"{where}: MPI.DATATYPE_NULL is not a datatype")
            if not dt.is_predefined:
                return None
            try:
                npdt = np.dtype(dtlib.to_numpy_dtype(dt))
            except (ValueError, TypeError):
                return None
        else:
            try:
                npdt = np.dtype(dt)
            except TypeError:
                raise TypeError(f"{where}: {dt!r} is not a datatype") from None
        if not _ops.simple_dtype(npdt):
            return None
    if buf is MPI.IN_PLACE or buf is MPI.BOTTOM:
        raise TypeError(f"{where}: MPI.IN_PLACE/MPI.BOTTOM are not accepted here")
    if isinstance(buf, np.ndarray):
        arr = buf
    else:
        try:
            arr = np.asarray(memoryview(buf))
        except (TypeError, ValueError, NotImplementedError) as e:
            raise TypeError(f"{where}: expected a buffer (numpy array, bytearray, "
                            f"memoryview...), got {type(buf).__name__}: {e}") from None
    if writable and not arr.flags.writeable:
        raise ValueError(f"{where} is read-only")
    if npdt is None and not _ops.simple_dtype(arr.dtype):
        # mpi4py maps no other dtype to an MPI datatype by itself (it would raise a KeyError
        # or BufferError naming neither the argument nor the rank)
        raise TypeError(f"{where}: dtype {arr.dtype} has no predefined MPI datatype "
                        f"(object, structured, byte-swapped, string, void and datetime arrays "
                        f"need [buf, datatype] with an MPI datatype, or a conversion)")
    orig = full = None
    if arr.flags.c_contiguous or arr.flags.f_contiguous:
        flat = arr.ravel(order="K")  # a view, in memory order (what MPI would see)
    else:
        orig = arr
        flat = full = np.ascontiguousarray(arr).ravel()
    if npdt is not None and npdt != flat.dtype:
        if orig is not None:
            raise TypeError(f"{where}: cannot reinterpret a non-contiguous array as {npdt}")
        if flat.nbytes % npdt.itemsize:
            raise ValueError(f"{where}: {flat.nbytes} bytes is not a whole number of "
                             f"{npdt.name} elements")
        flat = flat.view(np.uint8).view(npdt)
    if count is not None:
        count, displ = int(count), int(displ)
        if count < 0 or displ < 0 or displ + count > flat.size:
            raise ValueError(f"{where}: count {count} at displacement {displ} does not fit "
                             f"in its {flat.size} elements")
        flat = flat[displ:displ + count]
    return _Buf(flat, orig, full)


# -- requests ------------------------------------------------------------------------------------

class Request:
    """The handle of a nonblocking mtcoll call (mpi4py-style).

    It keeps the call's buffers alive until the call completes. Until :meth:`Test` returns True
    or :meth:`Wait` returns, the send buffer must not be modified and the receive buffer must
    not be read or written. Progress happens only inside mtcoll calls (``Wait``, ``Test``,
    :func:`waitall` and the start of any other mtcoll call): do not block in other MPI calls
    on something another rank can only do after its own ``Wait``.

    With ``MTCOLL_TIMEOUT`` set when the call started, :meth:`Wait` raises :class:`StallError`
    once no message of the running calls has completed for that many seconds, naming the
    ranks whose messages are outstanding. That, or any other error inside ``Wait`` (an MPI
    error such as a truncated message), breaks the :class:`Comm`: its receives are cancelled,
    and this request and every later call on that Comm raise RuntimeError.
    """

    def __init__(self, execution=None, native=None, on_done=(), keep=(), seq=None):
        self._exec = execution
        self._native = native
        self._on_done = list(on_done)
        self._keep = keep
        self.seq = seq
        self._comm = None  # set by Comm._start: the Comm to break on a stall
        self._timeout = None
        self._kind = None
        self._complete = execution is None and native is None
        if execution is not None:
            execution.on_done.append(self._finish)
            execution.on_error.append(self._exec_failed)
            if execution.done:
                self._finish()
        elif self._complete:
            self._finish()

    def _finish(self):
        self._complete = True
        callbacks, self._on_done = self._on_done, []
        self._keep = None
        for fn in callbacks:
            fn()

    def Test(self):
        """Advance the call (and every other running mtcoll call) without blocking.

        Returns
        -------
        bool
            True once the call is complete; its receive buffer then holds the result.

        Errors as for :meth:`Wait`.
        """
        if self._complete:
            return True
        self._usable()
        try:
            if self._exec is not None:
                if self._exec.test() and not self._complete:
                    self._abandoned()
            else:
                if execute.running():  # a peer may need one of them before it joins this call
                    execute.progress(block=False)
                if self._native.Test():
                    self._finish()
        except BaseException as e:
            self._raise_failure(e)
        return self._complete

    def Wait(self):
        """Block until the call is complete (advancing every running mtcoll call). Returns True.

        Raises :class:`StallError` after ``MTCOLL_TIMEOUT`` seconds without progress (see the
        class notes), RuntimeError if the call's :class:`Comm` is broken or freed.
        """
        if self._complete:
            return True
        self._usable()
        try:
            if self._exec is not None:
                if not self._exec.wait(self._timeout):
                    recv, send = self._exec.outstanding()
                    what = [f"messages from ranks {recv} have not arrived"] if recv else []
                    if send:
                        what.append(f"messages to ranks {send} have not been received")
                    self._stall("; ".join(what) or "nothing outstanding", recv or send)
                if not self._complete:
                    self._abandoned()
            elif self._timeout is None and not execute.running():
                self._native.Wait()
                self._finish()
            else:
                # poll: to advance the running mtcoll calls while the MPI library's call
                # completes (a peer may need one of them before it can take part in this one),
                # and to give up after MTCOLL_TIMEOUT
                deadline = math.inf if self._timeout is None else time.monotonic() + self._timeout
                sleep = self._comm is not None and self._comm.wait == "sleep"
                if not _poll(self._native.Test, deadline, sleep):
                    self._stall("the MPI library's collective did not complete (it does not "
                                "say which ranks it waits for; MTCOLL_CHECK=1 names ranks "
                                "that did not make the call)", [])
                self._finish()
        except BaseException as e:
            self._raise_failure(e)
        return True

    def _raise_failure(self, e):
        # An error inside Test/Wait leaves messages in flight: break the Comm (_fail), then
        # raise it again, an MPI error as RuntimeError naming the call.
        self._fail(e)
        if not isinstance(e, MPI.Exception):
            raise e
        raise RuntimeError(
            f"mtcoll {self._kind} on rank {self._rank()}: MPI error in a message of this call: "
            f"{_mpi_error_text(e)}. With MTCOLL_CHECK off this is how a call ends whose "
            f"count differs between ranks (a message longer than its receive is "
            f"MPI_ERR_TRUNCATE). The Comm is now broken: free it and make a new one, or "
            f"end the job") from e

    def _rank(self):
        return self._comm._rank if self._comm is not None else MPI.COMM_WORLD.Get_rank()

    def _usable(self):
        if self._exec is not None and self._exec.error is not None:
            return  # the call's own failure: Wait/Test raise it
        comm = self._comm
        if comm is not None and comm._broken is not None:
            raise RuntimeError(f"this request belongs to a broken mtcoll.Comm ({comm._broken}); "
                               f"free the Comm and make a new one, or end the job")

    def _abandoned(self):
        # The execution ended without completing while we waited: another call's failure broke
        # this call's Comm (see _exec_failed), which abandoned it. The buffers hold no result.
        self._usable()
        raise RuntimeError(f"mtcoll {self._kind} on rank {self._rank()}: the call was "
                           f"abandoned before it completed")

    def _exec_failed(self, error):
        # A message of this call failed while some wait (maybe of another call) made progress:
        # break the Comm now; Wait and Test on this request raise the error.
        if self._comm is not None:
            self._comm._break(f"{self._kind} on rank {self._comm._rank} failed: MPI error "
                              f"{_mpi_error_text(error)}")

    def _stall(self, what, ranks):
        seq = f" (call {self.seq})" if self.seq is not None else ""
        raise StallError(f"mtcoll {self._kind}{seq} on rank {self._rank()}: no progress for "
                         f"{self._timeout:g} s (MTCOLL_TIMEOUT); {what}. A rank may not have "
                         f"made this call, or made a different one. The Comm is now broken: "
                         f"free it and make a new one, or end the job", self._kind,
                         self._timeout, ranks)

    def _fail(self, e):
        # An error inside the data path leaves messages in flight: break the Comm.
        if self._complete:
            return
        self._abandon()
        if self._comm is not None:
            if isinstance(e, StallError):
                kind = "stalled"
            elif isinstance(e, MPI.Exception):
                kind = f"failed: MPI error {_mpi_error_text(e)}"
            else:
                kind = f"failed ({type(e).__name__}: {e})"
            self._comm._break(f"{self._kind} on rank {self._comm._rank} {kind}")

    def _abandon(self):
        if self._exec is not None:
            self._exec.abandon()
        if self not in _ABANDONED:
            _ABANDONED.append(self)  # keeps the MPI requests and the buffers alive

    def __repr__(self):
        state = "complete" if self._complete else "active"
        how = "native" if self._native is not None else "mtcoll"
        return f"<mtcoll.Request {how} {state}>"


def waitall(requests):
    """Wait for every request in ``requests`` (mtcoll :class:`Request` or ``MPI.Request``).

    The mtcoll calls are advanced together (waiting for one advances them all), then the MPI
    requests are waited for. Returns True. Errors as for :meth:`Request.Wait`
    (:class:`StallError` with ``MTCOLL_TIMEOUT``); the MPI requests are not waited for then.
    """
    requests = list(requests)
    for r in requests:
        if isinstance(r, Request):
            r.Wait()
    rest = [r for r in requests if not isinstance(r, Request)]
    if rest and execute.running():
        _poll(lambda: MPI.Request.Testall(rest))
    elif rest:
        MPI.Request.Waitall(rest)
    return True


# -- the communicator ----------------------------------------------------------------------------

class _Call:
    """One validated call: everything decided before any message is sent."""

    __slots__ = ("kind", "send", "recv", "raw", "count", "dtype", "op", "ufunc", "algorithm",
                 "why", "nbytes")

    def __init__(self, kind):
        self.kind = kind
        self.send = self.recv = self.raw = self.dtype = self.op = self.ufunc = None
        self.count = -1
        self.algorithm = "native"
        self.why = ""
        self.nbytes = 0


class Comm:
    """A communicator whose collectives run topology-aware schedules (MultiTree and others).

    Parameters
    ----------
    comm : MPI.Intracomm, default ``MPI.COMM_WORLD``
        The communicator to wrap. It is duplicated once; mtcoll's messages travel on the
        duplicate only.
    topology : str or mtcoll.topology.Topology, default ``"auto"``
        The network the ranks sit on (see :mod:`mtcoll.topology` for spec strings);
        ``MTCOLL_TOPOLOGY`` overrides it.
    algorithm : str, default ``"auto"``
        ``"auto"`` (chosen per call by :func:`choose`), ``"native"`` (always the MPI library) or
        a name from ``mtcoll.plan.ALGORITHMS``; ``MTCOLL_ALGO`` overrides it.
    ports : int, optional
        Port budget per rank for planning (default: the topology's).
    segment_bytes, max_segments : int, optional
        Pipelining of the executor (defaults :data:`mtcoll.execute.SEGMENT_BYTES`,
        :data:`mtcoll.execute.MAX_SEGMENTS`, or their ``SLEEP_`` twins when waiting sleeps).
    wait : {"auto", "busy", "sleep"}, optional
        How ranks wait for messages (see :data:`mtcoll.execute.WAIT`). ``"auto"`` (default):
        ``"sleep"`` when a host runs more ranks than it has cores. The ranks agree on one
        mode (sleep if any rank asks for it); ``MTCOLL_WAIT`` overrides this argument.

    Attributes
    ----------
    topology : mtcoll.topology.Topology
    virtual_topology : MPI.Cartcomm or MPI.Distgraphcomm
        The topology as an MPI virtual topology over the same ranks, never reordered:
        ``Create_cart`` with periods for torus, mesh and ring, ``Create_dist_graph_adjacent``
        (tree neighbours) otherwise. mtcoll's own messages do not use it; it is there for
        coordinates and neighbour queries. Freed by :meth:`Free`.
    tuning, tuning_path
        The tuning table for ``algorithm="auto"`` read at construction (the entry for this
        communicator's size and topology, or None) and the file it came from; see
        :mod:`mtcoll._tuning` (``MTCOLL_TUNING``). A bad tuning file raises ValueError on every
        rank, naming the file.
    wait : str
        ``"busy"`` or ``"sleep"``, as decided.

    Notes
    -----
    Collective: every rank of ``comm`` must construct it with the same arguments, and call its
    collectives in the same order with matching arguments (as with MPI). Set
    ``MTCOLL_CHECK=1`` to have every call first check that the ranks agree; a disagreement then
    raises the same error on every rank, naming the ranks, instead of hanging.

    Calls go to the MPI library (on the duplicate communicator) when: the algorithm is
    ``"native"`` or ``"auto"`` chose it; the op is not one of MPI's predefined arithmetic,
    logical or bitwise reductions (user-defined ops from ``MPI.Op.Create``, MINLOC, MAXLOC);
    the datatype is derived or not a plain numeric type; or the schedule would need more
    messages between two ranks than the tag space allows. ``Reduce_scatter_block`` and
    ``Allgather`` need a schedule with one chunk per rank and each chunk owned by a different
    rank: they use the configured algorithm's schedule if it is one, else MultiTree's, else
    ring's, else the MPI library.

    With ``MTCOLL_TIMEOUT=<seconds>`` nothing waits for ever: the agreement check gives up
    after that many seconds, naming the ranks that did not make the call, and the data path
    (``Wait``) after that many seconds without a completed message, naming the ranks whose
    messages are outstanding. Both raise :class:`StallError` and leave the Comm broken:
    messages of the call may still be in flight, so every later call (and ``Wait`` on its
    requests) raises RuntimeError. :meth:`Free` still works on a broken Comm (it waits for
    nothing and keeps the duplicate communicators allocated, so their messages can never reach
    a new communicator). Calls that go to the MPI library always run as its nonblocking twin
    (``Iallreduce``...), blocking ones too, and are waited for while the other running calls
    are advanced, so that they can time out too.

    Every attribute not defined here (``Get_rank``, ``Barrier``, ``Bcast``, ``rank``, ``size``,
    ``allreduce``...) is the wrapped communicator's, so a Comm can stand in for it.
    """

    def __init__(self, comm=None, topology="auto", algorithm="auto", ports=None,
                 segment_bytes=None, max_segments=None, wait=None):
        if comm is None:
            comm = MPI.COMM_WORLD
        if isinstance(comm, Comm):
            comm = comm._orig
        if not isinstance(comm, MPI.Intracomm) or comm == MPI.COMM_NULL:
            raise TypeError(f"comm must be an MPI intracommunicator, got {comm!r}")
        env_algo = os.environ.get("MTCOLL_ALGO", "").strip()
        env_topo = os.environ.get("MTCOLL_TOPOLOGY", "").strip()
        self._orig = comm
        self._dup = None
        algorithm = (env_algo or str(algorithm)).strip().lower()
        rank = comm.Get_rank()
        ports = _positive_int("ports", ports, rank, per_rank=True)
        segment_bytes = _positive_int("segment_bytes", segment_bytes, rank)
        max_segments = _positive_int("max_segments", max_segments, rank)
        self._dup = self._duplicate(comm, rank)
        try:
            leaders = host_leaders(self._dup)
            ranks_here = leaders.count(leaders[self._dup.Get_rank()])
            self.wait = self._wait_mode(wait, ranks_here)
            self._check_algorithm(algorithm, "MTCOLL_ALGO" if env_algo else "algorithm")
            try:
                self.topology = from_comm(self._dup, env_topo or topology, ports, leaders)
            except ValueError as e:
                where = f"environment variable MTCOLL_TOPOLOGY={env_topo!r}" if env_topo \
                    else f"topology={topology!r}"
                raise ValueError(f"{where} (rank {rank}): {e}") from None
            self.tuning, self.tuning_path = self._load_tuning()
            # the topology as an MPI virtual topology (Create_cart for torus, mesh and ring, a
            # distributed graph otherwise), for users who want coordinates or neighbours
            self.virtual_topology = mpi_topology(self._dup, self.topology)
            # the agreement check's own communicator: its messages never meet the executor's
            self._chk = self._dup.Dup()
        except BaseException:
            self._dup.Free()
            self._dup = None
            raise
        self.algorithm = algorithm
        self.ports = ports
        self.segment_bytes = segment_bytes
        self.max_segments = max_segments
        self._rank = self._dup.Get_rank()
        self._size = self._dup.Get_size()
        self._schedules = {}  # algorithm -> Schedule, or (exception type, message)
        self._executors = {}
        self._seq = 0
        self._requests = deque()  # in flight, oldest first
        self._nchecks = 0  # agreement checks made (their tag)
        self._broken = None  # why this Comm is broken (a stall or an error mid-call), or None

    @staticmethod
    def _duplicate(comm, rank):
        # comm.Dup() as its nonblocking twin, polled: the running mtcoll calls advance meanwhile
        # (another rank may need one of them finished before it gets here), and with
        # MTCOLL_TIMEOUT a rank that never constructs the Comm is not waited for forever. Once
        # the duplicate exists every rank is in here, so the blocking collectives after it wait
        # for no absent rank (unless one gave up just as the last rank joined: the window the
        # second Test below narrows, not closes).
        try:
            timeout = _env_timeout()
        except ValueError:
            timeout = None  # a bad value is reported by the first call, on this rank
        dup, req = comm.Idup()
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        try:
            done = _poll(req.Test, deadline, sleep=True)
        except BaseException:  # e.g. KeyboardInterrupt: MPI may still complete the duplicate
            _ABANDONED.append((dup, req))
            raise
        if not done:
            done = req.Test()  # the last rank may have joined just now: narrow the window
        if not done:
            _ABANDONED.append((dup, req))
            raise StallError(
                f"mtcoll.Comm on rank {rank}: not every rank of the communicator constructed an "
                f"mtcoll.Comm within MTCOLL_TIMEOUT={timeout:g} s (constructing one is "
                f"collective: every rank must, in the same order as its other collectives on "
                f"that communicator)", None, timeout, [])
        return dup

    def _check_algorithm(self, name, source):
        # Only rank 0 imports the planner (it may pull in numba); the verdict is broadcast.
        verdict = None
        if self._dup.Get_rank() == 0:
            try:
                from .plan import ALGORITHMS
                allowed = _SPECIAL_ALGORITHMS + tuple(ALGORITHMS)
                if name not in allowed:
                    what = "environment variable MTCOLL_ALGO" if source == "MTCOLL_ALGO" \
                        else "algorithm"
                    verdict = f"{what}={name!r} is not one of {', '.join(allowed)}"
            except ImportError as e:
                verdict = ImportError(f"cannot import mtcoll.plan: {e}")
        self._gate()
        verdict = self._dup.bcast(verdict, root=0)
        if isinstance(verdict, ImportError):
            raise verdict
        if verdict:
            raise ValueError(f"{verdict} (rank {self._dup.Get_rank()})")

    def _gate(self):
        # Before a broadcast of what rank 0 alone computes (imports, plans, files): with more
        # ranks than cores, the others wait sleeping rather than polling in the broadcast,
        # which would leave rank 0 a sliver of a core (64 ranks on 2 cores: the first Comm
        # took 13.5 s that way, 1.9 s this way).
        if getattr(self, "wait", "busy") != "sleep":
            return
        _poll(self._dup.Ibarrier().Test, sleep=True)

    def _bcast_within(self, payload, timeout, what):
        # bcast(payload, root=0) that advances mtcoll's running calls while it waits (a rank
        # may still need one of them finished before it makes this call) and gives up after
        # ``timeout`` seconds (MTCOLL_TIMEOUT; None: never): the planning on a call's first use
        # must not hold the other ranks for ever in a blocking broadcast when a rank never
        # makes the call, or makes a different one.
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        sleep = self.wait == "sleep"
        data = pickle.dumps(payload) if self._rank == 0 else b""
        size = np.array([len(data)], dtype=np.int64)
        for step in (0, 1):
            if step:
                data = bytearray(int(size[0])) if self._rank else data
                req = self._dup.Ibcast(data, root=0)
            else:
                req = self._dup.Ibcast(size, root=0)
            try:
                done = _poll(req.Test, deadline, sleep)
            except BaseException:  # e.g. another call's error, raised by the progress made
                _ABANDONED.append((req, data, size))  # MPI may still write or read them
                self._break(f"{what} interrupted on rank {self._rank}")
                raise
            if not done:
                _ABANDONED.append((req, data, size))
                self._break(f"{what} timed out on rank {self._rank}")
                raise StallError(
                    f"{what} on rank {self._rank}: not every rank took part within "
                    f"MTCOLL_TIMEOUT={timeout:g} s (the first call with an algorithm plans its "
                    f"schedule on rank 0 and broadcasts it; a rank may not have made this "
                    f"call, or made a different one). The Comm is now broken: free it and make "
                    f"a new one, or end the job", None, timeout, [])
        return pickle.loads(data) if self._rank else payload

    def _wait_mode(self, wait, ranks_here):
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
            bad = f"{where} (rank {self._dup.Get_rank()}) is not one of auto, busy, sleep"
        if mode == "auto":
            mode = "sleep" if ranks_here > (os.cpu_count() or 1) else "busy"
        flags = self._dup.allreduce((mode == "sleep") | (bad is not None) << 1, op=MPI.BOR)
        if flags & 2:
            raise ValueError(bad or "MTCOLL_WAIT or wait is not one of auto, busy, sleep "
                                    "on some rank")
        return "sleep" if flags & 1 else "busy"

    def _load_tuning(self):
        # Rank 0 reads the file and broadcasts the table for this communicator: every rank must
        # choose the same algorithm for a call, or the call deadlocks.
        payload = None
        if self._dup.Get_rank() == 0:
            try:
                path, required = _tuning.resolve_path()
                if path is None or (not required and not path.is_file()):
                    payload = ("ok", None, None)
                else:
                    from .plan import ALGORITHMS
                    table = _tuning.load(path, ALGORITHMS)
                    key = (self._dup.Get_size(), self.topology.spec.strip().lower())
                    mine = {key: table[key]} if key in table else None
                    payload = ("ok", mine, str(path))
            except (ValueError, ImportError) as e:
                payload = ("error", str(e))
        self._gate()
        payload = self._dup.bcast(payload, root=0)
        if payload[0] == "error":
            raise ValueError(f"{payload[1]} (read on rank 0, for rank {self._dup.Get_rank()}; "
                             f"MTCOLL_TUNING=off ignores tuning files)")
        return payload[1], payload[2]

    # -- passthrough and lifetime --------------------------------------------------------------

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._orig, name)

    @property
    def comm(self):
        """The wrapped communicator (not the private duplicate)."""
        return self._orig

    def __repr__(self):
        state = "freed" if self._dup is None else f"{self._orig.Get_size()} ranks"
        spec = getattr(getattr(self, "topology", None), "spec", "?")
        return f"<mtcoll.Comm {state}, topology {spec!r}, algorithm {self.algorithm!r}>"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.Free()
        return False

    def Free(self):
        """Wait for this Comm's calls still in flight, then free its duplicate communicator.

        Collective. The wrapped communicator is left alone. Freeing twice is harmless; any
        other call after ``Free`` raises RuntimeError. A broken Comm (see the class notes) waits
        for nothing and keeps its duplicate communicators allocated, so that no new
        communicator gets their context while messages of the broken call may still arrive.
        The other ranks, whose Comm may not be broken, free theirs (MPICH's ``MPI_Comm_free``
        does not wait for the other ranks).
        """
        if self._dup is None:
            return
        while self._requests and self._broken is None:
            self._requests.popleft().Wait()
        self.virtual_topology.Free()
        self.virtual_topology = None
        if self._broken is None:
            self._chk.Free()
            self._dup.Free()
        else:
            _ABANDONED.append((self._dup, self._chk))
        self._dup = self._chk = None
        self._requests.clear()
        self._schedules.clear()
        self._executors.clear()

    def _alive(self):
        if self._dup is None:
            raise RuntimeError("this mtcoll.Comm has been freed")
        if self._broken is not None:
            raise RuntimeError(f"this mtcoll.Comm is broken: {self._broken}. Messages of that "
                               f"call may still be in flight, so no later call can be trusted: "
                               f"Free() it and make a new Comm, or end the job")

    def _break(self, reason):
        # A call stalled or failed midway: stop every call in flight (their receives are
        # cancelled; their sends and buffers stay alive in _ABANDONED) and refuse new ones.
        if self._broken is not None:
            return
        self._broken = reason
        while self._requests:
            self._requests.popleft()._abandon()

    # -- schedules -------------------------------------------------------------------------------

    def schedule(self, algorithm=None):
        """The :class:`~mtcoll.schedule.Schedule` of ``algorithm`` (default: this Comm's).

        Collective on first use of an algorithm: rank 0 plans, the others receive the result.
        Raises ValueError (on every rank) when the algorithm does not fit the topology.
        """
        self._alive()
        name = (algorithm or self.algorithm).strip().lower()
        if name in _SPECIAL_ALGORITHMS:
            raise ValueError(f"{name!r} names no schedule; pass an algorithm such as "
                             f"'multitree'")
        got = self._schedules.get(name)
        if got is None:
            payload = None
            if self._rank == 0:
                try:
                    from .plan import plan
                    sched = plan(self.topology, name)
                    out = io.BytesIO()
                    sched.save(out)
                    payload = ("ok", out.getvalue())
                except Exception as e:  # every rank must raise, not only rank 0
                    payload = ("error", type(e).__name__, str(e))
            # nonblocking and polled on every rank (the same calls everywhere: whether calls are
            # running differs between ranks), sleeping in sleep mode like _gate
            payload = self._bcast_within(payload, _env_timeout(),
                                         f"planning {name!r} on first use")
            if payload[0] == "ok":
                got = sched if self._rank == 0 else Schedule.load(io.BytesIO(payload[1]))
                if got.nranks != self._size:
                    raise ValueError(f"plan({self.topology.spec!r}, {name!r}) gave a schedule "
                                     f"for {got.nranks} ranks, not {self._size}")
            else:
                got = payload[1:]
            self._schedules[name] = got
        if isinstance(got, tuple):
            kind, message = got
            cls = {"ValueError": ValueError, "TypeError": TypeError}.get(kind, RuntimeError)
            raise cls(f"planning {name!r} on {self.topology.spec!r}: {message}")
        return got

    def _executor(self, name):
        ex = self._executors.get(name)
        if ex is None:
            ex = self._executors[name] = execute.Executor(
                self._dup, self.schedule(name), self.segment_bytes, self.max_segments,
                self.wait)
        return ex

    # -- the calls -------------------------------------------------------------------------------

    def Allreduce(self, sendbuf, recvbuf, op=MPI.SUM):
        """Combine the ``sendbuf`` of every rank with ``op``; every rank gets the result.

        Parameters
        ----------
        sendbuf : buffer spec or ``MPI.IN_PLACE``
            A numpy array or other buffer, or ``[buf, datatype]``, ``[buf, count, datatype]``
            as in mpi4py. With ``MPI.IN_PLACE`` the input is taken from ``recvbuf``.
        recvbuf : buffer spec
            Writable, same dtype and number of elements as ``sendbuf``; receives the result.
            Non-contiguous arrays are copied in and out.
        op : MPI.Op, default ``MPI.SUM``
            SUM, PROD, MIN, MAX, LAND, LOR, LXOR, BAND, BOR or BXOR run on the chosen
            schedule; any other op runs in the MPI library.

        Raises
        ------
        ValueError, TypeError
            Before any message is sent, naming the argument and rank: a read-only, too small
            or too large ``recvbuf``, one of another dtype, overlapping buffers, or an op MPI
            does not define on the dtype (e.g. ``MPI.MIN`` on complex).

        Notes
        -----
        Collective. The result is bitwise identical on every rank and from run to run (for a
        given algorithm, topology, count and segment settings).
        """
        self._start("Allreduce", sendbuf, recvbuf, op, blocking=True).Wait()

    def Iallreduce(self, sendbuf, recvbuf, op=MPI.SUM):
        """Start an :meth:`Allreduce`; returns a :class:`Request`.

        The buffers must stay untouched (``sendbuf`` unmodified, ``recvbuf`` neither read nor
        written) until the request completes. The request keeps them alive. Several
        Iallreduce calls may be in flight at once; completing them in any order is fine.
        Data moves only inside mtcoll calls (see :class:`Request`). With ``MTCOLL_CHECK=1``
        the start synchronises the ranks (the agreement check exchanges a small descriptor
        between every pair of ranks).
        """
        return self._start("Iallreduce", sendbuf, recvbuf, op, blocking=False)

    def Reduce_scatter_block(self, sendbuf, recvbuf, op=MPI.SUM):
        """Reduce ``sendbuf`` (``size * k`` elements) over all ranks; rank ``r`` gets block ``r``
        (elements ``r*k .. r*k+k-1`` of the result) in ``recvbuf`` (``k`` elements).

        With ``sendbuf=MPI.IN_PLACE``, ``recvbuf`` holds the ``size * k`` input elements and
        gets the block in its first ``k``. Runs the reduce phase of a schedule with one chunk
        per rank (see the class notes). Collective; errors as for :meth:`Allreduce`.
        """
        self._start("Reduce_scatter_block", sendbuf, recvbuf, op, blocking=True).Wait()

    def Allgather(self, sendbuf, recvbuf):
        """Gather ``sendbuf`` (``k`` elements) of every rank into ``recvbuf`` (``size * k``),
        rank ``r``'s data in block ``r``, on every rank.

        With ``sendbuf=MPI.IN_PLACE`` each rank's contribution is already in its block of
        ``recvbuf``. Runs the gather phase of a schedule with one chunk per rank (see the class
        notes). Collective; errors as for :meth:`Allreduce`.
        """
        self._start("Allgather", sendbuf, recvbuf, None, blocking=True).Wait()

    # -- machinery -------------------------------------------------------------------------------

    def _start(self, kind, sendbuf, recvbuf, op, blocking):
        self._alive()
        check = _env_flag("MTCOLL_CHECK")
        debug = _env_flag("MTCOLL_DEBUG")
        timeout = _env_timeout()
        call, err = None, None
        try:
            call = self._prepare(kind, sendbuf, recvbuf, op)
        except (ValueError, TypeError) as e:
            err = e
        if check:
            self._agree(kind, call, err, timeout)
        elif err is not None:
            raise err
        self._retire()
        self._alive()  # the progress made above may have broken it (another call's MPI error)
        try:
            req = self._launch(call, blocking, debug)
        except StallError as e:  # from planning on first use, which does not know the call
            e.call = kind
            e.args = (f"mtcoll {kind}: {e.args[0]}",)
            raise
        req._comm, req._timeout, req._kind = self, timeout, kind
        if not req._complete:
            self._requests.append(req)
        return req

    def _prepare(self, kind, sendbuf, recvbuf, op):
        c = _Call(kind)
        c.raw = (sendbuf, recvbuf)
        rank, size = self._rank, self._size
        if kind != "Allgather":
            if not isinstance(op, MPI.Op) or op == MPI.OP_NULL:
                raise TypeError(f"op (rank {rank}) must be an MPI.Op, got {op!r}")
            c.op = op
        if recvbuf is MPI.IN_PLACE or recvbuf is None:
            raise TypeError(f"recvbuf (rank {rank}) must be a buffer, got {recvbuf!r}")
        c.recv = _buffer(recvbuf, "recvbuf", rank, writable=True)
        if sendbuf is not MPI.IN_PLACE:
            if sendbuf is None:
                raise TypeError(f"sendbuf (rank {rank}) must be a buffer or MPI.IN_PLACE")
            c.send = _buffer(sendbuf, "sendbuf", rank, writable=False)
            if c.send is None and c.recv is not None or c.send is not None and c.recv is None:
                c.why = "derived datatype"
                return c
        if c.recv is None:
            c.why = "derived datatype"
            return c
        recv = c.recv.flat
        c.dtype = recv.dtype
        if c.send is not None:
            send = c.send.flat
            if send.dtype != recv.dtype:
                raise TypeError(f"recvbuf (rank {rank}) has dtype {recv.dtype.name} but "
                                f"sendbuf has {send.dtype.name}")
            if send.size and np.may_share_memory(send, recv):
                raise ValueError(f"sendbuf and recvbuf (rank {rank}) overlap; pass "
                                 f"MPI.IN_PLACE as sendbuf to reduce in place")
            want = {"Allreduce": send.size, "Iallreduce": send.size,
                    "Reduce_scatter_block": send.size // size if send.size % size == 0 else None,
                    "Allgather": send.size * size}[kind]
            if want is None:
                raise ValueError(f"sendbuf (rank {rank}) holds {send.size} elements, not a "
                                 f"multiple of the {size} ranks")
            if recv.size != want:
                what = "too small" if recv.size < want else "too large"
                raise ValueError(f"recvbuf (rank {rank}) is {what}: it holds {recv.size} "
                                 f"elements, the call needs {want}")
        elif kind in ("Reduce_scatter_block", "Allgather") and recv.size % size:
            raise ValueError(f"recvbuf (rank {rank}) holds {recv.size} elements, not a "
                             f"multiple of the {size} ranks (MPI.IN_PLACE)")
        # count: the elements of the whole buffer a schedule runs on (for Allgather the
        # gathered result, for Reduce_scatter_block the input)
        c.count = c.send.flat.size if c.send is not None and kind != "Allgather" else recv.size
        c.nbytes = c.count * c.dtype.itemsize
        if kind != "Allgather":
            c.ufunc = _ops.lookup(op, c.dtype)  # TypeError for combinations MPI leaves undefined
            if c.ufunc is None:
                c.why = f"op {_ops.op_name(op) or 'user-defined'} or dtype {c.dtype}"
                return c
        if self.algorithm == "native":
            c.why = "algorithm 'native'"
        elif self.algorithm == "auto":
            # the hook takes the table only when there is one, so that a three-argument
            # replacement of choose() keeps working
            c.algorithm = (choose(c.nbytes, size, self.topology, tuning=self.tuning)
                           if self.tuning else choose(c.nbytes, size, self.topology))
            how = "tuning table" if self.tuning else "built-in rule"
            c.why = f"chosen by auto, {how}"
        else:
            c.algorithm = self.algorithm
        return c

    def _agree(self, kind, call, err, timeout):
        # Every rank sends a descriptor of its call to every other rank on the check
        # communicator (nonblocking, tagged with the check's number) and waits for theirs: up
        # to ``timeout`` seconds, so a rank that never makes the call is named, not waited for.
        # (One Allgather would be cheaper, but cannot tell who is missing.) A descriptor is a
        # row of numbers to compare and a text to report (the call's fields, or the error its
        # arguments raised): whatever a rank concludes from the rows it got, it needs nothing
        # more from the others, so a rank that gave up waiting cannot hold the rest.
        fields = ("validation", "call", "count", "datatype", "op", "algorithm", "topology")
        if err is not None:
            mine = [0, _CALLS.index(kind), -1, -1, -1, -1, -1]
            text = {"error": type(err).__name__, "message": str(err)}
        else:
            dcode = _ops.dtype_code(call.dtype) if call.dtype is not None else 0
            mine = [1, _CALLS.index(kind), call.count, dcode, _ops.op_code(call.op),
                    _code(self.algorithm), _code(self.topology.spec)]
            text = {"call": kind, "count": call.count,
                    "datatype": None if call.dtype is None else call.dtype.name,
                    "op": _ops.op_name(call.op) if call.op is not None else None,
                    "algorithm": self.algorithm, "topology": self.topology.spec}
        self._nchecks += 1
        tag = self._nchecks % 32768  # MPI guarantees tags up to 32767
        size, rank = self._size, self._rank
        head = 8 * len(fields)
        rows = np.zeros((size, head + _CHECK_TEXT), dtype=np.uint8)
        rows[rank, :head] = np.array(mine, dtype=np.int64).view(np.uint8)
        packed = _fit_json(text, _CHECK_TEXT)
        rows[rank, head:head + len(packed)] = np.frombuffer(packed, dtype=np.uint8)
        peers = [r for r in range(size) if r != rank]
        recvs = [self._chk.Irecv(rows[r], r, tag) for r in peers]
        sends = [self._chk.Isend(rows[rank], r, tag) for r in peers]
        if timeout is None and self.wait == "busy" and not execute.running():
            MPI.Request.Waitall(recvs + sends)
        else:
            deadline = math.inf if timeout is None else time.monotonic() + timeout
            reqs = recvs + sends
            try:
                agreed = _poll(lambda: MPI.Request.Testall(reqs), deadline, self.wait == "sleep")
            except BaseException:  # e.g. another call's error, raised by the progress made
                _ABANDONED.append((reqs, rows))  # MPI may still write or read them
                self._break(f"{kind} agreement check interrupted on rank {rank}")
                raise
            if not agreed:
                missing = []
                for r, q in zip(peers, recvs):
                    if q:  # not completed yet: cancel it (it may still complete meanwhile)
                        q.Cancel()
                        st = MPI.Status()
                        q.Wait(st)
                        if st.Is_cancelled():
                            missing.append(r)
                _ABANDONED.append((sends, rows))  # the sends may still be read
                if missing:
                    came = [r for r in range(size) if r not in missing]
                    self._break(f"{kind} agreement check timed out on rank {rank}")
                    raise StallError(
                        f"mtcoll {kind} on rank {rank}: rank(s) {missing} did not make this "
                        f"call within MTCOLL_TIMEOUT={timeout:g} s (MTCOLL_CHECK agreement "
                        f"check {self._nchecks}; ranks {came} did). The Comm is now broken: "
                        f"free it and make a new one, or end the job", kind, timeout, missing)
                # every descriptor came in after all (only our sends are not yet taken):
                # judge them like the others
        every = rows[:, :head].copy().view(np.int64)
        bad = np.flatnonzero(every[:, 0] == 0).tolist()
        if bad:
            if err is not None:
                raise err
            got = _unfit_json(rows[bad[0], head:])
            cls = TypeError if got.get("error") == "TypeError" else ValueError
            raise cls(f"mtcoll {kind}: rank(s) {bad} rejected their arguments; "
                      f"rank {bad[0]}: {got.get('message', '?')}")
        diff = [j for j in range(1, len(fields)) if (every[:, j] != every[0, j]).any()]
        if diff:
            descs = {r: _unfit_json(rows[r, head:]) for r in range(size)}
            parts = []
            for j in diff:
                f = fields[j]
                others = np.flatnonzero(every[:, j] != every[0, j]).tolist()
                shown = ", ".join(f"rank {r}: {descs[r].get(f)!r}" for r in others[:8])
                parts.append(f"{f}: rank 0 has {descs[0].get(f)!r} but ranks {others} differ "
                             f"({shown})")
            raise ValueError(f"mtcoll {kind}: the ranks disagree on " + "; ".join(parts))

    def _retire(self):
        # Drop finished calls; wait for any call old enough that a new one would reuse its tag
        # slot (the same decision on every rank: sequence numbers agree). Calls the MPI library
        # runs (no sequence number) use no slot: an unfinished one must not hide older
        # schedule calls behind it.
        reqs = self._requests
        if not reqs:
            return
        oldest = self._seq + 1 - execute.TAG_SLOTS
        for r in [r for r in reqs if r.seq is not None and r.seq <= oldest]:
            r.Wait()
        if any(r._complete for r in reqs):
            self._requests = deque(r for r in reqs if not r._complete)

    def _launch(self, c, blocking, debug):
        kind = c.kind
        size = self._size
        if c.dtype is not None and (c.count == 0 or size == 1):
            if debug and self._rank == 0:
                self._debug(c, "algorithm=none (nothing to exchange)")
            return self._trivial(c)
        if c.algorithm != "native":
            if kind in ("Allreduce", "Iallreduce"):
                ex = self._executor(c.algorithm)
                phases = (REDUCE, GATHER)
            else:
                ex = self._block_executor(c.algorithm)
                phases = (REDUCE,) if kind == "Reduce_scatter_block" else (GATHER,)
            if ex is None:
                c.why = "no schedule with one chunk per rank"
            else:
                lay = ex.layout(c.count, c.dtype.itemsize, phases)
                if not ex.fits_tags(lay):
                    c.why = f"{lay.max_stream} messages per rank pair exceed MPI.TAG_UB"
                else:
                    if debug and self._rank == 0:
                        self._debug(c, (
                            f"algorithm={ex.schedule.algorithm} steps={ex.schedule.steps} "
                            f"segment={ex.segmenting()[0]}Bx{ex.segmenting()[1]} "
                            f"wait={self.wait} "
                            f"messages={lay.nmessages}"
                            + (f" ({c.why})" if c.why else "")))
                    return self._run_schedule(c, ex, phases, blocking)
        if debug and self._rank == 0:
            self._debug(c, f"algorithm=native ({c.why})")
        self._alive()  # planning a schedule above advanced the running calls: one may have failed
        return self._native(c)

    def _debug(self, c, how):
        op = _ops.op_name(c.op) or "user-defined" if c.op is not None else "-"
        print(f"mtcoll[rank 0]: {c.kind} count={c.count} "
              f"dtype={getattr(c.dtype, 'name', 'derived')} op={op} bytes={c.nbytes} "
              f"topology={self.topology.spec} {how}", file=sys.stderr, flush=True)

    def _block_executor(self, name):
        """An executor whose schedule has one chunk per rank, each owned by another rank."""
        for cand in dict.fromkeys((name, "multitree", "ring")):
            try:
                sched = self.schedule(cand)
            except ValueError:
                continue
            if sched.nchunks == self._size and \
                    np.array_equal(np.sort(sched.owner), np.arange(self._size)):
                return self._executor(cand)
        return None

    def _trivial(self, c):
        # Nothing to exchange: no elements, or a single rank.
        if c.count and c.send is not None:
            np.copyto(c.recv.flat, c.send.flat)
        c.recv.copy_back()
        return Request()

    def _native(self, c):
        comm = self._dup
        if c.recv is None or (c.send is None and c.raw[0] is not MPI.IN_PLACE):
            sendspec, recvspec = c.raw  # derived datatypes: as given
            recv = None
        else:
            sendspec = MPI.IN_PLACE if c.send is None else c.send.flat
            recvspec = c.recv.flat
            recv = c.recv
        done = [recv.copy_back] if recv is not None and recv.orig is not None else []
        # Always the nonblocking twin, also for a blocking call (whose caller waits at once):
        # whether mtcoll calls are still running differs between ranks, and a rank blocked in
        # MPI_Allreduce cannot advance them while a peer waits for one of them before it joins
        # (MPI matches a blocking collective with a nonblocking one on no rank, so the choice
        # must not depend on that). Request.Wait advances the running calls while it waits.
        if c.kind == "Allgather":
            req = comm.Iallgather(sendspec, recvspec)
        elif c.kind == "Reduce_scatter_block":
            req = comm.Ireduce_scatter_block(sendspec, recvspec, c.op)
        else:
            req = comm.Iallreduce(sendspec, recvspec, c.op)
        return Request(native=req, on_done=done, keep=(c.raw, sendspec, recvspec))

    def _run_schedule(self, c, ex, phases, blocking):
        self._alive()  # planning on first use advances the running calls: one may have failed
        self._seq += 1
        size, rank = self._size, self._rank
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
        execution = ex.start(acc, c.ufunc, self._seq, phases, src)
        return Request(execution=execution, on_done=done, keep=(c.raw, c.send, recv, acc, src),
                       seq=self._seq)


# -- module level --------------------------------------------------------------------------------

_KEYVAL = None


def _drop_cache(comm, keyval, cache):
    # Runs when the user's communicator is freed (or at MPI_Finalize): forget the wrappers
    # without calling MPI from inside the callback.
    cache.clear()


def _comm_for(comm, options):
    global _KEYVAL
    if isinstance(comm, Comm):
        if options:
            raise TypeError("options are set when constructing an mtcoll.Comm; got both a Comm "
                            f"and {sorted(options)}")
        return comm
    if comm is None:
        comm = MPI.COMM_WORLD
    if not isinstance(comm, MPI.Intracomm) or comm == MPI.COMM_NULL:
        raise TypeError(f"comm must be an MPI intracommunicator, got {comm!r}")
    if _KEYVAL is None:
        _KEYVAL = MPI.Comm.Create_keyval(delete_fn=_drop_cache)
    cache = comm.Get_attr(_KEYVAL)
    if cache is None:
        cache = {}
        comm.Set_attr(_KEYVAL, cache)
    key = (tuple(sorted(options.items())), os.environ.get("MTCOLL_ALGO", ""),
           os.environ.get("MTCOLL_TOPOLOGY", ""))
    got = cache.get(key)
    if got is None or got._dup is None:
        got = cache[key] = Comm(comm, **options)
    return got


def Allreduce(sendbuf, recvbuf, op=MPI.SUM, comm=MPI.COMM_WORLD, **options):
    """:meth:`Comm.Allreduce` on ``comm`` through a cached :class:`Comm`.

    The first call for a (communicator, options) pair constructs the Comm (collective); later
    calls reuse it until the communicator is freed. ``options`` are :class:`Comm`'s keyword
    arguments (``topology``, ``algorithm``, ``ports``, ``segment_bytes``, ``max_segments``).
    """
    _comm_for(comm, options).Allreduce(sendbuf, recvbuf, op)


def Iallreduce(sendbuf, recvbuf, op=MPI.SUM, comm=MPI.COMM_WORLD, **options):
    """:meth:`Comm.Iallreduce` on ``comm`` through a cached :class:`Comm`; returns a
    :class:`Request` (see :func:`Allreduce` for the caching)."""
    return _comm_for(comm, options).Iallreduce(sendbuf, recvbuf, op)
