"""What both engines of a call share, process-wide: the running calls, the scratch pool, and a
call's set-up from its inputs and its failure steps.

The Python :class:`~mtcoll.execute.Execution` and the compiled engine's
``CompiledExecution`` import these; neither imports the other's module for them.
"""

from __future__ import annotations

import mmap

import numpy as np

from . import _limits

_SCRATCH_COUNT = 32  # and at most this many buffers: every call scans them all
_SCRATCH_SMALL = 64 * 1024  # a request this small may take any kept buffer up to this size
_SCRATCH_MMAP = 256 * 1024  # scratch this large is mapped from the kernel (see new_scratch)

# Scratch buffers kept between calls, oldest first, shared by every executor of the process:
# fresh large allocations cost page faults on every call. A call takes the smallest kept
# buffer that holds its scratch without wasting more than half of it (small requests may take
# any buffer up to _SCRATCH_SMALL bytes). The pool is bounded in bytes
# (_limits.SCRATCH_BUDGET), not per executor, so that what it holds stays about the same
# whatever mix of calls came last.
_pool = []


def get_scratch(nbytes):
    best = None
    for i, buf in enumerate(_pool):
        if nbytes <= buf.nbytes <= max(2 * nbytes, _SCRATCH_SMALL) and (
                best is None or buf.nbytes < _pool[best].nbytes):
            best = i
    if best is not None:
        return _pool.pop(best)
    return new_scratch(nbytes)


def put_scratch(buf):
    _pool.append(buf)
    total = sum(b.nbytes for b in _pool)
    while (total > _limits.SCRATCH_BUDGET or len(_pool) > _SCRATCH_COUNT) \
            and len(_pool) > 1:
        total -= _pool.pop(0).nbytes


def scratch_cached():
    """Bytes of scratch buffers kept for reuse (at most :data:`~mtcoll.execute.SCRATCH_BUDGET`,
    or the one most recently returned buffer when it alone is larger)."""
    return sum(b.nbytes for b in _pool)


def new_scratch(nbytes):
    """A scratch buffer of ``nbytes`` bytes. A large one is an anonymous ``mmap`` of its own,
    unmapped when the array is freed: had it come from ``malloc``, freeing it would raise
    glibc's mmap threshold (dynamic up to 32 MiB), after which buffers of that size come from
    the heap, which keeps their memory resident once freed. A stream of calls of changing
    sizes then ratchets the process's resident memory up (the soak in docs/reliability.md)
    without any memory being in use."""
    if nbytes < _SCRATCH_MMAP:
        return np.empty(nbytes, dtype=np.uint8)
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype=np.uint8)


active = []  # running executions, oldest first, over all communicators


def running():
    """Whether any execution is running (on any communicator of this process)."""
    return bool(active)


def take_inputs(call, executor, layout, acc, slot, src):
    """What an execution of either engine (the Python :class:`~mtcoll.execute.Execution`, the
    compiled ``CompiledExecution``) sets up from its inputs: its executor, layout,
    buffers (copying into ``acc`` the parts of ``src`` the layout reads from ``acc``), tag slot,
    callbacks and error, and its scratch buffer from the process's pool (``call._raw``, None
    when the layout needs none; returned whole when the call completes). Returns the scratch
    bytes the layout uses."""
    call.executor = executor
    call.layout = layout
    call.acc = acc
    if src is None:
        src = acc
    else:
        for a, b in layout.precopy:
            acc[a:b] = src[a:b]
    call.src = src
    call.slot = slot
    call.on_done = []
    call.error = None  # the MPI.Exception the execution failed with (see fail)
    call.on_error = []  # callbacks fn(error), run once when it fails
    nbytes = layout.scratch_size * acc.itemsize
    call._raw = get_scratch(nbytes) if nbytes else None
    return nbytes




def fail(call, error):
    """A message of ``call`` (an execution of either engine) failed: abandon it, keep ``error``
    to raise from its ``wait`` and ``test``, and tell its ``on_error`` callbacks."""
    if call.done:
        return
    call.error = error
    call.abandon()
    callbacks, call.on_error = call.on_error, []
    for fn in callbacks:
        fn(error)
