"""Requests of :class:`mtcoll.Comm`'s nonblocking calls, and how their progress happens.

A :class:`Request` is an ``MPI.Request`` (a subclass), so ``MPI.Request.Waitall``, ``Testall``,
``Waitany``, ``Testany`` and ``Waitsome`` take it, mixed with plain mpi4py requests. Its handle
is one of:

* the MPI library's own request, for a call mtcoll hands to the library with nothing left to do
  afterwards: MPI completes it, at MPI's cost;
* an MPI *generalized request* (``MPI.Grequest``) for a call mtcoll runs itself (a schedule) or
  must finish itself (a copy back into a non-contiguous receive buffer). mtcoll completes it
  (``MPI_Grequest_complete``) once the call is done, whoever advanced it.

How their progress happens (the progress thread, the lock): :mod:`mtcoll.comm._progress`.
"""

from __future__ import annotations

import math
import time

from mpi4py import MPI

from .. import execute
from ._errors import ABANDONED, StallError, mpi_error_text
from ._progress import LOCK, advance, poll, reraise, thread_running, unwatch, watch

__all__ = ["Request", "waitall", "collective_query", "collective_free", "collective_cancel"]

def collective_query(status):
    # A collective's status says nothing: no source, no tag, no elements, not cancelled.
    status.Set_source(MPI.ANY_SOURCE)
    status.Set_tag(MPI.ANY_TAG)
    status.Set_elements(MPI.BYTE, 0)
    status.Set_cancelled(False)


def collective_free():
    pass


def collective_cancel(completed):
    pass  # a collective cannot be cancelled (MPI: erroneous); the call runs to completion


