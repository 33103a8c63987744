"""The compiled progress engine: :mod:`mtcoll.execute`'s per-message work in numba.

One blocking call of an :class:`~mtcoll.execute.Executor` runs here when it can: the kernel
releases dependencies, posts receives and sends, tests completions and applies the reduction
in compiled code (``@njit(nogil=True, cache=True)``), calling the MPI library's C functions
(``MPI_Isend``, ``MPI_Irecv``, ``MPI_Testsome``, ``MPI_Waitsome``) through their addresses in
the library mpi4py loaded, with the handles mpi4py exposes (``comm.handle``,
``MPI.Datatype.handle``, request arrays of ``MPI._sizeof(MPI.Request)`` bytes a handle). The
messages are the Python executor's, piece for piece and tag for tag (the same
:class:`~mtcoll.execute.Layout`), and the combines happen in the same dependency order, so the
results are the same bits, and ranks running either engine interoperate.

What it serves, and what it leaves to the Python executor
--------------------------------------------------------
* Blocking calls (``Allreduce``, ``Reduce_scatter_block``, ``Allgather``) started while no
  other mtcoll call is running on this process. A nonblocking call (``Iallreduce``), or any
  call while others are in flight, runs on the Python executor: those must all be advanced
  together by :func:`mtcoll.execute.progress` (and by the progress thread), which the kernel,
  holding the lock for its whole call, would not do.
* The reductions of :mod:`mtcoll._ops` on bool, (u)int8..64, float32/64 and complex64/128.
  Other dtypes (float16, long double) fall back.
* An MPI library whose handles are 4-byte integers (MPICH and its ABI) or 8-byte values
  (Open MPI's pointers), whose ``MPI_Status`` mpi4py can show us, and whose C functions can be
  resolved. Anything else falls back.

``MTCOLL_ENGINE=python`` forces the Python executor; ``compiled`` (the default) uses the
kernel wherever it can. With ``MTCOLL_DEBUG`` rank 0 prints which engine runs each call and,
for the Python executor, why.

Waiting, time-outs and errors
-----------------------------
A busy wait (``wait="busy"``, no deadline) blocks in ``MPI_Waitsome`` inside the kernel, with
the GIL released. A sleeping wait (``wait="sleep"``) stays in the kernel too: it tests
(``MPI_Testsome``) as :data:`mtcoll.execute.WAIT` says -- :data:`~mtcoll._limits.SPIN_POLLS`
tests, :data:`~mtcoll._limits.YIELD_POLLS` after a ``sched_yield``, then ``nanosleep`` between
tests from :data:`~mtcoll._limits.SLEEP_MIN` doubling to :data:`~mtcoll._limits.SLEEP_MAX` --
with the thread's timer slack lowered to :data:`SLEEP_SLACK` while it sleeps, and returns to
Python after :data:`SLEEP_BUDGET` of sleeping without a completion, so that a deadline
(``MTCOLL_TIMEOUT``) is checked and signal handlers run. A busy wait with a deadline tests and
returns after some tests that found nothing. Python then checks the deadline and calls the
kernel again (all the state of a call is in arrays, so the kernel resumes where it stopped).
A failed message (MPI error, e.g. ``MPI_ERR_TRUNCATE`` in a status) ends the kernel: the
execution is abandoned (its receives cancelled) and the ``MPI.Exception`` raised from
:meth:`CompiledExecution.wait`, as the Python executor does.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time

import numpy as np
from mpi4py import MPI

from ..schedule import RECV, SEND
from . import _limits, _state
from ._abi import (DONE, DTYPE_CODES, ERROR, OPS, PACE_SLOTS, P_BUDGET, P_POLLS, P_SLACK,
                   P_SLEEP_MAX, P_SLEEP_MIN, P_SPIN, P_YIELDS, STALL, STATE_SLOTS, S_ERR, S_MOVED,
                   S_NACTIVE, S_REMAINING, S_WTAIL)

__all__ = ["start", "available", "preload", "warm", "engine_setting", "CompiledExecution"]

_IDLE_POLLS = 2000  # tests without progress before the kernel returns (busy, with a deadline)
#: While the kernel sleeps (``wait="sleep"``) the thread's timer slack, in ns: Linux's default
#: 50 us makes every short sleep last 50 us longer (a 20 us ``nanosleep`` took 89 us on the
#: 2-core VM, 30 us with a 1 ns slack). Restored when the kernel returns.
SLEEP_SLACK = 1000
#: The sleeping the kernel does without a completion before it returns to Python, which checks
#: the call's deadline (``MTCOLL_TIMEOUT``) and runs signal handlers, in seconds.
SLEEP_BUDGET = 0.01


def _pace(polls, spin, yields=0, sleep_min=0.0, sleep_max=0.0, budget=0.0, slack=0):
    """The kernel's pace array (times in seconds, slack in ns; see _kernel.run)."""
    pace = np.zeros(PACE_SLOTS, dtype=np.int64)
    pace[P_POLLS], pace[P_SPIN], pace[P_YIELDS] = max(polls, 1), spin, yields
    pace[P_SLEEP_MIN] = max(1, round(sleep_min * 1e9))
    pace[P_SLEEP_MAX] = round(sleep_max * 1e9)
    pace[P_BUDGET], pace[P_SLACK] = round(budget * 1e9), slack
    return pace


