"""Baseline allreduce algorithms on the same schedule type as MultiTree.

Each baseline is first written as its textbook sequence of logical transfers (rounds), then
:func:`pack` places every transfer at the first step where its data is ready, every link of
its route is free and both ranks have a port left. A baseline whose rounds already fit the
network (ring on a Hamiltonian cycle, ring2d on a torus) keeps its rounds as steps; one whose
rounds contend (recursive halving on a torus, trees on a one-port fat tree) is spread over more
steps, which is what contention costs it on a real network. Every schedule therefore passes
the same validator.

* ``ring``: reduce-scatter then all-gather around the topology's Hamiltonian cycle (a snake on
  torus and mesh, so each hop is one link), rank order where there is none.
* ``ring2d``: on a 2-D torus or mesh, half the data goes forward and half backward; each half
  is reduce-scattered along the rows, then along the columns, gathered back along the columns,
  then the rows.
* ``dbtree``: two complementary binary trees (NCCL's double binary tree: a rank is an interior
  node of at most one), each reducing half the data to its root and broadcasting it back, the
  halves cut into pieces that pipeline down the tree.
* ``rhd``: Rabenseifner -- recursive-halving reduce-scatter and recursive-doubling all-gather
  over the largest power of two P <= N ranks; the other N - P ranks first hand their data to a
  partner and get the result back at the end.
"""

from __future__ import annotations

import math

import numpy as np

from ..schedule import GATHER, REDUCE, Schedule


class _Transfers:
    """Logical transfers collected in priority order: (phase, round, src, dst, lo, hi)."""

    def __init__(self):
        self.rows = []

    def add(self, phase, rnd, src, dst, lo, hi):
        if hi > lo:
            self.rows.append((phase, rnd, src, dst, lo, hi))


# -- ring ----------------------------------------------------------------------------------------

def _ring_rounds(tr, order, label, r0_reduce, r0_gather, chunk_of=None):
    """Ring reduce-scatter and all-gather over ``order`` (ranks around the ring); the rank at
    position k ends owning the piece labelled ``label[k]``, a chunk range (lo, hi)."""
    n = len(order)
    for t in range(n - 1):
        for i in range(n):
            lo, hi = label[(i - t - 1) % n]
            tr.add(REDUCE, r0_reduce + t, order[i], order[(i + 1) % n], lo, hi)
    for t in range(n - 1):
        for i in range(n):
            lo, hi = label[(i - t) % n]
            tr.add(GATHER, r0_gather + t, order[i], order[(i + 1) % n], lo, hi)


def ring(topo):
    n = topo.nranks
    order = topo.hamiltonian_cycle() or list(range(n))
    tr = _Transfers()
    _ring_rounds(tr, order, [(r, r + 1) for r in order], 0, 0)
    return tr, n, np.arange(n)


# -- ring2d --------------------------------------------------------------------------------------

def ring2d(topo):
    if topo.kind not in ("torus", "mesh") or len(topo.dims) != 2:
        raise ValueError(f"ring2d needs a 2-D torus or mesh, not {topo.spec!r}")
    a, b = topo.dims  # a rows of b ranks; rank = i * b + j
    n = a * b
    owner = np.empty(2 * n, np.int64)
    tr = _Transfers()
    for h, sign in ((0, 1), (1, -1)):
        base = h * n
        # chunk base + j*a + i: row-piece j (a chunks), sub-chunk i; owned by rank (i, j)
        for j in range(b):
            for i in range(a):
                owner[base + j * a + i] = i * b + j
        for i in range(a):  # stage 1: along each row, ring over row-pieces
            cols = [(sign * k) % b for k in range(b)]
            _ring_rs(tr, [i * b + j for j in cols], [(base + j * a, base + (j + 1) * a)
                                                      for j in cols], 0)
            _ring_ag(tr, [i * b + j for j in cols], [(base + j * a, base + (j + 1) * a)
                                                      for j in cols], a - 1)
        for j in range(b):  # stage 2: along each column, ring over the sub-chunks of piece j
            rows = [(sign * k) % a for k in range(a)]
            _ring_rs(tr, [i * b + j for i in rows], [(base + j * a + i, base + j * a + i + 1)
                                                      for i in rows], b - 1)
            _ring_ag(tr, [i * b + j for i in rows], [(base + j * a + i, base + j * a + i + 1)
                                                      for i in rows], 0)
    return tr, 2 * n, owner


