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

:func:`grow_timed_py` is plain Python over numpy arrays; the numba kernel
:func:`mtcoll.plan._kernels.grow_timed` is the same function compiled, and the tests hold the
two bit for bit equal.
"""

from __future__ import annotations

import numpy as np

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


def grow_timed_py(n, k, ports, nbr_ptr, nbr, edge_route_ptr, route_link_ptr, route_links,
                  nlinks, rdur):
    """The all-gather transfers of the ``timed`` plan (see the module docstring).

    Returns ``(start, finish, src, dst, piece, alt, err)``: one entry per transfer in commit
    order, ``alt`` the route index of the edge; ``err`` 1 if some rank could not be reached
    (the graph is not connected), else 0.
    """
    npieces = n * k
    ne = nbr_ptr[n]
    have = np.full((n, npieces), np.inf)
    got = np.zeros((n, npieces), np.uint8)  # have < inf, in an eighth of the memory
    held = np.empty((n, npieces), np.int32)  # pieces per rank, in the order it got them
    nheld = np.zeros(n, np.int64)
    for r in range(n):
        for j in range(k):
            have[r, r * k + j] = 0.0
            got[r, r * k + j] = 1
            held[r, j] = r * k + j
        nheld[r] = k
    esrc = np.empty(ne, np.int64)
    for u in range(n):
        for e in range(nbr_ptr[u], nbr_ptr[u + 1]):
            esrc[e] = u
    maxp = 1
    for u in range(n):
        maxp = max(maxp, ports[u])
    sfree = np.full((n, maxp), np.inf)
    rfree = np.full((n, maxp), np.inf)
    for u in range(n):
        for j in range(ports[u]):
            sfree[u, j] = 0.0
            rfree[u, j] = 0.0
    link_free = np.zeros(nlinks)
    cursor = np.zeros(ne, np.int64)
    idle = np.zeros(ne, np.bool_)
    m = n * (npieces - k)
    o_start = np.empty(m)
    o_finish = np.empty(m)
    o_src = np.empty(m, np.int32)
    o_dst = np.empty(m, np.int32)
    o_piece = np.empty(m, np.int32)
    o_alt = np.empty(m, np.int8)
    # the proposals: a binary heap over edges (an edge has at most one), by (finish, edge)
    ht = np.empty(ne)
    he = np.empty(ne, np.int64)
    hp = np.empty(ne, np.int64)
    hn = 0
    for e in range(ne):
        f, p, q, s = _propose(e, esrc, nbr, cursor, held, nheld, have, got, edge_route_ptr,
                              route_link_ptr, route_links, link_free, sfree, rfree, ports, rdur)
        if p < 0:
            idle[e] = True
        else:
            hn = _push(ht, he, hp, hn, f, e, p)
    done = 0
    while done < m and hn > 0:
        f0 = ht[0]
        e = he[0]
        p0 = hp[0]
        hn = _pop(ht, he, hp, hn)
        f, p, q, s = _propose(e, esrc, nbr, cursor, held, nheld, have, got, edge_route_ptr,
                              route_link_ptr, route_links, link_free, sfree, rfree, ports, rdur)
        if p < 0:
            idle[e] = True
            continue
        if f != f0 or p != p0:  # stale: the piece arrived another way, or a link was taken
            hn = _push(ht, he, hp, hn, f, e, p)
            continue
        u = esrc[e]
        v = nbr[e]
        for i in range(route_link_ptr[q], route_link_ptr[q + 1]):
            link_free[route_links[i]] = f
        _take(sfree, u, ports[u], f)
        _take(rfree, v, ports[v], f)
        have[v, p] = f
        got[v, p] = 1
        held[v, nheld[v]] = p
        nheld[v] += 1
        o_start[done] = s
        o_finish[done] = f
        o_src[done] = u
        o_dst[done] = v
        o_piece[done] = p
        o_alt[done] = q - edge_route_ptr[e]
        done += 1
        # this edge's next transfer, and the edges out of v that had nothing to send
        f, p, q, s = _propose(e, esrc, nbr, cursor, held, nheld, have, got, edge_route_ptr,
                              route_link_ptr, route_links, link_free, sfree, rfree, ports, rdur)
        if p < 0:
            idle[e] = True
        else:
            hn = _push(ht, he, hp, hn, f, e, p)
        for e2 in range(nbr_ptr[v], nbr_ptr[v + 1]):
            if idle[e2]:
                f, p, q, s = _propose(e2, esrc, nbr, cursor, held, nheld, have, got,
                                      edge_route_ptr, route_link_ptr, route_links, link_free,
                                      sfree, rfree, ports, rdur)
                if p >= 0:
                    idle[e2] = False
                    hn = _push(ht, he, hp, hn, f, e2, p)
    err = 0 if done == m else 1
    return (o_start[:done], o_finish[:done], o_src[:done], o_dst[:done], o_piece[:done],
            o_alt[:done], err)


def _propose(e, esrc, nbr, cursor, held, nheld, have, got, edge_route_ptr, route_link_ptr,
             route_links, link_free, sfree, rfree, ports, rdur):
    """Edge ``e``'s next transfer: (finish, piece, route id, start), piece -1 if its sender
    holds nothing its receiver lacks. Advances the edge's cursor past pieces the receiver
    holds (it never loses them)."""
    u = esrc[e]
    v = nbr[e]
    c = cursor[e]
    while c < nheld[u] and got[v, held[u, c]]:
        c += 1
    cursor[e] = c
    if c == nheld[u]:
        return 0.0, -1, -1, 0.0
    p = held[u, c]
    ready = have[u, p]
    ready = max(ready, _earliest(sfree, u, ports[u]))
    ready = max(ready, _earliest(rfree, v, ports[v]))
    best = np.inf
    bq = -1
    start = 0.0
    for q in range(edge_route_ptr[e], edge_route_ptr[e + 1]):
        t = ready
        for i in range(route_link_ptr[q], route_link_ptr[q + 1]):
            t = max(t, link_free[route_links[i]])
        if t + rdur[q] < best:
            best = t + rdur[q]
            bq = q
            start = t
    return best, p, bq, start


def _push(ht, he, hp, n, t, e, p):
    i = n
    while i > 0:
        j = (i - 1) >> 1
        if ht[j] < t or (ht[j] == t and he[j] < e):
            break
        ht[i] = ht[j]
        he[i] = he[j]
        hp[i] = hp[j]
        i = j
    ht[i] = t
    he[i] = e
    hp[i] = p
    return n + 1


def _pop(ht, he, hp, n):
    n -= 1
    t, e, p = ht[n], he[n], hp[n]
    i = 0
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        if c + 1 < n and (ht[c + 1] < ht[c] or (ht[c + 1] == ht[c] and he[c + 1] < he[c])):
            c += 1
        if t < ht[c] or (t == ht[c] and e < he[c]):
            break
        ht[i] = ht[c]
        he[i] = he[c]
        hp[i] = hp[c]
        i = c
    if n > 0:
        ht[i] = t
        he[i] = e
        hp[i] = p
    return n


def _earliest(free, u, count):
    t = free[u, 0]
    for j in range(1, count):
        t = min(t, free[u, j])
    return t


def _take(free, u, count, until):
    j0 = 0
    for j in range(1, count):
        if free[u, j] < free[u, j0]:
            j0 = j
    free[u, j0] = until


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
