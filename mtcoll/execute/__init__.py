"""The executor: runs any :class:`~mtcoll.schedule.Schedule` with nonblocking MPI messages.

What it hands on, to :mod:`mtcoll.comm`:

- :class:`Executor` (one per communicator and schedule), whose ``start`` returns an
  :class:`Execution` (one running call) or, for a blocking call the compiled engine serves, its
  twin with the same interface; :class:`Layout`, a call's pieces and their dependencies;
- :func:`progress` and :func:`running`, which advance and report every running call of the
  process; :func:`scratch_cached`, the scratch pool's size;
- the limits and waiting settings (``SEGMENT_BYTES``, ``MAX_SEGMENTS``, ``TAG_SLOTS``,
  ``WAIT``, ...), read here and set on :mod:`mtcoll.execute._limits`, where both engines read
  them at call time.

The rooms: ``_executor.py`` the Python executor (how a call runs, in its docstring),
``_engine.py`` the compiled engine and ``_kernel.py`` its numba kernel, ``_abi.py`` the codes
and slots those two share, ``_state.py`` what both engines share process-wide (running calls,
the scratch pool), ``_limits.py`` the settings. Nothing here imports a topology or a planner.
"""

from . import _limits
from ._executor import Execution, Executor, Layout, progress, running, scratch_cached

__all__ = ["Executor", "Execution", "Layout", "progress", "running", "scratch_cached",
           "MAX_MESSAGE_ELEMENTS", "SEGMENT_BYTES", "MAX_SEGMENTS", "SLEEP_SEGMENT_BYTES",
           "SLEEP_MAX_SEGMENTS", "RECV_WINDOW", "TAG_SLOTS", "WAIT", "SPIN_POLLS",
           "YIELD_POLLS", "SLEEP_MIN", "SLEEP_MAX", "SCRATCH_BUDGET"]

_LIMITS = frozenset(__all__[6:])


def __getattr__(name):
    # the settings' current values: a run that changed one on _limits reads the change here
    if name in _LIMITS:
        return getattr(_limits, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
