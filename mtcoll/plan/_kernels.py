"""The numba kernels of the planner: MultiTree growth, step packing and the fast validator.

Each kernel has a pure-Python twin (``_multitree.grow_trees_py``, ``_pack.pack_py``,
``_validate.check_py``) that the tests compare it with. Compiled on first use and cached on
disk (``cache=True``); planning at 64 ranks happens on one rank (see ``mtcoll.comm``), so the
cost is paid once per machine.
"""

from __future__ import annotations

import types

import numpy as np
from numba import njit, prange

from . import _timed_grow
from ._codes import (E_EARLY_GATHER, E_EARLY_REDUCE, E_LINK, E_MISSING, E_OWNER, E_RECV_PORTS,
                     E_SEND_PORTS, NKINDS)



@njit(cache=True)
def grow_trees(n, ports, nbr_ptr, nbr, edge_route_ptr, route_link_ptr, route_links, nlinks):
    """MultiTree growth; semantics in ``mtcoll.plan._multitree``. Returns the edges
    (step, parent, child, tree, route) and 0, or empty arrays and 1 if the graph is not
    connected."""
    m = n * (n - 1)
    o_step = np.empty(m, np.int32)
    o_par = np.empty(m, np.int32)
    o_child = np.empty(m, np.int32)
    o_tree = np.empty(m, np.int32)
    o_alt = np.empty(m, np.int8)
    if n == 1:
        return o_step, o_par, o_child, o_tree, o_alt, 0
    # Per tree, two small structures (a turn lands on a different tree each time, so what a
    # turn reads must be small to stay in cache):
    # * inb[tree]: the members, one bit per rank (n/8 bytes);
    # * mem[tree, :mlen]: the members that may still have a neighbour outside the tree, in
    #   join order, packed as rank << 16 | step joined; -1 where one turned out to have none
    #   (found lazily, by a walk).
    nwords = (n + 63) // 64
    inb = np.zeros((n, nwords), np.uint64)
    mem = np.empty((n, n), np.int32)
    mlen = np.ones(n, np.int32)
    dead = np.zeros(n, np.int32)
    size = np.ones(n, np.int32)
    for r in range(n):
        inb[r, r >> 6] |= np.uint64(1) << np.uint64(r & 63)
        mem[r, 0] = r << 16
    # where each tree's walk resumes: members after it found nothing earlier in this step, and
    # resources only shrink within a step
    cursor = np.empty(n, np.int32)
    link_step = np.full(nlinks, -1, np.int32)
    sent = np.zeros(n, np.int32)
    recv = np.zeros(n, np.int32)
    alive = np.zeros(n, np.bool_)
    k = 0
    done = 0
    t = 0
    while done < n:
        sent[:] = 0
        recv[:] = 0
        # ranks with a send port left: none, and every tree's walk would only confirm it
        senders = 0
        for x in range(n):
            alive[x] = size[x] < n
            cursor[x] = mlen[x] - 1
            senders += ports[x] > 0
        added_in_step = 0
        while senders > 0:
            added = 0
            for kk in range(n):
                tree = (t + kk) % n
                if not alive[tree]:
                    continue
                if senders == 0:
                    break
                x, fu, fv, fq, falt = _walk(tree, t, cursor[tree], mem, dead, inb, sent, ports,
                                            recv, nbr_ptr, nbr, edge_route_ptr, route_link_ptr,
                                            route_links, link_step)
                if fu < 0:
                    alive[tree] = False
                    if 2 * dead[tree] > mlen[tree] and mlen[tree] > 32:
                        _compact(mem, mlen, dead, tree, -1)
                    continue
                cursor[tree] = x
                for i in range(route_link_ptr[fq], route_link_ptr[fq + 1]):
                    link_step[route_links[i]] = t
                sent[fu] += 1
                senders -= sent[fu] == ports[fu]
                recv[fv] += 1
                inb[tree, fv >> 6] |= np.uint64(1) << np.uint64(fv & 63)
                size[tree] += 1
                o_step[k] = t
                o_par[k] = fu
                o_child[k] = fv
                o_tree[k] = tree
                o_alt[k] = falt
                k += 1
                added += 1
                for e in range(nbr_ptr[fv], nbr_ptr[fv + 1]):
                    if not _has(inb, tree, nbr[e]):
                        x = mlen[tree]
                        mem[tree, x] = (fv << 16) | (t + 1)
                        mlen[tree] = x + 1
                        break
                if 2 * dead[tree] > mlen[tree] and mlen[tree] > 32:
                    cursor[tree] = _compact(mem, mlen, dead, tree, cursor[tree])
                if size[tree] == n:
                    done += 1
                    alive[tree] = False
            added_in_step += added
            if added == 0:
                break
        if added_in_step == 0:
            return o_step[:0], o_par[:0], o_child[:0], o_tree[:0], o_alt[:0], 1
        t += 1
    return o_step, o_par, o_child, o_tree, o_alt, 0


