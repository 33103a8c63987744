"""A schedule cut into the pieces mtcoll's executor sends, for the simulator's dataflow replay.

The executor (``mtcoll/execute/_executor.py``) cuts every transfer into ``ceil(bytes / segment_bytes)``
pieces, at most ``max_segments``, one MPI message each, sent in order on the pair's
connection; a piece moves on as soon as the pieces it overlaps have arrived, so the pieces of
one transfer pipeline through the steps. :func:`pieces` rewrites a schedule the same way:
every chunk becomes ``L`` sub-chunks (``L`` the least common multiple of the piece counts
used), a transfer of ``k`` pieces becomes ``k`` transfers of consecutive sub-chunk ranges, and
step ``s`` becomes
steps ``s * K .. s * K + k - 1`` (``K`` the largest piece count) so that, replayed with
``mode="dataflow", sharing="priority"``, a transfer's first piece is served before its second
as on one TCP connection, and every piece waits only for the pieces whose data it carries.
"""

from __future__ import annotations

import math

import numpy as np

from ..schedule import Schedule

__all__ = ["pieces", "piece_counts"]


def piece_counts(schedule, nbytes, itemsize, segment_bytes, max_segments):
    """Pieces per transfer of ``schedule`` for a buffer of ``nbytes``, as the executor cuts."""
    bounds = schedule.chunk_bounds(nbytes // itemsize)
    sizes = (bounds[schedule.hi] - bounds[schedule.lo]) * itemsize
    return np.clip(-(-sizes // segment_bytes), 1, max_segments).astype(np.int64)


def pieces(schedule, nbytes, itemsize=4, segment_bytes=256 * 1024, max_segments=16):
    """``schedule`` with each transfer cut into its executor pieces (see the module docstring).

    The defaults are the executor's :data:`mtcoll.execute.SEGMENT_BYTES` and
    :data:`~mtcoll.execute.MAX_SEGMENTS` (ranks that busy-wait, as on the testbed, where the
    MPI library sees every rank as its own node); ``SLEEP_SEGMENT_BYTES`` and
    ``SLEEP_MAX_SEGMENTS`` are the sleeping ranks' ones.
    """
    k = piece_counts(schedule, nbytes, itemsize, segment_bytes, max_segments)
    kmax = int(k.max()) if len(k) else 1
    # the counts in use, not every count up to kmax: lcm(1..16) sub-chunks per chunk would
    # outnumber the elements, and the empty sub-chunks would leave pieces without bytes
    sub = math.lcm(*np.unique(k).tolist()) if len(k) else 1
    if schedule.nchunks * sub > nbytes // itemsize:
        raise ValueError(f"{nbytes} bytes are too few to cut {schedule.nchunks} chunks into "
                         f"{sub} sub-chunks each (piece counts {np.unique(k).tolist()})")
    rows = []
    for i in range(len(k)):
        lo, hi = int(schedule.lo[i]) * sub, int(schedule.hi[i]) * sub
        n = int(k[i])
        width = (hi - lo) // n
        for p in range(n):
            rows.append((int(schedule.phase[i]), int(schedule.step[i]) * kmax + p,
                         int(schedule.src[i]), int(schedule.dst[i]), lo + p * width,
                         hi if p == n - 1 else lo + (p + 1) * width, int(schedule.route[i])))
    cols = [np.array(c, np.int64) for c in zip(*rows)]
    owner = np.repeat(np.asarray(schedule.owner), sub)
    return Schedule(schedule.algorithm, schedule.topology, schedule.nranks,
                    schedule.nchunks * sub, owner, *cols[:6], route=cols[6],
                    meta=dict(schedule.meta, pieces_of=schedule.nchunks, sub_chunks=sub))
