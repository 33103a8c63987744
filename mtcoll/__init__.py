"""mtcoll: topology-aware collectives for MPI, after MultiTree (Huang et al., ISCA 2021).

A drop-in :class:`Comm` runs ``Allreduce`` and friends on schedules planned for the network
(MultiTree, ring, 2-D ring, double binary tree, halving-doubling) and falls back to the MPI
library where that is the better or the only choice::

    from mpi4py import MPI
    import mtcoll

    comm = mtcoll.Comm(MPI.COMM_WORLD)
    comm.Allreduce(sendbuf, recvbuf, op=MPI.SUM)

Importing mtcoll imports mpi4py (and so initialises MPI) but not the planner or numba.
"""

from .comm import Allreduce, Comm, Iallreduce, Request, StallError, waitall
from .schedule import Schedule

__all__ = ["Comm", "Allreduce", "Iallreduce", "waitall", "Request", "StallError", "Schedule"]
