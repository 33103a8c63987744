"""The simulator's engines: a fluid max-min network replay, in numba and in pure Python.

Both engines replay the same input, a task graph flattened into arrays:

* ``size[i]`` bytes and ``delay[i]`` seconds per task (the per-message overhead plus the
  latency of every hop of its route), ``rptr``/``rlinks`` its route as a CSR list of link ids,
  ``cap[l]`` each link's bandwidth in bytes/s;
* ``dptr``/``dlist``: the tasks that wait for task ``i`` are ``dlist[dptr[i]:dptr[i+1]]``;
  ``ndeps[i]`` is how many tasks task ``i`` waits for;
* ``prio[i]``: the task's priority class, lower first (all equal: plain fair sharing);
* ``conn[i]``: the connection the task is sent on (a TCP stream between two ranks), or -1;
* ``burst[l]``: bytes link ``l`` lets through at once after it idled (a token bucket's depth).

A task is *released* when the last task it waits for completes. It then spends ``delay``
seconds in flight without using any bandwidth, becomes *active*, and drains its bytes at the
rate the fair share gives it; it *completes* when its last byte is through. A connection
carries one task at a time, in the order their delays elapsed (ties: lower task index first):
a task whose connection is busy waits in the connection's queue and becomes active when the
task before it completes. A link with a burst is a token bucket: its tokens (bytes, full at
the start) refill at its bandwidth while no task crosses it, up to ``burst[l]``; a task that
becomes active has the fewest tokens of its route's links (at most its size) delivered at
once, taken from each of those links, and drains only the rest. A task without
bytes or without a route completes when its delay has elapsed. The rates are max-min fair
(progressive filling): every active task crossing a link counts once on it; the link whose
remaining capacity split over its not-yet-fixed tasks is smallest fixes their rate at that
share; repeat. With priority classes, the classes are filled one after the other, lowest
first, each in what the classes before it left (a class may get nothing and wait). Rates
change only when a task becomes active or completes, so the replay is event-driven and exact
up to floating-point rounding.

The numba engine recomputes the shares only over the tasks connected, through shared links,
to the links an event touched (max-min fairness decomposes over such components); the Python
twin recomputes every active task at every event. The tests hold them to the same times.
"""

from __future__ import annotations

import heapq

import numpy as np
from numba import njit

_ACT, _FIN = 0, 1  # event kinds: a task's delay has elapsed; a task's last byte is through
# events closer than this (relative) are handled as one batch before the shares are recomputed
BATCH_RTOL = 1e-12


# -- dependencies --------------------------------------------------------------------------------

@njit(cache=True)
def dataflow_deps(phase, step, src, dst, lo, hi, nranks, nchunks):
    """Data dependencies of a schedule's transfers: transfer ``i`` waits for every transfer
    ``j`` that its sender received earlier (in (phase, step) order) and whose chunk range
    overlaps its own. Transfers must be sorted by (phase, step). Returns (before, after) edge
    arrays: ``after[e]`` waits for ``before[e]``."""
    t = len(src)
    nstep = 1
    for i in range(t):
        if step[i] + 1 > nstep:
            nstep = step[i] + 1
    key = np.empty(t, np.int64)
    for i in range(t):
        key[i] = np.int64(phase[i]) * nstep + step[i]
    # receives per (rank, chunk), in transfer order, which is (phase, step) order
    ptr = np.zeros(nranks * nchunks + 1, np.int64)
    for j in range(t):
        for c in range(lo[j], hi[j]):
            ptr[dst[j] * nchunks + c + 1] += 1
    for k in range(nranks * nchunks):
        ptr[k + 1] += ptr[k]
    fill = ptr[:-1].copy()
    lst = np.empty(ptr[-1], np.int64)
    for j in range(t):
        for c in range(lo[j], hi[j]):
            b = dst[j] * nchunks + c
            lst[fill[b]] = j
            fill[b] += 1
    stamp = np.full(t, -1, np.int64)
    nedge = 0
    for rep in range(2):  # count, then fill
        if rep == 1:
            before = np.empty(nedge, np.int64)
            after = np.empty(nedge, np.int64)
            stamp[:] = -1
            nedge = 0
        for i in range(t):
            s = src[i]
            for c in range(lo[i], hi[i]):
                b = s * nchunks + c
                for q in range(ptr[b], ptr[b + 1]):
                    j = lst[q]
                    if key[j] >= key[i]:
                        break
                    if stamp[j] != i:
                        stamp[j] = i
                        if rep == 1:
                            before[nedge] = j
                            after[nedge] = i
                        nedge += 1
    return before, after