_ONE_TEST = _pace(1, 1)  # test() and warm(): one test, no waiting


def engine_setting():
    """``"compiled"`` or ``"python"``: ``MTCOLL_ENGINE``, default compiled."""
    raw = os.environ.get("MTCOLL_ENGINE", "").strip().lower()
    if raw in ("", "compiled", "numba"):
        return "compiled"
    if raw == "python":
        return "python"
    raise ValueError(f"environment variable MTCOLL_ENGINE={os.environ['MTCOLL_ENGINE']!r} "
                     f"(rank {MPI.COMM_WORLD.Get_rank()} of MPI.COMM_WORLD): expected "
                     f"compiled or python")


# -- the MPI library's C interface -------------------------------------------------------------

class _Abi:
    """What the kernel needs of the MPI library: function addresses and handle layouts."""

    def __init__(self):
        self.why = None
        try:
            self._probe()
        except Exception as e:  # any surprise means: not an ABI we know
            self.why = f"MPI ABI not understood ({type(e).__name__}: {e})"

    def _probe(self):
        hsize = MPI._sizeof(MPI.Request)
        if not (hsize == MPI._sizeof(MPI.Comm) == MPI._sizeof(MPI.Datatype)) \
                or hsize not in (4, 8):
            self.why = (f"unknown MPI ABI: handles of {hsize}, {MPI._sizeof(MPI.Comm)}, "
                        f"{MPI._sizeof(MPI.Datatype)} bytes (request, comm, datatype)")
            return
        if ctypes.sizeof(ctypes.c_int) != 4 or ctypes.sizeof(ctypes.c_void_p) != 8:
            self.why = "C int is not 4 bytes or pointers not 8: not a platform the kernel knows"
            return
        self.handle = np.int32 if hsize == 4 else np.int64
        # the MPI_Status layout: where MPI_ERROR is, found by writing a marker through mpi4py
        self.status_size = MPI._sizeof(MPI.Status)
        st = MPI.Status()
        marker = 0x3C5A7E11
        st.Set_source(0x1234)
        st.Set_tag(0x2345)
        st.Set_error(marker)
        raw = np.frombuffer(ctypes.string_at(MPI._addressof(st), self.status_size), np.int32)
        hits = np.flatnonzero(raw == marker)
        if len(hits) != 1 or self.status_size % 4:
            self.why = "unknown MPI ABI: the error field of MPI_Status not found"
            return
        self.err_word = int(hits[0])  # int32 index within a status
        # and the C library's, for waiting inside the kernel (prctl: Linux only, else 0)
        self.fn = np.array([self._address(name) for name in
                            ("MPI_Isend", "MPI_Irecv", "MPI_Testsome", "MPI_Waitsome")]
                           + [self._libc(name) for name in ("sched_yield", "nanosleep")]
                           + [self._libc("prctl", required=False)], dtype=np.int64)
        self.req_null = self.handle(self._signed(MPI.REQUEST_NULL.handle))
        self.err_in_status = int(MPI.ERR_IN_STATUS)
        self.library = MPI.Get_library_version().splitlines()[0].strip()

    def _address(self, name):
        for path in (MPI.__file__, None):  # the extension's libmpi, else the process's
            try:
                return ctypes.cast(getattr(ctypes.CDLL(path), name), ctypes.c_void_p).value
            except (OSError, AttributeError):
                continue
        raise LookupError(f"{name} not found in the MPI library mpi4py loaded")

    def _libc(self, name, required=True):
        try:
            return ctypes.cast(getattr(ctypes.CDLL(None), name), ctypes.c_void_p).value
        except (OSError, AttributeError):
            if required:
                raise LookupError(f"{name} not found in the process's C library") from None
            return 0

    def _signed(self, h):
        # mpi4py gives a handle as an unsigned integer (MPICH's int handles sign-extended to
        # 64 bits): its low bits, as the signed integer of the handle's size
        bits = 8 * np.dtype(self.handle).itemsize
        h = int(h) & ((1 << bits) - 1)
        return h - (1 << bits) if h >> (bits - 1) else h

    def handle_of(self, obj):
        return self.handle(self._signed(obj.handle))


