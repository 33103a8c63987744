"""The public communicator, :class:`Comm`.

A :class:`Comm` *is* an mpi4py ``MPI.Intracomm`` (a subclass, as ``mpi4py.util.pkl5`` builds
its communicators): the user's communicator, with ``Allreduce``, ``Iallreduce``,
``Reduce_scatter_block`` and ``Allgather`` replaced by topology-aware schedules where that
pays, and every other method mpi4py's own. Its own messages travel on a private duplicate.
This file holds its construction, lifetime, the public calls with their fast path to the MPI
library, and the ``auto`` choice (:func:`choose`); the rooms behind it
(``mtcoll/comm/__init__.py`` lists them all):
:mod:`mtcoll.comm._planning` (what the ranks settle together: duplicate, wait mode, tuning,
schedules), :mod:`mtcoll.comm._derived` (``Dup``, ``Split``, ``Create_cart``...),
:mod:`mtcoll.comm._dispatch` (a call's path to the library or the executor),
:mod:`mtcoll.comm._buffers` (arguments), :mod:`mtcoll.comm._requests` (requests),
:mod:`mtcoll.comm._progress` (progress),
:mod:`mtcoll.comm._agreement` (the agreement check), :mod:`mtcoll.comm._errors`; the module-level
calls are in :mod:`mtcoll.comm._calls`.
"""

from __future__ import annotations

import os
from collections import deque

import numpy as np
from mpi4py import MPI

from .. import _calibrate, _env, _tuning
from . import _learn, _links, _registry
from ._buffers import prepare
from ._derived import Derived, cart_spec
from . import _dispatch, _planning
from ._dispatch import FAST_KINDS
from .._env import env_flag, env_quiet
from ..topology import from_comm, host_leaders, mpi_topology, parse
from ._errors import ABANDONED, StallError, positive_int
from ._planning import SPECIAL_ALGORITHMS
from ._progress import LOCK, thread_enabled
from ._requests import Request, waitall

__all__ = ["Comm", "Cartcomm", "Graphcomm", "Distgraphcomm", "Intercomm", "Request", "waitall",
           "choose", "StallError",
           "SMALL_MESSAGE_BYTES", "ENV_VARS"]

#: Without a calibration (``MTCOLL_CALIBRATE=off``), ``algorithm="auto"`` leaves messages
#: below this many bytes to the MPI library.
SMALL_MESSAGE_BYTES = 64 * 1024

#: Environment variables mtcoll reads.
ENV_VARS = ("MTCOLL_ALGO", "MTCOLL_TOPOLOGY", "MTCOLL_TUNING", "MTCOLL_WAIT", "MTCOLL_CHECK",
            "MTCOLL_DEBUG", "MTCOLL_TIMEOUT", "MTCOLL_PROGRESS", "MTCOLL_CALIBRATE",
            "MTCOLL_CACHE_DIR", "MTCOLL_PROBE_SECONDS", "MTCOLL_ENGINE", "MTCOLL_MEASURE_LINKS")

_IN_PLACE, _ndarray = MPI.IN_PLACE, np.ndarray  # (the fast paths' globals, looked up once)
# the fast path's call kinds (compared by identity) and its cache keys: _dispatch.fast_key
_ALLREDUCE, _RSB, _ALLGATHER = FAST_KINDS
_WORLD, _Intracomm, _COMM_NULL, _find = MPI.COMM_WORLD, MPI.Intracomm, MPI.COMM_NULL, \
    _registry.find
_ENV = _env.STORE


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


def _measure_option(value, rank):
    # measure_links=True, or MTCOLL_MEASURE_LINKS=1 (either turns it on; a bad value raises)
    if value is not True and value is not False and value not in (0, 1):
        raise TypeError(f"measure_links must be True or False, got {value!r} (rank {rank})")
    return bool(value) or env_flag("MTCOLL_MEASURE_LINKS")


#: The state of an mtcoll communicator allocated but not set up yet (see ``Comm._finish``).
LATER = "later"


class _Constructor(type):
    """``mtcoll.Comm(comm, ...)`` itself: the Comm ``comm`` already has with these options
    (a lookup, see :mod:`mtcoll.comm._registry`), else a new one, set up and registered. mpi4py's
    own constructors allocate with ``cls.__new__(cls)`` and do not come here."""

    def __call__(cls, comm=None, topology="auto", algorithm="auto", ports=None,
                 segment_bytes=None, max_segments=None, wait=None, measure_links=False):
        options = (topology, algorithm, ports, segment_bytes, max_segments, wait, measure_links)
        if comm is None:
            comm = _WORLD
        if isinstance(comm, _Intracomm) and comm != _COMM_NULL:  # (the hit path, inlined)
            got = _find(comm, options)[0]
            if got is not None and isinstance(got, cls):
                return got
        return cls._construct(comm, options)