@njit(cache=True, inline="always")
def _has(inb, tree, v):
    return (inb[tree, v >> 6] >> np.uint64(v & 63)) & np.uint64(1)


@njit(cache=True, inline="always")
def _walk(tree, t, x, mem, dead, inb, sent, ports, recv, nbr_ptr, nbr, edge_route_ptr,
          route_link_ptr, route_links, link_step):
    """The first edge of ``tree`` in step ``t``, walking its open members newest first from
    slot ``x``: (slot, parent, child, route id, route index), parent -1 if none. Members found
    with every neighbour in the tree are struck from the list on the way (checked for every
    member passed, not only those that can send: otherwise closed members pile up)."""
    while x >= 0:
        e = mem[tree, x]
        if e >= 0 and (e & 0xFFFF) <= t:
            u = e >> 16
            can_send = sent[u] < ports[u]
            outside = False
            for i in range(nbr_ptr[u], nbr_ptr[u + 1]):
                v = nbr[i]
                if _has(inb, tree, v):
                    continue
                outside = True
                if not can_send:
                    break  # still open; nothing to send with
                if recv[v] >= ports[v]:
                    continue
                for q in range(edge_route_ptr[i], edge_route_ptr[i + 1]):
                    free = True
                    for j in range(route_link_ptr[q], route_link_ptr[q + 1]):
                        if link_step[route_links[j]] == t:
                            free = False
                            break
                    if free:
                        return x, u, v, q, q - edge_route_ptr[i]
            if not outside:
                mem[tree, x] = -1
                dead[tree] += 1
        x -= 1
    return x, -1, -1, -1, 0


@njit(cache=True)
def _compact(mem, mlen, dead, tree, cur):
    """Drop the struck members of ``tree``'s open list, keeping order; returns the cursor's new
    slot (the last live slot at or before it)."""
    y = 0
    newcur = -1
    for x in range(mlen[tree]):
        e = mem[tree, x]
        if e >= 0:
            mem[tree, y] = e
            y += 1
        if x == cur:
            newcur = y - 1
    mlen[tree] = y
    dead[tree] = 0
    return newcur


@njit(cache=True)
def both_phases(step, parent, child, tree, alt):
    """The transfers of a MultiTree allreduce from its edges (in creation order), in one pass:
    the reduce phase (edges reversed in time, child to parent) then the gather phase, as
    (phase, step, src, dst, lo, hi, route) in (phase, step) order."""
    m = len(step)
    nsteps = 0
    for i in range(m):
        nsteps = max(nsteps, step[i] + 1)
    phase = np.empty(2 * m, np.int8)
    st = np.empty(2 * m, np.int32)
    src = np.empty(2 * m, np.int32)
    dst = np.empty(2 * m, np.int32)
    lo = np.empty(2 * m, np.int32)
    hi = np.empty(2 * m, np.int32)
    route = np.empty(2 * m, np.int8)
    for i in range(m):
        j = m - 1 - i  # reduce phase: latest edge first
        phase[i] = 0
        st[i] = nsteps - 1 - step[j]
        src[i] = child[j]
        dst[i] = parent[j]
        lo[i] = tree[j]
        hi[i] = tree[j] + 1
        route[i] = alt[j]
        k = m + i
        phase[k] = 1
        st[k] = step[i]
        src[k] = parent[i]
        dst[k] = child[i]
        lo[k] = tree[i]
        hi[k] = tree[i] + 1
        route[k] = alt[i]
    return phase, st, src, dst, lo, hi, route


