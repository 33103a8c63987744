"""A topology flattened into CSR arrays, the form the planning kernels read.

``nbr_ptr``/``nbr``: the tree neighbours of each rank, one entry per candidate edge: the rank's
successor on the topology's Hamiltonian cycle first (if it has one), then the rest in order.
``edge_route_ptr``: for candidate edge ``e``, its alternative routes are
``edge_route_ptr[e] .. edge_route_ptr[e+1]-1``; route ``q`` crosses the links
``route_links[route_link_ptr[q] : route_link_ptr[q+1]]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Graph:
    nranks: int
    nlinks: int
    ports: np.ndarray
    nbr_ptr: np.ndarray
    nbr: np.ndarray
    edge_route_ptr: np.ndarray
    route_link_ptr: np.ndarray
    route_links: np.ndarray


def flatten(topo):
    """The :class:`Graph` of a :class:`~mtcoll.topology.Topology`."""
    n = topo.nranks
    cyc = topo.hamiltonian_cycle()
    succ = {cyc[i]: cyc[(i + 1) % n] for i in range(n)} if cyc else {}
    nbr_ptr, nbr, erp, rlp, links = [0], [], [0], [0], []
    for u in range(n):
        for v in sorted(topo.tree_neighbors(u), key=lambda v: v != succ.get(u)):
            nbr.append(v)
            for r in topo.routes(u, v):
                links.extend(r)
                rlp.append(len(links))
            erp.append(len(rlp) - 1)
        nbr_ptr.append(len(nbr))
    i32 = lambda a: np.asarray(a, dtype=np.int32)  # noqa: E731
    return Graph(n, topo.nlinks, i32(topo.ports), i32(nbr_ptr), i32(nbr), i32(erp), i32(rlp),
                 i32(links))


def lookup_routes(src, dst, alt, nbr_ptr, nbr, edge_route_ptr):
    """Per transfer, the route id in the graph's route table (int32), or -1 if (src, dst) is not
    a candidate edge or has no route number ``alt``; for a pair listed twice, its first edge.

    Vectorised numpy (a sort and a binary search), so that validating and simulating never need
    numba for it: importing numba alone costs about half a second per process.
    """
    src, dst, alt = np.asarray(src), np.asarray(dst), np.asarray(alt)
    nbr_ptr, nbr = np.asarray(nbr_ptr, np.int64), np.asarray(nbr, np.int64)
    out = np.full(len(src), -1, np.int32)
    if not len(src) or not len(nbr):
        return out
    width = max(int(nbr.max()), int(src.max()), int(dst.max())) + 1
    owner = np.repeat(np.arange(len(nbr_ptr) - 1), np.diff(nbr_ptr))
    order = np.argsort(owner * width + nbr, kind="stable")  # ties keep the first edge first
    keys = (owner * width + nbr)[order]
    erp = np.asarray(edge_route_ptr, np.int64)
    # in slices: the int64 temporaries of 33 M transfers at once took 2.3 GB
    for a in range(0, len(src), _SLICE):
        b = a + _SLICE
        want = src[a:b].astype(np.int64) * width + dst[a:b]
        pos = np.minimum(np.searchsorted(keys, want), len(keys) - 1)
        e = order[pos]
        q = erp[e] + alt[a:b]
        hit = (keys[pos] == want) & (alt[a:b] >= 0) & (q < erp[e + 1])
        out[a:b][hit] = q[hit]
    return out


_SLICE = 1 << 20  # transfers looked up at a time


def route_ids(schedule, topo):
    """The links every transfer of ``schedule`` crosses on ``topo``.

    Returns ``(q, route_link_ptr, route_links)``: transfer ``i`` crosses
    ``route_links[route_link_ptr[q[i]] : route_link_ptr[q[i] + 1]]``. Tree edges come straight
    from the flattened graph; the few other pairs (a baseline's long hops) from
    :meth:`Topology.routes`.
    """
    g = flatten(topo)
    q = lookup_routes(schedule.src, schedule.dst, schedule.route, g.nbr_ptr, g.nbr,
                      g.edge_route_ptr)  # -1 where not a tree edge
    miss = np.flatnonzero(q < 0)
    rl_ptr, rl = g.route_link_ptr, g.route_links
    if miss.size:
        keys = np.unique(np.stack((schedule.src[miss], schedule.dst[miss],
                                   schedule.route[miss].astype(np.int32)), axis=1), axis=0)
        ptr, links, ids = list(rl_ptr), list(rl), {}
        for s, d, a in keys.tolist():
            routes = topo.routes(s, d)
            if a >= len(routes):
                raise ValueError(f"{schedule.algorithm} schedule: transfer {s}->{d} uses route "
                                 f"{a}, but {topo.spec} has {len(routes)} between them")
            links.extend(routes[a])
            ptr.append(len(links))
            ids[(s, d, a)] = len(ptr) - 2
        for i in miss.tolist():
            q[i] = ids[(int(schedule.src[i]), int(schedule.dst[i]), int(schedule.route[i]))]
        rl_ptr, rl = np.array(ptr, np.int64), np.array(links, np.int64)
    return q, rl_ptr, rl
