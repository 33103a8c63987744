"""Derived communicators: what :class:`mtcoll.Comm`'s ``Dup``, ``Clone``, ``Idup``, ``Split``,
``Split_type``, ``Create``, ``Create_group``, ``Create_from_group``, ``Create_cart``,
``Create_graph``, ``Create_dist_graph(_adjacent)``, ``Create_intercomm`` (and, on the results,
``Cartcomm.Sub`` and ``Intercomm.Merge``) return -- mtcoll communicators too, with the
parent's options and the network the new ranks sit on (a Cartesian grid: the grid's).

Every derived Comm is registered as its new communicator's own (:mod:`mtcoll.comm._registry`):
``mtcoll.Comm(c)`` of its handle gives it back, and it is released when that communicator is
freed. :class:`Derived` is a base class of :class:`mtcoll.Comm`: its methods are mpi4py's own
(a Comm must answer them as methods), each a few lines over :func:`derive`. They need of the
Comm its ``_adopt``, ``_ensure``, ``_plain``, ``_options``, ``network`` and ``ports``, and the
classes to build (``_COMM_CLASS``, ``_CART_CLASS``, ``_GRAPH_CLASS``, ``_DISTGRAPH_CLASS``,
``_INTER_CLASS``, set in :mod:`mtcoll.comm._comm`).
"""

from __future__ import annotations

from mpi4py import MPI

#: The options of a Comm made by ``mtcoll.Comm.Create_from_group`` called on the class.
_DEFAULT_OPTIONS = dict(algorithm="auto", segment_bytes=None, max_segments=None, wait=None,
                        measure_links=False)


def cart_spec(dims, periods):
    """The network model of a Cartesian grid: a torus when every dimension wraps, else a mesh
    (a dimension that wraps loses its wrap-around link: the model never invents links);
    ``ring:N``/``mesh:1xN`` in one dimension, ``full:1`` for zero dimensions (one rank)."""
    dims = [int(d) for d in dims]
    if not dims:
        return "full:1"
    if periods is None or isinstance(periods, bool):
        periods = [bool(periods)] * len(dims)
    periodic = len(periods) == len(dims) and all(periods)
    if len(dims) == 1:
        return f"ring:{dims[0]}" if periodic else f"mesh:1x{dims[0]}"
    return ("torus:" if periodic else "mesh:") + "x".join(map(str, dims))


def derive(new, cls, options, topology="auto", ports=None, env_topology=False, measured=None):
    """``new`` (what mpi4py's method returned; ``MPI.COMM_NULL`` on ranks left out) as an
    mtcoll ``cls`` with ``options``, set up now (collective over ``new``), owned: its
    ``Free()`` frees ``new``. A subcommunicator has its own network: ``MTCOLL_TOPOLOGY`` (for
    the whole job) applies only to a duplicate (``env_topology``), and so does the parent's
    link measurement (``measured``: same ranks, same links)."""
    if new == MPI.COMM_NULL:
        return new
    out = MPI.Intracomm.__new__(cls, new)
    try:
        out._adopt(topology, ports, env_topology, options, measured=measured)
    except BaseException:
        MPI.Comm.Free(new)
        raise
    return out


class _either:
    # a method that is a classmethod too: called on an instance it gets the instance (its
    # options), on the class the class (mpi4py's Create_from_group is a classmethod)
    def __init__(self, func):
        self.func = func
        self.__doc__ = func.__doc__

    def __get__(self, obj, cls):
        return self.func.__get__(cls if obj is None else obj)