# -- the validator's kernels --------------------------------------------------------------------

# (the error kinds, shared with the Python twin in _validate.py, come from _codes.py)


@njit(cache=True)
def _record(errs, nerr, counts, kind, a, b, c, d):
    counts[kind] += 1
    if nerr < errs.shape[0]:
        errs[nerr, 0] = kind
        errs[nerr, 1] = a
        errs[nerr, 2] = b
        errs[nerr, 3] = c
        errs[nerr, 4] = d
        return nerr + 1
    return nerr


@njit(cache=True)
def check(nranks, nchunks, owner, phase, step, src, dst, lo, hi, q, route_link_ptr, route_links,
          nlinks, ports, weights, max_errors):
    """Fast validator; semantics and error records as in ``_validate.check_py``.

    Returns (errors: int64[k, 5] rows (kind, a, b, c, d), counts per kind)."""
    errs = np.zeros((max_errors, 5), np.int64)
    counts = np.zeros(NKINDS, np.int64)
    nerr = 0
    m = len(step)
    # (a) links and (b) ports: transfers come sorted by (phase, step)
    link_key = np.full(nlinks, -1, np.int64)
    link_tr = np.zeros(nlinks, np.int64)
    send_key = np.full(nranks, -1, np.int64)
    send_cnt = np.zeros(nranks, np.int64)
    recv_key = np.full(nranks, -1, np.int64)
    recv_cnt = np.zeros(nranks, np.int64)
    big = np.int64(1) << 40
    for i in range(m):
        key = phase[i] * big + step[i]
        r = q[i]
        for j in range(route_link_ptr[r], route_link_ptr[r + 1]):
            ln = route_links[j]
            if link_key[ln] == key:
                nerr = _record(errs, nerr, counts, E_LINK, i, ln, link_tr[ln], 0)
            link_key[ln] = key
            link_tr[ln] = i
        s = src[i]
        if send_key[s] != key:
            send_key[s] = key
            send_cnt[s] = 0
        send_cnt[s] += 1
        if send_cnt[s] == ports[s] + 1:
            nerr = _record(errs, nerr, counts, E_SEND_PORTS, i, s, ports[s], 0)
        d = dst[i]
        if recv_key[d] != key:
            recv_key[d] = key
            recv_cnt[d] = 0
        recv_cnt[d] += 1
        if recv_cnt[d] == ports[d] + 1:
            nerr = _record(errs, nerr, counts, E_RECV_PORTS, i, d, ports[d], 0)
    # (c) replay, chunk by chunk (chunks are independent): group the (transfer, chunk) pairs
    # by chunk, keeping (phase, step) order, with what the replay reads of each transfer
    start = np.zeros(nchunks + 1, np.int64)
    for i in range(m):
        for c in range(lo[i], hi[i]):
            start[c + 1] += 1
    for c in range(nchunks):
        start[c + 1] += start[c]
    fill = start[:-1].copy()
    p_key = np.empty(start[nchunks], np.int32)  # phase * 2^24 + step
    p_src = np.empty(start[nchunks], np.int32)
    p_dst = np.empty(start[nchunks], np.int32)
    for i in range(m):
        kk = phase[i] * (1 << 24) + step[i]
        for c in range(lo[i], hi[i]):
            f = fill[c]
            p_key[f] = kk
            p_src[f] = src[i]
            p_dst[f] = dst[i]
            fill[c] = f + 1
    total = np.uint64(0)
    for r in range(nranks):
        total += weights[r]
    cerr = np.zeros((nchunks, NKINDS), np.int64)
    cfirst = np.full((nchunks, NKINDS, 4), -1, np.int64)
    _replay(nranks, nchunks, owner, start, p_key, p_src, p_dst, weights, total, cerr, cfirst)
    for kind in (E_EARLY_REDUCE, E_OWNER, E_EARLY_GATHER, E_MISSING):
        for c in range(nchunks):
            if cerr[c, kind]:
                counts[kind] += cerr[c, kind] - 1
                nerr = _record(errs, nerr, counts, kind, cfirst[c, kind, 0], cfirst[c, kind, 1],
                               cfirst[c, kind, 2], cfirst[c, kind, 3])
    return errs[:nerr], counts


