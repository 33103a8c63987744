"""mtcoll's environment variables read cheaply: flags, the timeout, any ``MTCOLL_*`` string.

A leaf: the communicator, the executor's tools and the command-line tools read the
environment through it, and it imports nothing of mtcoll. A bad value raises ValueError naming
the variable and the rank.
"""

from __future__ import annotations

import math
import os

from mpi4py import MPI

__all__ = ["STORE", "getenv", "env_flag", "env_quiet", "env_timeout"]


# os.environ's own store (bytes keys on POSIX): what os.environ.get reads, without the key
# encoding that makes os.environ.get cost as much as a small MPI call (measured: 12 us vs 33 ns
# on the loaded project machine). Elsewhere, os.environ itself.
STORE = getattr(os.environ, "_data", None)
if not (isinstance(STORE, dict) and os.name == "posix"):
    STORE = None


def getenv(name):
    """``os.environ.get(name, "")``, read from os.environ's own store when there is one."""
    d = STORE
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
    d = STORE
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
