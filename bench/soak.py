"""Soak: many nonblocking allreduces in flight at once, every result checked.

    mpiexec -n 8 python bench/soak.py [--calls 10000] [--inflight 8] [--seed S]
                                      [--max-bytes 4194304] [--json FILE]
                                      [--fresh-buffers] [--trim]

One :class:`mtcoll.Comm` per algorithm (multitree, ring, ring2d, dbtree, rhd where they fit the
size, auto, native) over the same MPI communicator, so calls of different algorithms are in
flight together. Call ``i`` draws its algorithm, dtype, op, size (log-uniform from 0 B to
``--max-bytes``, plus exact zeros and tiny counts) and in-place flag from a generator seeded
with ``(seed, i)``: every rank draws the same call. Each rank's input is a slice of a pool of
small integer-valued numbers at a rank-dependent offset, so every rank can compute the whole
expected result itself, and any reduction order gives the same values (up to the sign of a
zero in complex products): a result is right only if it equals that exactly, element for
element (``np.array_equal``). Up to ``--inflight`` calls per rank are outstanding; which one a
rank completes next is drawn per rank, so ranks complete them in different orders.

User point-to-point traffic runs on the same MPI communicator meanwhile (Isend/Irecv to the
ring neighbours with tags that equal mtcoll's own tag numbers, half of the receives with
``MPI.ANY_TAG``); every user message must arrive intact, and no message may be left over on the
communicator or on any Comm's duplicate at the end.

The harness reuses its own large buffers, as an application (a training loop with its gradient
buffers) would: ``--inflight`` output buffers of ``--max-bytes`` each, one for the expected
result and one for the comparison, all allocated and written before the first call
(:class:`_Buffers`). A call takes an output buffer and uses a prefix of it; the buffer goes
back only after the call has completed (``Wait``, or ``Test`` returned True) *and* its result
has been checked. Before an out-of-place call the prefix is filled with a poison byte, so an
element mtcoll fails to write cannot pass for a stale result. The expected result is reduced
into its buffer with the ufuncs' ``out=`` (no temporary of the message's size), and the
result is compared with it as ``np.array_equal`` does, into the reused bool array.
``--fresh-buffers`` restores the earlier harness: a new output array per call
(``np.empty_like`` or a copy of the input), the expected result built with a copy, compared
with ``np.array_equal``, the data pools made on first use. Either way every result is checked.

Every 1000 calls (a *block*) the rank drains its calls and records its resident memory
(``/proc/self/statm``), the bytes glibc's malloc has handed out and not freed and the free
bytes it keeps (``mallinfo2()``, which reads and changes nothing), the Comms' pending
requests, the running executions (``mtcoll.execute._state.active``), mtcoll's scratch pool
(``mtcoll.execute.scratch_cached()``) and the executors' cached layouts. With ``--trim`` it
then also calls ``malloc_trim(0)`` and reads the resident memory again; that trim changes what the later blocks' plain readings see, so it
is off by default. Rank 0 prints a summary; ``--json`` writes it. ``tests/tools/test_soak.py`` runs
:func:`soak` with a few hundred calls at every size in the suite.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time

import numpy as np
from mpi4py import MPI

import mtcoll
import mtcoll.execute as _execute

ALGORITHMS = ("multitree", "ring", "ring2d", "dbtree", "rhd", "auto", "native")
DTYPES = ("float32", "float64", "int32", "int64", "complex64", "complex128")
OPS = ("SUM", "PROD", "MAX", "MIN", "BAND", "BOR", "BXOR")
_UFUNC = {"SUM": np.add, "PROD": np.multiply, "MAX": np.maximum, "MIN": np.minimum,
          "BAND": np.bitwise_and, "BOR": np.bitwise_or, "BXOR": np.bitwise_xor}
_MAX_STEP = 97  # rank r reads the pool from offset + r * step, step in 1.._MAX_STEP
USER_TAGS = (0, 1, 5, 63, 64, 65, 127, 4096)  # include tag values mtcoll itself uses


def _ops_for(dtype):
    kind = np.dtype(dtype).kind
    if kind == "c":
        return ("SUM", "PROD")
    if kind == "f":
        return ("SUM", "PROD", "MAX", "MIN")
    return OPS


def _opclass(op):
    return {"SUM": "sum", "PROD": "prod", "MAX": "order", "MIN": "order"}.get(op, "bits")


class _Pools:
    """Per (dtype, op class): an array of numbers whose reduction over any <= 16 ranks is exact
    in any order (small integers for SUM, +-1 and a few 2s for PROD, integers below 2**20 for
    MIN/MAX, random bits for the bitwise ops). The pools are read-only: sendbufs may be views."""

    def __init__(self, seed, length):
        self.seed, self.length, self.pools = seed, length, {}

    def make_all(self):
        """Make every pool now (instead of on first use)."""
        for dtype in DTYPES:
            for op in _ops_for(dtype):
                self.get(dtype, op)

    def get(self, dtype, op):
        key = (dtype, _opclass(op))
        pool = self.pools.get(key)
        if pool is None:
            dt = np.dtype(dtype)
            rng = np.random.default_rng([self.seed, dt.num, "sum prod order bits".split().index(
                key[1])])
            n = self.length
            cls = key[1]
            if cls == "sum":
                pool = rng.integers(-8, 9, n).astype(dt)
                if dt.kind == "c":
                    pool = (pool + 1j * rng.integers(-8, 9, n)).astype(dt)
            elif cls == "prod":
                vals = [1, -1, 1, -1, 1, 2, -1, 1]
                if dt.kind == "c":
                    vals += [1j, -1j]
                pool = rng.choice(np.array(vals, dtype=dt), n)
            elif cls == "order":
                pool = rng.integers(-(2**20), 2**20, n).astype(dt)
            else:
                info = np.iinfo(dt)
                pool = rng.integers(info.min, info.max, n, dtype=dt, endpoint=True)
            pool.setflags(write=False)
            self.pools[key] = pool
        return pool


def draw_call(seed, i, algorithms, max_bytes):
    """The parameters of call ``i``: the same on every rank."""
    rng = np.random.default_rng([seed, i, 1])
    algorithm = algorithms[int(rng.integers(len(algorithms)))]
    dtype = DTYPES[int(rng.integers(len(DTYPES)))]
    ops = _ops_for(dtype)
    op = ops[int(rng.integers(len(ops)))]
    itemsize = np.dtype(dtype).itemsize
    u = rng.random()
    if u < 0.03:
        count = 0
    elif u < 0.08:
        count = int(rng.integers(1, 9))
    else:  # log-uniform bytes in [1, max_bytes]
        nbytes = math.exp(rng.uniform(0.0, math.log(max_bytes)))
        count = int(nbytes) // itemsize
    in_place = bool(rng.integers(2))
    step = int(rng.integers(1, _MAX_STEP + 1))
    offset = int(rng.integers(0, 4096))
    user = rng.random() < 0.25  # exchange user messages alongside this call
    return dict(algorithm=algorithm, dtype=dtype, op=op, count=count, in_place=in_place,
                step=step, offset=offset, user=user)


def _slice(pool, call, rank):
    a = call["offset"] + rank * call["step"]
    return pool[a:a + call["count"]]


def expected(pools, call, size, out=None):
    """The allreduce of every rank's input over ``size`` ranks; computed into ``out`` (an array
    of the call's dtype and count) if given, else into a new array."""
    pool = pools.get(call["dtype"], call["op"])
    if out is None:
        out = _slice(pool, call, 0).copy()
    else:
        np.copyto(out, _slice(pool, call, 0))
    ufunc = _UFUNC[call["op"]]
    for r in range(1, size):
        ufunc(out, _slice(pool, call, r), out=out)
    return out