# -- the numba engine ----------------------------------------------------------------------------

@njit(cache=True, inline="always")
def _less(ta, ka, tb, kb):
    return ta < tb or (ta == tb and ka < kb)


@njit(cache=True)
def _push(ht, hk, hv, n, t, k, v):
    i = n
    while i > 0:
        p = (i - 1) >> 1
        if not _less(t, k, ht[p], hk[p]):
            break
        ht[i] = ht[p]
        hk[i] = hk[p]
        hv[i] = hv[p]
        i = p
    ht[i] = t
    hk[i] = k
    hv[i] = v
    return n + 1


@njit(cache=True)
def _pop(ht, hk, hv, n):
    t, k, v = ht[0], hk[0], hv[0]
    n -= 1
    if n > 0:
        lt, lk, lv = ht[n], hk[n], hv[n]
        i = 0
        while True:
            c = 2 * i + 1
            if c >= n:
                break
            if c + 1 < n and _less(ht[c + 1], hk[c + 1], ht[c], hk[c]):
                c += 1
            if not _less(ht[c], hk[c], lt, lk):
                break
            ht[i] = ht[c]
            hk[i] = hk[c]
            hv[i] = hv[c]
            i = c
        ht[i] = lt
        hk[i] = lk
        hv[i] = lv
    return t, k, v, n


