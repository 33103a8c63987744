"""How the progress of mtcoll's calls happens: the lock, the progress rounds, the thread.

How progress happens
--------------------
mtcoll's schedules move only when Python code tests their messages. That happens

1. inside mtcoll calls: ``Wait``/``Test`` of any mtcoll request, :func:`waitall`, the start of
   any other mtcoll call, the agreement check;
2. in a **progress thread** (one per process, started with the first mtcoll call, when MPI
   runs with ``MPI.THREAD_MULTIPLE``, mpi4py's default): while a schedule or a watched request
   is in flight and no mtcoll call is advancing it, it tests their messages (``Testsome``,
   never blocking inside MPI while holding mtcoll's lock) and sleeps between tests that found
   nothing, from :data:`THREAD_SLEEP_MIN` doubling to :data:`THREAD_SLEEP_MAX` seconds, so a
   waiting rank costs a few wake-ups, not a core. With nothing in flight it sleeps on an event.

The thread is what lets a rank sit in a plain MPI call (``MPI.Request.Waitall`` on mtcoll
requests, a blocking collective, ``Barrier``) while another rank still needs this rank's part of
an mtcoll schedule: ranks may complete their calls in different orders. Without
``THREAD_MULTIPLE`` (or with ``MTCOLL_PROGRESS=off``) there is no thread: mtcoll then runs the
calls it hands to the library as their nonblocking twins, waited for while advancing its own
(as before), and ``MPI.Request.Waitall`` on a request of a schedule would wait for ever --
use :func:`waitall` or the request's ``Wait`` there.

All progress on mtcoll's state happens under one lock (:data:`LOCK`): the thread takes it only
when it is free, so an mtcoll wait never waits for the thread.
"""

from __future__ import annotations

import atexit
import math
import os
import threading
import time

from mpi4py import MPI

from .. import execute

__all__ = ["LOCK", "THREAD_SLEEP_MIN", "THREAD_SLEEP_MAX", "WATCHED", "watch", "unwatch",
           "thread_enabled", "thread_running", "advance", "reraise", "wake", "poll"]

#: Guards the executor's running calls and the completion of mtcoll requests.
LOCK = threading.RLock()
#: The progress thread's sleeps between tests that completed nothing (seconds).
THREAD_SLEEP_MIN = 20e-6
THREAD_SLEEP_MAX = 500e-6

WATCHED = []  # library requests whose mtcoll Request must finish them (copy back)


def watch(req):
    """Have the progress rounds finish ``req`` (an mtcoll Request over a library request)."""
    WATCHED.append(req)


def unwatch(req):
    # by identity: MPI requests compare equal by handle, and every completed one is NULL
    for i, r in enumerate(WATCHED):
        if r is req:
            del WATCHED[i]
            return
_WAKE = threading.Event()
_STOP = False
_THREAD = None
_FAILED = []  # an exception the progress thread hit (not an MPI error charged to a call)


def thread_enabled():
    """Whether this process may run the progress thread: MPI at ``THREAD_MULTIPLE`` and
    ``MTCOLL_PROGRESS`` not ``off``/``0``."""
    raw = os.environ.get("MTCOLL_PROGRESS", "").strip().lower()
    if raw in ("off", "0", "no", "false"):
        return False
    if raw not in ("", "thread", "on", "1", "yes", "true"):
        raise ValueError(f"environment variable MTCOLL_PROGRESS={os.environ['MTCOLL_PROGRESS']!r}"
                         f" (rank {MPI.COMM_WORLD.Get_rank()} of MPI.COMM_WORLD): expected "
                         f"thread or off")
    return MPI.Query_thread() == MPI.THREAD_MULTIPLE


def _advance_all():
    # One round of progress on everything in flight; True if anything moved.
    moved = False
    if execute.running():
        moved = execute.progress(block=False)
    for r in list(WATCHED):
        if r._native.Test():
            unwatch(r)
            if not r._complete:
                r._finish()
            moved = True
    return moved


def reraise():
    """Raise, in the calling thread, what the progress thread hit (once)."""
    if _FAILED:
        raise _FAILED.pop()


def advance():
    """Advance everything mtcoll has in flight once (under :data:`LOCK`)."""
    reraise()
    if execute.running() or WATCHED:
        with LOCK:
            _advance_all()


def _loop():
    delay = THREAD_SLEEP_MIN
    while not _STOP:
        if not (execute.running() or WATCHED):
            _WAKE.wait()
            _WAKE.clear()
            delay = THREAD_SLEEP_MIN
            continue
        moved = False
        if not _FAILED and LOCK.acquire(blocking=False):
            try:
                moved = _advance_all()
            except BaseException as e:  # raised in the main thread by its next mtcoll call
                _FAILED.append(e)
            finally:
                LOCK.release()
        if moved:
            delay = THREAD_SLEEP_MIN
        else:
            time.sleep(delay)
            delay = min(2 * delay, THREAD_SLEEP_MAX)


def _stop():
    # Before MPI_Finalize (atexit runs this before mpi4py's own handler, registered earlier).
    global _STOP, _THREAD
    _STOP = True
    _WAKE.set()
    if _THREAD is not None:
        _THREAD.join(timeout=5)
        _THREAD = None


def thread_running():
    """Whether the progress thread has been started (and not stopped)."""
    return _THREAD is not None


def wake():
    """Tell the progress thread (starting it on first use) that something is in flight."""
    global _THREAD
    if _THREAD is None and not _STOP:
        _THREAD = threading.Thread(target=_loop, name="mtcoll-progress", daemon=True)
        _THREAD.start()
        atexit.register(_stop)
    _WAKE.set()


def poll(test, deadline=math.inf, sleep=False):
    """Call ``test()`` until it returns True (then True) or ``deadline`` passes (then False).

    In between, advance mtcoll's running calls: another rank may be unable to join what we wait
    for until one of those finishes, since the ranks may complete their calls in different
    orders. And sleep as the executor does in sleep mode, or not at all.
    """
    delay = execute.SLEEP_MIN
    while not test():
        advance()
        if time.monotonic() >= deadline:
            return False
        if sleep:
            time.sleep(delay)
            delay = min(2 * delay, execute.SLEEP_MAX)
    return True