def _ring_rs(tr, order, label, r0):
    n = len(order)
    for t in range(n - 1):
        for i in range(n):
            lo, hi = label[(i - t - 1) % n]
            tr.add(REDUCE, r0 + t, order[i], order[(i + 1) % n], lo, hi)


def _ring_ag(tr, order, label, r0):
    n = len(order)
    for t in range(n - 1):
        for i in range(n):
            lo, hi = label[(i - t) % n]
            tr.add(GATHER, r0 + t, order[i], order[(i + 1) % n], lo, hi)


# -- double binary tree --------------------------------------------------------------------------

def _inorder_tree(n):
    """Parent of each position in a balanced in-order binary tree over 0..n-1 (root: -1)."""
    parent = [-1] * n

    def build(lo, hi, up):
        if lo > hi:
            return
        mid = (lo + hi + 1) // 2
        parent[mid] = up
        build(lo, mid - 1, mid)
        build(mid + 1, hi, mid)

    build(0, n - 1, -1)
    return parent


def dbtree(topo, pieces=None):
    n = topo.nranks
    p0 = _inorder_tree(n)
    # tree 1: the same shape on ranks shifted by one, which turns tree 0's leaves (every other
    # position) into tree 1's interior nodes
    trees = [p0, [-1] * n]
    for pos, up in enumerate(p0):
        trees[1][(pos + 1) % n] = -1 if up < 0 else (up + 1) % n
    depth = [_depths(p) for p in trees]
    k = pieces or max(1, math.ceil(math.log2(max(n, 2))))
    tr = _Transfers()
    owner = np.empty(2 * k, np.int64)
    for x, par in enumerate(trees):
        root = par.index(-1)
        dmax = max(depth[x])
        for piece in range(k):
            c = x * k + piece
            owner[c] = root
            for r in range(n):  # reduce: deepest first, piece after piece
                if par[r] >= 0:
                    tr.add(REDUCE, piece + dmax - depth[x][r], r, par[r], c, c + 1)
            for r in range(n):  # broadcast: shallowest first
                if par[r] >= 0:
                    tr.add(GATHER, piece + depth[x][r] - 1, par[r], r, c, c + 1)
    return tr, 2 * k, owner


def _depths(parent):
    d = [0] * len(parent)
    for r in range(len(parent)):
        x, k = r, 0
        while parent[x] >= 0:
            x, k = parent[x], k + 1
        d[r] = k
    return d


# -- recursive halving / doubling ----------------------------------------------------------------

def rhd(topo):
    n = topo.nranks
    p = 1 << (n.bit_length() - 1)  # largest power of two <= n
    rem = n - p
    # ranks 0..2*rem-1 pair up: the even one hands everything to the odd one and sits out
    real = [2 * v + 1 if v < rem else v + rem for v in range(p)]
    tr = _Transfers()
    rnd = 0
    for r in range(0, 2 * rem, 2):
        tr.add(REDUCE, 0, r, r + 1, 0, p)
    if rem:
        rnd = 1
    held = {v: (0, p) for v in range(p)}
    d = p // 2
    while d >= 1:
        for v in range(p):
            lo, hi = held[v]
            mid = (lo + hi) // 2
            keep, give = ((lo, mid), (mid, hi)) if v & d == 0 else ((mid, hi), (lo, mid))
            tr.add(REDUCE, rnd, real[v], real[v ^ d], *give)
            held[v] = keep
        rnd += 1
        d //= 2
    rnd = 0
    d = 1
    while d < p:
        new = {}
        for v in range(p):
            lo, hi = held[v]
            tr.add(GATHER, rnd, real[v], real[v ^ d], lo, hi)
            plo, phi = held[v ^ d]
            new[v] = (min(lo, plo), max(hi, phi))
        held = new
        rnd += 1
        d *= 2
    for r in range(0, 2 * rem, 2):
        tr.add(GATHER, rnd, r + 1, r, 0, p)
    return tr, p, np.array(real, np.int64)


# -- packing -------------------------------------------------------------------------------------