_ABI = None
_KERNEL = None
_READY = False  # the kernel is loaded, its signature compiled or read from numba's cache
_LOADER = None  # the thread loading it in the background (see preload), until it is done
_LOAD_ERROR = None  # why the load failed, once it has
_LOADING_CALLS = 0  # calls that ran on the Python executor while the engine was loading
#: How long interpreter exit waits for a background load still running (seconds): a thread
#: inside LLVM while the process tears down could crash it.
EXIT_WAIT = 60.0
#: Calls that run on the Python executor while the compiled engine loads in the background
#: (see :func:`preload`); the next call waits for the load to finish. A count of calls, the
#: same on every rank, rather than a time: the ranks then wait at the same call, where a rank
#: waiting alone would leave the others polling for its messages (with more ranks than cores,
#: on the cores its load needs).
LOAD_PATIENCE = 1
#: Calls the compiled engine has run in this process (the tests check it served them).
served = 0


def _abi():
    global _ABI
    if _ABI is None:
        _ABI = _Abi()
    return _ABI


def available(wait=True):
    """None when the compiled engine can run here, else why not (one line).

    ``wait=False`` (a call asking): for the first :data:`LOAD_PATIENCE` calls that ask while
    the kernel loads (:func:`preload`, started here if nothing started it), do not wait: the
    answer is then that it is loading, and the call goes to the Python executor."""
    global _LOADING_CALLS
    abi = _abi()
    if abi.why:
        return abi.why
    if not _READY:
        preload()
        if wait or _LOADING_CALLS >= LOAD_PATIENCE:
            _load()
        elif not _READY:
            _LOADING_CALLS += 1
            return _LOAD_ERROR or "the compiled engine is still loading, in the background"
    return _LOAD_ERROR


def _kernel():
    global _KERNEL
    if _KERNEL is None:
        from . import _kernel
        _KERNEL = _kernel
    return _KERNEL


def preload():
    """Start loading the compiled engine in a background thread (numba's import and the
    cached kernel's load: a few tenths of a second of CPU per process), unless it is loaded,
    loading or cannot run here; returns at once. Until it is done, calls run on the Python
    executor (the same messages and bits). The thread calls no MPI function: what the engine
    needs of the MPI library is read here, in the calling thread."""
    global _LOADER
    if _READY or _LOADER is not None or _LOAD_ERROR or _abi().why:
        return
    import atexit
    import threading

    _LOADER = threading.Thread(target=_run_load, name="mtcoll-engine-load", daemon=True)
    _LOADER.start()
    atexit.register(_LOADER.join, EXIT_WAIT)


