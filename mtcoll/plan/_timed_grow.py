"""The timed planner's growth (:mod:`mtcoll.plan._timed`): plain Python over numpy arrays.

A leaf: :func:`grow_timed_py` and the helpers it calls import only numpy, so that
:mod:`mtcoll.plan._kernels` compiles the same functions with numba (``grow_timed``) and
:mod:`mtcoll.plan._timed` runs either; the tests hold the two bit for bit equal.
"""

from __future__ import annotations

import numpy as np


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
        f, p, q, s = propose(e, esrc, nbr, cursor, held, nheld, have, got, edge_route_ptr,
                              route_link_ptr, route_links, link_free, sfree, rfree, ports, rdur)
        if p < 0:
            idle[e] = True
        else:
            hn = push(ht, he, hp, hn, f, e, p)
    done = 0
    while done < m and hn > 0:
        f0 = ht[0]
        e = he[0]
        p0 = hp[0]
        hn = pop(ht, he, hp, hn)
        f, p, q, s = propose(e, esrc, nbr, cursor, held, nheld, have, got, edge_route_ptr,
                              route_link_ptr, route_links, link_free, sfree, rfree, ports, rdur)
        if p < 0:
            idle[e] = True
            continue
        if f != f0 or p != p0:  # stale: the piece arrived another way, or a link was taken
            hn = push(ht, he, hp, hn, f, e, p)
            continue
        u = esrc[e]
        v = nbr[e]
        for i in range(route_link_ptr[q], route_link_ptr[q + 1]):
            link_free[route_links[i]] = f
        take(sfree, u, ports[u], f)
        take(rfree, v, ports[v], f)
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
        f, p, q, s = propose(e, esrc, nbr, cursor, held, nheld, have, got, edge_route_ptr,
                              route_link_ptr, route_links, link_free, sfree, rfree, ports, rdur)
        if p < 0:
            idle[e] = True
        else:
            hn = push(ht, he, hp, hn, f, e, p)
        for e2 in range(nbr_ptr[v], nbr_ptr[v + 1]):
            if idle[e2]:
                f, p, q, s = propose(e2, esrc, nbr, cursor, held, nheld, have, got,
                                      edge_route_ptr, route_link_ptr, route_links, link_free,
                                      sfree, rfree, ports, rdur)
                if p >= 0:
                    idle[e2] = False
                    hn = push(ht, he, hp, hn, f, e2, p)
    err = 0 if done == m else 1
    return (o_start[:done], o_finish[:done], o_src[:done], o_dst[:done], o_piece[:done],
            o_alt[:done], err)


def propose(e, esrc, nbr, cursor, held, nheld, have, got, edge_route_ptr, route_link_ptr,
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
    ready = max(ready, earliest(sfree, u, ports[u]))
    ready = max(ready, earliest(rfree, v, ports[v]))
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


def push(ht, he, hp, n, t, e, p):
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


def pop(ht, he, hp, n):
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


def earliest(free, u, count):
    t = free[u, 0]
    for j in range(1, count):
        t = min(t, free[u, j])
    return t


def take(free, u, count, until):
    j0 = 0
    for j in range(1, count):
        if free[u, j] < free[u, j0]:
            j0 = j
    free[u, j0] = until
