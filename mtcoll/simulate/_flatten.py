"""A schedule flattened for a replay: per transfer its links, bytes and step ordinal, and the
model's constants. Shared by the link-level replay (``simulate/__init__.py``, ``_replay.py``)
and the SimGrid replay (``_simgrid.py``); imports no other part of the simulator."""

from __future__ import annotations

import numpy as np

from ..plan._graph import route_ids

#: seconds added per hop (link) for the router a transfer crosses: 10 cycles of a 1 GHz router
#: pipeline (route computation, allocation, crossbar), rounded up from BookSim's few stages
ROUTER_DELAY = 10e-9
#: seconds per message: one 16-byte head flit at 16 GB/s (the paper's message-based flow
#: control sends one head flit per chunk)
OVERHEAD = 1e-9
#: bytes per element: float32 gradients
ITEMSIZE = 4


def route_table(schedule, topo):
    """Per transfer, its links as a CSR list (rptr, rlinks)."""
    q, rl_ptr, rl = route_ids(schedule, topo)
    first = rl_ptr[q]
    lens = rl_ptr[q + 1] - first
    rptr = np.concatenate(([0], np.cumsum(lens)))
    # position k of transfer i reads rl[first[i] + k]
    rlinks = rl[np.repeat(first - rptr[:-1], lens) + np.arange(rptr[-1])]
    return rptr, rlinks.astype(np.int64)


def element_bounds(schedule, nbytes, itemsize):
    """The chunks' element offsets for a buffer of ``nbytes`` (checked against ``itemsize``)."""
    nbytes = int(nbytes)
    itemsize = int(itemsize)
    if itemsize < 1:
        raise ValueError(f"itemsize must be at least 1, got {itemsize}")
    if nbytes < 0 or nbytes % itemsize:
        raise ValueError(f"nbytes must be a non-negative multiple of itemsize {itemsize}, "
                         f"got {nbytes}")
    return schedule.chunk_bounds(nbytes // itemsize)


def transfer_bytes(schedule, nbytes, itemsize):
    b = element_bounds(schedule, nbytes, itemsize) * int(itemsize)
    return (b[schedule.hi] - b[schedule.lo]).astype(np.float64)


def step_index(schedule):
    """Ordinal step of each transfer over both phases (reduce steps first), and the count."""
    key = schedule.phase.astype(np.int64) * (int(schedule.step.max()) + 1) + schedule.step
    uniq, idx = np.unique(key, return_inverse=True)
    return idx.astype(np.int64), len(uniq)