def _class_of(cls, comm):
    # the mtcoll class of comm's kind: mtcoll.Comm of a Cartesian communicator is a Cartcomm
    if cls is not Comm:
        return cls
    kind = MPI.Comm.Get_topology(comm)
    return {MPI.CART: Cartcomm, MPI.GRAPH: Graphcomm, MPI.DIST_GRAPH: Distgraphcomm}.get(kind,
                                                                                       Comm)


class Comm(Derived, MPI.Intracomm, metaclass=_Constructor):
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
    measure_links : bool, default False
        Measure the rate of every link of the network at construction (a few messages per
        link, all links at once) and plan for what was measured: :attr:`network` becomes the
        spec with an override for each link clearly slower or faster than the others
        (:mod:`mtcoll.comm._links`), cached with the calibration. ``MTCOLL_MEASURE_LINKS=1``
        turns it on too.

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
    measured_links : mtcoll.comm._links.Measured or None
        What ``measure_links`` found (the spec measured from, the measured spec, measured or
        cached, its time, every link's rate); None when it is off.

    Notes
    -----
    Collective: every rank of ``comm`` must construct it with the same arguments, and call its
    collectives in the same order with matching arguments (as with MPI). Set
    ``MTCOLL_CHECK=1`` to have every call first check that the ranks agree; a disagreement then
    raises the same error on every rank, naming the ranks, instead of hanging.

    ``Comm(c, ...)`` of a communicator that already has a Comm with these options is that
    Comm (a lookup: no message, no new communicator); a Comm is released when its
    communicator is freed, or by :meth:`Free` (see :mod:`mtcoll.comm._registry`). Every derivation
    (``Dup``, ``Clone``, ``Idup``, ``Split``, ``Split_type``, ``Create``, ``Create_group``,
    ``Create_from_group``, ``Create_cart`` and ``Cartcomm.Sub``, ``Create_graph``,
    ``Create_dist_graph(_adjacent)``, ``Create_intercomm``'s ``Merge``) returns an mtcoll
    communicator with this one's options (:mod:`mtcoll.comm._derived`; the network of each:
    docs/api.md). An object allocated but not set up (an ``Idup``'s communicator, an object
    mpi4py's own constructors made) sets itself up at its first mtcoll call.

    Calls go to the MPI library (on the duplicate communicator) when: the algorithm is
    ``"native"`` or ``"auto"`` chose it; the op is not one of MPI's predefined arithmetic,
    logical or bitwise reductions (user-defined ops from ``MPI.Op.Create``, MINLOC, MAXLOC);
    the datatype is derived or not a plain numeric type; or the schedule would need more
    messages between two ranks than the tag space allows. ``Reduce_scatter_block`` and
    ``Allgather`` need a schedule with one chunk per rank and each chunk owned by a different
    rank: they use the configured algorithm's schedule if it is one, else MultiTree's, else
    ring's, else the MPI library. A blocking call handed to the library is the library's
    blocking call (with the progress thread of :mod:`mtcoll.comm._progress` advancing mtcoll's
    calls in flight meanwhile); the choice for a (size, dtype, op) is cached.

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

    # What an object has before its setup (mpi4py's own constructors and unpickling allocate
    # one with ``cls.__new__(cls)`` and never call anything else): not yet set up, the fast
    # path empty, so that its first mtcoll call reaches _alive, which sets it up.
    _pending = LATER
    _dup = None
    _broken = None
    _fast = frozenset()
    _last_kind = _last_dtype = _last_op = _last_nbytes = None
    _learner = None

    def __new__(cls, comm=None, *args, **kwargs):
        # Allocation only (``Comm(...)`` itself is _Constructor.__call__). With a communicator
        # (unpickling passes one): the Comm it already has with the default options, if any.
        if comm is None:
            return MPI.Intracomm.__new__(cls)  # the static base of every mtcoll class
        if isinstance(comm, MPI.Intracomm) and comm != MPI.COMM_NULL:
            got = _registry.find(comm, _registry.DEFAULT_OPTIONS)[0]
            if got is not None and isinstance(got, cls):
                return got
        return MPI.Intracomm.__new__(cls, comm)

    @classmethod
    def _construct(cls, comm, options):
        if comm is None:
            comm = MPI.COMM_WORLD
        if not isinstance(comm, MPI.Intracomm) or comm == MPI.COMM_NULL:
            raise TypeError(f"comm must be an MPI intracommunicator, got {comm!r}")
        got, k = _registry.find(comm, options)
        if got is not None and isinstance(got, cls):
            return got
        cls = _class_of(cls, comm)
        self = MPI.Intracomm.__new__(cls, comm)
        topology, algorithm, ports, segment_bytes, max_segments, wait, measure_links = options
        self._setup(comm, self._grid_spec(topology), algorithm, ports, segment_bytes,
                    max_segments, wait, owned=False, measure_links=measure_links)
        _registry.register(comm, k, self)
        return self

    def _grid_spec(self, topology):
        # "auto" on a Cartesian communicator is its grid, as for Create_cart
        if isinstance(topology, str) and topology.strip().lower() == "auto" \
                and isinstance(self, MPI.Cartcomm):
            dims, periods, _ = MPI.Cartcomm.Get_topo(self)
            return cart_spec(dims, periods)
        return topology

    def _finish(self):
        # Set up an object that was allocated but not set up (an Idup's communicator once its
        # request completed, an object of mpi4py's own constructors): at its first mtcoll call,
        # which every rank makes at the same point, so this collective setup matches.
        pending = self._pending
        req, setup = (None, None) if pending is LATER else pending
        if req is not None:
            req.Wait()  # (the caller's request: its own Wait then returns at once)
        self._pending = None
        if setup is None:  # (the defaults; a communicator mpi4py made is this object's own)
            owned = self != MPI.COMM_WORLD and self != MPI.COMM_SELF
            setup = dict(topology=self._grid_spec("auto"), ports=None, env_topology=True,
                         options=dict(algorithm="auto", segment_bytes=None,
                                      max_segments=None, wait=None, measure_links=False),
                         owned=owned)
        try:
            self._adopt(**setup)
        except BaseException:
            self._pending = pending if req is None else (None, setup)
            raise

    def _adopt(self, topology, ports, env_topology, options, owned=True, measured=None):
        # the setup of a communicator mtcoll derived (or mpi4py made): registered as its own
        self._setup(self._plain(), topology, ports=ports, owned=owned,
                    env_topology=env_topology, measured=measured, **options)
        if self.algorithm not in SPECIAL_ALGORITHMS:
            # the inherited algorithm where it fits the new network, else auto's choice (the
            # planner's verdict is broadcast: every rank falls back alike)
            try:
                _planning.rank_schedule(self, self.algorithm)
            except ValueError:
                self.algorithm = "auto"
        # a communicator mtcoll (or mpi4py) made is this Comm's own; COMM_WORLD's (unpickled)
        # is its Comm of the default options
        _registry.register(self, _registry.OWN if owned else
                           _registry.key(_registry.DEFAULT_OPTIONS), self)

    def _plain(self):
        # mpi4py's own object of this handle, of the matching class
        for base in (MPI.Cartcomm, MPI.Graphcomm, MPI.Distgraphcomm):
            if isinstance(self, base):
                return base(self)
        return MPI.Intracomm(self)

    def __getattr__(self, name):
        # only for names not found: say why an object not yet set up has no network, tuning...
        if self._pending is not None and not name.startswith("__"):
            raise AttributeError(
                f"{type(self).__name__!r} object has no attribute {name!r} yet: this mtcoll "
                f"communicator is set up at its first mtcoll call (Allreduce, Allgather, "
                f"Reduce_scatter_block, Iallreduce, schedule(), a derivation), collectively")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _setup(self, comm, topology, algorithm, ports, segment_bytes, max_segments, wait,
               owned, env_topology=True, measure_links=False, measured=None):
        self._pending = None
        self._dup = None
        self._owned = owned  # Free frees the communicator itself too (mtcoll made it)
        self._orig = comm
        self._options = dict(algorithm=algorithm, segment_bytes=segment_bytes,
                             max_segments=max_segments, wait=wait, measure_links=measure_links)
        env_algo = os.environ.get("MTCOLL_ALGO", "").strip()
        env_topo = os.environ.get("MTCOLL_TOPOLOGY", "").strip() if env_topology else ""
        algorithm = (env_algo or str(algorithm)).strip().lower()
        self.algorithm = algorithm
        # MTCOLL_ALGO is for the whole job: where its algorithm does not fit this Comm's
        # network, calls run as auto would (an algorithm= argument that does not fit raises)
        self._env_algorithm = algorithm if env_algo else None
        rank = MPI.Intracomm.Get_rank(self)
        ports = positive_int("ports", ports, rank, per_rank=True)
        segment_bytes = positive_int("segment_bytes", segment_bytes, rank)
        max_segments = positive_int("max_segments", max_segments, rank)
        measure = _measure_option(measure_links, rank)
        try:
            threaded = thread_enabled()
        except ValueError:
            threaded = None  # a bad value: reported on every rank by _wait_mode
        self._dup = _planning.duplicate(MPI.Intracomm(self), rank)  # mpi4py's Idup, not ours
        try:
            leaders = host_leaders(self._dup)
            ranks_here = leaders.count(leaders[self._dup.Get_rank()])
            self.wait, self._threaded = _planning.wait_mode(self, wait, ranks_here, threaded)
            _planning.check_algorithm(self, algorithm, "MTCOLL_ALGO" if env_algo else "algorithm")
            try:
                self.network = from_comm(self._dup, env_topo or topology, ports, leaders)
            except ValueError as e:
                where = f"environment variable MTCOLL_TOPOLOGY={env_topo!r}" if env_topo \
                    else f"topology={topology!r}"
                raise ValueError(f"{where} (rank {rank}): {e}") from None
            # before anything reads the network (tuning, calibration key, schedules): what is
            # planned is planned for the links as measured
            self.measured_links = None
            if measure and measured is not None and \
                    self.network.spec in (measured.base, measured.spec):
                # a duplicate's links are its parent's: what they measured holds (the same
                # spec on every rank, as the parent's is)
                self.network = parse(measured.spec, nranks=self._dup.Get_size(), ports=ports)
                self.measured_links = measured
            elif measure:
                self._leaders = leaders
                self.network, self.measured_links = _links.measure(
                    self, self.network, ports, env_flag("MTCOLL_DEBUG"))
            self.tuning, self.tuning_path = _planning.load_tuning(self)
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
        self._rank_schedules = {}  # algorithm -> this rank's RankSchedule, or the same tuple
        self._executors = {}
        self._seq = 0
        self._requests = deque()  # in flight, oldest first
        self._nchecks = 0  # agreement checks made (their tag)
        self._ncalls = 0  # calls made (every rank counts alike: the stall's presence round)
        self._broken = None  # why this Comm is broken (a stall or an error mid-call), or None
        # (nbytes, dtype, op handle) of blocking Allreduce calls the library runs, when the
        # progress thread runs (only then are they the library's blocking calls): one set per
        # algorithm setting, since what the library runs depends on it (see ``algorithm``)
        self._fast_by_algorithm = {}
        self.algorithm = self.algorithm  # (the set of the setting given)
        self._lib_allreduce, self._lib_iallreduce = self._dup.Allreduce, self._dup.Iallreduce
        self._lib_rsb, self._lib_allgather = self._dup.Reduce_scatter_block, self._dup.Allgather
        self._leaders = leaders
        self._probing = False  # the calibration probe's calls print no debug lines
        self.calibration = None
        self._learner = None  # auto's learning on the calls (mtcoll.comm._learn), or None
        if algorithm == "auto" and self.tuning is None and self._size > 1:
            try:
                if _calibrate.mode() != "off":  # the cached calibration: a prior, no probe
                    self._learner = _learn.Learner(
                        self, _calibrate.prior(self, env_flag("MTCOLL_DEBUG")))
                    self.calibration = self._learner.calibration
            except BaseException:  # (as above: what mtcoll made; the caller frees the rest)
                self.virtual_topology.Free()
                self._chk.Free()
                self._dup.Free()
                self._dup = self._chk = self.virtual_topology = None
                raise

    # -- lifetime ----------------------------------------------------------------------------

    @property
    def algorithm(self):
        """The algorithm setting: ``"auto"``, ``"native"`` or a planner name. Assigning it
        changes the algorithm of later calls; the fast path then follows the new setting (what
        it remembered as the library's calls under another setting is not used)."""
        return self._algorithm

    @algorithm.setter
    def algorithm(self, value):
        self._algorithm = value
        memo = getattr(self, "_fast_by_algorithm", None)
        if memo is not None:  # (not yet during construction)
            self._fast = memo.setdefault(value, set())
            self._last_kind = self._last_dtype = self._last_op = None  # _fast_path's memo
            self._last_nbytes = None

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
        RuntimeError; the next ``mtcoll.Comm(comm)`` builds a new Comm. A broken Comm (see the
        class notes) waits for nothing and keeps its duplicate communicators allocated, so that
        no new communicator gets their context while messages of the broken call may still
        arrive. Freeing the communicator given at construction releases its Comms the same
        way (MPI's attribute delete callback, on every rank inside ``MPI_Comm_free``).
        """
        if self._pending is not None:  # never set up: only the communicator is there
            pending, self._pending = self._pending, None
            if pending is not LATER and pending[0] is not None:
                pending[0].Wait()  # (an Idup's: MPI frees no communicator mid-duplication)
            owned = pending[1]["owned"] if pending is not LATER and pending[1] else \
                self != MPI.COMM_WORLD and self != MPI.COMM_SELF
            if owned and self != MPI.COMM_NULL:
                MPI.Intracomm.Free(self)
            return
        if self._dup is None:
            return  # freed already, or released when its communicator was freed
        self._release()
        _registry.forget(self, self)
        if self._owned:
            MPI.Intracomm.Free(self)  # (MPI's delete callback releases the other Comms of it)

    def _release(self):
        # the mtcoll part of Free: wait for the calls in flight, free the duplicates and the
        # virtual topology. Also MPI's delete callback when the communicator is freed.
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
            self._rank_schedules.clear()
            self._executors.clear()
            self._forget_fast()

    def _alive(self):
        if self._dup is None:
            if self._pending is None:
                raise RuntimeError("this mtcoll.Comm has been freed")
            self._finish()
        if self._broken is not None:
            raise RuntimeError(f"this mtcoll.Comm is broken: {self._broken}. Messages of that "
                               f"call may still be in flight, so no later call can be trusted: "
                               f"Free() it and make a new Comm, or end the job")

    def _ensure(self):
        # before a derivation: an object not yet set up is set up (collective, as the
        # derivation is); a freed one derives from its options as before
        if self._pending is not None:
            self._finish()

    def _break(self, reason):
        # A call stalled or failed midway: stop every call in flight (their receives are
        # cancelled; their sends and buffers stay alive in ABANDONED) and refuse new ones.
        if self._broken is not None:
            return
        with LOCK:
            self._broken = reason
            self._forget_fast()  # no fast path on a broken Comm: every call raises
            while self._requests:
                self._requests.popleft()._abandon()

    # -- the calls -------------------------------------------------------------------------------

    def _fast_path(self, kind, sendbuf, recvbuf, op):
        """The send buffer to give the library when a call may go straight to it: plain
        arrays whose (call, size, dtype, op) this Comm has already handed to it, nothing to
        check or print, and buffers that cannot overlap (``MPI.IN_PLACE``, or None or the same
        object where mpi4py takes those as in place, become ``MPI.IN_PLACE``); else None, and
        the slow path checks and says what is wrong. ``kind``: ``"Allreduce"`` (for
        ``Iallreduce`` too), ``"Reduce_scatter_block"`` or ``"Allgather"``, always one of
        these string constants (compared by identity).

        Every attribute read here costs tens of nanoseconds against a 3 us call: the last
        call's (kind, dtype, op, size) is remembered, so a loop of like calls compares
        identities instead of building and hashing a key (docs/performance.md, the drop-in
        overhead)."""
        try:
            dtype = recvbuf.dtype
            nbytes = recvbuf.nbytes
            if kind is not self._last_kind or dtype is not self._last_dtype \
                    or op is not self._last_op or nbytes != self._last_nbytes:
                if (kind, nbytes, dtype.num, 0 if op is None else op.handle) not in self._fast:
                    return None
                # (the dtype and op objects are held: their ids cannot be reused meanwhile)
                self._last_kind, self._last_dtype, self._last_op = kind, dtype, op
                self._last_nbytes = nbytes
        except AttributeError:  # not an array, or not an op
            return None
        env = _ENV  # env_quiet(), inlined: when no MTCOLL_ variable is set, three lookups
        if env is None or b"MTCOLL_CHECK" in env or b"MTCOLL_DEBUG" in env \
                or b"MTCOLL_TIMEOUT" in env:
            if not env_quiet():
                return None
        if sendbuf is _IN_PLACE:
            return sendbuf
        if sendbuf is None:
            return _IN_PLACE
        if sendbuf is recvbuf:  # in place for the reductions (mpi4py >= 4.2), an error else
            return _IN_PLACE if kind is not _ALLGATHER else None
        if type(sendbuf) is not _ndarray or sendbuf.dtype is not dtype:
            return None  # another dtype, or not a plain array
        if kind is not _ALLREDUCE:  # the block calls: size * k elements on one side
            size = self._size
            if (sendbuf.nbytes * size if kind is _ALLGATHER else nbytes * size) \
                    != (nbytes if kind is _ALLGATHER else sendbuf.nbytes):
                return None
        sbase, rbase = sendbuf.base, recvbuf.base
        if sbase is recvbuf or rbase is sendbuf or (sbase is not None and sbase is rbase):
            return None  # maybe overlapping
        return sendbuf

    def _forget_fast(self):
        # no call goes straight to the library any more (a freed or broken Comm)
        for memo in self._fast_by_algorithm.values():
            memo.clear()
        self._last_kind = self._last_dtype = self._last_op = self._last_nbytes = None

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
        send = self._fast_path(_ALLREDUCE, sendbuf, recvbuf, op)
        if send is not None:
            try:
                self._lib_allreduce(send, recvbuf, op)
                self._ncalls += 1
                return
            except (BufferError, ValueError, TypeError):
                pass  # not as mpi4py takes it (non-contiguous...): the slow path says why
        if self._learner is not None:  # auto learning: the call may be timed
            _learn.call(self, "Allreduce", sendbuf, recvbuf, op, True)
            return
        _dispatch.start(self, "Allreduce", sendbuf, recvbuf, op, blocking=True).Wait()

    def Iallreduce(self, sendbuf, recvbuf, op=MPI.SUM):
        """Start an :meth:`Allreduce`; returns a :class:`Request` (an ``MPI.Request``).

        The buffers must stay untouched (``sendbuf`` unmodified, ``recvbuf`` neither read nor
        written) until the request completes. The request keeps them alive. Several
        Iallreduce calls may be in flight at once; completing them in any order is fine, with
        the request's ``Wait``/``Test``, :func:`mtcoll.waitall` or ``MPI.Request.Waitall`` &
        co. (see :mod:`mtcoll.comm._progress` for how progress happens). With ``MTCOLL_CHECK=1``
        the start synchronises the ranks (the agreement check exchanges a small descriptor
        between every pair of ranks).
        """
        # the fast path, as for Allreduce: the library's own request, returned as is
        send = self._fast_path(_ALLREDUCE, sendbuf, recvbuf, op)
        if send is not None:
            try:
                native = self._lib_iallreduce(send, recvbuf, op)
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
        if self._learner is not None:  # auto learning: the call may be timed
            return _learn.call(self, "Iallreduce", sendbuf, recvbuf, op, False)
        return _dispatch.start(self, "Iallreduce", sendbuf, recvbuf, op, blocking=False)

    def Reduce_scatter_block(self, sendbuf, recvbuf, op=MPI.SUM):
        """Reduce ``sendbuf`` (``size * k`` elements) over all ranks; rank ``r`` gets block ``r``
        (elements ``r*k .. r*k+k-1`` of the result) in ``recvbuf`` (``k`` elements).

        With ``sendbuf=MPI.IN_PLACE`` (or None), ``recvbuf`` holds the ``size * k`` input
        elements and gets the block in its first ``k``. Runs the reduce phase of a schedule
        with one chunk per rank (see the class notes). Collective; errors as for
        :meth:`Allreduce`.
        """
        send = self._fast_path(_RSB, sendbuf, recvbuf, op)  # the fast path, as for Allreduce
        if send is not None:
            try:
                self._lib_rsb(send, recvbuf, op)
                self._ncalls += 1
                return
            except (BufferError, ValueError, TypeError):
                pass
        _dispatch.start(self, "Reduce_scatter_block", sendbuf, recvbuf, op, blocking=True).Wait()

    def Allgather(self, sendbuf, recvbuf):
        """Gather ``sendbuf`` (``k`` elements) of every rank into ``recvbuf`` (``size * k``),
        rank ``r``'s data in block ``r``, on every rank.

        With ``sendbuf=MPI.IN_PLACE`` (or None) each rank's contribution is already in its
        block of ``recvbuf``. Runs the gather phase of a schedule with one chunk per rank (see
        the class notes). Collective; errors as for :meth:`Allreduce`.
        """
        send = self._fast_path(_ALLGATHER, sendbuf, recvbuf, None)  # as for Allreduce
        if send is not None:
            try:
                self._lib_allgather(send, recvbuf)
                self._ncalls += 1
                return
            except (BufferError, ValueError, TypeError):
                pass
        _dispatch.start(self, "Allgather", sendbuf, recvbuf, None, blocking=True).Wait()

    def schedule(self, algorithm=None):
        """The whole :class:`~mtcoll.schedule.Schedule` of ``algorithm`` (default: this Comm's).

        Collective on first use of an algorithm: rank 0 plans, the others receive the result.
        Raises ValueError (on every rank) when the algorithm does not fit the topology.
        """
        return _planning.schedule(self, algorithm)

    # -- machinery -------------------------------------------------------------------------------

    def _prepare(self, kind, sendbuf, recvbuf, op):
        c = prepare(kind, sendbuf, recvbuf, op, self._rank, self._size)
        if c.why:
            return c  # only the MPI library can run it
        if self.algorithm == "native":
            c.why = "algorithm 'native'"
        elif self.algorithm == "auto":
            self._auto(c)
        else:
            c.algorithm = self.algorithm
        return c

    def _auto(self, c, note=""):
        # auto's choice for a prepared call (the hook takes the table only when there is one,
        # so that a three-argument replacement of choose() keeps working)
        size = self._size
        if self.tuning:
            c.algorithm = choose(c.nbytes, size, self.network, tuning=self.tuning)
            how = "tuning table"
        elif self._learner is not None and c.kind in ("Allreduce", "Iallreduce"):
            c.algorithm, how = self._learner.choose(c)  # mtcoll.comm._learn
        elif self.calibration is not None:
            c.algorithm = choose(c.nbytes, size, self.network, calibration=self.calibration)
            how = self.calibration.choose(c.nbytes)[1]
        elif self._learner is not None:
            # Reduce_scatter_block and Allgather are not learned yet, and with no prior the
            # built-in rule's MultiTree from 64 KiB can be many times the library's call
            c.algorithm, how = "native", "the MPI library (no prior; auto learns Allreduce)"
        else:
            c.algorithm = choose(c.nbytes, size, self.network)
            how = "built-in rule"
        c.why = f"{note}chosen by auto, {how}"


class Cartcomm(Comm, MPI.Cartcomm):
    """An mtcoll :class:`Comm` that is an ``MPI.Cartcomm`` (what :meth:`Comm.Create_cart`
    and :meth:`Sub` return, and ``mtcoll.Comm`` of a Cartesian communicator): mpi4py's
    coordinates and shifts, mtcoll's collectives on the grid's network."""

    def Sub(self, remain_dims):
        """mpi4py's ``Sub``; the new communicator is an mtcoll :class:`Cartcomm` whose network
        is its own grid (the dimensions kept, with their periods)."""
        return self._sub(remain_dims)


class Graphcomm(Comm, MPI.Graphcomm):
    """An mtcoll :class:`Comm` that is an ``MPI.Graphcomm`` (:meth:`Comm.Create_graph`)."""


class Distgraphcomm(Comm, MPI.Distgraphcomm):
    """An mtcoll :class:`Comm` that is an ``MPI.Distgraphcomm``
    (:meth:`Comm.Create_dist_graph`, :meth:`Comm.Create_dist_graph_adjacent`)."""


class Intercomm(MPI.Intercomm):
    """An ``MPI.Intercomm`` (what :meth:`Comm.Create_intercomm` returns) whose :meth:`Merge`
    is an mtcoll :class:`Comm` with the options of the local side. Its own collectives are
    mpi4py's: mtcoll's schedules reduce within one group."""

    def Merge(self, high=False):
        """mpi4py's ``Merge``; the new intracommunicator is an mtcoll :class:`Comm` with the
        local side's options and its own detected network (collective over both groups)."""
        return self._local._derive(MPI.Intercomm(self).Merge(high))


# what Derived builds
Comm._COMM_CLASS, Comm._CART_CLASS, Comm._INTER_CLASS = Comm, Cartcomm, Intercomm
Comm._GRAPH_CLASS, Comm._DISTGRAPH_CLASS = Graphcomm, Distgraphcomm
