"""The module-level calls, ``mtcoll.Allreduce`` and ``mtcoll.Iallreduce``: the
:class:`~mtcoll.comm.Comm` of (communicator, options), which ``mtcoll.Comm`` keeps as an MPI
attribute of the communicator (:mod:`mtcoll.comm._registry`) and releases when it is freed.
"""

from __future__ import annotations

from mpi4py import MPI

from ._comm import Comm

__all__ = ["Allreduce", "Iallreduce"]

# -- module level --------------------------------------------------------------------------------


def _comm_for(comm, options):
    # mtcoll.Comm(comm, **options) is itself the cache: the Comm the communicator already has
    # with these options (an MPI attribute of it, mtcoll.comm._registry), made on first use
    if isinstance(comm, Comm):
        if options:
            raise TypeError("options are set when constructing an mtcoll.Comm; got both a Comm "
                            f"and {sorted(options)}")
        return comm
    return Comm(comm, **options)


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