def _run_load():
    global _READY, _LOAD_ERROR
    try:
        _kernel()
        _stub_call()
    except Exception as e:  # noqa: BLE001 -- said by available(), per call
        _LOAD_ERROR = f"the numba kernel failed to load ({type(e).__name__}: {e})"
    else:
        _READY = True


def _load():
    # the load, waited for: join the background one, or run it here
    if _LOADER is not None:
        _LOADER.join()
    elif not _READY and not _LOAD_ERROR:
        _run_load()


def warm():
    """Compile the kernel for this MPI library's ABI (or load it from numba's cache), and wait
    for it: one call of no messages through the path every call takes. Returns None, or why the
    engine cannot run here. ``python -m mtcoll.execute._engine`` runs it (``make`` does, after
    installing), and the calibration probe before its points."""
    return available(wait=True)


def _stub_call():
    # One call of no messages (no MPI function is called: nothing to post or test): what
    # makes numba compile the kernel or load it from its cache, for the one signature of
    # every call.
    class _Stub:
        npieces = scratch_size = 0
        kind = phase = peer = a = b = tagnum = scratch = src_read = npending = ()
        dependents = reduce_recvs = ready = precopy = ()
        comm, rank, sleep = MPI.COMM_SELF, 0, False

    acc = np.zeros(1)
    CompiledExecution(_Stub(), _Stub(), acc, np.add, 0)._step(False, _ONE_TEST)


# -- selection ---------------------------------------------------------------------------------

def start(executor, layout, acc, ufunc, slot, src, blocking, debug=False):
    """A :class:`CompiledExecution` of this call, or None (the caller runs the Python executor)
    when the compiled engine cannot serve it (or is still loading: the first call starts its
    load in the background, see :func:`preload`); with ``debug`` (the caller's
    ``MTCOLL_DEBUG``, off for calls the user did not make), rank 0 says which."""
    why = _why_not(executor, layout, acc, ufunc, blocking)
    if debug and executor.rank == 0:
        print(f"mtcoll[rank 0]: engine=" + (f"python ({why})" if why else "compiled"),
              file=sys.stderr, flush=True)
    if why:
        return None
    global served
    served += 1
    return CompiledExecution(executor, layout, acc, ufunc, slot, src)


def _why_not(executor, layout, acc, ufunc, blocking):
    if engine_setting() == "python":
        return "MTCOLL_ENGINE=python"
    if not blocking:
        return "a nonblocking call (the compiled engine serves blocking calls)"
    if _state.running():
        return "other mtcoll calls in flight (advanced together by the Python executor)"
    if (acc.dtype.kind, acc.dtype.itemsize) not in DTYPE_CODES or not acc.dtype.isnative:
        return f"dtype {acc.dtype} (the kernel reduces bool, ints, float32/64, complex)"
    if layout.reduce_recvs and OPS.get(ufunc) is None:
        return f"reduction {getattr(ufunc, '__name__', ufunc)!r} unknown to the kernel"
    if layout.reduce_recvs and ufunc is np.multiply and acc.dtype.kind == "c":
        # numpy's vectorised complex multiply may fuse operations (FMA): the kernel's product
        # would differ in the last bit
        return "complex PROD (numpy's complex multiply rounds as the kernel cannot match)"
    if MPI._typedict.get(acc.dtype.char) is None:
        return f"no MPI datatype for dtype {acc.dtype}"
    return None if _READY else available(wait=False)


# -- the flat tables of a layout ---------------------------------------------------------------