class Request(MPI.Request):
    """The handle of a nonblocking mtcoll call: an ``MPI.Request``.

    It keeps the call's buffers alive until the call completes. Until it completes (``Test``
    returns True, ``Wait`` returns, or ``MPI.Request.Waitall`` & co. complete it) the send
    buffer must not be modified and the receive buffer must not be read or written.
    ``Wait(status)``, ``Test(status)`` and the lowercase ``wait()``/``test()`` (which return
    None and ``(flag, None)``, as for mpi4py's buffer calls) work as for any MPI request, and so
    do MPI's ``Waitall``, ``Testall``, ``Waitany``, ``Testany``, ``Waitsome``, ``Testsome`` on a
    mix of mtcoll and mpi4py requests. See :mod:`mtcoll.comm._progress` for how progress happens.
    ``Cancel()`` does nothing (a collective cannot be cancelled); ``Free()`` drops the handle,
    the call still runs to completion (its Comm's ``Free`` waits for it).

    With ``MTCOLL_TIMEOUT`` set when the call started, :meth:`Wait` raises :class:`StallError`
    once no message of the running calls has completed for that many seconds, naming the
    ranks whose messages are outstanding. That, or any other error inside ``Wait`` (an MPI
    error such as a truncated message), breaks the :class:`Comm`: its receives are cancelled,
    and this request and every later call on that Comm raise RuntimeError.
    """

    def __new__(cls, execution=None, native=None, on_done=(), keep=(), seq=None):
        if execution is None and native is not None and not on_done:
            handle = native  # the library's request: MPI completes it
        elif execution is None and native is None:
            handle = MPI.REQUEST_NULL  # complete already: nothing was exchanged
        else:
            handle = MPI.Grequest.Start(collective_query, collective_free, collective_cancel)
        self = super().__new__(cls, handle)
        self._greq = handle if execution is not None or native is not None and on_done \
            else None
        return self

    def __init__(self, execution=None, native=None, on_done=(), keep=(), seq=None):
        self._exec = execution
        self._native = native
        self._on_done = list(on_done)
        self._keep = keep
        self.seq = seq
        self._comm = None  # set by Comm._start: the Comm to break on a stall
        self._timeout = None
        self._kind = None
        self._threaded = False  # set by Comm._start: the progress thread runs
        self._number = None  # set by Comm._start: the call's number on its Comm
        self._complete = execution is None and native is None
        if execution is not None:
            execution.on_done.append(self._finish)
            execution.on_error.append(self._exec_failed)
            if execution.done:
                self._finish()
        elif native is not None and on_done:
            watch(self)

    @classmethod
    def _library(cls, native, keep, comm, kind, number):
        # The fast path's request (mtcoll.Comm.Iallreduce): the library's own request, nothing
        # to finish, no watchdog -- what __init__ would make, without its branches.
        self = MPI.Request.__new__(cls, native)
        self.__dict__.update(_greq=None, _exec=None, _native=native, _on_done=[], _keep=keep,
                             seq=None, _comm=comm, _timeout=None, _kind=kind, _threaded=True,
                             _number=number, _complete=False)
        return self

    def _finish(self):
        self._complete = True
        callbacks, self._on_done = self._on_done, []
        self._keep = None
        for fn in callbacks:
            fn()
        if self._greq is not None:
            self._greq.Complete()

    def _done(self):
        # complete, also when MPI completed the library's request (MPI.Request.Waitall...)
        return self._complete or (self._greq is None and not MPI.Request.__bool__(self))

    # -- the MPI request interface ---------------------------------------------------------

    def Test(self, status=None):
        """Advance the call (and every other running mtcoll call) without blocking.

        Returns
        -------
        bool
            True once the call is complete; its receive buffer then holds the result.

        Errors as for :meth:`Wait`.
        """
        if not self._complete:
            self._usable()
            try:
                reraise()
                if self._exec is not None:
                    with LOCK:
                        if self._exec.test() and not self._complete:
                            self._abandoned()
                elif self._greq is None:
                    if not self._threaded:
                        advance()  # a peer may need one of them before it joins this call
                    if not MPI.Request.Test(self, status):
                        return False
                    self._complete = True
                    self._keep = None
                    return True
                else:
                    if not self._threaded:
                        advance()
                    if self._native.Test():
                        with LOCK:
                            if not self._complete:
                                self._finish()
            except BaseException as e:
                self._raise_failure(e)
            if not self._complete:
                return False
        return MPI.Request.Test(self, status)

    def Wait(self, status=None):
        """Block until the call is complete (advancing every running mtcoll call). Returns True.

        Raises :class:`StallError` after ``MTCOLL_TIMEOUT`` seconds without progress (see the
        class notes), RuntimeError if the call's :class:`Comm` is broken or freed.
        """
        if not self._complete:
            self._usable()
            try:
                reraise()
                if self._exec is not None:
                    with LOCK:
                        self._wait_execution()
                else:
                    self._wait_native(status)
            except BaseException as e:
                self._raise_failure(e)
        MPI.Request.Wait(self, status)  # complete: frees a generalized request
        return True

    def wait(self, status=None):
        """:meth:`Wait`; returns None (mpi4py's lowercase wait of a buffer call)."""
        self.Wait(status)
        return None

    def test(self, status=None):
        """:meth:`Test`; returns ``(flag, None)`` (mpi4py's lowercase test)."""
        return self.Test(status), None

    def Cancel(self):
        """Does nothing: a collective cannot be cancelled; the call runs to completion."""

    def _wait_execution(self):
        if not self._exec.wait(self._timeout):
            recv, send = self._exec.outstanding()
            what = [f"messages from ranks {recv} have not arrived"] if recv else []
            if send:
                what.append(f"messages to ranks {send} have not been received")
            self._stall("; ".join(what) or "nothing outstanding", recv or send)
        if not self._complete:
            self._abandoned()

    def _wait_native(self, status):
        target = self._native if self._greq is not None else self
        if self._timeout is None and (self._threaded or not execute.running()):
            # the MPI library waits (the progress thread, if any, advances mtcoll's calls)
            MPI.Request.Wait(target, status)
        else:
            # poll: to advance the running mtcoll calls while the MPI library's call
            # completes (a peer may need one of them before it can take part in this one),
            # and to give up after MTCOLL_TIMEOUT
            deadline = math.inf if self._timeout is None else time.monotonic() + self._timeout
            if not poll(lambda: MPI.Request.Test(target, status), deadline):
                self._stall("the MPI library's collective did not complete (it does not "
                            "say which ranks it waits for; MTCOLL_CHECK=1 names ranks "
                            "that did not make the call)", [])
        with LOCK:
            unwatch(self)
            if not self._complete:
                self._finish()

    # -- failures ----------------------------------------------------------------------------

    def _raise_failure(self, e):
        # An error inside Test/Wait leaves messages in flight: break the Comm (_fail), then
        # raise it again, an MPI error as RuntimeError naming the call.
        with LOCK:
            self._fail(e)
        if not isinstance(e, MPI.Exception):
            raise e
        raise RuntimeError(
            f"mtcoll {self._kind} on rank {self._rank()}: MPI error in a message of this call: "
            f"{mpi_error_text(e)}. With MTCOLL_CHECK off this is how a call ends whose "
            f"count differs between ranks (a message longer than its receive is "
            f"MPI_ERR_TRUNCATE). The Comm is now broken: free it and make a new one, or "
            f"end the job") from e

    def _rank(self):
        return self._comm._rank if self._comm is not None else MPI.COMM_WORLD.Get_rank()

    def _usable(self):
        if self._exec is not None and self._exec.error is not None:
            return  # the call's own failure: Wait/Test raise it
        comm = self._comm
        if comm is not None and comm._broken is not None:
            raise RuntimeError(f"this request belongs to a broken mtcoll.Comm ({comm._broken}); "
                               f"free the Comm and make a new one, or end the job")

    def _abandoned(self):
        # The execution ended without completing while we waited: another call's failure broke
        # this call's Comm (see _exec_failed), which abandoned it. The buffers hold no result.
        self._usable()
        raise RuntimeError(f"mtcoll {self._kind} on rank {self._rank()}: the call was "
                           f"abandoned before it completed")

    def _exec_failed(self, error):
        # A message of this call failed while some wait (maybe of another call) made progress:
        # break the Comm now; Wait and Test on this request raise the error.
        if self._comm is not None:
            self._comm._break(f"{self._kind} on rank {self._comm._rank} failed: MPI error "
                              f"{mpi_error_text(error)}")

    def _stall(self, what, ranks):
        # No progress for MTCOLL_TIMEOUT: find which ranks did not join the call (up to half
        # the timeout more; see mtcoll.comm._agreement.absent) and name them rather than the peers
        # whose messages are missing, which may just be waiting for them too.
        seq = f" (call {self.seq})" if self.seq is not None else ""
        missing = []
        if self._comm is not None and self._number is not None:
            from ._agreement import absent
            missing = absent(self._comm, self._number, self._timeout / 2)
        if missing:
            who = (f"rank(s) {missing} did not join this call (every other rank did and "
                   f"stalled; {what})")
            ranks = missing
        else:
            who = what
        raise StallError(f"mtcoll {self._kind}{seq} on rank {self._rank()}: no progress for "
                         f"{self._timeout:g} s (MTCOLL_TIMEOUT); {who}. A rank may not have "
                         f"made this call, or made a different one. The Comm is now broken: "
                         f"free it and make a new one, or end the job", self._kind,
                         self._timeout, ranks)

    def _fail(self, e):
        # An error inside the data path leaves messages in flight: break the Comm.
        if self._complete:
            return
        self._abandon()
        if self._comm is not None:
            if isinstance(e, StallError):
                kind = "stalled"
            elif isinstance(e, MPI.Exception):
                kind = f"failed: MPI error {mpi_error_text(e)}"
            else:
                kind = f"failed ({type(e).__name__}: {e})"
            self._comm._break(f"{self._kind} on rank {self._comm._rank} {kind}")

    def _abandon(self):
        if self._exec is not None:
            self._exec.abandon()
        unwatch(self)
        if not any(x is self for x in ABANDONED):
            ABANDONED.append(self)  # keeps the MPI requests and the buffers alive

    def __repr__(self):
        state = "complete" if self._done() else "active"
        how = "native" if self._native is not None else "mtcoll"
        return f"<mtcoll.Request {how} {state}>"


def waitall(requests):
    """Wait for every request in ``requests`` (mtcoll :class:`Request` or ``MPI.Request``).

    The mtcoll calls are advanced together (waiting for one advances them all), then the MPI
    requests are waited for. Returns True. Errors as for :meth:`Request.Wait`
    (:class:`StallError` with ``MTCOLL_TIMEOUT``); the MPI requests are not waited for then.
    ``MPI.Request.Waitall`` takes the same list (with the progress thread running).
    """
    requests = list(requests)
    for r in requests:
        if isinstance(r, Request):
            r.Wait()
    rest = [r for r in requests if not isinstance(r, Request)]
    if rest and execute.running() and not thread_running():
        poll(lambda: MPI.Request.Testall(rest))
    elif rest:
        MPI.Request.Waitall(rest)
    return True