def pack(topo, transfers, nchunks):
    """Steps for logical transfers: each at the first step where its data is ready, its route's
    links are free and both ranks are within their port budgets (greedy list scheduling in
    (phase, round) order; the first free route of the topology's alternatives). Returns
    (phase, step, src, dst, lo, hi, route) arrays."""
    rows = sorted(transfers.rows, key=lambda r: (r[0], r[1]))
    n = topo.nranks
    out = []
    for phase in (REDUCE, GATHER):
        ready = np.zeros((n, nchunks), np.int64)  # first step at which the data may leave
        used_links = {}
        sends = {}
        recvs = {}
        routes = {}
        for ph, _, s, d, lo, hi in rows:
            if ph != phase:
                continue
            if (s, d) not in routes:
                routes[s, d] = topo.routes(s, d)
            t = int(ready[s, lo:hi].max())
            while True:
                if sends.get((t, s), 0) < topo.ports[s] and recvs.get((t, d), 0) < topo.ports[d]:
                    alt = next((k for k, r in enumerate(routes[s, d])
                                if not any(used_links.get((t, x)) for x in r)), None)
                    if alt is not None:
                        break
                t += 1
            links = routes[s, d][alt]
            for x in links:
                used_links[t, x] = True
            sends[t, s] = sends.get((t, s), 0) + 1
            recvs[t, d] = recvs.get((t, d), 0) + 1
            # the receiver may pass the data on from the next step; a reduce receive also holds
            # back the receiver's own later sends of those chunks, which read after it
            ready[d, lo:hi] = np.maximum(ready[d, lo:hi], t + 1)
            out.append((phase, t, s, d, lo, hi, alt))
    a = np.array(out, np.int64).reshape(-1, 7)
    return tuple(a[:, i] for i in range(7))


BASELINES = {"ring": ring, "ring2d": ring2d, "dbtree": dbtree, "rhd": rhd}


def ring_in_rounds(topo):
    """Ring's (phase, step, src, dst, lo, hi, route) columns built directly, when its rounds
    are its steps: around the Hamiltonian cycle, the default routes of the cycle's pairs
    sharing no link. Then :func:`pack` would place round t at step t on route 0 (each rank
    sends and receives once a round, and receives in round t what it sends in t + 1), so this
    is its result without the per-transfer Python work, which on 4,096 ranks (33.5 M
    transfers) takes longer and more memory than the machine has. None where it does not
    apply."""
    n = topo.nranks
    order = topo.hamiltonian_cycle()
    if not order or n < 2:
        return None
    seen = set()
    for i in range(n):
        r = topo.routes(order[i], order[(i + 1) % n])[0]
        if not r or seen.intersection(r) or len(set(r)) != len(r):
            return None
        seen.update(r)
    order = np.asarray(order, np.int32)
    i = np.arange(n, dtype=np.int32)
    t = np.arange(n - 1, dtype=np.int32)
    src = np.tile(order, 2 * (n - 1))
    dst = np.tile(np.roll(order, -1), 2 * (n - 1))
    # round t: position i sends chunk order[i - t - 1] (reduce), order[i - t] (gather)
    lo_red = order[(i[None, :] - t[:, None] - 1) % n].ravel()
    lo_gat = order[(i[None, :] - t[:, None]) % n].ravel()
    lo = np.concatenate((lo_red, lo_gat))
    step = np.tile(np.repeat(t, n), 2)
    phase = np.repeat(np.array([REDUCE, GATHER], np.int8), n * (n - 1))
    return phase, step, src, dst, lo, lo + 1, np.zeros(len(lo), np.int8)


def plan_baseline(topo, algorithm):
    cols = ring_in_rounds(topo) if algorithm == "ring" else None
    if cols is not None:
        *cols, route = cols
        return Schedule(algorithm, topo.spec, topo.nranks, topo.nranks, np.arange(topo.nranks),
                        *cols, route=route, meta={"ports": ports_meta(topo)}, copy=False)
    tr, nchunks, owner = BASELINES[algorithm](topo)
    *cols, route = pack(topo, tr, nchunks)
    return Schedule(algorithm, topo.spec, topo.nranks, nchunks, owner, *cols, route=route,
                    meta={"ports": ports_meta(topo)})


def ports_meta(topo):
    p = topo.ports
    return int(p[0]) if (p == p[0]).all() else p.tolist()
