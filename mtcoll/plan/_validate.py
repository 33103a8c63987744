"""The schedule validator: does a schedule compute an allreduce, without contention, on a topology?

Checks, in the order reported:

(a) **links** -- no directed link carries two transfers in one step of a phase (following each
    transfer's route, so every link of a switch path counts);
(b) **ports** -- no rank sends, or receives, more than its port budget in one step;
(c) **symbolic correctness** -- replaying the schedule on contributions: every chunk ends fully
    reduced at its owner with every rank's contribution exactly once; no rank forwards a partial
    before it has received all it will receive of that chunk; no rank forwards a reduced chunk
    before it holds it; every rank ends with every reduced chunk;
(d) **step bound** -- each phase costs at least the topology's lower bound
    ``max(diameter, ceil((N-1)/ports))`` (``Schedule.step_cost``: steps weighted by their largest
    transfer in units of 1/N of the buffer); for a buffer cut into C != N chunks, the same bound
    counted in chunks (:func:`cost_bound`). A schedule below it is miscounted, not fast.

The fast path (numba, :func:`mtcoll.plan._kernels.check`) replays (c) on fingerprints: per
(rank, chunk) the number of contributions and the wrapping 64-bit sum of a random weight per
rank. The pure-Python twin (:func:`check_py`) replays exact sets and names the missing or
doubled ranks. Both return the same error kinds; the tests hold them to each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..topology import parse
from ._graph import route_ids

# the error kinds, shared with the numba kernel (imported only when it runs, so that planning and
# validating small schedules never loads numba)
from ._codes import (E_EARLY_GATHER, E_EARLY_REDUCE, E_LINK, E_MISSING, E_OWNER, E_RECV_PORTS,
                     E_SEND_PORTS)

MAX_ERRORS = 20
_PHASE = ("reduce", "gather")


@dataclass
class Report:
    """What :func:`validate` found. ``valid`` is True when ``errors`` is empty."""

    algorithm: str
    topology: str
    nranks: int
    steps: tuple
    step_cost: tuple
    lower_bound: int
    errors: list = field(default_factory=list)
    counts: dict = field(default_factory=dict)

    @property
    def valid(self):
        return not self.errors

    def __str__(self):
        if self.valid:
            return (f"valid: {self.algorithm} on {self.topology}, steps {self.steps}, "
                    f"lower bound {self.lower_bound}")
        shown = "\n  ".join(self.errors)
        total = sum(self.counts.values())
        more = f"\n  ... {total - len(self.errors)} more" if total > len(self.errors) else ""
        return f"invalid {self.algorithm} schedule on {self.topology}:\n  {shown}{more}"


def validate(schedule, topology, engine="auto", max_errors=MAX_ERRORS):
    """Check ``schedule`` against ``topology`` (a spec string or Topology).

    Parameters
    ----------
    engine : {"auto", "numba", "python"}
        ``python`` replays exact sets (slow; names missing ranks); ``numba`` uses
        fingerprints; ``auto`` picks python up to 64 ranks (quicker there than compiling the
        kernels on a fresh machine), numba above.

    Returns
    -------
    Report
    """
    topo = parse(topology, nranks=schedule.nranks)
    if engine == "auto":
        engine = "python" if schedule.nranks <= 64 else "numba"
    if engine not in ("numba", "python"):
        raise ValueError(f"engine must be 'auto', 'numba' or 'python', got {engine!r}")
    q, rl_ptr, rl = route_ids(schedule, topo)
    fn = check_py if engine == "python" else _check_numba
    errs, counts = fn(schedule, topo, q, rl_ptr, rl, max_errors)
    lb = cost_bound(schedule, topo)
    cost = schedule.step_cost()
    for p, c in enumerate(cost):
        if c < lb - 1e-9 and schedule.nranks > 1:
            counts["bound"] = counts.get("bound", 0) + 1
            errs.append(f"step bound: the {_PHASE[p]} phase costs {c:g} steps, below the lower "
                        f"bound {lb} of {topo.spec} with these ports")
    return Report(schedule.algorithm, topo.spec, schedule.nranks, schedule.steps, cost, lb,
                  errs[:max_errors], counts)


def cost_bound(schedule, topo):
    """The least :meth:`Schedule.step_cost` of a phase on ``topo``: the topology's
    ``max(diameter, ceil((N-1)/ports))`` for one chunk per rank; for ``C`` chunks, a step costs
    at least ``N/C`` and rank ``r`` must move the ``C - own_r`` chunks it does not own, at most
    its ports at a time, so ``max(diameter, max_r ceil((C - own_r)/ports_r)) * N/C``."""
    n, c = schedule.nranks, schedule.nchunks
    if c == n or n <= 1:
        return topo.lower_bound()
    own = np.bincount(schedule.owner, minlength=n)
    per = int(np.max(-((own - c) // topo.ports)))  # ceil((c - own) / ports)
    return max(topo.diameter, per) * n / c


def _check_numba(s, topo, q, rl_ptr, rl, max_errors):
    weights = np.random.default_rng(0x5eed).integers(1, 2**63, size=s.nranks, dtype=np.uint64)
    weights |= np.uint64(1)
    from ._kernels import check

    rows, counts = check(s.nranks, s.nchunks, s.owner, s.phase, s.step, s.src, s.dst, s.lo,
                           s.hi, q, rl_ptr, rl, topo.nlinks, topo.ports, weights, max_errors)
    msgs = [_message(s, topo, *_locate(s, row)) for row in rows.tolist()]
    return msgs, {_KIND[k]: int(c) for k, c in enumerate(counts) if c}


def _locate(s, row):
    """The replay names a transfer by -1 - (phase * 2^24 + step) and its rank and chunk; find
    the transfer index the message wants."""
    kind, a, b, c, d = row
    if kind in (E_EARLY_REDUCE, E_EARLY_GATHER) and a < 0:
        key = -1 - a
        ph, st = key >> 24, key & ((1 << 24) - 1)
        side = s.dst if kind == E_EARLY_REDUCE else s.src
        hit = np.flatnonzero((s.phase == ph) & (s.step == st) & (side == b)
                             & (s.lo <= c) & (s.hi > c))
        a = int(hit[0])
    if kind == E_EARLY_REDUCE and d >= 0:
        d = d & ((1 << 24) - 1)
    return kind, a, b, c, d


_KIND = {E_LINK: "link", E_SEND_PORTS: "ports", E_RECV_PORTS: "ports",
         E_EARLY_REDUCE: "early", E_EARLY_GATHER: "early", E_OWNER: "contribution",
         E_MISSING: "missing"}


def _describe(s, i):
    c = f"chunk {s.lo[i]}" if s.hi[i] - s.lo[i] == 1 else f"chunks {s.lo[i]}..{s.hi[i] - 1}"
    return (f"{s.src[i]}->{s.dst[i]} ({c}) at step {s.step[i]} of the "
            f"{_PHASE[s.phase[i]]} phase")


def _message(s, topo, kind, a, b, c, d, detail=""):
    if kind == E_LINK:
        return (f"link used twice in one step: link {topo.link_src[b]}->{topo.link_dst[b]} "
                f"carries {_describe(s, c)} and {_describe(s, a)}")
    if kind == E_SEND_PORTS:
        return (f"port budget exceeded: rank {b} sends more than {c} transfers at step "
                f"{s.step[a]} of the {_PHASE[s.phase[a]]} phase ({_describe(s, a)})")
    if kind == E_RECV_PORTS:
        return (f"port budget exceeded: rank {b} receives more than {c} transfers at step "
                f"{s.step[a]} of the {_PHASE[s.phase[a]]} phase ({_describe(s, a)})")
    if kind == E_EARLY_REDUCE:
        return (f"sent before its data is complete: rank {b} sends its partial chunk {c} at "
                f"step {d} of the reduce phase but receives more of it afterwards "
                f"({_describe(s, a)})")
    if kind == E_EARLY_GATHER:
        return (f"sent before its data is complete: rank {b} forwards chunk {c} before it "
                f"holds the reduced chunk ({_describe(s, a)})")
    if kind == E_OWNER:
        return (f"missing or doubled contribution: chunk {a} at its owner rank {b} has {c} "
                f"contributions, expected each of {d} ranks exactly once{detail}")
    if kind == E_MISSING:
        return f"missing chunk: rank {a} never receives reduced chunk {b}"
    raise AssertionError(kind)


def check_py(s, topo, q, rl_ptr, rl, max_errors):
    """Pure-Python twin of :func:`mtcoll.plan._kernels.check`, replaying exact sets."""
    rows = []
    counts = {}

    def record(kind, a, b, c, d, detail=""):
        counts[_KIND[kind]] = counts.get(_KIND[kind], 0) + 1
        if len(rows) < max_errors:
            rows.append(_message(s, topo, kind, a, b, c, d, detail))

    n, m = s.nranks, s.ntransfers
    link_seen, send_n, recv_n = {}, {}, {}
    for i in range(m):
        key = (int(s.phase[i]), int(s.step[i]))
        for ln in rl[rl_ptr[q[i]]:rl_ptr[q[i] + 1]].tolist():
            if (key, ln) in link_seen:
                record(E_LINK, i, ln, link_seen[(key, ln)], 0)
            link_seen[(key, ln)] = i
        sr, dr = int(s.src[i]), int(s.dst[i])
        send_n[key, sr] = send_n.get((key, sr), 0) + 1
        if send_n[key, sr] == topo.ports[sr] + 1:
            record(E_SEND_PORTS, i, sr, int(topo.ports[sr]), 0)
        recv_n[key, dr] = recv_n.get((key, dr), 0) + 1
        if recv_n[key, dr] == topo.ports[dr] + 1:
            record(E_RECV_PORTS, i, dr, int(topo.ports[dr]), 0)
    # reduce phase on sets of contributing ranks (ints as bit sets), counted with multiplicity
    held = [[{r: 1} for _ in range(s.nchunks)] for r in range(n)]
    first_send = {}
    red = [i for i in range(m) if s.phase[i] == 0]
    gat = [i for i in range(m) if s.phase[i] == 1]
    by_step = {}
    for i in red:
        by_step.setdefault(int(s.step[i]), []).append(i)
    for t in sorted(by_step):
        moving = []
        for i in by_step[t]:
            for c in range(s.lo[i], s.hi[i]):
                moving.append((i, c, dict(held[s.src[i]][c])))
                first_send.setdefault((int(s.src[i]), c), t)
        for i, c, contrib in moving:
            d = int(s.dst[i])
            if (d, c) in first_send:
                record(E_EARLY_REDUCE, i, d, c, first_send[d, c])
            for r, k in contrib.items():
                held[d][c][r] = held[d][c].get(r, 0) + k
    for c in range(s.nchunks):
        o = int(s.owner[c])
        h = held[o][c]
        if len(h) != n or any(k != 1 for k in h.values()):
            missing = sorted(set(range(n)) - set(h))
            doubled = sorted(r for r, k in h.items() if k > 1)
            detail = "".join([f"; missing ranks {missing}" if missing else "",
                              f"; doubled ranks {doubled}" if doubled else ""])
            record(E_OWNER, c, o, sum(h.values()), n, detail)
    have = {(int(s.owner[c]), c): -1 for c in range(s.nchunks)}
    for i in gat:
        for c in range(s.lo[i], s.hi[i]):
            if have.get((int(s.src[i]), c), 1 << 40) >= s.step[i]:
                record(E_EARLY_GATHER, i, int(s.src[i]), c, 0)
            key = (int(s.dst[i]), c)
            have[key] = min(have.get(key, 1 << 40), int(s.step[i]))
    for r in range(n):
        for c in range(s.nchunks):
            if (r, c) not in have:
                record(E_MISSING, r, c, 0, 0)
    return rows, counts