class Derived:
    """The derived-communicator methods of :class:`mtcoll.Comm`."""

    def _derive(self, new, cls=None, topology="auto", ports=None, env_topology=False):
        return derive(new, cls or self._COMM_CLASS, self._options, topology, ports,
                      env_topology)

    def _dup_args(self):
        # a duplicate keeps the network (same ranks; a given Topology object is reused), the
        # port budget, MTCOLL_TOPOLOGY, and what measure_links found (the same links)
        return dict(topology=self.network.spec, ports=self.ports, env_topology=True,
                    measured=self.measured_links)

    def Dup(self, info=None):
        """Duplicate: an mtcoll communicator of this one's class, with the same options and
        network (collective)."""
        self._ensure()
        return derive(self._plain().Dup(info), type(self), self._options, **self._dup_args())

    def Clone(self):
        """mpi4py's ``Clone`` (a duplicate): as :meth:`Dup`."""
        return self.Dup()

    def Dup_with_info(self, info):
        """Duplicate with ``info``: as :meth:`Dup` (collective)."""
        self._ensure()
        return derive(self._plain().Dup_with_info(info), type(self), self._options,
                      **self._dup_args())

    def Idup(self, info=None):
        """mpi4py's ``Idup``: ``(communicator, MPI.Request)``. The communicator is an mtcoll
        communicator of this one's class and options; like any ``Idup``'s it is usable once
        the request completes, and its mtcoll part (duplicates, network, tuning) is set up at
        its first mtcoll call (collective: every rank makes that call at the same point), which
        waits for the request if the program has not. ``Free()`` before then frees the
        communicator alone."""
        self._ensure()
        new, req = MPI.Intracomm.Idup(self, info)  # mpi4py allocates type(self): not set up
        new._pending = (req, dict(options=dict(self._options), owned=True,
                                  **self._dup_args()))
        return new, req

    def Idup_with_info(self, info):
        """mpi4py's ``Idup_with_info``: as :meth:`Idup`."""
        return self.Idup(info)

    def Split(self, color=0, key=0):
        """mpi4py's ``Split``; the new communicator is an mtcoll :class:`Comm` (collective;
        ``MPI.COMM_NULL`` for ``color=MPI.UNDEFINED``)."""
        self._ensure()
        return self._derive(MPI.Intracomm(self).Split(color, key))

    def Split_type(self, split_type, key=0, info=MPI.INFO_NULL):
        """mpi4py's ``Split_type`` (any split type: shared memory, hardware-guided...); the new
        communicator is an mtcoll :class:`Comm` (``MPI.COMM_NULL`` where MPI gives none)."""
        self._ensure()
        return self._derive(MPI.Intracomm(self).Split_type(split_type, key, info))

    def Create(self, group):
        """mpi4py's ``Create``; the new communicator is an mtcoll :class:`Comm`."""
        self._ensure()
        return self._derive(MPI.Intracomm(self).Create(group))

    def Create_group(self, group, tag=0):
        """mpi4py's ``Create_group``; the new communicator is an mtcoll :class:`Comm`."""
        self._ensure()
        return self._derive(MPI.Intracomm(self).Create_group(group, tag))

    @_either
    def Create_from_group(self_or_cls, group, stringtag="org.mpi4py", info=MPI.INFO_NULL,
                          errhandler=None):
        """mpi4py's ``Create_from_group`` (MPI 4: a communicator from a group alone); the new
        communicator is an mtcoll :class:`Comm`. On an mtcoll communicator it takes that one's
        options; on the class (``mtcoll.Comm.Create_from_group``) the defaults."""
        new = MPI.Intracomm.Create_from_group(group, stringtag, info, errhandler)
        if isinstance(self_or_cls, type):
            return derive(new, self_or_cls._COMM_CLASS, _DEFAULT_OPTIONS, env_topology=True)
        self_or_cls._ensure()
        return self_or_cls._derive(new)

    def Create_cart(self, dims, periods=None, reorder=False):
        """mpi4py's ``Create_cart``; the new communicator is an mtcoll :class:`Cartcomm` whose
        :attr:`network` is the grid: ``torus:AxB...`` when every dimension is periodic,
        ``mesh:AxB...`` otherwise (``ring:N``/``mesh:1xN`` in one dimension, ``full:1`` in
        none). Ranks outside the grid get ``MPI.COMM_NULL``."""
        self._ensure()
        new = MPI.Intracomm(self).Create_cart(dims, periods, reorder)
        if new == MPI.COMM_NULL:
            return new
        grid, wraps, _ = new.Get_topo()
        return self._derive(new, self._CART_CLASS, cart_spec(grid, wraps))

    def Create_graph(self, index, edges, reorder=False):
        """mpi4py's ``Create_graph``; the new communicator is an mtcoll ``Graphcomm``. Its
        network is detected (``auto``): an MPI graph names the program's neighbours, not the
        links between the ranks."""
        self._ensure()
        return self._derive(MPI.Intracomm(self).Create_graph(index, edges, reorder),
                            self._GRAPH_CLASS)

    def Create_dist_graph_adjacent(self, sources, destinations, sourceweights=None,
                                   destweights=None, info=MPI.INFO_NULL, reorder=False):
        """mpi4py's ``Create_dist_graph_adjacent``; an mtcoll ``Distgraphcomm`` with the
        detected network (as :meth:`Create_graph`)."""
        self._ensure()
        new = MPI.Intracomm(self).Create_dist_graph_adjacent(
            sources, destinations, sourceweights, destweights, info, reorder)
        return self._derive(new, self._DISTGRAPH_CLASS)

    def Create_dist_graph(self, sources, degrees, destinations, weights=None,
                          info=MPI.INFO_NULL, reorder=False):
        """mpi4py's ``Create_dist_graph``; an mtcoll ``Distgraphcomm`` with the detected
        network (as :meth:`Create_graph`)."""
        self._ensure()
        new = MPI.Intracomm(self).Create_dist_graph(sources, degrees, destinations, weights,
                                                    info, reorder)
        return self._derive(new, self._DISTGRAPH_CLASS)

    def Create_intercomm(self, local_leader, peer_comm, remote_leader, tag=0):
        """mpi4py's ``Create_intercomm``: an ``mtcoll.comm.Intercomm``, an ``MPI.Intercomm``
        whose collectives are mpi4py's (mtcoll's schedules run within one group: this
        communicator is the local side) and whose ``Merge()`` is an mtcoll :class:`Comm` with
        this one's options."""
        self._ensure()
        new = MPI.Intracomm(self).Create_intercomm(local_leader, peer_comm, remote_leader, tag)
        out = self._INTER_CLASS(new)
        out._local = self
        return out

    def _sub(self, remain_dims):
        # Cartcomm.Sub: the kept dimensions' grid
        self._ensure()
        new = MPI.Cartcomm(self).Sub(remain_dims)
        if new == MPI.COMM_NULL:
            return new
        grid, wraps, _ = new.Get_topo()
        return self._derive(new, self._CART_CLASS, cart_spec(grid, wraps))
