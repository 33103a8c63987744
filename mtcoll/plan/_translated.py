"""MultiTree on a 2-D torus by translation: one tree grown, every other tree its translate.

On ``torus:AxB`` (A, B >= 3, one port per link, no link options) tree ``r`` can be tree 0
shifted by ``r``'s coordinates. Tree 0 is grown a step at a time taking at most one edge per
direction (+x, -x, +y, -y), each to the non-member nearest the root; then in every step each
directed link ``w -> w+d`` is used by exactly one tree (the one that shifts tree 0's
``d``-edge of that step onto it), and each rank sends and receives at most one transfer per
direction: the whole schedule is free of contention because tree 0's steps are. The planner
holds O(N) edges instead of O(N^2); a rank's part is computed from them directly
(:meth:`Translated.rank_part`), and the whole schedule only when asked (:meth:`schedule`).

Steps per phase: 1,025 on torus:64x64 (bound 1,024) and 4,097 on torus:128x128 (bound
4,096), against 1,026 for the general grower on 64x64.
"""

from __future__ import annotations

import heapq

import numpy as np

from ..schedule import GATHER, REDUCE, RankSchedule
from ._multitree import schedule_from_trees

_DIRS = ((1, 0), (-1, 0), (0, 1), (0, -1))


def fits(topo):
    """Whether ``topo`` is a 2-D torus translation planning serves: sides of 3 or more, the
    default ports, no link speeds or hosts."""
    return (topo.kind == "torus" and len(topo.dims) == 2 and min(topo.dims) >= 3
            and "/" not in topo.spec and bool((np.asarray(topo.ports) == 4).all()))