class _Flat:
    """A :class:`~mtcoll.execute.Layout` as the kernel's arrays (built once per layout)."""

    def __init__(self, lay):
        n = lay.npieces
        self.kind = np.asarray(lay.kind, dtype=np.int8)
        self.phase = np.asarray(lay.phase, dtype=np.int8)
        self.peer = np.asarray(lay.peer, dtype=np.int32)
        self.a = np.asarray(lay.a, dtype=np.int64)
        self.b = np.asarray(lay.b, dtype=np.int64)
        self.tagnum = np.asarray(lay.tagnum, dtype=np.int64)
        self.scratch = np.asarray(lay.scratch, dtype=np.int64)
        self.src_read = np.asarray(lay.src_read, dtype=np.bool_)
        self.npending = np.asarray(lay.npending, dtype=np.int32)
        counts = np.fromiter((len(d) for d in lay.dependents), dtype=np.int64, count=n)
        self.dep_ptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(counts, out=self.dep_ptr[1:])
        self.dep_idx = np.fromiter((q for d in lay.dependents for q in d), dtype=np.int32,
                                   count=int(self.dep_ptr[-1]))
        self.recv_order = np.asarray(lay.reduce_recvs, dtype=np.int32)
        # the first work: pieces ready at the start (reduce-phase receives are posted apart)
        self.ready = np.asarray(lay.ready, dtype=np.int32)


def _flat(lay):
    flat = getattr(lay, "_flat", None)
    if flat is None:
        flat = lay._flat = _Flat(lay)
    return flat


def _bytes(x):
    """``x`` (1-D, C-contiguous) as a writable uint8 array over the same memory: the kernel's
    single signature. A read-only input is only ever read (it is a send or combine source)."""
    if x.flags.writeable:
        return x.view(np.uint8)
    if x.nbytes == 0:
        return np.zeros(0, dtype=np.uint8)
    raw = (ctypes.c_uint8 * x.nbytes).from_address(x.ctypes.data)
    return np.frombuffer(raw, dtype=np.uint8)


# -- one call ----------------------------------------------------------------------------------

