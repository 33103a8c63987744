"""The module-level calls, ``mtcoll.Allreduce`` and ``mtcoll.Iallreduce``: a
:class:`~mtcoll.comm.Comm` cached per (communicator, options) as an attribute of the
communicator, dropped when it is freed.
"""

from __future__ import annotations

import os

from mpi4py import MPI

from .comm import Comm

__all__ = ["Allreduce", "Iallreduce"]

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
