"""The drop-in communicator: :class:`Comm`, an ``mpi4py.MPI.Intracomm`` whose collectives run
mtcoll's schedules (or the MPI library's own calls, where those are faster).

What it hands on, to :mod:`mtcoll` (the public API): :class:`Comm` and its topology classes
(:class:`Cartcomm`, ...), :class:`Request`, :func:`waitall`, :class:`StallError`, the module-level
:func:`Allreduce`/:func:`Iallreduce`; :func:`choose` (the ``auto`` rule), ``ENV_VARS``.

The rooms, along a call's path: ``_comm.py`` the class (construction, lifetime, the public
calls and their fast path to the MPI library, the ``auto`` rule), ``_buffers.py`` arguments to
flat arrays, ``_dispatch.py`` a call's path, ``_planning.py`` what the ranks settle together
(schedules, executors), ``_derived.py`` the derived communicators, ``_registry.py`` the Comms of
an MPI communicator, ``_requests.py`` the requests, ``_progress.py`` the lock, progress rounds and
thread, ``_agreement.py`` the cross-rank check, ``_learn.py`` ``auto`` learning on the calls,
``_errors.py`` what failing leaves behind, ``_calls.py`` the module-level calls.
"""

from ._calls import Allreduce, Iallreduce
from ._comm import (ENV_VARS, SMALL_MESSAGE_BYTES, Cartcomm, Comm, Distgraphcomm, Graphcomm,
                    Intercomm, choose)
from ._errors import StallError
from ._requests import Request, waitall

__all__ = ["Comm", "Cartcomm", "Graphcomm", "Distgraphcomm", "Intercomm", "Request", "waitall",
           "StallError", "Allreduce", "Iallreduce", "choose", "SMALL_MESSAGE_BYTES", "ENV_VARS"]