class CompiledExecution:
    """One blocking call run by the kernel: the interface of :class:`mtcoll.execute.Execution`
    (``done``, ``error``, ``on_done``, ``on_error``, :meth:`wait`, :meth:`test`,
    :meth:`outstanding`, :meth:`abandon`), but never among :func:`mtcoll.execute.running`'s
    executions: only its own waits advance it."""

    engine = "compiled"

    def __init__(self, executor, layout, acc, ufunc, slot, src=None):
        abi = _abi()
        nbytes = _state.take_inputs(self, executor, layout, acc, slot, src)
        self._src8 = _bytes(self.src)
        self._acc8 = _bytes(acc)
        self._dt = np.int64(DTYPE_CODES[acc.dtype.kind, acc.dtype.itemsize])
        self.done = layout.npieces == 0
        self._flat = flat = _flat(layout)
        n = layout.npieces
        self._op = np.int32(OPS.get(ufunc, 0))
        self._pending = flat.npending.copy()
        self._arrived = np.zeros(n, dtype=np.int8)
        self._work = np.empty(2 * n + 1, dtype=np.int32)
        self._work[:len(flat.ready)] = flat.ready
        self._state = np.zeros(STATE_SLOTS, dtype=np.int64)
        self._state[S_REMAINING] = n
        self._state[S_WTAIL] = len(flat.ready)
        self._reqs = np.full(n, abi.req_null, dtype=abi.handle)
        self._req_piece = np.full(n, -1, dtype=np.int32)
        self._index = np.empty(max(n, 1), dtype=np.int32)
        self._statuses = np.zeros(max(n, 1) * abi.status_size // 4, dtype=np.int32)
        self._comm = abi.handle_of(executor.comm)
        self._dtype = abi.handle_of(MPI._typedict[acc.dtype.char])
        self._tmp = self._acc8[:0] if self._raw is None else self._raw[:nbytes]
        self._started = False

    # -- running -----------------------------------------------------------------------------

    def _step(self, block, pace):
        abi = _abi()
        f = self._flat
        k = _kernel()
        rc = k.run(abi.fn, self._state, f.kind, f.phase, f.peer, f.a, f.b, f.tagnum, f.scratch,
                   f.src_read, f.dep_ptr, f.dep_idx, f.recv_order, self._pending, self._arrived,
                   self._work, self._reqs, self._req_piece, self._index, self._statuses,
                   self._acc8, self._src8, self._tmp, self._dt, np.int64(self.acc.itemsize),
                   self._op, self._dtype, self._comm,
                   np.int64(self.slot), np.int64(_limits.TAG_SLOTS),
                   np.int64(_limits.RECV_WINDOW), bool(block), pace,
                   np.int64(abi.status_size // 4), np.int64(abi.err_word),
                   np.int64(abi.err_in_status), bool(not self._started))
        self._started = True
        if rc == DONE:
            self._close()
        elif rc == ERROR:
            error = MPI.Exception(int(self._state[S_ERR]))
            self._fail(error)
            raise error
        elif rc == STALL:
            self._fail_quietly()
            raise RuntimeError(f"mtcoll executor stalled on rank {self.executor.rank} with "
                               f"{int(self._state[S_REMAINING])} pieces left: the schedule "
                               f"{self.executor.schedule!r} is inconsistent")
        moved = bool(self._state[S_MOVED])
        return moved

    def test(self):
        """Advance this call without blocking; True once it is complete (raises its error)."""
        if not self.done:
            self._step(False, _ONE_TEST)
        if self.error is not None:
            raise self.error
        return self.done

    def wait(self, timeout=None):
        """Run this call to completion; returns True. With ``timeout`` (seconds), return False
        once no message has completed for that long (the call is then still running)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.executor.sleep:  # the kernel tests, yields and sleeps as mtcoll.execute.WAIT says
            pace = _pace(1 << 62, _limits.SPIN_POLLS, _limits.YIELD_POLLS,
                         _limits.SLEEP_MIN, _limits.SLEEP_MAX, SLEEP_BUDGET, SLEEP_SLACK)
        elif deadline is None:
            pace = None  # blocks in MPI_Waitsome until done (or an error)
        else:
            pace = _pace(_IDLE_POLLS, _IDLE_POLLS)  # polls, returning for the deadline
        while not self.done:
            if pace is None:
                self._step(True, _ONE_TEST)
                continue
            if self._step(False, pace):
                if timeout is not None:
                    deadline = time.monotonic() + timeout
                continue
            if deadline is not None and time.monotonic() >= deadline:
                return False
        if self.error is not None:
            raise self.error
        return True

    # -- ending ------------------------------------------------------------------------------

    def _close(self):
        self.done = True
        if self._raw is not None:
            _state.put_scratch(self._raw)
            self._raw = None
            self._tmp = self._acc8[:0]
        callbacks, self.on_done = self.on_done, []
        for fn in callbacks:
            fn()

    def _active(self):
        n = int(self._state[S_NACTIVE])
        return self._reqs[:n], self._req_piece[:n]

    def outstanding(self):
        """``(recv_from, send_to)``: sorted peers of this call's posted, incomplete messages."""
        recv, send = set(), set()
        lay = self.layout
        null = _abi().req_null
        for r, p in zip(*self._active()):
            if r != null:
                (send if lay.kind[p] == SEND else recv).add(lay.peer[p])
        return sorted(recv), sorted(send)

    def abandon(self):
        """Stop without completing: cancel the posted receives; the sends stay posted (their
        requests and buffers are kept alive by this object). Counts as ``done`` from then on,
        ``on_done`` never runs."""
        if self.done:
            return
        self.done = True
        lay = self.layout
        null = _abi().req_null
        reqs, pieces = self._active()
        self._kept = []
        for i, p in enumerate(pieces.tolist()):
            if reqs[i] == null:
                continue
            r = MPI.Request.fromhandle(int(reqs[i]) & (2**64 - 1))  # as mpi4py shows handles
            if lay.kind[p] == RECV:
                try:
                    r.Cancel()
                    r.Wait()
                except MPI.Exception:
                    pass
            else:
                self._kept.append(r)  # a send in flight: its buffer stays ours
        # the scratch stays with this object (kept alive by the abandoned request, as the
        # Python executor's): a receive MPI failed to cancel may still write into it

    def _fail(self, error):
        _state.fail(self, error)  # the Python executor's steps, over this class's abandon()

    def _fail_quietly(self):
        self.abandon()



if __name__ == "__main__":
    problem = warm()
    library = MPI.Get_library_version().splitlines()[0].strip()
    print(f"mtcoll compiled engine: {problem or 'ready'} ({library})")
