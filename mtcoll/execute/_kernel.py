"""The numba kernel of :mod:`mtcoll.execute._engine` (imported, and numba with it, on first use).

:func:`run` is one stretch of a call: it carries on the call whose whole state is in its array
arguments until the call is done, an MPI error or a stall ends it, or (not blocking) it has
waited as long as ``pace`` allows without a completion. It does what
:class:`mtcoll.execute.Execution` does, in the same order: post reduce-phase receives ahead
(at most ``window``), act on pieces whose dependencies are met (send, gather-receive, combine),
test completions, release dependents. Not blocking, it waits between tests that found
nothing as ``pace`` (int64, slots :data:`mtcoll.execute._engine._PACE`) says: the first
``pace[P_SPIN]`` tests one after the other, the next ``pace[P_YIELDS]`` each after a
``sched_yield``, then each after a ``nanosleep`` from ``pace[P_SLEEP_MIN]`` ns doubling up to
``pace[P_SLEEP_MAX]`` (0: no sleeping); it returns after ``pace[P_POLLS]`` such tests in a row
or once it has slept ``pace[P_BUDGET]`` ns since the last completion, so that the caller can
check its deadline. While sleeping, the thread's timer slack is ``pace[P_SLACK]`` ns (restored
on return). The call holds no GIL throughout.

MPI's C functions are called through their addresses (``fn``: Isend, Irecv, Testsome,
Waitsome, then the C library's sched_yield, nanosleep and prctl, 0 when absent) by
:func:`_ccall`, which casts an address to a C function of the argument types it is given:
4-byte integer handles (MPICH) and 8-byte ones (Open MPI's pointers) are both plain integer
arguments in the x86-64 and AArch64 C calling conventions. (prctl is variadic; its integer
arguments travel in the same registers either way, and on x86-64 the callee reads ``%al``
only to decide whether to save vector registers.)
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ..schedule import GATHER, RECV, REDUCE, SEND
from ._abi import (DONE, ERROR, IDLE, P_BUDGET, P_POLLS, P_SLACK, P_SLEEP_MAX, P_SLEEP_MIN, P_SPIN,
                   P_YIELDS, STALL, S_ERR, S_MOVED, S_NACTIVE, S_NEXT_RECV, S_RECVS_OUT,
                   S_REMAINING, S_WHEAD, S_WTAIL)

# the functions of ``fn``, by index
_ISEND, _IRECV, _TESTSOME, _WAITSOME, _SCHED_YIELD, _NANOSLEEP, _PRCTL = range(7)
_PR_SET_TIMERSLACK, _PR_GET_TIMERSLACK = 29, 30  # <linux/prctl.h>


@intrinsic
def _ccall(typingctx, addr, args):
    """``int f(args...)`` for the C function at ``addr`` (an integer), args a tuple of
    integers (C ints, handles and pointers as integers)."""
    if not isinstance(addr, types.Integer) or not isinstance(args, types.BaseTuple):
        return None
    if not all(isinstance(t, types.Integer) for t in args.types):
        return None
    sig = types.int32(addr, args)

    def codegen(context, builder, signature, llargs):
        fnaddr, tup = llargs
        vals = cgutils.unpack_tuple(builder, tup, len(args.types))
        fnty = ir.FunctionType(ir.IntType(32), [context.get_value_type(t) for t in args.types])
        fptr = builder.inttoptr(fnaddr, fnty.as_pointer())
        return builder.call(fptr, vals)

    return sig, codegen


# -- the reduction: out[lo+i] = mine[lo+i] (op) other[off+i], as the ufunc of mtcoll._ops ------
# op codes as mtcoll.execute._abi.OPS: 1 SUM, 2 PROD, 3 MIN, 4 MAX, 5 LAND, 6 LOR, 7 LXOR, 8 BAND,
# 9 BOR, 10 BXOR. MIN and MAX follow numpy's minimum/maximum: a NaN operand is the result.

def _combine(op, out, lo, mine, other, off, n):
    # Each variant loops over slices (o, m, t), not over out[lo + i]: indexed from lo, a
    # 1M-element float32 SUM took 2-3x as long in a micro-benchmark (our reading, not checked
    # in the machine code: numba's wrap-around check of a computed index keeps it scalar).
    raise NotImplementedError  # compiled only (see the overload)


def _combine_int(op, out, lo, mine, other, off, n):
    o, m, t = out[lo:lo + n], mine[lo:lo + n], other[off:off + n]  # see _combine
    if op == 1:
        for i in range(n):
            o[i] = m[i] + t[i]
    elif op == 2:
        for i in range(n):
            o[i] = m[i] * t[i]
    elif op == 3:
        for i in range(n):
            x, y = m[i], t[i]
            o[i] = x if x <= y else y
    elif op == 4:
        for i in range(n):
            x, y = m[i], t[i]
            o[i] = x if x >= y else y
    elif op == 5:
        for i in range(n):
            o[i] = 1 if (m[i] != 0 and t[i] != 0) else 0
    elif op == 6:
        for i in range(n):
            o[i] = 1 if (m[i] != 0 or t[i] != 0) else 0
    elif op == 7:
        for i in range(n):
            o[i] = 1 if ((m[i] != 0) != (t[i] != 0)) else 0
    elif op == 8:
        for i in range(n):
            o[i] = m[i] & t[i]
    elif op == 9:
        for i in range(n):
            o[i] = m[i] | t[i]
    elif op == 10:
        for i in range(n):
            o[i] = m[i] ^ t[i]


def _combine_float(op, out, lo, mine, other, off, n):
    o, m, t = out[lo:lo + n], mine[lo:lo + n], other[off:off + n]  # see _combine
    if op == 1:
        for i in range(n):
            o[i] = m[i] + t[i]
    elif op == 2:
        for i in range(n):
            o[i] = m[i] * t[i]
    elif op == 3:
        for i in range(n):
            x, y = m[i], t[i]
            o[i] = x if (x <= y or x != x) else y
    elif op == 4:
        for i in range(n):
            x, y = m[i], t[i]
            o[i] = x if (x >= y or x != x) else y


def _combine_complex(op, out, lo, mine, other, off, n):
    o, m, t = out[lo:lo + n], mine[lo:lo + n], other[off:off + n]  # see _combine
    if op == 1:
        for i in range(n):
            o[i] = m[i] + t[i]
    elif op == 2:
        for i in range(n):
            o[i] = m[i] * t[i]


def _combine_bool(op, out, lo, mine, other, off, n):
    o, m, t = out[lo:lo + n], mine[lo:lo + n], other[off:off + n]  # see _combine
    if op == 5:
        for i in range(n):
            o[i] = m[i] and t[i]
    elif op == 6:
        for i in range(n):
            o[i] = m[i] or t[i]
    elif op == 7:
        for i in range(n):
            o[i] = m[i] != t[i]


@overload(_combine)
def _combine_typed(op, out, lo, mine, other, off, n):
    dt = out.dtype
    if isinstance(dt, types.Boolean):
        return _combine_bool
    if isinstance(dt, types.Integer):
        return _combine_int
    if isinstance(dt, types.Float):
        return _combine_float
    if isinstance(dt, types.Complex):
        return _combine_complex
    return None


# the element types, by mtcoll.execute._abi.DTYPE_CODES; the buffers come as bytes (one compiled
# kernel for every dtype) and are viewed as their type to be combined
@njit(nogil=True, cache=True)
def _apply(dt, op, acc, lo, mine, tmp, off, n):
    if dt == 0:
        _combine(op, acc.view(np.bool_), lo, mine.view(np.bool_), tmp.view(np.bool_), off, n)
    elif dt == 1:
        _combine(op, acc.view(np.int8), lo, mine.view(np.int8), tmp.view(np.int8), off, n)
    elif dt == 2:
        _combine(op, acc.view(np.int16), lo, mine.view(np.int16), tmp.view(np.int16), off, n)
    elif dt == 3:
        _combine(op, acc.view(np.int32), lo, mine.view(np.int32), tmp.view(np.int32), off, n)
    elif dt == 4:
        _combine(op, acc.view(np.int64), lo, mine.view(np.int64), tmp.view(np.int64), off, n)
    elif dt == 5:
        _combine(op, acc.view(np.uint8), lo, mine.view(np.uint8), tmp.view(np.uint8), off, n)
    elif dt == 6:
        _combine(op, acc.view(np.uint16), lo, mine.view(np.uint16), tmp.view(np.uint16), off,
                 n)
    elif dt == 7:
        _combine(op, acc.view(np.uint32), lo, mine.view(np.uint32), tmp.view(np.uint32), off,
                 n)
    elif dt == 8:
        _combine(op, acc.view(np.uint64), lo, mine.view(np.uint64), tmp.view(np.uint64), off,
                 n)
    elif dt == 9:
        _combine(op, acc.view(np.float32), lo, mine.view(np.float32), tmp.view(np.float32),
                 off, n)
    elif dt == 10:
        _combine(op, acc.view(np.float64), lo, mine.view(np.float64), tmp.view(np.float64),
                 off, n)
    elif dt == 11:
        _combine(op, acc.view(np.complex64), lo, mine.view(np.complex64),
                 tmp.view(np.complex64), off, n)
    elif dt == 12:
        _combine(op, acc.view(np.complex128), lo, mine.view(np.complex128),
                 tmp.view(np.complex128), off, n)


# -- the kernel --------------------------------------------------------------------------------

@njit(nogil=True, cache=True)
def _post(fn, which, ptr, count, dtype_h, peer, tag, comm_h, reqs, slot):
    # MPI_Isend / MPI_Irecv (buf, count, datatype, peer, tag, comm, &request)
    where = np.int64(reqs.ctypes.data) + np.int64(slot) * reqs.itemsize
    return _ccall(fn[which], (np.int64(ptr), np.int32(count), dtype_h, np.int32(peer),
                              np.int32(tag), comm_h, where))


@njit(nogil=True, cache=True)
def run(fn, st, kind, phase, peer, a, b, tagnum, scratch, src_read, dep_ptr, dep_idx,
        recv_order, pending, arrived, work, reqs, req_piece, index, statuses, acc, src, tmp, dt,
        isz, op, dtype_h, comm_h, slot, tag_slots, window, block, pace, status_words,
        err_word, err_in_status, first):
    st[S_MOVED] = 0
    acc_p = np.int64(acc.ctypes.data)
    src_p = np.int64(src.ctypes.data)
    tmp_p = np.int64(tmp.ctypes.data)
    if first:
        rc = _drain(fn, st, kind, phase, peer, a, b, tagnum, scratch, src_read, dep_ptr,
                    dep_idx, recv_order, pending, arrived, work, reqs, req_piece, acc, src, tmp,
                    dt, op, dtype_h, comm_h, slot, tag_slots, window, isz, acc_p, src_p, tmp_p)
        if rc != 0:
            st[S_ERR] = rc
            return ERROR
        if st[S_REMAINING] == 0:
            return DONE
    slack = np.full(1, -1, dtype=np.int64)  # the thread's timer slack, while lowered
    rc = _loop(fn, st, kind, phase, peer, a, b, tagnum, scratch, src_read, dep_ptr, dep_idx,
               recv_order, pending, arrived, work, reqs, req_piece, index, statuses, acc, src,
               tmp, dt, isz, op, dtype_h, comm_h, slot, tag_slots, window, block, pace,
               status_words, err_word, err_in_status, acc_p, src_p, tmp_p, slack)
    if slack[0] >= 0:
        _ccall(fn[_PRCTL], (np.int64(_PR_SET_TIMERSLACK), slack[0], np.int64(0), np.int64(0),
                            np.int64(0)))
    return rc


@njit(nogil=True, cache=True)
def _idle(fn, pace, idle, delay, slept, ts, slack):
    # The wait between two tests that found nothing (``idle`` of them in a row), as ``pace``
    # says (see run): test again at once, after a sched_yield, or after a nanosleep of
    # ``delay`` ns with the thread's timer slack lowered to pace[P_SLACK] (Linux's default 50 us
    # slack would make a 20 us sleep last 90 us). Returns the nanoseconds slept, -1 for none.
    if idle < pace[P_SPIN]:
        return -1
    if idle < pace[P_SPIN] + pace[P_YIELDS]:
        _ccall(fn[_SCHED_YIELD], ())
        return -1
    if pace[P_SLEEP_MAX] <= 0:
        return -1
    if slack[0] < 0 and fn[_PRCTL] != 0 and pace[P_SLACK] > 0:
        zero = np.int64(0)
        old = _ccall(fn[_PRCTL], (np.int64(_PR_GET_TIMERSLACK), zero, zero, zero, zero))
        if old > pace[P_SLACK]:
            slack[0] = old
            _ccall(fn[_PRCTL], (np.int64(_PR_SET_TIMERSLACK), pace[P_SLACK], zero, zero, zero))
    ts[0] = delay // 1000000000
    ts[1] = delay % 1000000000
    _ccall(fn[_NANOSLEEP], (np.int64(ts.ctypes.data), np.int64(0)))  # EINTR: just test again
    return delay


@njit(nogil=True, cache=True)
def _loop(fn, st, kind, phase, peer, a, b, tagnum, scratch, src_read, dep_ptr, dep_idx,
          recv_order, pending, arrived, work, reqs, req_piece, index, statuses, acc, src, tmp,
          dt, isz, op, dtype_h, comm_h, slot, tag_slots, window, block, pace, status_words,
          err_word, err_in_status, acc_p, src_p, tmp_p, slack):
    outcount = np.zeros(1, dtype=np.int32)
    ts = np.zeros(2, dtype=np.int64)  # struct timespec {tv_sec, tv_nsec}
    idle = 0
    delay = pace[P_SLEEP_MIN]
    slept = 0
    while True:
        n = st[S_NACTIVE]
        if n == 0:
            return STALL
        args = (np.int32(n), np.int64(reqs.ctypes.data), np.int64(outcount.ctypes.data),
                np.int64(index.ctypes.data), np.int64(statuses.ctypes.data))
        if block:
            rc = _ccall(fn[_WAITSOME], args)
        else:
            rc = _ccall(fn[_TESTSOME], args)
        if rc != 0:
            err = rc
            if rc == err_in_status:
                for k in range(min(outcount[0], n)):
                    e = statuses[k * status_words + err_word]
                    if e != 0:  # MPI_SUCCESS is 0
                        err = e
                        break
            st[S_ERR] = err
            return ERROR
        m = outcount[0]
        if m <= 0:  # none (MPI_UNDEFINED cannot happen: every request listed is active)
            idle += 1
            if idle >= pace[P_POLLS]:
                return IDLE
            t = _idle(fn, pace, idle, delay, slept, ts, slack)
            if t >= 0:
                slept += t
                delay = min(2 * delay, pace[P_SLEEP_MAX])
                if slept >= pace[P_BUDGET]:
                    return IDLE
            continue
        idle = 0
        delay = pace[P_SLEEP_MIN]
        slept = 0
        st[S_MOVED] = 1
        for k in range(m):
            i = index[k]
            p = req_piece[i]
            req_piece[i] = -1
            if kind[p] == RECV and phase[p] == REDUCE:
                arrived[p] = 1
                st[S_RECVS_OUT] -= 1
                if pending[p] == 0:
                    work[st[S_WTAIL]] = p
                    st[S_WTAIL] += 1
            else:
                _finish(p, st, dep_ptr, dep_idx, pending, work)
        j = 0  # drop the completed requests (MPI_REQUEST_NULL now)
        for i in range(n):
            if req_piece[i] >= 0:
                reqs[j] = reqs[i]
                req_piece[j] = req_piece[i]
                j += 1
        st[S_NACTIVE] = j
        rc = _drain(fn, st, kind, phase, peer, a, b, tagnum, scratch, src_read, dep_ptr,
                    dep_idx, recv_order, pending, arrived, work, reqs, req_piece, acc, src, tmp,
                    dt, op, dtype_h, comm_h, slot, tag_slots, window, isz, acc_p, src_p, tmp_p)
        if rc != 0:
            st[S_ERR] = rc
            return ERROR
        if st[S_REMAINING] == 0:
            return DONE


@njit(nogil=True, cache=True)
def _finish(p, st, dep_ptr, dep_idx, pending, work):
    st[S_REMAINING] -= 1
    for k in range(dep_ptr[p], dep_ptr[p + 1]):
        q = dep_idx[k]
        pending[q] -= 1
        if pending[q] == 0:
            work[st[S_WTAIL]] = q
            st[S_WTAIL] += 1


@njit(nogil=True, cache=True)
def _drain(fn, st, kind, phase, peer, a, b, tagnum, scratch, src_read, dep_ptr, dep_idx,
           recv_order, pending, arrived, work, reqs, req_piece, acc, src, tmp, dt, op, dtype_h,
           comm_h, slot, tag_slots, window, isz, acc_p, src_p, tmp_p):
    # Act on the queued pieces (in order, as the Python executor's _run), then top up the
    # reduce-phase receives posted ahead (_post_recvs). Returns an MPI error code, or 0.
    while st[S_WHEAD] < st[S_WTAIL]:
        p = work[st[S_WHEAD]]
        st[S_WHEAD] += 1
        if kind[p] == SEND:
            base = src_p if src_read[p] else acc_p
            which = 0
        elif phase[p] == GATHER:
            base = acc_p
            which = 1
        else:
            if arrived[p] == 1:
                arrived[p] = 2
                off = scratch[p]
                if src_read[p]:
                    _apply(dt, op, acc, a[p], src, tmp, off, b[p] - a[p])
                else:
                    _apply(dt, op, acc, a[p], acc, tmp, off, b[p] - a[p])
                _finish(p, st, dep_ptr, dep_idx, pending, work)
            continue
        n = st[S_NACTIVE]
        rc = _post(fn, which, base + a[p] * isz, b[p] - a[p], dtype_h, peer[p],
                   tagnum[p] * tag_slots + slot, comm_h, reqs, n)
        if rc != 0:
            return rc
        req_piece[n] = p
        st[S_NACTIVE] = n + 1
    while st[S_RECVS_OUT] < window and st[S_NEXT_RECV] < recv_order.size:
        p = recv_order[st[S_NEXT_RECV]]
        st[S_NEXT_RECV] += 1
        n = st[S_NACTIVE]
        rc = _post(fn, 1, tmp_p + scratch[p] * isz, b[p] - a[p], dtype_h, peer[p],
                   tagnum[p] * tag_slots + slot, comm_h, reqs, n)
        if rc != 0:
            return rc
        req_piece[n] = p
        st[S_NACTIVE] = n + 1
        st[S_RECVS_OUT] += 1
    return 0
