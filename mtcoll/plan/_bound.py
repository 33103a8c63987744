"""A lower bound on the allreduce time of a network, from its links alone.

No algorithm that reduces at the ranks (none of mtcoll's, nor the MPI library's, reduces inside
the network) can beat it; every predicted or measured time is compared with it.

* **Cut.** For a set ``S`` of vertices holding some ranks but not all, the result every rank of
  ``S`` ends with depends on inputs outside ``S``: at least one value per element, ``nbytes``
  in all, must enter ``S`` over the links that point into it, and as many must leave. So the
  time is at least ``nbytes / (bandwidth into S) + the least latency of those links`` (the last
  byte still has to arrive), and the same outwards. ForestColl (Zhao et al., 2024) gives the
  optimum of tree packings as such a cut bound.
* **Volume.** Reduction at the ranks needs, per element, ``N - 1`` messages into the rank
  that ends with the reduced value (a tree over the N contributions) and ``N - 1`` to hand it
  to the others: ``2 (N - 1) nbytes`` received by ranks, over the ranks' own incoming links (and
  as many sent over their outgoing links).
* **Latency.** Every rank's result depends on every other rank's input: at least the latency
  of the slowest shortest route.

The cuts tried are every single rank, every host (its ranks and NIC), every switch with its
ranks, and every slab of a grid (a run of rows, columns, ... of the grid or of its host grid).
The true minimum over all cuts is at least as high, so the figure stays a lower bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Bound", "allreduce_bound"]


@dataclass(frozen=True)
class Bound:
    """``time`` (seconds) no allreduce of ``nbytes`` can beat on the network, and what sets it:
    ``kind`` ("cut", "volume" or "latency") and ``where`` (the cut, in words)."""

    time: float
    kind: str
    where: str
    nbytes: int

    def as_dict(self):
        return {"bound_s": self.time, "bound_kind": self.kind, "bound_where": self.where,
                "bound_bytes": self.nbytes}


def allreduce_bound(topo, nbytes):
    """The :class:`Bound` of an allreduce of ``nbytes`` bytes on ``topo`` (see the module
    docstring)."""
    nbytes = int(nbytes)
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    n = topo.nranks
    if n <= 1:
        return Bound(0.0, "none", "one rank", nbytes)
    best = (0.0, "latency", "")
    src, dst = topo.link_src, topo.link_dst
    bw, lat = topo.bandwidth, topo.latency
    for name, mask in _cuts(topo):
        held = int(mask[:n].sum())
        if held == 0 or held == n:
            continue
        for inward, word in ((True, "into"), (False, "out of")):
            cross = (~mask[src] & mask[dst]) if inward else (mask[src] & ~mask[dst])
            if not cross.any():
                continue
            t = nbytes / float(bw[cross].sum()) + float(lat[cross].min())
            if t > best[0]:
                best = (t, "cut", f"{word} {name}")
    rank_in = dst < n
    rank_out = src < n
    for sel, word in ((rank_in, "into"), (rank_out, "out of")):
        t = 2 * (n - 1) * nbytes / float(bw[sel].sum()) + float(lat[sel].min())
        if t > best[0]:
            best = (t, "volume", f"{word} the ranks")
    far = _latency_diameter(topo)
    if far > best[0]:
        best = (far, "latency", "the slowest shortest route")
    return Bound(best[0], best[1], best[2], nbytes)


def _cuts(topo):
    """(name, vertex mask) of the cuts tried."""
    n, nv = topo.nranks, topo.nvertices
    for r in range(n):
        m = np.zeros(nv, bool)
        m[r] = True
        yield f"rank {r}", m
    hosts = topo.host_of
    for h in sorted(set(hosts[hosts >= 0].tolist())):
        m = hosts == h
        if m[:n].sum() > 1:
            yield f"host {h}", m
    # switches with the ranks hanging off them (fattree leaves, bigraph switches)
    if topo.switched:
        for s in range(n, nv):
            m = np.zeros(nv, bool)
            m[s] = True
            ranks = topo.link_src[(topo.link_dst == s) & (topo.link_src < n)]
            if len(ranks):
                m[ranks] = True
                yield f"switch {s} and its ranks", m
    grid = _grid_coords(topo)
    if grid is not None:
        coords, dims, owner = grid
        for axis, d in enumerate(dims):
            for w in range(1, d):
                for a in range(d if topo.kind != "mesh" else d - w + 1):
                    sel = ((coords[:, axis] - a) % d) < w
                    m = sel[owner]
                    yield f"rows {a}..{(a + w - 1) % d} of axis {axis}", m


def _grid_coords(topo):
    """Per grid cell its coordinates, the grid's dims, and per vertex its cell (or None when
    the topology is no grid)."""
    if topo.kind in ("torus", "mesh", "ring"):
        dims = topo.dims
        cells = np.arange(topo.nranks)
        owner = cells
    elif topo.kind == "hosts" and topo.spec.split(":")[0] in ("torus", "mesh", "ring"):
        dims = topo.dims
        owner = topo.host_of.copy()
    else:
        return None
    strides = [math.prod(dims[i + 1:]) for i in range(len(dims))]
    ncell = math.prod(dims)
    coords = np.array([[(c // s) % d for s, d in zip(strides, dims)] for c in range(ncell)])
    return coords, dims, owner


def _latency_diameter(topo):
    n = topo.nranks
    if n > 256:  # every pair's route is n^2 lookups; take rank 0's, a lower bound still
        pairs = [(0, v) for v in range(1, n)]
    else:
        pairs = [(u, v) for u in range(n) for v in range(n) if u != v]
    lat = topo.latency
    return max(float(sum(lat[list(topo.routes(u, v)[0])])) for u, v in pairs)
