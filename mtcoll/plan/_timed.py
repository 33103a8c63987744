"""``timed``: allreduce trees grown on the time-expanded network, for links of any speed.

MultiTree counts steps and takes every step as long as one chunk on one link. Here a transfer
of a piece over a route takes ``sum of the route's latencies + piece bytes / its slowest
link's bandwidth`` (:func:`route_durations`), and the all-gather is grown in time, as TACOS
(Won et al., MICRO 2024) grows collectives on a time-expanded network:

* The buffer is cut into ``K`` pieces per rank (``nchunks = K * N``); rank ``r`` owns pieces
  ``r*K .. r*K+K-1`` and holds them from time 0.
* Every candidate edge ``u -> v`` (the graph of :mod:`mtcoll.plan._graph`) *proposes* its next
  transfer: the piece ``u`` has held longest among those ``v`` neither holds nor is promised,
  starting when ``u`` holds it, one of the edge's routes has every link free, ``u`` has a send
  port free and ``v`` a receive port, and finishing one route duration later (the route that
  is free first; the first such on ties).
* The proposal that finishes first, over the whole network, is committed (ties: lower edge;
  each edge has one proposal at a time); its links and ports are busy until it finishes, and ``v`` holds the piece
  from then on. A proposal whose piece ``v`` got meanwhile, or whose links were taken, is made
  again when it comes up. This is list scheduling by earliest arrival: a slow link is used
  only when what it brings arrives before any other way would bring it, so a piece never
  waits on a slow link that a faster path beats.
* The reduce-scatter is the same trees run backwards in time: the transfer that occupied
  ``[start, finish]`` in the all-gather runs child to parent at ``[T - finish, T - start]``.
* Steps are the distinct start times, in order (reduce: the distinct finish times, latest
  first), so the validator's per-step rules hold: a link or port carries one transfer at a
  time, and a rank forwards a piece only after it arrived. Steps are not lock-step: the
  executor, and the simulator's dataflow mode, run each transfer when its data is there.

:func:`~mtcoll.plan._timed_grow.grow_timed_py` is plain Python over numpy arrays; the numba kernel
:func:`mtcoll.plan._kernels.grow_timed` is the same function compiled, and the tests hold the
two bit for bit equal.
"""

from __future__ import annotations

import numpy as np

from ._timed_grow import grow_timed_py

#: bytes of the buffer the planner times its transfers for: large enough that bandwidth, not
#: latency, decides (the schedule itself is size-free, as every schedule is)
PLAN_BYTES = 16 << 20


def route_durations(g, topo, piece_bytes):
    """Seconds a piece of ``piece_bytes`` takes on each route of the flattened graph ``g``:
    the sum of its links' latencies plus the bytes at its slowest link's bandwidth."""
    ptr = np.asarray(g.route_link_ptr, np.int64)
    links = np.asarray(g.route_links, np.int64)
    nroutes = len(ptr) - 1
    out = np.zeros(nroutes)
    for q in range(nroutes):
        ls = links[ptr[q]:ptr[q + 1]]
        if len(ls):
            out[q] = float(topo.latency[ls].sum()) + piece_bytes / float(topo.bandwidth[ls].min())
    return out


def steps_of(times, descending=False):
    """The step of each transfer: the rank of its time among the distinct times (latest first
    with ``descending``)."""
    uniq, idx = np.unique(times, return_inverse=True)
    idx = idx.astype(np.int32)
    return (len(uniq) - 1 - idx) if descending else idx


def pieces_per_rank(nranks):
    """The piece counts per rank the planner tries: finer pieces let trees route round slow
    links, at the cost of more messages; one piece per rank from 65 ranks on."""
    if nranks <= 16:
        return (1, 2, 4)
    if nranks <= 64:
        return (1, 2)
    return (1,)


def plan_timed(topo, g, engine, edges, meta):
    """The ``timed`` schedule of ``topo`` (flattened to ``g``): the fastest, in the planner's
    time model, of the grown plans for each :func:`pieces_per_rank` and of MultiTree (its
    ``edges``, timed step by step), so that it is never slower than MultiTree there."""
    from ..schedule import GATHER, REDUCE, Schedule
    from ._multitree import schedule_from_trees

    n = topo.nranks
    if engine == "numba":
        from ._kernels import grow_timed as grow
    else:
        grow = grow_timed_py
    best = None
    for k in pieces_per_rank(n):
        rdur = route_durations(g, topo, PLAN_BYTES / (n * k))
        *cols, err = grow(n, k, g.ports, g.nbr_ptr, g.nbr, g.edge_route_ptr, g.route_link_ptr,
                          g.route_links, g.nlinks, rdur)
        if err:
            raise ValueError(f"the topology {topo.spec!r} is not connected: timed cannot span it")
        makespan = float(cols[1].max()) if len(cols[1]) else 0.0
        if best is None or makespan < best[0]:
            best = (makespan, k, cols)
    mt = multitree_makespan(edges, topo, g)
    meta = dict(meta, planned_gather_s=min(best[0], mt), multitree_gather_s=mt,
                plan_bytes=PLAN_BYTES)
    if mt <= best[0]:
        meta.update(pieces_per_rank=1, grown=False)
        return schedule_from_trees(edges, topo.spec, n, meta, algorithm="timed")
    _, k, (start, finish, src, dst, piece, alt) = best
    meta.update(pieces_per_rank=k, grown=True)
    m = len(start)
    cols = (np.repeat(np.array([REDUCE, GATHER], np.int8), m),
            np.concatenate((steps_of(finish, descending=True), steps_of(start))),
            np.concatenate((dst, src)), np.concatenate((src, dst)),
            np.concatenate((piece, piece)), np.concatenate((piece + 1, piece + 1)))
    return Schedule("timed", topo.spec, n, n * k, np.arange(n * k) // k, *cols,
                    route=np.concatenate((alt, alt)), meta=meta, copy=False)


def multitree_makespan(edges, topo, g):
    """The all-gather time of MultiTree's ``edges`` (step, parent, child, tree, route) run step
    by step in the planner's model: each step as long as its slowest transfer."""
    from ._graph import lookup_routes

    step, parent, child, _, alt = edges
    if not len(step):
        return 0.0
    q = lookup_routes(parent, child, alt, g.nbr_ptr, g.nbr, g.edge_route_ptr)
    d = route_durations(g, topo, PLAN_BYTES / topo.nranks)[q]
    order = np.argsort(step, kind="stable")
    st, d = step[order], d[order]
    starts = np.concatenate(([0], np.flatnonzero(np.diff(st)) + 1))
    return float(np.maximum.reduceat(d, starts).sum())
