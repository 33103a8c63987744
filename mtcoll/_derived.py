"""Derived communicators: what :class:`mtcoll.Comm`'s ``Dup``, ``Split``, ``Split_type``,
``Create``, ``Create_group`` and ``Create_cart`` return -- mtcoll communicators too, with the
parent's options and the network the new ranks sit on (``Create_cart``: the grid's).

:class:`Derived` is a mixin of :class:`mtcoll.Comm`; it needs the Comm's ``_setup``,
``schedule`` and options, and the two classes to build (``_COMM_CLASS``, ``_CART_CLASS``,
set by :mod:`mtcoll.comm`).
"""

from __future__ import annotations

from mpi4py import MPI

from ._planning import _SPECIAL_ALGORITHMS


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


class Derived:
    """The derived-communicator methods of :class:`mtcoll.Comm`."""

    # -- derived communicators: mtcoll communicators too -------------------------------------

    def _derive(self, new, cls=None, topology="auto", ports=None, env_topology=False):
        # ``new``: what mpi4py's method returned (MPI.COMM_NULL on ranks left out). A
        # subcommunicator has its own network: MTCOLL_TOPOLOGY (for the whole job) applies
        # only to a duplicate.
        if new == MPI.COMM_NULL:
            return new
        cls = cls or self._COMM_CLASS
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
        return self._derive(new, self._CART_CLASS, _cart_spec(dims, periods))

    def _topology_arg(self):
        # a duplicate keeps the network (same ranks); a given Topology object is reused
        return self.network.spec
