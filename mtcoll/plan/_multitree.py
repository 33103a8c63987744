"""MultiTree (Huang et al., ISCA 2021): one spanning tree rooted at every rank, grown step by step.

Construction, the same in the pure-Python twin below and in the numba kernel
(:func:`mtcoll.plan._kernels.grow_trees`):

* Trees ``0 .. N-1``; tree ``r`` is rooted at rank ``r`` and carries chunk ``r``.
* Step ``t`` starts with every link and port free. Trees take turns round-robin, starting at
  tree ``t mod N`` so that no tree is always served first; in its turn a tree adds at most one
  edge ``u -> v``: ``u`` in the tree since before step ``t``, ``v`` not in it, every link of one
  of the routes from ``u`` to ``v`` unused in step ``t``, ``u`` below its send budget and ``v``
  below its receive budget. The first such edge is taken, scanning members newest first, their
  neighbours in the graph's order (the Hamiltonian-cycle successor first), routes in order. A
  tree that finds nothing sits out the rest of the step; the step ends when a round adds
  nothing. (Newest-first with the cycle successor first is what lets one-port tori finish in
  N-1 steps, like ring, while four-port tori land within a step of the lower bound; oldest-first
  scanning missed both, see docs/algorithms.md.)
* All-gather sends chunk ``r`` down tree ``r`` in creation order; reduce-scatter sends the same
  edges reversed in time, so a child always reduces into its parent after all of its own
  children have reduced into it.
"""

from __future__ import annotations

import numpy as np

from ..schedule import GATHER, REDUCE, Schedule


def grow_trees_py(g):
    """Pure-Python twin of the kernel: the edges as arrays (step, parent, child, tree, route)."""
    n = g.nranks
    joined = [[-1] * n for _ in range(n)]  # joined[tree][rank]: step it joined (-1: not yet)
    members = [[r] for r in range(n)]
    for r in range(n):
        joined[r][r] = 0
    nbrs = [[int(v) for v in g.nbr[g.nbr_ptr[u]:g.nbr_ptr[u + 1]]] for u in range(n)]
    out = []
    done = 1 if n == 1 else 0
    t = 0
    while done < n:
        link_step = {}
        sent = [0] * n
        recv = [0] * n
        alive = [len(members[x]) < n for x in range(n)]
        added_in_step = 0
        while True:
            added = 0
            for k in range(n):
                tree = (t + k) % n
                if not alive[tree]:
                    continue
                edge = _find_edge_py(g, nbrs, t, joined[tree], members[tree], link_step, sent, recv)
                if edge is None:
                    alive[tree] = False
                    continue
                u, v, q, alt = edge
                for i in range(g.route_link_ptr[q], g.route_link_ptr[q + 1]):
                    link_step[int(g.route_links[i])] = t
                sent[u] += 1
                recv[v] += 1
                joined[tree][v] = t + 1
                members[tree].append(v)
                out.append((t, u, v, tree, alt))
                added += 1
                if len(members[tree]) == n:
                    done += 1
                    alive[tree] = False
            added_in_step += added
            if added == 0:
                break
        if added_in_step == 0:
            raise ValueError("the topology is not connected: MultiTree cannot span it")
        t += 1
    a = np.array(out, dtype=np.int32).reshape(-1, 5)
    return tuple(a[:, i].copy() for i in range(5))


def _find_edge_py(g, nbrs, t, joined, members, link_step, sent, recv):
    for u in reversed(members):
        if joined[u] > t or sent[u] >= g.ports[u]:  # joined in this step: not a parent yet
            continue
        for j, v in enumerate(nbrs[u]):
            if joined[v] >= 0 or recv[v] >= g.ports[v]:
                continue
            e = g.nbr_ptr[u] + j
            for alt, q in enumerate(range(g.edge_route_ptr[e], g.edge_route_ptr[e + 1])):
                ls = g.route_links[g.route_link_ptr[q]:g.route_link_ptr[q + 1]]
                if all(link_step.get(int(x), -1) != t for x in ls):
                    return u, v, q, alt
    return None


def schedule_from_trees(edges, topo_spec, nranks, meta, algorithm="multitree"):
    """The allreduce :class:`Schedule` of MultiTree edges (step, parent, child, tree, route):
    the gather phase sends chunk r down tree r in creation order, the reduce phase runs the same
    edges backwards in time."""
    step, parent, child, tree, route = edges
    if len(step) > 4096:  # the numba pass saves copies of arrays of millions of transfers
        from ._kernels import both_phases

        cols = both_phases(step, parent, child, tree, route)
    else:
        nsteps = int(step.max()) + 1 if len(step) else 0
        rev = slice(None, None, -1)
        cols = (np.repeat(np.array([REDUCE, GATHER], np.int8), len(step)),
                np.concatenate((nsteps - 1 - step[rev], step)),
                np.concatenate((child[rev], parent)),
                np.concatenate((parent[rev], child)),
                np.concatenate((tree[rev], tree)),
                np.concatenate((tree[rev] + 1, tree + 1)),
                np.concatenate((route[rev], route)))
    *cols, route = cols
    return Schedule(algorithm, topo_spec, nranks, nranks, np.arange(nranks), *cols,
                    route=route, meta=meta, copy=False)