class Translated:
    """Tree 0 of a translated MultiTree on ``torus:AxB``: its edges in creation order (``step``,
    ``parent``, ``child``, ``dir`` an index into +x, -x, +y, -y), from which every tree and
    every rank's part follow."""

    def __init__(self, dims, spec, meta=None):
        self.dims = (int(dims[0]), int(dims[1]))
        self.spec = spec
        self.nranks = self.dims[0] * self.dims[1]
        self.meta = dict(meta or {})
        self.step, self.parent, self.child, self.dir = _grow(*self.dims)
        self.nsteps = int(self.step[-1]) + 1 if len(self.step) else 0

    def _shift(self, v, r):
        # rank v moved by rank r's coordinates (r may be an array)
        a, b = self.dims
        return ((v // b + r // b) % a) * b + (v % b + r % b) % b

    def _unshift(self, v, r):
        a, b = self.dims
        return ((v // b - r // b) % a) * b + (v % b - r % b) % b

    def check(self):
        """The errors of tree 0 that would make the translated schedule wrong (empty: valid):
        tree 0 spans, each edge's parent joined before its step and its child once, the edges
        join neighbours along their direction, and no direction twice in a step (which is link
        exclusivity and the port budget of every translate)."""
        n, errs = self.nranks, []
        joined = np.full(n, -1, np.int64)
        joined[0] = 0
        a, b = self.dims
        for t, u, v, d in zip(self.step.tolist(), self.parent.tolist(), self.child.tolist(),
                              self.dir.tolist()):
            if not 0 <= joined[u] <= t:
                errs.append(f"step {t}: parent {u} of {v} is not in tree 0 yet")
            if joined[v] >= 0:
                errs.append(f"step {t}: {v} joins tree 0 twice")
            joined[v] = t + 1
            dx, dy = _DIRS[d]
            if v != ((u // b + dx) % a) * b + (u % b + dy) % b:
                errs.append(f"step {t}: {u} -> {v} is not a {_DIRS[d]} link")
        if (joined < 0).any():
            errs.append(f"tree 0 misses {int((joined < 0).sum())} ranks")
        key = self.step.astype(np.int64) * 4 + self.dir
        if len(np.unique(key)) != len(key):
            errs.append("a direction used twice in one step: translates share a link")
        return errs

    def edges(self):
        """The edges of all trees, (step, parent, child, tree, route), in step order (tree 0's
        edge order, then tree by tree): the form :func:`schedule_from_trees` takes."""
        n, m = self.nranks, len(self.step)
        r = np.arange(n, dtype=np.int32)
        par = self._shift(self.parent[:, None], r[None, :]).astype(np.int32).ravel()
        child = self._shift(self.child[:, None], r[None, :]).astype(np.int32).ravel()
        return (np.repeat(self.step.astype(np.int32), n), par, child, np.tile(r, m),
                np.zeros(m * n, np.int8))

    def schedule(self):
        """The whole :class:`~mtcoll.schedule.Schedule` (O(N^2) transfers)."""
        return schedule_from_trees(self.edges(), self.spec, self.nranks, self.meta)

    def summary(self):
        """The stream summary a part carries (as ``schedule._stream_summary`` of the whole):
        every transfer is one chunk wide, and the pair ``w -> w+d`` carries tree 0's
        d-edges in the gather phase and its (-d)-edges, reversed, in the reduce phase."""
        n = self.nranks
        per = np.bincount(self.dir, minlength=4).astype(np.int64)
        back = per[[1, 0, 3, 2]]  # the reduce phase runs each edge the other way
        rows = [(0, int((per + back).max()), 1), (1, int(back.max()), 1),
                (2, int(per.max()), 1)]
        m = n * (n - 1)
        return (np.array(rows, np.int64), np.array([(REDUCE, 1, m), (GATHER, 1, m)], np.int64))

    def rank_part(self, rank, summary=None):
        """Rank ``rank``'s :class:`~mtcoll.schedule.RankSchedule`, from tree 0 alone
        (O(T) time and memory): equal to ``RankSchedule.of(self.schedule(), rank)``."""
        n, m, w = self.nranks, len(self.step), int(rank)
        i = np.arange(m, dtype=np.int64)
        t_sends = self._unshift(w, self.parent)  # tree in which w is edge i's parent
        t_recvs = self._unshift(w, self.child)   # ... and its child
        last = self.nsteps - 1
        # position of each transfer in the whole schedule: reduce phase (edges reversed,
        # trees reversed), then gather phase
        gat_send = m * n + i * n + t_sends
        gat_recv = m * n + i * n + t_recvs
        red_send = m * n - 1 - (i * n + t_recvs)  # the child sends up
        red_recv = m * n - 1 - (i * n + t_sends)
        pos = np.concatenate((red_send, red_recv, gat_send, gat_recv))
        order = np.argsort(pos, kind="stable")
        peer_par = self._shift(self.parent, t_recvs)
        peer_child = self._shift(self.child, t_sends)
        phase = np.repeat(np.array([REDUCE, REDUCE, GATHER, GATHER], np.int8), m)
        step = np.concatenate((last - self.step, last - self.step, self.step, self.step))
        src = np.concatenate((np.full(m, w), peer_child, np.full(m, w), peer_par))
        dst = np.concatenate((peer_par, np.full(m, w), peer_child, np.full(m, w)))
        tree = np.concatenate((t_recvs, t_sends, t_sends, t_recvs))
        cols = dict(phase=phase, step=step, src=src, dst=dst, lo=tree, hi=tree + 1,
                    route=np.zeros(4 * m, np.int8))
        cols = {k: v[order] for k, v in cols.items()}
        return RankSchedule("multitree", self.spec, n, n, w, np.arange(n),
                            (self.nsteps, self.nsteps), cols, *(summary or self.summary()),
                            meta=self.meta)


def _grow(a, b):
    # tree 0, one edge per direction and step, each direction taking (in turn, from a
    # direction that rotates with the step) the candidate nearest the root, oldest first
    n = a * b

    def nb(v, d):
        return ((v // b + _DIRS[d][0]) % a) * b + (v % b + _DIRS[d][1]) % b

    def dist(v):
        x, y = divmod(v, b)
        return min(x, a - x) + min(y, b - y)

    member = np.zeros(n, bool)
    member[0] = True
    heaps = [[] for _ in _DIRS]
    seq = 0

    def offer(u):
        nonlocal seq
        for d in range(4):
            v = nb(u, d)
            if not member[v]:
                heapq.heappush(heaps[d], (dist(v), seq, v, u))
                seq += 1

    offer(0)
    out, t, size = [], 0, 1
    while size < n:
        taken = {}
        for k in range(4):
            d = (t + k) % 4
            h, held = heaps[d], []
            while h:
                item = heapq.heappop(h)
                if member[item[2]]:
                    continue  # joined since it was offered
                if item[2] in taken:
                    held.append(item)  # another direction's pick this step
                    continue
                taken[item[2]] = (item[3], d)
                break
            for item in held:
                heapq.heappush(h, item)
        if not taken:
            raise ValueError(f"torus:{a}x{b}: tree 0 cannot grow")
        for v, (u, d) in taken.items():
            member[v] = True
            out.append((t, u, v, d))
        size += len(taken)
        for v in taken:
            offer(v)
        t += 1
    e = np.array(out, np.int64).reshape(-1, 4)
    return e[:, 0], e[:, 1], e[:, 2], e[:, 3]