def equal_into(a, b, scratch):
    """``np.array_equal(a, b)`` for 1-D arrays of one dtype and size, with the element-wise
    comparison written into ``scratch`` (a bool array at least that long) instead of a new
    array. Equal values, as ``np.array_equal`` (0.0 equals -0.0: complex PROD gives zeros of
    either sign depending on the order of the products)."""
    if a.shape != b.shape:
        return False
    eq = scratch[:a.size]
    np.equal(a, b, out=eq)
    return bool(eq.all())


POISON = 0xA5  # the byte an out-of-place call's output buffer is filled with first


class _Buffers:
    """The soak's reused buffers (the default): ``n`` output buffers of ``nbytes`` bytes, one
    for the expected result and one bool array for the comparison, allocated and written (so
    resident) when made. :meth:`take` hands out an output buffer, :meth:`give` takes it back:
    the caller gives it back only after the call that wrote it has completed and its result
    has been checked, so no buffer serves two calls at once."""

    def __init__(self, n, nbytes):
        self.n, self.nbytes = n, nbytes
        self.free = [np.full(nbytes, POISON, dtype=np.uint8) for _ in range(n)]
        self.expect = np.full(nbytes, POISON, dtype=np.uint8)
        self.same = np.ones(nbytes // 4 + 1, dtype=bool)
        self.total_bytes = (n + 1) * nbytes + self.same.nbytes

    def take(self, dtype, count):
        """An output buffer's prefix as ``count`` elements of ``dtype``, and the buffer."""
        if not self.free:
            raise RuntimeError(f"soak: more than {self.n} output buffers in use")
        dt = np.dtype(dtype)
        if count * dt.itemsize > self.nbytes:
            raise ValueError(f"soak: {count} x {dt} exceeds the {self.nbytes}-byte buffers")
        raw = self.free.pop()
        return raw[:count * dt.itemsize].view(dt), raw

    def give(self, raw):
        if any(b is raw for b in self.free) or len(self.free) >= self.n:
            raise RuntimeError("soak: an output buffer given back twice")
        self.free.append(raw)

    def expected_into(self, dtype, count):
        dt = np.dtype(dtype)
        return self.expect[:count * dt.itemsize].view(dt)


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trimmed_rss_bytes():
    """Resident bytes after glibc's ``malloc_trim(0)`` has returned the heap's free pages to
    the system (a diagnostic: what is resident because it is in use, not because the allocator
    keeps it), or None without glibc. Called after the plain reading of a block, with
    ``--trim`` only: it lowers what the later blocks' plain readings see."""
    try:
        import ctypes
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim(0)
    return _rss_bytes()


def _mallinfo():
    """(bytes glibc's malloc has handed out and not freed, free bytes it keeps in its heaps)
    from ``mallinfo2()`` over all arenas; it reads and changes nothing. (None, None) without
    glibc 2.33+. Python's small objects (pymalloc's arenas) are not in it."""
    try:
        import ctypes

        class Info(ctypes.Structure):
            _fields_ = [(f, ctypes.c_size_t) for f in (
                "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                "uordblks", "fordblks", "keepcost")]

        fn = ctypes.CDLL("libc.so.6").mallinfo2
        fn.restype = Info
    except (OSError, AttributeError):
        return None, None
    m = fn()
    return m.uordblks + m.hblkhd, m.fordblks


def _caches(comms):
    scratch = layouts = pending = 0
    for c in comms.values():
        # requests not complete; complete ones wait in the deque until the Comm's next call
        # drops them (bounded by the calls in flight), holding no buffers (checked below)
        pending += sum(not r._complete or r._keep is not None for r in c._requests)
        for ex in c._executors.values():
            layouts += len(ex._layouts)
    scratch = _execute.scratch_cached()  # one pool for the process
    return pending, scratch, layouts


def _user_payload(i, src, tag, n=6):
    return np.array([i, src, tag] + [(i * 1000003 + src * 7919 + tag + k) % 2**31
                                     for k in range(n)], dtype=np.int64)


def make_comms(comm, algorithms=ALGORITHMS):
    """One Comm per algorithm that fits the communicator (planned up front, so that planning
    stays out of the timed loop); the names of those that do not fit."""
    comms, skipped = {}, []
    for name in algorithms:
        c = mtcoll.Comm(comm, algorithm=name)
        if name == "auto":
            # the first use of a schedule is collective (rank 0 plans and broadcasts): plan
            # whatever auto may choose now, out of the timed loop
            for a in ALGORITHMS[:5]:
                try:
                    c.schedule(a)
                except ValueError:
                    pass
        elif name != "native":
            try:
                c.schedule()
            except ValueError:
                c.Free()
                skipped.append(name)
                continue
        comms[name] = c
    return comms, skipped


def soak(comm, calls=10000, inflight=8, seed=0, max_bytes=4 * 2**20, block=1000,
         algorithms=ALGORITHMS, user_traffic=True, progress=None, complete="wait",
         buffers="pooled", trim=False):
    """Run the soak on ``comm`` (collective); returns the summary dict (the same keys on every
    rank; the figures are totals or maxima over the ranks).

    ``progress``, if given, is called on rank 0 with each block's record. ``complete``:
    ``"wait"`` calls the request's ``Wait``; ``"test"`` tests it and every other call in flight
    until it is done. ``buffers``: ``"pooled"`` reuses the harness's output and expected-result
    buffers (:class:`_Buffers`), ``"fresh"`` allocates them per call (the earlier harness).
    ``trim``: also read the resident memory after ``malloc_trim(0)`` at each block's end.
    """
    if buffers not in ("pooled", "fresh"):
        raise ValueError(f"buffers must be 'pooled' or 'fresh', not {buffers!r}")
    run = _SoakRank(comm, inflight, seed, max_bytes, algorithms, complete, buffers)
    t0 = time.perf_counter()
    run.tblock = t0
    for i in range(calls):
        run.start(i, user_traffic)
        if len(run.window) >= inflight:
            run.complete_one()
        if len(run.user_reqs) >= 16:
            run.finish_user()
        if (i + 1) % block == 0 or i + 1 == calls:
            run.end_block(i + 1, trim, progress)
    run.drain()
    wall = time.perf_counter() - t0
    leftovers = run.close()
    return run.summary(calls, inflight, buffers, trim, wall, leftovers)


class _SoakRank:
    """One rank's part of a soak: its Comms, data and buffers, the calls and user messages in
    flight, and its tallies; each method is a step of :func:`soak`'s loop or its close."""

    def __init__(self, comm, inflight, seed, max_bytes, algorithms, complete, buffers):
        self.comm, self.seed, self.max_bytes, self.complete = comm, seed, max_bytes, complete
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.comms, self.skipped = make_comms(comm, algorithms)
        self.names = tuple(self.comms)
        # mtcoll talks on a duplicate: congruent with the user's communicator, never the same one
        self.dups_ok = all(MPI.Comm.Compare(c._dup, comm) == MPI.CONGRUENT
                           for c in self.comms.values())
        # the longest slice: max_bytes of the smallest dtype (4 bytes), at the largest offset
        self.pools = _Pools(seed, max_bytes // 4 + 4096 + self.size * _MAX_STEP)
        self.bufs = None
        if buffers == "pooled":
            self.pools.make_all()  # the input data, made before the first call
            self.bufs = _Buffers(inflight, max_bytes)
        # per rank: which call to complete next
        self.pick = np.random.default_rng([seed, self.rank, 2])
        self.window = []  # (index, call, request, recvbuf, its pooled buffer or None)
        # recv and send alternate in user_reqs
        self.user_reqs, self.user_checks, self.user_keep = [], [], []
        self.stats = dict(wrong=0, checked=0, bytes=0, user_sent=0, user_received=0,
                          user_bad=0)
        self.by_algorithm = {n: 0 for n in self.names}
        self.by_op = {n: 0 for n in OPS}
        self.first_wrong = []
        self.blocks = []
        self.tblock = None

    def start(self, i, user_traffic):
        """Start call ``i`` (and, when it draws them, its user messages)."""
        call = draw_call(self.seed, i, self.names, self.max_bytes)
        pool = self.pools.get(call["dtype"], call["op"])
        mine = _slice(pool, call, self.rank)
        c = self.comms[call["algorithm"]]
        op = getattr(MPI, call["op"])
        raw = None
        if self.bufs is None:
            out = mine.copy() if call["in_place"] else np.empty_like(mine)
        else:
            out, raw = self.bufs.take(call["dtype"], call["count"])
            if call["in_place"]:
                np.copyto(out, mine)
            else:
                out.view(np.uint8).fill(POISON)
        if call["in_place"]:
            req = c.Iallreduce(MPI.IN_PLACE, out, op)
        else:
            req = c.Iallreduce(mine, out, op)  # a read-only view of the pool is a fine sendbuf
        self.window.append((i, call, req, out, raw))
        self.by_algorithm[call["algorithm"]] += 1
        self.by_op[call["op"]] += 1
        self.stats["bytes"] += out.nbytes
        if user_traffic and call["user"] and self.size > 1:
            self._user_exchange(i)

    def _user_exchange(self, i):
        """Post call ``i``'s user messages: a receive from the left neighbour, a send right."""
        rank, size, comm = self.rank, self.size, self.comm
        tag = USER_TAGS[i % len(USER_TAGS)]
        dst, src = (rank + 1) % size, (rank - 1) % size
        any_tag = bool(i % 2)
        buf = np.empty(9, dtype=np.int64)
        self.user_reqs.append(comm.Irecv(buf, src, MPI.ANY_TAG if any_tag else tag))
        self.user_checks.append((buf, i, src, tag, any_tag))
        payload = _user_payload(i, rank, tag)
        self.user_keep.append(payload)  # alive until the send completes
        self.user_reqs.append(comm.Isend(payload, dst, tag))
        self.stats["user_sent"] += 1

    def complete_one(self):
        """With the window full, complete one call of it."""
        # each rank completes its calls in its own order: oldest, newest, or any
        window, pick = self.window, self.pick
        u = pick.random()
        j = 0 if u < 0.5 else (len(window) - 1 if u < 0.7 else int(pick.integers(len(window))))
        self.finish(window.pop(j))
        if pick.random() < 0.2:
            for e in window:
                e[2].Test()

    def finish(self, entry):
        """Complete a call taken out of the window and check its result."""
        i, call, req, out, raw = entry
        if self.complete == "wait":
            req.Wait()
        else:
            while not req.Test():
                for e in self.window:
                    e[2].Test()
                time.sleep(20e-6)
        # the call is complete: check its result, then (pooled) give its buffer back
        bufs, stats = self.bufs, self.stats
        if bufs is None:
            want = expected(self.pools, call, self.size)
            right = np.array_equal(out, want)
        else:
            want = expected(self.pools, call, self.size,
                            bufs.expected_into(call["dtype"], call["count"]))
            right = equal_into(out, want, bufs.same)
        stats["checked"] += 1
        if not right:
            stats["wrong"] += 1
            if len(self.first_wrong) < 5:
                bad = np.flatnonzero(out != want)
                self.first_wrong.append(dict(call=i, rank=self.rank, nbad=int(bad.size),
                                             first=int(bad[0]) if bad.size else -1,
                                             **{k: call[k] for k in ("algorithm", "dtype", "op",
                                                                     "count", "in_place")}))
        if raw is not None:
            bufs.give(raw)

    def finish_user(self):
        """Complete the user messages in flight and check what arrived."""
        # Never block in MPI on a neighbour's message while holding back mtcoll calls: the
        # neighbour may reach its send only after one of our calls completes, and mtcoll moves
        # data only inside mtcoll calls. Poll both instead.
        statuses = [MPI.Status() for _ in self.user_reqs]
        while not MPI.Request.Testall(self.user_reqs, statuses):
            for e in self.window:
                e[2].Test()
            time.sleep(20e-6)
        for (buf, i, src, tag, any_tag), status in zip(self.user_checks, statuses[::2]):
            ok = np.array_equal(buf, _user_payload(i, src, tag))
            if any_tag:
                ok = ok and status.Get_tag() == tag and status.Get_source() == src
            self.stats["user_received"] += 1
            self.stats["user_bad"] += not ok
        self.user_reqs.clear()
        self.user_checks.clear()
        self.user_keep.clear()

    def drain(self):
        """Complete every call and user message in flight."""
        while self.window:
            self.finish(self.window.pop(0))
        self.finish_user()

    def end_block(self, ncalls, trim, progress):
        """Drain, then record the block's memory and cache readings (progress gets it on rank 0)."""
        self.drain()
        gc.collect()
        pending, scratch, layouts = _caches(self.comms)
        rss = _rss_bytes()
        in_use, heap_free = _mallinfo()
        rec = dict(calls=ncalls, seconds=time.perf_counter() - self.tblock, rss=rss,
                   malloc_in_use=in_use, malloc_free=heap_free,
                   rss_trimmed=_trimmed_rss_bytes() if trim else None,
                   pending=pending, active=len(_execute._state.active), scratch_bytes=scratch,
                   layouts=layouts)
        self.tblock = time.perf_counter()
        self.blocks.append(rec)
        if progress is not None and self.rank == 0:
            progress(rec)

    def close(self):
        """Free the Comms once all is drained: (stray messages, pending requests, scratch bytes,
        cached layouts) as they were left."""
        comm, comms = self.comm, self.comms
        # nothing left over: no stray message on the user's communicator or any duplicate
        comm.Barrier()
        stray = int(comm.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG))
        stray += sum(int(c._dup.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG))
                     + int(c._chk.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG)) for c in comms.values())
        pending, scratch, layouts = _caches(comms)
        for c in comms.values():
            c.Free()
        return stray, pending, scratch, layouts

    def summary(self, calls, inflight, buffers, trim, wall, leftovers):
        """soak's summary dict, the same on every rank (collective)."""
        comm, stats, blocks, bufs = self.comm, self.stats, self.blocks, self.bufs
        stray, pending, scratch, layouts = leftovers

        def total(x):
            return comm.allreduce(x, op=MPI.SUM)

        def most(x):
            return comm.allreduce(x, op=MPI.MAX)

        rss_first, rss_last = blocks[0]["rss"], blocks[-1]["rss"]
        growth = (rss_last - rss_first) / rss_first
        trimmed = [b["rss_trimmed"] for b in blocks]
        trimmed_growth = None if None in trimmed else (trimmed[-1] - trimmed[0]) / trimmed[0]
        trimmed_growth = comm.allgather(trimmed_growth)
        return dict(
            ranks=self.size, calls=calls, complete=self.complete, inflight=inflight,
            seed=self.seed, max_bytes=self.max_bytes, buffers=buffers, trim=trim,
            # resident bytes of the harness's reused buffers per rank (0 with fresh buffers)
            harness_buffer_bytes=0 if bufs is None else bufs.total_bytes,
            algorithms=list(self.names), skipped_algorithms=self.skipped,
            wrong=total(stats["wrong"]), checked=total(stats["checked"]),
            bytes_per_rank_total=most(stats["bytes"]),
            user_sent=total(stats["user_sent"]), user_received=total(stats["user_received"]),
            user_bad=total(stats["user_bad"]),
            stray_messages=total(stray), pending_after=total(pending),
            active_after=total(len(_execute._state.active)), scratch_bytes_max=most(scratch),
            layouts_max=most(layouts),
            dup_congruent=bool(comm.allreduce(self.dups_ok, op=MPI.LAND)),
            rss_first_block_max=most(rss_first), rss_last_block_max=most(rss_last),
            rss_growth_max=most(growth), wall_s=most(wall),
            calls_per_s=calls / most(wall), by_algorithm=self.by_algorithm, by_op=self.by_op,
            first_wrong=[w for ws in comm.allgather(self.first_wrong) for w in ws][:5],
            blocks=comm.bcast(blocks, root=0),  # rank 0's
            blocks_rss_growth_per_rank=comm.allgather(growth),
            # per rank, resident bytes at the end of each block: a leak grows with the calls, an
            # allocator's high-water mark steps up and stays
            rss_by_rank=comm.allgather([b["rss"] for b in blocks]),
            # per rank and block, mallinfo2(): bytes malloc has handed out and not freed, and
            # the free bytes it keeps (None without glibc 2.33+)
            malloc_in_use_by_rank=comm.allgather([b["malloc_in_use"] for b in blocks]),
            malloc_free_by_rank=comm.allgather([b["malloc_free"] for b in blocks]),
            # the same after malloc_trim(0) at each block's end (None without --trim or glibc)
            rss_trimmed_growth_max=None if None in trimmed_growth else max(trimmed_growth),
            blocks_rss_trimmed_growth_per_rank=trimmed_growth,
        )


def _pct(x):
    return "n/a" if x is None else f"{100 * x:+.2f}%"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=10000)
    p.add_argument("--inflight", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-bytes", type=int, default=4 * 2**20)
    p.add_argument("--block", type=int, default=1000)
    p.add_argument("--complete", choices=("wait", "test"), default="wait",
                   help="complete a call with its Wait (default) or by testing every call in "
                        "flight until it is done")
    p.add_argument("--fresh-buffers", action="store_true",
                   help="allocate each call's output and expected result afresh (the earlier "
                        "harness) instead of reusing a few buffers")
    p.add_argument("--trim", action="store_true",
                   help="after each block's reading also call malloc_trim(0) and read the "
                        "resident memory again (lowers the later plain readings)")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()

    def show(rec):
        print(f"soak: {rec['calls']} calls, block {rec['seconds']:.1f} s, "
              f"rss {rec['rss'] / 2**20:.1f} MiB, pending {rec['pending']}, "
              f"active {rec['active']}, scratch {rec['scratch_bytes']} B",
              file=sys.stderr, flush=True)

    load0 = os.getloadavg()
    res = soak(comm, args.calls, args.inflight, args.seed, args.max_bytes, args.block,
               progress=show, complete=args.complete,
               buffers="fresh" if args.fresh_buffers else "pooled", trim=args.trim)
    res["loadavg_start"] = load0
    res["loadavg_end"] = os.getloadavg()
    res["complete"] = args.complete
    if rank == 0:
        from importlib.metadata import version
        res["mtcoll_version"] = version("mtcoll")
        res["mpi_library"] = MPI.Get_library_version().splitlines()[0]
        ok = (res["wrong"] == 0 and res["user_bad"] == 0 and res["stray_messages"] == 0
              and res["pending_after"] == 0 and res["active_after"] == 0
              and res["user_sent"] == res["user_received"] and res["rss_growth_max"] < 0.05)
        res["ok"] = ok
        print(f"soak: {res['ranks']} ranks, {res['calls']} calls (up to {res['inflight']} in "
              f"flight), {res['checked']} results checked over the ranks, {res['wrong']} wrong; "
              f"user messages {res['user_received']}/{res['user_sent']} received, "
              f"{res['user_bad']} bad; stray messages {res['stray_messages']}; pending "
              f"{res['pending_after']}, active {res['active_after']}; rss "
              f"{res['rss_first_block_max'] / 2**20:.1f} -> "
              f"{res['rss_last_block_max'] / 2**20:.1f} MiB (growth "
              f"{100 * res['rss_growth_max']:+.2f}% worst rank; after malloc_trim "
              f"{_pct(res['rss_trimmed_growth_max'])}); wall {res['wall_s']:.1f} s "
              f"({res['calls_per_s']:.1f} calls/s); load {load0[0]:.2f} -> "
              f"{res['loadavg_end'][0]:.2f}; {'OK' if ok else 'FAILED'}")
        print(f"soak: calls by algorithm {res['by_algorithm']}; by op {res['by_op']}")
        print(f"soak: {res['buffers']} buffers (harness buffers "
              f"{res['harness_buffer_bytes'] / 2**20:.1f} MiB per rank); growth per rank "
              + ", ".join(f"{100 * g:+.2f}%" for g in res["blocks_rss_growth_per_rank"]))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1, default=str)
    return 0 if comm.bcast(res.get("ok") if rank == 0 else None, root=0) else 1


if __name__ == "__main__":
    sys.exit(main())