@njit(cache=True)
def replay(size, delay, rptr, rlinks, cap, dptr, dlist, ndeps0, prio, conn, burst):
    """Replay a task graph (see the module docstring). Returns per task its release, start
    (active) and completion times and whether its rate was ever below its route's narrowest
    link (it shared a link)."""
    n = len(size)
    # per connection: the task it carries (-1: idle) and its queue, a linked list over tasks
    nconn = 1
    for i in range(n):
        if conn[i] + 1 > nconn:
            nconn = conn[i] + 1
    cbusy = np.full(nconn, -1, np.int64)
    qhead = np.full(nconn, -1, np.int64)
    qtail = np.full(nconn, -1, np.int64)
    qnext = np.full(n, -1, np.int64)
    nl = len(cap)
    npos = len(rlinks)
    tokens = burst.copy()
    idle_from = np.zeros(nl)  # since when the link carries nothing
    ndeps = ndeps0.copy()
    release = np.zeros(n)
    start = np.full(n, np.nan)
    finish = np.full(n, np.nan)
    slowed = np.zeros(n, np.bool_)
    rate = np.zeros(n)
    rem = np.zeros(n)
    tlast = np.zeros(n)
    ver = np.zeros(n, np.int64)
    state = np.zeros(n, np.int8)  # 0 waiting, 1 in flight (delay), 2 active, 3 complete
    solo = np.full(n, np.inf)  # rate alone on its route
    owner = np.empty(npos, np.int64)
    for i in range(n):
        for p in range(rptr[i], rptr[i + 1]):
            owner[p] = i
            if cap[rlinks[p]] < solo[i]:
                solo[i] = cap[rlinks[p]]
    # active tasks per link: doubly linked lists over route positions
    nxt = np.full(npos, -1, np.int64)
    prv = np.full(npos, -1, np.int64)
    head = np.full(nl, -1, np.int64)
    cnt = np.zeros(nl, np.int64)
    # event heap: time, key = task * 2 + kind, version
    hcap = 2 * n + 16
    ht = np.empty(hcap)
    hk = np.empty(hcap, np.int64)
    hv = np.empty(hcap, np.int64)
    hn = 0
    for i in range(n):
        if ndeps[i] == 0:
            state[i] = 1
            hn = _push(ht, hk, hv, hn, delay[i], i * 2 + _ACT, 0)
    # per batch / per component scratch
    dirty = np.empty(nl, np.int64)
    ndirty = 0
    lstamp = np.zeros(nl, np.int64)
    fstamp = np.zeros(n, np.int64)
    fz = np.zeros(n, np.int64)
    epoch = 0
    clinks = np.empty(nl, np.int64)
    cflows = np.empty(n, np.int64)
    lrem = np.zeros(nl)
    lnun = np.zeros(nl, np.int64)
    newrate = np.zeros(n)
    ndone = 0
    while hn > 0:
        t0 = ht[0]
        window = t0 + BATCH_RTOL * max(t0, 1e-9)
        epoch += 1
        ndirty = 0
        t = t0
        while hn > 0 and ht[0] <= window:
            te, key, v, hn = _pop(ht, hk, hv, hn)
            t = te
            f = key >> 1
            kind = key & 1
            done_now = False
            activate = False
            free = 0.0
            if kind == _FIN:
                if state[f] != 2 or v != ver[f]:
                    continue  # superseded by a rate change
                for p in range(rptr[f], rptr[f + 1]):
                    l = rlinks[p]
                    if prv[p] >= 0:
                        nxt[prv[p]] = nxt[p]
                    else:
                        head[l] = nxt[p]
                    if nxt[p] >= 0:
                        prv[nxt[p]] = prv[p]
                    cnt[l] -= 1
                    if cnt[l] == 0:
                        idle_from[l] = te
                    if lstamp[l] != epoch:
                        lstamp[l] = epoch
                        dirty[ndirty] = l
                        ndirty += 1
                done_now = True
            else:
                c = conn[f]
                if size[f] <= 0.0 or rptr[f] == rptr[f + 1]:
                    start[f] = te
                    done_now = True
                elif c >= 0 and cbusy[c] >= 0 and cbusy[c] != f:
                    # its connection carries an earlier task: wait behind it
                    if qtail[c] >= 0:
                        qnext[qtail[c]] = f
                    else:
                        qhead[c] = f
                    qtail[c] = f
                else:
                    if c >= 0:
                        cbusy[c] = f
                    start[f] = te
                    # the links' buckets deliver what they hold of it at once
                    free = size[f]
                    for p in range(rptr[f], rptr[f + 1]):
                        l = rlinks[p]
                        if cnt[l] == 0 and burst[l] > 0.0:
                            tokens[l] = min(burst[l],
                                            tokens[l] + (te - idle_from[l]) * cap[l])
                            idle_from[l] = te
                        if tokens[l] < free:
                            free = tokens[l]
                    if free > 0.0:
                        for p in range(rptr[f], rptr[f + 1]):
                            tokens[rlinks[p]] -= free
                    if free >= size[f]:
                        done_now = True
                    else:
                        activate = True
                if activate:
                    state[f] = 2
                    rem[f] = size[f] - free
                    rate[f] = 0.0
                    tlast[f] = te
                    for p in range(rptr[f], rptr[f + 1]):
                        l = rlinks[p]
                        prv[p] = -1
                        nxt[p] = head[l]
                        if head[l] >= 0:
                            prv[head[l]] = p
                        head[l] = p
                        cnt[l] += 1
                        if lstamp[l] != epoch:
                            lstamp[l] = epoch
                            dirty[ndirty] = l
                            ndirty += 1
            if done_now:
                state[f] = 3
                finish[f] = te
                ndone += 1
                c = conn[f]
                if c >= 0 and cbusy[c] == f:
                    # the connection's next task goes now (an event in this same batch)
                    g = qhead[c]
                    cbusy[c] = g
                    if g >= 0:
                        qhead[c] = qnext[g]
                        if qhead[c] < 0:
                            qtail[c] = -1
                        if hn == len(ht):
                            ht = np.concatenate((ht, np.empty(len(ht))))
                            hk = np.concatenate((hk, np.empty(len(hk), np.int64)))
                            hv = np.concatenate((hv, np.empty(len(hv), np.int64)))
                        hn = _push(ht, hk, hv, hn, te, g * 2 + _ACT, 0)
                for q in range(dptr[f], dptr[f + 1]):
                    d = dlist[q]
                    ndeps[d] -= 1
                    if te > release[d]:
                        release[d] = te
                    if ndeps[d] == 0:
                        state[d] = 1
                        if hn == len(ht):
                            ht = np.concatenate((ht, np.empty(len(ht))))
                            hk = np.concatenate((hk, np.empty(len(hk), np.int64)))
                            hv = np.concatenate((hv, np.empty(len(hv), np.int64)))
                        hn = _push(ht, hk, hv, hn, release[d] + delay[d], d * 2 + _ACT, 0)
        if ndirty == 0:
            continue
        # the component of active tasks reachable from the dirty links through shared links
        epoch += 1
        ncl = 0
        ncf = 0
        for k in range(ndirty):
            l = dirty[k]
            lstamp[l] = epoch
            clinks[ncl] = l
            ncl += 1
        k = 0
        while k < ncl:
            p = head[clinks[k]]
            k += 1
            while p >= 0:
                f = owner[p]
                if fstamp[f] != epoch:
                    fstamp[f] = epoch
                    cflows[ncf] = f
                    ncf += 1
                    for q in range(rptr[f], rptr[f + 1]):
                        l2 = rlinks[q]
                        if lstamp[l2] != epoch:
                            lstamp[l2] = epoch
                            clinks[ncl] = l2
                            ncl += 1
                p = nxt[p]
        # progressive filling over the component, one priority class at a time
        for k in range(ncl):
            lrem[clinks[k]] = cap[clinks[k]]
        order = np.argsort(prio[cflows[:ncf]], kind="mergesort")
        g0 = 0
        while g0 < ncf:
            level = prio[cflows[order[g0]]]
            g1 = g0
            while g1 < ncf and prio[cflows[order[g1]]] == level:
                g1 += 1
            for k in range(ncl):
                lnun[clinks[k]] = 0
            for k in range(g0, g1):
                f = cflows[order[k]]
                for q in range(rptr[f], rptr[f + 1]):
                    lnun[rlinks[q]] += 1
            left = g1 - g0
            while left > 0:
                best = np.inf
                bl = -1
                for k in range(ncl):
                    l = clinks[k]
                    if lnun[l] > 0:
                        s = max(lrem[l], 0.0) / lnun[l]
                        if s < best:
                            best = s
                            bl = l
                p = head[bl]
                while p >= 0:
                    f = owner[p]
                    if fz[f] != epoch and prio[f] == level:
                        fz[f] = epoch
                        newrate[f] = best
                        left -= 1
                        for q in range(rptr[f], rptr[f + 1]):
                            l2 = rlinks[q]
                            lrem[l2] -= best
                            lnun[l2] -= 1
                    p = nxt[p]
            g0 = g1
        for k in range(ncf):
            f = cflows[k]
            r = newrate[f]
            if r < solo[f] * (1.0 - 1e-9):
                slowed[f] = True
            if r != rate[f]:
                rem[f] -= rate[f] * (t - tlast[f])
                if rem[f] < 0.0:
                    rem[f] = 0.0
                tlast[f] = t
                rate[f] = r
                ver[f] += 1
                if r > 0.0:  # a task starved by higher classes waits for a rate change
                    if hn == len(ht):
                        ht = np.concatenate((ht, np.empty(len(ht))))
                        hk = np.concatenate((hk, np.empty(len(hk), np.int64)))
                        hv = np.concatenate((hv, np.empty(len(hv), np.int64)))
                    hn = _push(ht, hk, hv, hn, t + rem[f] / r, f * 2 + _FIN, ver[f])
    return release, start, finish, slowed, ndone


