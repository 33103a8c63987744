"""The public communicator, :class:`Comm`, and the module-level calls built on it.

A :class:`Comm` *is* an mpi4py ``MPI.Intracomm`` (a subclass, as ``mpi4py.util.pkl5`` builds
its communicators): the user's communicator, with ``Allreduce``, ``Iallreduce``,
``Reduce_scatter_block`` and ``Allgather`` replaced by topology-aware schedules where that
pays, and every other method mpi4py's own. Its own messages travel on a private duplicate. The
pieces behind it: :mod:`mtcoll._buffers` (arguments), :mod:`mtcoll._requests` (requests and
progress), :mod:`mtcoll._agreement` (the agreement check), :mod:`mtcoll._errors`.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import sys
import time
from collections import deque

import numpy as np
from mpi4py import MPI

from . import _calibrate, _ops, _tuning, execute
from ._agreement import agree
from ._buffers import prepare
from ._errors import ABANDONED, StallError, env_flag, env_quiet, env_timeout, positive_int
from ._requests import LOCK, Request, poll, reraise, thread_enabled, waitall, wake
from .schedule import GATHER, REDUCE, Schedule
from .topology import from_comm, host_leaders, mpi_topology

__all__ = ["Comm", "Cartcomm", "Request", "Allreduce", "Iallreduce", "waitall", "choose",
           "StallError", "SMALL_MESSAGE_BYTES", "ENV_VARS"]

#: Without a calibration (``MTCOLL_CALIBRATE=off``), ``algorithm="auto"`` leaves messages
#: below this many bytes to the MPI library.
SMALL_MESSAGE_BYTES = 64 * 1024

#: Environment variables mtcoll reads.
ENV_VARS = ("MTCOLL_ALGO", "MTCOLL_TOPOLOGY", "MTCOLL_TUNING", "MTCOLL_WAIT", "MTCOLL_CHECK",
            "MTCOLL_DEBUG", "MTCOLL_TIMEOUT", "MTCOLL_PROGRESS", "MTCOLL_CALIBRATE",
            "MTCOLL_CACHE_DIR", "MTCOLL_PROBE_SECONDS")

_SPECIAL_ALGORITHMS = ("auto", "native")
_FAST_CACHE = 256  # (nbytes, dtype, op) choices remembered per Comm
_COMPLETE = Request()  # what a blocking call the library ran returns: nothing to wait for
_IN_PLACE, _ndarray = MPI.IN_PLACE, np.ndarray  # (the fast paths' globals, looked up once)


def choose(nbytes, nranks, topology, tuning=None, calibration=None):
    """The algorithm ``algorithm="auto"`` uses for a call moving ``nbytes`` bytes per rank.

    The tuning hook. A measured tuning table (``tuning``, written by
    ``python -m mtcoll.bench --tune``; see :mod:`mtcoll._tuning`) decides when it has a table
    for ``nranks`` ranks on this topology. Otherwise the calibrated model (``calibration``, a
    :class:`mtcoll._calibrate.Calibration` that :class:`Comm` measures on its communicator at
    construction, or reads from its cache): the candidate with the fastest predicted time, the
    MPI library's own ``Allreduce`` included. Without either (``MTCOLL_CALIBRATE=off``), the
    built-in rule: the MPI library (``"native"``) below :data:`SMALL_MESSAGE_BYTES` and
    MultiTree above.

    Parameters
    ----------
    nbytes : int
        Size of the buffer being reduced, in bytes (the same on every rank).
    nranks : int
        Size of the communicator.
    topology : mtcoll.topology.Topology or str
        The communicator's network model (or its spec), :attr:`Comm.network`.
    tuning : dict, optional
        A tuning table as :func:`mtcoll._tuning.load` returns it, keyed by
        ``(nranks, topology spec)``. :class:`Comm` passes the table it read at construction.
    calibration : mtcoll._calibrate.Calibration, optional
        The fitted model of this communicator (:attr:`Comm.calibration`); ignored when a
        tuning table covers the call.

    Returns
    -------
    str
        ``"native"`` or a name from ``mtcoll.plan.ALGORITHMS``. It must depend only on the
        arguments, so that every rank chooses the same. :class:`Comm` caches the answer per
        (size, dtype, op).
    """
    if nranks < 2:
        return "native"
    spec = getattr(topology, "spec", topology)
    tuned = _tuning.lookup(tuning, nbytes, nranks, spec)
    if tuned is not None:
        return tuned
    if calibration is not None:
        return calibration.choose(nbytes)[0]
    if nbytes < SMALL_MESSAGE_BYTES:
        return "native"
    return "multitree"


def _cart_spec(dims, periods):
    # The network model of a Cartesian grid: a torus when every dimension wraps, else a mesh
    # (a dimension that wraps loses its wrap-around link: the model never invents links).
    dims = [int(d) for d in dims]
    if periods is None or isinstance(periods, bool):
        periods = [bool(periods)] * len(dims)
    periodic = len(periods) == len(dims) and all(periods)
    if len(dims) == 1:
        return f"ring:{dims[0]}" if periodic else f"mesh:1x{dims[0]}"
    return ("torus:" if periodic else "mesh:") + "x".join(map(str, dims))


class Comm(MPI.Intracomm):
    """A communicator whose collectives run topology-aware schedules (MultiTree and others).

    ``mtcoll.Comm(comm)`` is ``comm`` itself as far as MPI is concerned (``isinstance(c,
    MPI.Intracomm)``, ``c == comm``, ``MPI.Win.Create(..., comm=c)``, ``pkl5.Intracomm(c)``,
    attributes, error handlers, ``c.topology`` = ``MPI.UNDEFINED``/``MPI.CART``...): every
    method mtcoll does not define is mpi4py's own, on the user's communicator.

    Parameters
    ----------
    comm : MPI.Intracomm, default ``MPI.COMM_WORLD``
        The communicator to stand for. It is duplicated once; mtcoll's own messages travel on
        the duplicate only.
    topology : str or mtcoll.topology.Topology, default ``"auto"``
        The network the ranks sit on (see :mod:`mtcoll.topology` for spec strings), kept as
        :attr:`network`; ``MTCOLL_TOPOLOGY`` overrides it.
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
    network : mtcoll.topology.Topology
        mtcoll's model of the network (``topology`` keeps mpi4py's meaning).
    virtual_topology : MPI.Cartcomm or MPI.Distgraphcomm
        The network as an MPI virtual topology over the same ranks, never reordered:
        ``Create_cart`` with periods for torus, mesh and ring, ``Create_dist_graph_adjacent``
        (tree neighbours) otherwise. mtcoll's own messages do not use it; it is there for
        coordinates and neighbour queries. Freed by :meth:`Free`.
    comm : MPI.Intracomm
        The communicator given at construction.
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

    ``Dup``, ``Dup_with_info``, ``Split``, ``Split_type``, ``Create``, ``Create_group`` and
    ``Create_cart`` return mtcoll communicators with this one's options (``Create_cart``: a
    :class:`Cartcomm` whose network is the matching ``torus:``/``mesh:``/``ring:``; the others
    detect their network, ``"auto"``) and its algorithm where that fits their network (else
    ``"auto"``). ``Idup`` returns a plain mpi4py communicator (it is not
    usable before its request completes).

    Calls go to the MPI library (on the duplicate communicator) when: the algorithm is
    ``"native"`` or ``"auto"`` chose it; the op is not one of MPI's predefined arithmetic,
    logical or bitwise reductions (user-defined ops from ``MPI.Op.Create``, MINLOC, MAXLOC);
    the datatype is derived or not a plain numeric type; or the schedule would need more
    messages between two ranks than the tag space allows. ``Reduce_scatter_block`` and
    ``Allgather`` need a schedule with one chunk per rank and each chunk owned by a different
    rank: they use the configured algorithm's schedule if it is one, else MultiTree's, else
    ring's, else the MPI library. A blocking call handed to the library is the library's
    blocking call (with the progress thread of :mod:`mtcoll._requests` advancing mtcoll's calls
    in flight meanwhile); the choice for a (size, dtype, op) is cached.

    With ``MTCOLL_TIMEOUT=<seconds>`` nothing waits for ever: the agreement check gives up
    after that many seconds, naming the ranks that did not make the call, and the data path
    (``Wait``) after that many seconds without a completed message. Both raise
    :class:`StallError` and leave the Comm broken: messages of the call may still be in
    flight, so every later call (and ``Wait`` on its requests) raises RuntimeError.
    :meth:`Free` still works on a broken Comm (it waits for nothing and keeps the duplicate
    communicators allocated, so their messages can never reach a new communicator). With
    ``MTCOLL_TIMEOUT`` (or without the progress thread) calls handed to the MPI library run as
    its nonblocking twin (``Iallreduce``...), blocking ones too, waited for while the other
    running calls are advanced, so that they can time out too.
    """

    def __new__(cls, comm=None, *args, **kwargs):
        if comm is None:
            comm = MPI.COMM_WORLD
        if not isinstance(comm, MPI.Intracomm) or comm == MPI.COMM_NULL:
            raise TypeError(f"comm must be an MPI intracommunicator, got {comm!r}")
        return MPI.Intracomm.__new__(cls, comm)  # the static base of Comm and Cartcomm

    def __init__(self, comm=None, topology="auto", algorithm="auto", ports=None,
                 segment_bytes=None, max_segments=None, wait=None):
        self._setup(MPI.COMM_WORLD if comm is None else comm, topology, algorithm, ports,
                    segment_bytes, max_segments, wait, owned=False)

    def _setup(self, comm, topology, algorithm, ports, segment_bytes, max_segments, wait,
               owned, env_topology=True):
        self._dup = None
        self._owned = owned  # Free frees the communicator itself too (mtcoll made it)
        self._orig = comm
        self._options = dict(algorithm=algorithm, segment_bytes=segment_bytes,
                             max_segments=max_segments, wait=wait)
        env_algo = os.environ.get("MTCOLL_ALGO", "").strip()
        env_topo = os.environ.get("MTCOLL_TOPOLOGY", "").strip() if env_topology else ""
        algorithm = (env_algo or str(algorithm)).strip().lower()
        self.algorithm = algorithm
        rank = MPI.Intracomm.Get_rank(self)
        ports = positive_int("ports", ports, rank, per_rank=True)
        segment_bytes = positive_int("segment_bytes", segment_bytes, rank)
        max_segments = positive_int("max_segments", max_segments, rank)
        try:
            threaded = thread_enabled()
        except ValueError:
            threaded = None  # a bad value: reported on every rank by _wait_mode
        self._dup = self._duplicate(MPI.Intracomm(self), rank)  # mpi4py's Idup, not ours
        try:
            leaders = host_leaders(self._dup)
            ranks_here = leaders.count(leaders[self._dup.Get_rank()])
            self.wait, self._threaded = self._wait_mode(wait, ranks_here, threaded)
            self._check_algorithm(algorithm, "MTCOLL_ALGO" if env_algo else "algorithm")
            try:
                self.network = from_comm(self._dup, env_topo or topology, ports, leaders)
            except ValueError as e:
                where = f"environment variable MTCOLL_TOPOLOGY={env_topo!r}" if env_topo \
                    else f"topology={topology!r}"
                raise ValueError(f"{where} (rank {rank}): {e}") from None
            self.tuning, self.tuning_path = self._load_tuning()
            # the network as an MPI virtual topology (Create_cart for torus, mesh and ring, a
            # distributed graph otherwise), for users who want coordinates or neighbours
            self.virtual_topology = mpi_topology(self._dup, self.network)
            # the agreement check's own communicator: its messages never meet the executor's
            self._chk = self._dup.Dup()
        except BaseException:
            self._dup.Free()
            self._dup = None
            raise
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
        self._ncalls = 0  # calls made (every rank counts alike: the stall's presence round)
        self._broken = None  # why this Comm is broken (a stall or an error mid-call), or None
        # (nbytes, dtype, op handle) of blocking Allreduce calls the library runs, when the
        # progress thread runs (only then are they the library's blocking calls)
        self._fast = set()
        self._lib_allreduce, self._lib_iallreduce = self._dup.Allreduce, self._dup.Iallreduce
        self._leaders = leaders
        self._probing = False  # the calibration probe's calls print no debug lines
        self.calibration = None
        if algorithm == "auto" and self.tuning is None and self._size > 1:
            try:
                if _calibrate.mode() != "off":
                    self._probing = True
                    self.calibration = _calibrate.calibrate(self, env_flag("MTCOLL_DEBUG"))
            except BaseException:  # (as above: what mtcoll made; the caller frees the rest)
                self.virtual_topology.Free()
                self._chk.Free()
                self._dup.Free()
                self._dup = self._chk = self.virtual_topology = None
                raise
            finally:
                self._probing = False


    @staticmethod
    def _duplicate(comm, rank):
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
        poll(self._dup.Ibarrier().Test, sleep=True)

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
                done = poll(req.Test, deadline, sleep)
            except BaseException:  # e.g. another call's error, raised by the progress made
                ABANDONED.append((req, data, size))  # MPI may still write or read them
                self._break(f"{what} interrupted on rank {self._rank}")
                raise
            if not done:
                ABANDONED.append((req, data, size))
                self._break(f"{what} timed out on rank {self._rank}")
                raise StallError(
                    f"{what} on rank {self._rank}: not every rank took part within "
                    f"MTCOLL_TIMEOUT={timeout:g} s (the first call with an algorithm plans its "
                    f"schedule on rank 0 and broadcasts it; a rank may not have made this "
                    f"call, or made a different one). The Comm is now broken: free it and make "
                    f"a new one, or end the job", None, timeout, [])
        return pickle.loads(data) if self._rank else payload

    def _wait_mode(self, wait, ranks_here, threaded):
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
        if threaded is None:
            bad = f"environment variable MTCOLL_PROGRESS={os.environ['MTCOLL_PROGRESS']!r} " \
                  f"(rank {self._dup.Get_rank()}) is not one of thread, off"
        # and whether every rank runs the progress thread: only then do blocking calls handed
        # to the library run as the library's blocking calls (the same call on every rank)
        flags = self._dup.allreduce((mode == "sleep") | (bad is not None) << 1
                                    | (not threaded) << 2, op=MPI.BOR)
        if flags & 2:
            raise ValueError(bad or "MTCOLL_WAIT, MTCOLL_PROGRESS or wait is not valid "
                                    "on some rank")
        return ("sleep" if flags & 1 else "busy"), not flags & 4

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
                    key = (self._dup.Get_size(), self.network.spec.strip().lower())
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

    # -- lifetime ----------------------------------------------------------------------------

    @property
    def comm(self):
        """The communicator given at construction (not the private duplicate)."""
        return self._orig

    @property
    def network_spec(self):
        """:attr:`network`'s spec string (``"torus:4x4"``...)."""
        return self.network.spec

    def __repr__(self):
        state = "freed" if getattr(self, "_dup", None) is None else f"{self._size} ranks"
        spec = getattr(getattr(self, "network", None), "spec", "?")
        return (f"<mtcoll.Comm {state}, network {spec!r}, "
                f"algorithm {getattr(self, 'algorithm', '?')!r}>")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.Free()
        return False

    def Free(self):
        """Wait for this Comm's calls still in flight, then free what mtcoll made.

        Collective. mtcoll's duplicate communicators and virtual topology are freed; the
        communicator given at construction (``MPI.COMM_WORLD``, say) is left alone, while one
        that mtcoll made (by ``Dup``, ``Split``, ``Create_cart``...) is freed too, as mpi4py's
        ``Free`` would. Freeing twice is harmless; any other mtcoll call after ``Free`` raises
        RuntimeError. A broken Comm (see the class notes) waits for nothing and keeps its
        duplicate communicators allocated, so that no new communicator gets their context while
        messages of the broken call may still arrive.
        """
        if self._dup is None:
            return
        with LOCK:
            while self._requests and self._broken is None:
                self._requests.popleft().Wait()
            self.virtual_topology.Free()
            self.virtual_topology = None
            if self._broken is None:
                self._chk.Free()
                self._dup.Free()
            else:
                ABANDONED.append((self._dup, self._chk))
            self._dup = self._chk = None
            self._requests.clear()
            self._schedules.clear()
            self._executors.clear()
            self._fast.clear()
        if self._owned:
            MPI.Intracomm.Free(self)

    def _alive(self):
        if self._dup is None:
            raise RuntimeError("this mtcoll.Comm has been freed")
        if self._broken is not None:
            raise RuntimeError(f"this mtcoll.Comm is broken: {self._broken}. Messages of that "
                               f"call may still be in flight, so no later call can be trusted: "
                               f"Free() it and make a new Comm, or end the job")

    def _break(self, reason):
        # A call stalled or failed midway: stop every call in flight (their receives are
        # cancelled; their sends and buffers stay alive in ABANDONED) and refuse new ones.
        if self._broken is not None:
            return
        with LOCK:
            self._broken = reason
            self._fast.clear()  # no fast path on a broken Comm: every call raises
            while self._requests:
                self._requests.popleft()._abandon()

    # -- derived communicators: mtcoll communicators too -------------------------------------

    def _derive(self, new, cls=None, topology="auto", ports=None, env_topology=False):
        # ``new``: what mpi4py's method returned (MPI.COMM_NULL on ranks left out). A
        # subcommunicator has its own network: MTCOLL_TOPOLOGY (for the whole job) applies
        # only to a duplicate.
        if new == MPI.COMM_NULL:
            return new
        cls = cls or Comm
        plain = (MPI.Cartcomm if issubclass(cls, MPI.Cartcomm) else MPI.Intracomm)(new)
        out = cls.__new__(cls, plain)
        try:
            out._setup(plain, topology, ports=ports, owned=True, env_topology=env_topology,
                       **self._options)
        except BaseException:
            plain.Free()
            raise
        if out.algorithm not in _SPECIAL_ALGORITHMS:
            # the inherited algorithm where it fits the new network, else auto's choice (the
            # planner's verdict is broadcast: every rank falls back alike)
            try:
                out.schedule()
            except ValueError:
                out.algorithm = "auto"
        return out

    def Dup(self, info=None):
        """Duplicate: an mtcoll :class:`Comm` with the same options (collective)."""
        new = MPI.Intracomm(self).Dup(info)
        return self._derive(new, type(self), self._topology_arg(), self.ports, True)

    def Dup_with_info(self, info):
        """Duplicate with ``info``: an mtcoll :class:`Comm` (collective)."""
        new = MPI.Intracomm(self).Dup_with_info(info)
        return self._derive(new, type(self), self._topology_arg(), self.ports, True)

    def Idup(self, info=None):
        """mpi4py's ``Idup`` on the communicator: ``(MPI.Intracomm, MPI.Request)`` -- a plain
        mpi4py communicator, since it is not usable before the request completes (wrap it in
        :class:`Comm` then)."""
        return MPI.Intracomm(self).Idup(info)

    def Split(self, color=0, key=0):
        """mpi4py's ``Split``; the new communicator is an mtcoll :class:`Comm` (collective;
        ``MPI.COMM_NULL`` for ``color=MPI.UNDEFINED``)."""
        return self._derive(MPI.Intracomm(self).Split(color, key))

    def Split_type(self, split_type, key=0, info=MPI.INFO_NULL):
        """mpi4py's ``Split_type``; the new communicator is an mtcoll :class:`Comm`."""
        return self._derive(MPI.Intracomm(self).Split_type(split_type, key, info))

    def Create(self, group):
        """mpi4py's ``Create``; the new communicator is an mtcoll :class:`Comm`."""
        return self._derive(MPI.Intracomm(self).Create(group))

    def Create_group(self, group, tag=0):
        """mpi4py's ``Create_group``; the new communicator is an mtcoll :class:`Comm`."""
        return self._derive(MPI.Intracomm(self).Create_group(group, tag))

    def Create_cart(self, dims, periods=None, reorder=False):
        """mpi4py's ``Create_cart``; the new communicator is an mtcoll :class:`Cartcomm` whose
        :attr:`network` is the grid: ``torus:AxB...`` when every dimension is periodic,
        ``mesh:AxB...`` otherwise (``ring:N``/``mesh:1xN`` in one dimension). Ranks outside the
        grid get ``MPI.COMM_NULL``."""
        new = MPI.Intracomm(self).Create_cart(dims, periods, reorder)
        return self._derive(new, Cartcomm, _cart_spec(dims, periods))

    def _topology_arg(self):
        # a duplicate keeps the network (same ranks); a given Topology object is reused
        return self.network.spec

    # -- schedules ---------------------------------------------------------------------------

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
                    sched = plan(self.network, name)
                    out = io.BytesIO()
                    sched.save(out)
                    payload = ("ok", out.getvalue())
                except Exception as e:  # every rank must raise, not only rank 0
                    payload = ("error", type(e).__name__, str(e))
            # nonblocking and polled on every rank (the same calls everywhere: whether calls are
            # running differs between ranks), sleeping in sleep mode like _gate
            payload = self._bcast_within(payload, env_timeout(),
                                         f"planning {name!r} on first use")
            if payload[0] == "ok":
                got = sched if self._rank == 0 else Schedule.load(io.BytesIO(payload[1]))
                if got.nranks != self._size:
                    raise ValueError(f"plan({self.network.spec!r}, {name!r}) gave a schedule "
                                     f"for {got.nranks} ranks, not {self._size}")
            else:
                got = payload[1:]
            self._schedules[name] = got
        if isinstance(got, tuple):
            kind, message = got
            cls = {"ValueError": ValueError, "TypeError": TypeError}.get(kind, RuntimeError)
            raise cls(f"planning {name!r} on {self.network.spec!r}: {message}")
        return got

    def _executor(self, name):
        ex = self._executors.get(name)
        if ex is None:
            ex = self._executors[name] = execute.Executor(
                self._dup, self.schedule(name), self.segment_bytes, self.max_segments,
                self.wait)
        return ex

    # -- the calls -------------------------------------------------------------------------------

    # -- the calls -------------------------------------------------------------------------------

    def _fast_path(self, sendbuf, recvbuf, op):
        """``(sendbuf, True)`` when a call may go straight to the library: plain arrays whose
        (size, dtype, op) this Comm has already handed to it, nothing to check or print, and
        buffers that cannot overlap (``None`` or the same object becomes ``MPI.IN_PLACE``);
        else ``(sendbuf, False)`` and the slow path checks and says what is wrong."""
        try:
            fast = (recvbuf.nbytes, recvbuf.dtype.num, op.handle) in self._fast
        except AttributeError:  # not an array, or not an op
            return sendbuf, False
        if not (fast and env_quiet()):
            return sendbuf, False
        if sendbuf is None or sendbuf is recvbuf:
            return _IN_PLACE, True
        if sendbuf is _IN_PLACE:
            return sendbuf, True
        plain = (type(sendbuf) is _ndarray and sendbuf.dtype is recvbuf.dtype
                 and sendbuf.base is not recvbuf and recvbuf.base is not sendbuf
                 and (sendbuf.base is None or sendbuf.base is not recvbuf.base))
        return sendbuf, plain  # not plain: maybe overlapping, or another dtype

    def Allreduce(self, sendbuf, recvbuf, op=MPI.SUM):
        """Combine the ``sendbuf`` of every rank with ``op``; every rank gets the result.

        Parameters
        ----------
        sendbuf : buffer spec, ``MPI.IN_PLACE`` or None
            A buffer (numpy array or scalar, ``bytearray``, ``array.array``, a DLPack or
            ``__cuda_array_interface__`` exporter in host memory), or ``[buf, datatype]``,
            ``[buf, count, datatype]`` as in mpi4py. With ``MPI.IN_PLACE`` or None (or
            ``recvbuf`` itself) the input is taken from ``recvbuf``.
        recvbuf : buffer spec
            Writable, same dtype and number of elements as ``sendbuf``; receives the result.
            Non-contiguous arrays are copied in and out.
        op : MPI.Op, default ``MPI.SUM``
            SUM, PROD, MIN, MAX, LAND, LOR, LXOR, BAND, BOR or BXOR run on the chosen
            schedule; any other op runs in the MPI library.

        Raises
        ------
        ValueError, TypeError, BufferError
            Before any message is sent, naming the argument and rank: a read-only (BufferError),
            too small or too large ``recvbuf``, one of another dtype, overlapping buffers, or an
            op MPI does not define on the dtype (e.g. ``MPI.MIN`` on complex).

        Notes
        -----
        Collective. The result is bitwise identical on every rank and from run to run (for a
        given algorithm, topology, count and segment settings).
        """
        # The fast path: plain contiguous arrays whose (size, dtype, op) this Comm has already
        # handed to the MPI library, nothing to check or print, no watchdog: straight to the
        # library's blocking call (mtcoll's calls in flight are advanced by the progress thread).
        sendbuf, fast = self._fast_path(sendbuf, recvbuf, op)
        if fast:
            try:
                self._lib_allreduce(sendbuf, recvbuf, op)
                self._ncalls += 1
                return
            except (BufferError, ValueError, TypeError):
                pass  # not as mpi4py takes it (non-contiguous...): the slow path says why
        self._start("Allreduce", sendbuf, recvbuf, op, blocking=True).Wait()

    def Iallreduce(self, sendbuf, recvbuf, op=MPI.SUM):
        """Start an :meth:`Allreduce`; returns a :class:`Request` (an ``MPI.Request``).

        The buffers must stay untouched (``sendbuf`` unmodified, ``recvbuf`` neither read nor
        written) until the request completes. The request keeps them alive. Several
        Iallreduce calls may be in flight at once; completing them in any order is fine, with
        the request's ``Wait``/``Test``, :func:`mtcoll.waitall` or ``MPI.Request.Waitall`` &
        co. (see :mod:`mtcoll._requests` for how progress happens). With ``MTCOLL_CHECK=1``
        the start synchronises the ranks (the agreement check exchanges a small descriptor
        between every pair of ranks).
        """
        # the fast path, as for Allreduce: the library's own request, returned as is
        sendbuf, fast = self._fast_path(sendbuf, recvbuf, op)
        if fast:
            try:
                native = self._lib_iallreduce(sendbuf, recvbuf, op)
            except (BufferError, ValueError, TypeError):
                pass
            else:
                self._ncalls += 1
                req = Request._library(native, (sendbuf, recvbuf), self, "Iallreduce",
                                       self._ncalls)
                reqs = self._requests
                reqs.append(req)
                if len(reqs) > 64:  # what _retire does, now and then
                    self._requests = deque(r for r in reqs if not r._done())
                return req
        return self._start("Iallreduce", sendbuf, recvbuf, op, blocking=False)

    def Reduce_scatter_block(self, sendbuf, recvbuf, op=MPI.SUM):
        """Reduce ``sendbuf`` (``size * k`` elements) over all ranks; rank ``r`` gets block ``r``
        (elements ``r*k .. r*k+k-1`` of the result) in ``recvbuf`` (``k`` elements).

        With ``sendbuf=MPI.IN_PLACE`` (or None), ``recvbuf`` holds the ``size * k`` input
        elements and gets the block in its first ``k``. Runs the reduce phase of a schedule
        with one chunk per rank (see the class notes). Collective; errors as for
        :meth:`Allreduce`.
        """
        self._start("Reduce_scatter_block", sendbuf, recvbuf, op, blocking=True).Wait()

    def Allgather(self, sendbuf, recvbuf):
        """Gather ``sendbuf`` (``k`` elements) of every rank into ``recvbuf`` (``size * k``),
        rank ``r``'s data in block ``r``, on every rank.

        With ``sendbuf=MPI.IN_PLACE`` (or None) each rank's contribution is already in its
        block of ``recvbuf``. Runs the gather phase of a schedule with one chunk per rank (see
        the class notes). Collective; errors as for :meth:`Allreduce`.
        """
        self._start("Allgather", sendbuf, recvbuf, None, blocking=True).Wait()

    # -- machinery -------------------------------------------------------------------------------

    def _start(self, kind, sendbuf, recvbuf, op, blocking):
        reraise()  # what the progress thread hit, in this thread
        self._alive()
        check = env_flag("MTCOLL_CHECK")
        debug = env_flag("MTCOLL_DEBUG") and not self._probing
        timeout = env_timeout()
        call, err = None, None
        try:
            call = self._prepare(kind, sendbuf, recvbuf, op)
        except (ValueError, TypeError, BufferError) as e:
            err = e
        with LOCK:
            if check:
                agree(self, kind, call, err, timeout)
            elif err is not None:
                raise err
            self._retire()
            self._alive()  # the progress made above may have broken it (another call's error)
            try:
                req = self._launch(call, blocking, debug, timeout)
            except StallError as e:  # from planning on first use, which does not know the call
                e.call = kind
                e.args = (f"mtcoll {kind}: {e.args[0]}",)
                raise
            self._ncalls += 1
            if type(req) is not tuple:
                req._comm, req._timeout, req._kind = self, timeout, kind
                req._threaded, req._number = self._threaded, self._ncalls
                if not req._done():
                    self._requests.append(req)
                    if req._greq is not None and self._threaded and not blocking:
                        wake()  # (a blocking call's own Wait advances it)
                return req
        # the library's blocking call, outside the lock: the progress thread must be able to
        # advance mtcoll's calls in flight meanwhile
        run, done = req
        run()
        for fn in done:
            fn()
        return _COMPLETE

    def _prepare(self, kind, sendbuf, recvbuf, op):
        c = prepare(kind, sendbuf, recvbuf, op, self._rank, self._size)
        if c.why:
            return c  # only the MPI library can run it
        size = self._size
        if self.algorithm == "native":
            c.why = "algorithm 'native'"
        elif self.algorithm == "auto":
            # the hook takes the table only when there is one, so that a three-argument
            # replacement of choose() keeps working
            if self.tuning:
                c.algorithm = choose(c.nbytes, size, self.network, tuning=self.tuning)
                how = "tuning table"
            elif self.calibration is not None:
                c.algorithm = choose(c.nbytes, size, self.network, calibration=self.calibration)
                how = self.calibration.choose(c.nbytes)[1]
            else:
                c.algorithm = choose(c.nbytes, size, self.network)
                how = "built-in rule"
            c.why = f"chosen by auto, {how}"
        else:
            c.algorithm = self.algorithm
        return c

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
        if any(r._done() for r in reqs):
            self._requests = deque(r for r in reqs if not r._done())

    def _launch(self, c, blocking, debug, timeout):
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
        return self._native(c, blocking and self._threaded and timeout is None)

    def _debug(self, c, how):
        op = _ops.op_name(c.op) or "user-defined" if c.op is not None else "-"
        print(f"mtcoll[rank 0]: {c.kind} count={c.count} "
              f"dtype={getattr(c.dtype, 'name', 'derived')} op={op} bytes={c.nbytes} "
              f"topology={self.network.spec} {how}", file=sys.stderr, flush=True)

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

    def _native(self, c, direct):
        # The MPI library runs the call, on the duplicate. ``direct``: a blocking call with the
        # progress thread running and no watchdog: the library's blocking call, the same on
        # every rank (MPI matches a blocking collective with a nonblocking one on no rank, so
        # the choice must not depend on what each rank has in flight). Otherwise its
        # nonblocking twin, which Request.Wait waits for while advancing mtcoll's calls (a
        # rank blocked in MPI_Allreduce could not advance them while a peer waits for one of
        # them before it joins) and can give up on after MTCOLL_TIMEOUT.
        comm = self._dup
        if c.recv is None:
            sendspec, recvspec = c.raw  # derived datatypes: as given
            recv = None
        else:
            sendspec = MPI.IN_PLACE if c.send is None else c.send.flat
            recvspec = c.recv.flat
            recv = c.recv
        done = [recv.copy_back] if recv is not None and recv.orig is not None else []
        if direct:
            if c.kind == "Allgather":
                return (lambda: comm.Allgather(sendspec, recvspec)), done
            if c.kind == "Reduce_scatter_block":
                return (lambda: comm.Reduce_scatter_block(sendspec, recvspec, c.op)), done
            if c.dtype is not None and env_quiet() and len(self._fast) < _FAST_CACHE:
                self._fast.add((c.nbytes, c.dtype.num, c.op.handle))  # the library's, always
            return (lambda: comm.Allreduce(sendspec, recvspec, c.op)), done
        if c.kind == "Iallreduce" and not done and c.dtype is not None and self._threaded \
                and env_quiet() and len(self._fast) < _FAST_CACHE:
            self._fast.add((c.nbytes, c.dtype.num, c.op.handle))  # the library's, always
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




class Cartcomm(Comm, MPI.Cartcomm):
    """An mtcoll :class:`Comm` that is an ``MPI.Cartcomm`` (what :meth:`Comm.Create_cart`
    returns): mpi4py's coordinates and shifts, mtcoll's collectives on the grid's network."""


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
