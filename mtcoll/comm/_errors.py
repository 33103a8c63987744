"""What every part of :class:`mtcoll.Comm` shares about failing: :class:`StallError`, argument
checks, MPI error texts, and the objects a broken call leaves behind."""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

__all__ = ["StallError", "ABANDONED", "positive_int", "mpi_error_text"]


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
        The ranks (of the communicator) that did not join: those that did not make the call
        (agreement check), or those whose messages had not arrived (data path; empty when the
        MPI library ran the call, which does not say).
    """

    def __init__(self, message, call=None, timeout=None, ranks=()):
        super().__init__(message)
        self.call, self.timeout, self.ranks = call, timeout, list(ranks)

    def __str__(self):
        return self.args[0]


#: Whatever a broken Comm leaves behind (requests with their buffers, its communicators): kept
#: alive for good, since MPI may still read or write those buffers, and a freed communicator's
#: context could be reused by a new one while stale messages for it are in flight.
ABANDONED = []


def positive_int(name, value, rank, per_rank=False):
    """None (the default) or a positive int; ``ports`` may also be one int per rank."""
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


def mpi_error_text(e):
    # MPI_ERR_IN_STATUS (from Waitsome/Testsome) says only "see the status": name the class.
    try:
        cls = e.Get_error_class()
        names = {getattr(MPI, n): n for n in ("ERR_TRUNCATE", "ERR_IN_STATUS", "ERR_OTHER",
                                              "ERR_COUNT", "ERR_TYPE", "ERR_INTERN")}
        return f"{names.get(cls, f'error class {cls}')}: {e.Get_error_string()}"
    except Exception:
        return str(e)