# -- the pure-Python twin ------------------------------------------------------------------------

def replay_py(size, delay, rptr, rlinks, cap, dptr, dlist, ndeps0, prio, conn, burst):
    """The same replay as :func:`replay`, written plainly: every active task is re-shared at
    every event. For tests and small graphs."""
    n = len(size)
    routes = [list(rlinks[rptr[i]:rptr[i + 1]]) for i in range(n)]
    ndeps = [int(x) for x in ndeps0]
    release = [0.0] * n
    start = [float("nan")] * n
    finish = [float("nan")] * n
    slowed = [False] * n
    solo = [min((cap[l] for l in r), default=float("inf")) for r in routes]
    active = {}  # task -> [remaining bytes, rate, time of last update]
    ver = [0] * n
    sending = {}  # connection -> the task it carries
    queue = {}  # connection -> the tasks waiting for it, in order
    tokens = [float(b) for b in burst]
    idle_from = [0.0] * len(cap)
    users = [0] * len(cap)  # active tasks per link
    heap = [(float(delay[i]), i * 2 + _ACT, 0) for i in range(n) if ndeps[i] == 0]
    heapq.heapify(heap)
    ndone = 0
    while heap:
        t0 = heap[0][0]
        window = t0 + BATCH_RTOL * max(t0, 1e-9)
        changed = False
        t = t0
        while heap and heap[0][0] <= window:
            te, key, v = heapq.heappop(heap)
            t = te
            f, kind = key >> 1, key & 1
            if kind == _FIN:
                if f not in active or v != ver[f]:
                    continue
                del active[f]
                changed = True
                for l in routes[f]:
                    users[l] -= 1
                    if users[l] == 0:
                        idle_from[l] = te
            else:
                c = int(conn[f])
                start_now = size[f] > 0 and routes[f]
                if start_now and c >= 0 and sending.get(c, f) != f:
                    queue.setdefault(c, []).append(f)
                    continue
                start[f] = te
                if start_now:
                    if c >= 0:
                        sending[c] = f
                    free = float(size[f])
                    for l in routes[f]:
                        if users[l] == 0 and burst[l] > 0:
                            tokens[l] = min(float(burst[l]),
                                            tokens[l] + (te - idle_from[l]) * float(cap[l]))
                            idle_from[l] = te
                        free = min(free, tokens[l])
                    if free > 0:
                        for l in routes[f]:
                            tokens[l] -= free
                    if free < size[f]:
                        active[f] = [float(size[f]) - free, 0.0, te]
                        for l in routes[f]:
                            users[l] += 1
                        changed = True
                        continue
            finish[f] = te
            ndone += 1
            c = int(conn[f])
            if c >= 0 and sending.get(c) == f:
                del sending[c]
                if queue.get(c):
                    g = queue[c].pop(0)
                    sending[c] = g
                    heapq.heappush(heap, (te, g * 2 + _ACT, 0))
            for d in dlist[dptr[f]:dptr[f + 1]]:
                ndeps[d] -= 1
                release[d] = max(release[d], te)
                if ndeps[d] == 0:
                    heapq.heappush(heap, (release[d] + float(delay[d]), int(d) * 2 + _ACT, 0))
        if not changed:
            continue
        rates = _maxmin_py({f: routes[f] for f in active}, cap, prio)
        for f, r in rates.items():
            a = active[f]
            if r < solo[f] * (1.0 - 1e-9):
                slowed[f] = True
            if r != a[1]:
                a[0] = max(a[0] - a[1] * (t - a[2]), 0.0)
                a[1], a[2] = r, t
                ver[f] += 1
                if r > 0:
                    heapq.heappush(heap, (t + a[0] / r, f * 2 + _FIN, ver[f]))
    return (np.array(release), np.array(start), np.array(finish), np.array(slowed, bool), ndone)


def _maxmin_py(routes, cap, prio):
    """Max-min fair rates of tasks crossing links (progressive filling), priority class by
    priority class, lowest first."""
    left = {l: float(cap[l]) for r in routes.values() for l in r}
    rates = {}
    for level in sorted({int(prio[f]) for f in routes}):
        group = {f: r for f, r in routes.items() if prio[f] == level}
        users = {}
        for f, r in group.items():
            for l in r:
                users.setdefault(l, []).append(f)
        count = {l: len(u) for l, u in users.items()}
        fixed = 0
        while fixed < len(group):
            share, bl = min((max(left[l], 0.0) / count[l], l) for l in users if count[l] > 0)
            for f in users[bl]:
                if f not in rates:
                    rates[f] = share
                    fixed += 1
                    for l in group[f]:
                        left[l] -= share
                        count[l] -= 1
    return rates
