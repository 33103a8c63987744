"""What every part of :class:`mtcoll.Comm` shares about failing: :class:`StallError`, the
environment variables that are numbers or flags, MPI error texts, and the objects a broken
call leaves behind."""

from __future__ import annotations

import math
import os

import numpy as np
from mpi4py import MPI

__all__ = ["StallError", "ABANDONED", "getenv", "env_flag", "env_quiet", "env_timeout", "positive_int",
           "mpi_error_text"]


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


# os.environ's own store (bytes keys on POSIX): what os.environ.get reads, without the key
# encoding that makes os.environ.get cost as much as a small MPI call (measured: 12 us vs 33 ns
# on the loaded project machine). Elsewhere, os.environ itself.
_ENV_STORE = getattr(os.environ, "_data", None)
if not (isinstance(_ENV_STORE, dict) and os.name == "posix"):
    _ENV_STORE = None


def getenv(name):
    """``os.environ.get(name, "")``, read from os.environ's own store when there is one."""
    d = _ENV_STORE
    if d is None:
        return os.environ.get(name, "")
    raw = d.get(name.encode())
    return "" if raw is None else os.fsdecode(raw)


_OFF = frozenset((None, b"", b"0", b"false", b"no", b"off", b"False", b"FALSE", b"No", b"NO",
                  b"Off", b"OFF"))


def env_flag(name):
    raw = getenv(name).strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"environment variable {name}={os.environ[name]!r} (rank "
                     f"{MPI.COMM_WORLD.Get_rank()} of MPI.COMM_WORLD): expected 0 or 1")


def env_quiet():
    """True when MTCOLL_CHECK and MTCOLL_DEBUG are off and MTCOLL_TIMEOUT unset: a call then
    needs nothing but itself (the fast path of :meth:`mtcoll.Comm.Allreduce`)."""
    d = _ENV_STORE
    if d is None:
        return not (env_flag("MTCOLL_CHECK") or env_flag("MTCOLL_DEBUG")
                    or os.environ.get("MTCOLL_TIMEOUT", "").strip())
    if b"MTCOLL_CHECK" not in d and b"MTCOLL_DEBUG" not in d and b"MTCOLL_TIMEOUT" not in d:
        return True
    return (d.get(b"MTCOLL_CHECK") in _OFF and d.get(b"MTCOLL_DEBUG") in _OFF
            and not d.get(b"MTCOLL_TIMEOUT", b"").strip())


def env_timeout():
    """MTCOLL_TIMEOUT: seconds (float > 0) for the stall watchdog; unset or empty: None."""
    raw = getenv("MTCOLL_TIMEOUT").strip()
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