@njit(cache=True, parallel=True)
def _replay(nranks, nchunks, owner, start, p_key, p_src, p_dst, weights, total, cerr, cfirst):
    """Per chunk: fingerprints (contribution count, wrapping sum of random weights) through the
    reduce phase, then who holds the reduced chunk from which step through the gather phase.
    Errors: counted per chunk, the first of each kind kept as (a, b, c, d) for the message,
    with -1 - key (the phase * 2^24 + step of the transfer) where a transfer index would go."""
    never = np.int64(1) << 40
    for c in prange(nchunks):
        cnt = np.ones(nranks, np.int64)
        hsh = weights.copy()
        first_send = np.full(nranks, -1, np.int64)
        tc = np.empty(nranks, np.int64)
        th = np.empty(nranks, np.uint64)
        k = start[c]
        end = start[c + 1]
        while k < end and p_key[k] < (1 << 24):  # reduce phase, one step at a time
            e = k
            while e < end and p_key[e] == p_key[k]:
                e += 1
            if e - k > tc.shape[0]:
                tc = np.empty(e - k, np.int64)
                th = np.empty(e - k, np.uint64)
            for x in range(k, e):  # read as at the end of the previous step...
                tc[x - k] = cnt[p_src[x]]
                th[x - k] = hsh[p_src[x]]
                if first_send[p_src[x]] < 0:
                    first_send[p_src[x]] = p_key[x]
            for x in range(k, e):  # ...then deliver
                d = p_dst[x]
                if first_send[d] >= 0:
                    _note(cerr, cfirst, c, E_EARLY_REDUCE, -1 - p_key[x], d, c, first_send[d])
                cnt[d] += tc[x - k]
                hsh[d] += th[x - k]
            k = e
        o = owner[c]
        if cnt[o] != nranks or hsh[o] != total:
            _note(cerr, cfirst, c, E_OWNER, c, o, cnt[o], nranks)
        have = first_send  # reuse: step from which a rank holds the reduced chunk
        have[:] = never
        have[o] = -1
        while k < end:
            st = p_key[k] - (1 << 24)
            if have[p_src[k]] >= st:
                _note(cerr, cfirst, c, E_EARLY_GATHER, -1 - p_key[k], p_src[k], c, 0)
            if have[p_dst[k]] > st:
                have[p_dst[k]] = st
            k += 1
        for r in range(nranks):
            if have[r] == never:
                _note(cerr, cfirst, c, E_MISSING, r, c, 0, 0)


@njit(cache=True)
def _note(cerr, cfirst, c, kind, a, b, cc, d):
    if cerr[c, kind] == 0:
        cfirst[c, kind, 0] = a
        cfirst[c, kind, 1] = b
        cfirst[c, kind, 2] = cc
        cfirst[c, kind, 3] = d
    cerr[c, kind] += 1


# -- the timed planner --------------------------------------------------------------------------

def _timed_kernel():
    # the Python twin's functions, each compiled, calling each other compiled: a copy of the
    # module's globals in which the helpers are their compiled selves
    env = dict(_timed_grow.__dict__)
    for name in ("earliest", "take", "push", "pop"):
        env[name] = njit(cache=True)(getattr(_timed_grow, name))
    env["propose"] = njit(cache=True)(types.FunctionType(_timed_grow.propose.__code__, env,
                                                         "propose"))
    grow = types.FunctionType(_timed_grow.grow_timed_py.__code__, env, "grow_timed_py")
    return njit(cache=True)(grow)


#: the timed planner's growth (``mtcoll.plan._timed_grow.grow_timed_py``), compiled
grow_timed = _timed_kernel()
