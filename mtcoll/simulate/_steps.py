"""Step-mode replay over a schedule's own arrays, for schedules of millions of transfers.

In step mode only one step runs at a time, so a step whose transfers share no link (every
planned schedule's steps, on the network it was planned for) needs no event queue: each
transfer drains alone at its route's narrowest link, and ends ``delay + bytes / rate`` after
the step began. :func:`scan` computes that per step in one pass over the schedule's columns
(int32 and int8, as the schedule holds them), with no per-transfer array of its own: the
general replay's inputs (sizes, delays, routes as CSR, barrier tasks, dependency lists) take
about 70 bytes per transfer, 2.3 GB for the 33.5 M transfers of MultiTree on torus:64x64. A
step where two transfers with bytes meet on a link is flagged, and the caller replays that
step alone with the general engine (which then sees exactly what it would have seen: nothing
else is running during a step).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def scan(phase, step, lo, hi, bounds, itemsize, q, rl_ptr, rl, latency, cap, overhead,
         router_delay, rel_start, rel_finish):
    """One pass over transfers sorted by (phase, step).

    Returns ``(first, dur, contended, load)``: per ordinal step its first transfer (and the
    total as the last entry), its duration where no link is shared (else 0), whether two
    transfers with bytes share a link in it, and the bytes each link carries over the whole
    schedule. ``rel_start``/``rel_finish`` (empty, or one per transfer) receive each
    transfer's start and finish relative to its step's release.
    """
    t = len(step)
    keep = len(rel_finish) == t
    nsteps = 0
    for i in range(t):
        if i == 0 or step[i] != step[i - 1] or phase[i] != phase[i - 1]:
            nsteps += 1
    first = np.empty(nsteps + 1, np.int64)
    dur = np.zeros(nsteps)
    contended = np.zeros(nsteps, np.bool_)
    load = np.zeros(len(cap))
    stamp = np.full(len(cap), -1, np.int64)
    k = -1
    for i in range(t):
        if i == 0 or step[i] != step[i - 1] or phase[i] != phase[i - 1]:
            k += 1
            first[k] = i
        size = float(bounds[hi[i]] - bounds[lo[i]]) * itemsize
        r = q[i]
        delay = overhead
        rate = np.inf
        for p in range(rl_ptr[r], rl_ptr[r + 1]):
            link = rl[p]
            delay += latency[link] + router_delay
            if cap[link] < rate:
                rate = cap[link]
            load[link] += size
            if size > 0:
                if stamp[link] == k:
                    contended[k] = True
                stamp[link] = k
        end = delay + size / rate if size > 0 and rate < np.inf else delay
        if keep:
            rel_start[i] = delay
            rel_finish[i] = end
        if end > dur[k]:
            dur[k] = end
    first[nsteps] = t
    return first, dur, contended, load
