"""Mismatched calls: ranks that disagree on a call, or do not make it.

With ``MTCOLL_CHECK=1`` every rank raises, naming the odd ranks; with ``MTCOLL_TIMEOUT`` a rank
that never calls is named instead of waited for, and a stalled data path ends in
:class:`mtcoll.comm.StallError`. With checking off a mismatch may give a wrong result, an MPI
error or a stall, but never writes outside the receive buffer (guard zones). The table of what
happens in each case is in docs/reliability.md ("Mismatched calls").

Every test makes its own Comm and frees it, and ends with a Barrier on ``MPI.COMM_WORLD``, so
a rank that skipped a call, or a broken Comm, does not reach into the next test.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from mpi4py import MPI

import mtcoll
from mtcoll.comm import _dispatch
from mtcoll import execute
from mtcoll.comm import StallError

TIMEOUT = 2.0
# How late past MTCOLL_TIMEOUT a rank may raise. Measured: at most 0.017 s over 30 stalls at
# 2..8 ranks on 2 shared cores (docs/reliability.md); the rest is headroom for a loaded machine.
SLACK = 1.0
N = 1 << 16  # float64 elements: 512 KiB, well above the native cut-off, several segments


@pytest.fixture(autouse=True)
def _settle(comm):
    """A Barrier on the clean world communicator after each test: a rank that skipped a call
    waits here for the ranks still timing out."""
    yield
    comm.Barrier()


@pytest.fixture
def fresh(comm):
    """``fresh(**options)``: a new Comm on a duplicate of COMM_WORLD (so that it is constructed
    on every rank, whatever Comms of COMM_WORLD earlier tests left), freed after the test
    (broken or not)."""
    made = []

    def make(**options):
        base = comm.Dup()
        c = mtcoll.Comm(base, **options)
        made.append((c, base))
        return c

    yield make
    for c, base in made:
        c.Free()
        if c._broken is None:  # (a broken Comm keeps its communicators, see Comm.Free)
            base.Free()


_TRUNCATION = {}


@pytest.fixture
def truncation_contained(comm):
    """Skip a test that provokes MPI_ERR_TRUNCATE where the MPI library itself writes a
    truncated message past the receive buffer (Open MPI 5.0.11 does: the whole message lands,
    corrupting the memory behind the buffer, and the job later crashes). Probed once per
    process, collectively, with plain mpi4py: rank 1 sends rank 0 a message 1024 elements
    longer than its receive, into a buffer with a guard zone behind it."""
    if comm.Get_size() < 2:
        return  # (the test itself skips)
    if "ok" not in _TRUNCATION:
        c = comm.Dup()
        n, extra = 4096, 1024
        touched = 0
        if c.Get_rank() == 0:
            space = np.full(n + 2 * extra, -7.0)
            try:
                c.Recv(space[:n], source=1, tag=7)
            except MPI.Exception as e:
                assert e.Get_error_class() == MPI.ERR_TRUNCATE, e
            touched = int((space[n:] != -7.0).sum())
        elif c.Get_rank() == 1:
            c.Send(np.ones(n + extra), dest=0, tag=7)
        _TRUNCATION["touched"] = c.bcast(touched, root=0)
        _TRUNCATION["ok"] = _TRUNCATION["touched"] == 0
        c.Free()
    if not _TRUNCATION["ok"]:
        pytest.skip(f"the MPI library ({MPI.Get_library_version().split(',')[0].strip()}) "
                    f"writes a truncated message past the receive buffer "
                    f"({_TRUNCATION['touched']} elements behind it changed in a plain mpi4py "
                    f"Recv): a test of MPI_ERR_TRUNCATE would corrupt memory")


def _ranks_sum(size, n):
    return np.full(n, size * (size - 1) / 2)


def _world_ok(comm, n=N):
    """A new Comm on the world works and gives the right result on every rank: nothing of a
    broken call (stale messages, cancelled receives) reaches it."""
    r, size = comm.Get_rank(), comm.Get_size()
    with mtcoll.Comm(comm, algorithm="multitree") as c:
        out = np.zeros(n)
        c.Allreduce(np.full(n, float(r)), out)
        assert np.array_equal(out, _ranks_sum(size, n))


# -- MTCOLL_TIMEOUT itself -------------------------------------------------------------------------

@pytest.mark.mpi
@pytest.mark.parametrize("value", ["abc", "0", "-1", "inf", "nan", "1s"])
def test_bad_timeout_value_names_variable(comm, fresh, monkeypatch, value):
    c = fresh(algorithm="multitree")
    monkeypatch.setenv("MTCOLL_TIMEOUT", value)
    with pytest.raises(ValueError, match=rf"MTCOLL_TIMEOUT='{value}' \(rank {comm.Get_rank()} "
                                         r"of MPI.COMM_WORLD\): expected a number of seconds"):
        c.Allreduce(np.ones(8), np.zeros(8))
    monkeypatch.setenv("MTCOLL_TIMEOUT", "")  # empty: no watchdog, and the Comm is fine
    out = np.zeros(8)
    c.Allreduce(np.full(8, float(comm.Get_rank())), out)
    assert np.array_equal(out, _ranks_sum(comm.Get_size(), 8))


def test_timeout_is_listed():
    assert "MTCOLL_TIMEOUT" in mtcoll.comm.ENV_VARS
    assert issubclass(StallError, TimeoutError)


# -- checking on: every rank raises, naming the odd ones -----------------------------------------

def _odd_call(c, what, odd, r, size):
    """Each rank's call: rank ``odd`` differs from the others in ``what``."""
    me = r == odd
    n = 12 * size
    if what == "count":
        c.Allreduce(np.ones(n + me), np.zeros(n + me))
    elif what == "datatype":
        dt = np.float32 if me else np.float64
        c.Allreduce(np.ones(n, dt), np.zeros(n, dt))
    elif what == "op":
        c.Allreduce(np.ones(n), np.zeros(n), op=MPI.MAX if me else MPI.SUM)
    elif what == "call":
        if me:
            c.Allgather(np.ones(12), np.zeros(n))
        else:
            c.Allreduce(np.ones(n), np.zeros(n))
    elif what == "algorithm":
        c.Allreduce(np.ones(n), np.zeros(n))
    else:
        raise AssertionError(what)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("what", ["count", "datatype", "op", "call", "algorithm"])
@pytest.mark.parametrize("odd", ["last", "first"])
def test_check_names_odd_ranks(comm, fresh, need_size, monkeypatch, what, odd):
    size = need_size(min_size=2, max_size=8)
    r = comm.Get_rank()
    odd = size - 1 if odd == "last" else 0
    monkeypatch.setenv("MTCOLL_CHECK", "1")
    monkeypatch.setenv("MTCOLL_TIMEOUT", "30")  # a bug here fails, it does not hang
    algo = ("ring" if r == odd else "multitree") if what == "algorithm" else "multitree"
    c = fresh(algorithm=algo)
    named = [odd] if odd else list(range(1, size))  # rank 0 is the reference
    field = "algorithm" if what == "algorithm" else what
    with pytest.raises(ValueError, match=rf"the ranks disagree on (.*; )?{field}: rank 0 has "
                                         rf".* but ranks {named} differ".replace("[", r"\[")
                       .replace("]", r"\]")):
        _odd_call(c, what, odd, r, size)
    # a disagreement found by the check leaves the Comm usable (every descriptor was received)
    if what != "algorithm":
        out = np.zeros(N)
        c.Allreduce(np.full(N, float(r)), out)
        assert np.array_equal(out, _ranks_sum(size, N))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("call", ["Allreduce", "Iallreduce", "Allgather"])
@pytest.mark.parametrize("missing", ["last", "first"])
def test_check_names_missing_rank(comm, fresh, need_size, monkeypatch, call, missing):
    """One rank does not call: with MTCOLL_CHECK=1 MTCOLL_TIMEOUT=2 every calling rank raises
    StallError naming it, after the timeout and not much later."""
    size = need_size(min_size=2, max_size=8)
    r = comm.Get_rank()
    missing = size - 1 if missing == "last" else 0
    monkeypatch.setenv("MTCOLL_CHECK", "1")
    monkeypatch.setenv("MTCOLL_TIMEOUT", str(TIMEOUT))
    c = fresh(algorithm="multitree")
    c.Allreduce(np.ones(8), np.zeros(8))  # a good call first: the check's numbering moves on
    elapsed = None
    if r != missing:
        t0 = time.monotonic()
        with pytest.raises(StallError, match=rf"rank {r}: rank\(s\) \[{missing}\] did not make "
                                             rf"this call within MTCOLL_TIMEOUT=2 s") as err:
            if call == "Allgather":
                c.Allgather(np.ones(4), np.zeros(4 * size))
            else:
                getattr(c, call)(np.ones(N), np.zeros(N))
        elapsed = time.monotonic() - t0
        assert err.value.ranks == [missing]
        assert err.value.call == call and err.value.timeout == TIMEOUT
        assert TIMEOUT <= elapsed <= TIMEOUT + SLACK, elapsed
        with pytest.raises(RuntimeError, match="mtcoll.Comm is broken: .* agreement check timed "
                                               "out .* Free\\(\\) it"):
            c.Allreduce(np.ones(8), np.zeros(8))
    c.Free()
    comm.Barrier()
    _world_ok(comm)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("what", ["count", "error"])
def test_check_gives_up_while_others_see_a_mismatch(comm, fresh, need_size, monkeypatch, what):
    """A race the agreement check must survive: rank 0's MTCOLL_TIMEOUT (1 s) expires before
    the last rank makes its call (at 1.5 s), and that call differs (another count, or
    arguments that raise). Rank 0 raises StallError naming the last rank. The other ranks,
    whose timeout is longer, get every descriptor, see the disagreement and must raise it at
    once -- they need nothing more from rank 0, which has left."""
    size = need_size(min_size=2, max_size=8)
    r, last = comm.Get_rank(), size - 1
    monkeypatch.setenv("MTCOLL_CHECK", "1")
    monkeypatch.setenv("MTCOLL_TIMEOUT", "1" if r == 0 else "10")
    c = fresh(algorithm="multitree")
    c.Allreduce(np.ones(8), np.zeros(8))  # a good call first
    n = N
    recv = np.zeros(N)
    if r == last:
        time.sleep(1.5)
        if what == "count":
            n = N + 8
        else:
            recv = np.zeros(N + 1)  # recvbuf too large: the last rank's own ValueError
    t0 = time.monotonic()
    if r == 0:
        with pytest.raises(StallError, match=rf"rank\(s\) \[{last}\] did not make this call"):
            c.Allreduce(np.ones(N), recv)
    elif what == "count":
        with pytest.raises(ValueError, match=rf"the ranks disagree on count: rank 0 has {N} but "
                                             rf"ranks \[{last}\] differ \(rank {last}: {N + 8}\)"):
            c.Allreduce(np.ones(n), np.zeros(n))
    else:
        msg = (r"recvbuf \(rank \d+\) is too large" if r == last else
               rf"rank\(s\) \[{last}\] rejected their arguments; rank {last}: recvbuf "
               rf"\(rank {last}\) is too large")
        with pytest.raises(ValueError, match=msg):
            c.Allreduce(np.ones(N), recv)
    elapsed = time.monotonic() - t0
    assert elapsed <= (1 if r == 0 else 1.5) + SLACK + 1.5, elapsed
    c.Free()
    comm.Barrier()
    _world_ok(comm)


@pytest.mark.mpi(min_size=2)
def test_construction_names_timeout(comm, need_size, monkeypatch):
    """The last rank never constructs the Comm: with MTCOLL_TIMEOUT=2 the others raise
    StallError after the timeout instead of waiting in the collective duplicate for ever. (On a
    communicator of the test's own, left unfreed: its duplicate stays pending on those ranks.)"""
    size = need_size(min_size=2, max_size=8)
    r = comm.Get_rank()
    monkeypatch.setenv("MTCOLL_TIMEOUT", str(TIMEOUT))
    sub = comm.Dup()
    if r != size - 1:
        t0 = time.monotonic()
        with pytest.raises(StallError, match=rf"mtcoll.Comm on rank {r}: not every rank of the "
                                             rf"communicator constructed an mtcoll.Comm within "
                                             rf"MTCOLL_TIMEOUT=2 s") as err:
            mtcoll.Comm(sub, algorithm="multitree")
        assert TIMEOUT <= time.monotonic() - t0 <= TIMEOUT + SLACK
        assert err.value.timeout == TIMEOUT and err.value.ranks == []
    comm.Barrier()
    _world_ok(comm)


# -- the stall watchdog on the data path (checking off) -------------------------------------------

@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("algorithm", ["multitree", "native"])
@pytest.mark.parametrize("blocking", [True, False], ids=["Allreduce", "Iallreduce"])
@pytest.mark.parametrize("warm", [True, False], ids=["planned", "first-use"])
def test_watchdog_without_check(comm, fresh, need_size, monkeypatch, algorithm, blocking,
                                warm):
    """Checking off, the last rank does not call: every other rank raises StallError within
    timeout + slack. On a planned Comm ("planned") the data path's watchdog fires, and together
    each names the missing one (and only it: the stalled ranks find out who did not join, which
    takes up to half the timeout more). On a Comm's first call with the algorithm, the broadcast
    of the schedule gives up instead (naming no ranks) on the ranks that wait for the missing one
    in the broadcast tree; the others get as far as the data path. The MPI library's own
    collective (native) is named the same way."""
    size = need_size(min_size=2, max_size=8)
    r, missing = comm.Get_rank(), size - 1
    monkeypatch.setenv("MTCOLL_CHECK", "0")
    monkeypatch.setenv("MTCOLL_TIMEOUT", str(TIMEOUT))
    c = fresh(algorithm=algorithm)
    if warm:
        c.Allreduce(np.ones(N), np.zeros(N))
    kind = "Allreduce" if blocking else "Iallreduce"
    if algorithm == "native":
        how = rf"no progress for 2 s \(MTCOLL_TIMEOUT\); rank\(s\) \[{missing}\] did not join " \
              rf"this call .*the MPI library's collective"
    else:
        how = rf"no progress for 2 s \(MTCOLL_TIMEOUT\); rank\(s\) \[{missing}\] did not join " \
              rf"this call .*messages (from|to) ranks"
        if not warm:
            how = rf"({how}|planning 'multitree' on first use on rank {r}: not every rank took " \
                  rf"part)"
    named = []
    if r != missing:
        out = np.zeros(N)
        t0 = time.monotonic()
        with pytest.raises(StallError, match=rf"mtcoll {kind}( \(call \d+\))?:? (on rank {r}: )?"
                                             + how) as err:
            if blocking:
                c.Allreduce(np.ones(N), out)
            else:
                req = c.Iallreduce(np.ones(N), out)
                assert not req.Test()
                req.Wait()
        elapsed = time.monotonic() - t0
        assert TIMEOUT <= elapsed <= 1.5 * TIMEOUT + SLACK, elapsed
        assert err.value.call == kind and err.value.timeout == TIMEOUT
        named = err.value.ranks
        if "planning" in str(err.value):
            assert named == [], str(err.value)
        else:
            assert named == [missing], str(err.value)
        with pytest.raises(RuntimeError, match="broken"):
            c.Allreduce(np.ones(8), np.zeros(8))
        if not blocking and warm:
            with pytest.raises(RuntimeError, match="broken"):
                req.Wait()
    everyone = comm.allgather(named)
    if warm:
        assert all(got == [missing] for got in everyone[:missing]), everyone
    c.Free()
    comm.Barrier()
    _world_ok(comm)


@pytest.mark.mpi(min_size=2)
def test_planning_broadcast_times_out(comm, fresh, need_size, monkeypatch):
    """Checking off, rank 0 does not make a Comm's first MultiTree call: the others wait for it
    in the broadcast of the schedule it would plan, and give up there."""
    need_size(min_size=2, max_size=8)
    r = comm.Get_rank()
    monkeypatch.setenv("MTCOLL_CHECK", "0")
    monkeypatch.setenv("MTCOLL_TIMEOUT", str(TIMEOUT))
    c = fresh(algorithm="multitree")
    if r != 0:
        t0 = time.monotonic()
        with pytest.raises(StallError, match=rf"mtcoll Iallreduce: planning 'multitree' on first "
                                             rf"use on rank {r}: not every rank took part "
                                             rf"within MTCOLL_TIMEOUT=2 s") as err:
            c.Iallreduce(np.ones(N), np.zeros(N))
        elapsed = time.monotonic() - t0
        assert TIMEOUT <= elapsed <= TIMEOUT + SLACK, elapsed
        assert err.value.call == "Iallreduce" and err.value.ranks == []
        with pytest.raises(RuntimeError, match="broken: planning 'multitree' on first use timed "
                                               "out"):
            c.schedule("multitree")
    c.Free()
    comm.Barrier()
    _world_ok(comm)


@pytest.mark.mpi(min_size=2)
def test_no_timeout_no_watchdog_cost(comm, fresh, need_size, monkeypatch):
    """Without MTCOLL_TIMEOUT a request carries no deadline (a native call is made as its
    nonblocking twin either way, see docs/sharp-bits.md)."""
    size = need_size(min_size=2, max_size=8)
    monkeypatch.delenv("MTCOLL_TIMEOUT", raising=False)
    c = fresh(algorithm="native")
    out = np.zeros(4)
    req = _dispatch.start(c, "Allreduce", np.ones(4), out, MPI.SUM, blocking=True)
    assert req._timeout is None
    req.Wait()
    assert np.array_equal(out, np.full(4, float(size)))
    monkeypatch.setenv("MTCOLL_TIMEOUT", "60")
    out = np.zeros(4)
    req = _dispatch.start(c, "Allreduce", np.ones(4), out, MPI.SUM, blocking=True)
    assert req._timeout == 60.0
    req.Wait()
    assert np.array_equal(out, np.full(4, float(size)))


# -- checking off: no memory corruption ------------------------------------------------------------

G = 4096  # guard elements on each side


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("algorithm", ["multitree", "native"])
@pytest.mark.parametrize("what", ["count_more", "count_less", "datatype", "op", "algorithm"])
def test_guard_zones_untouched(comm, fresh, need_size, monkeypatch, what, algorithm):
    """Checking off, the last rank's call differs: whatever happens (a wrong result, an MPI
    error, a stall), nothing is written outside any rank's receive buffer, and no rank hangs."""
    size = need_size(min_size=2, max_size=8)
    if algorithm == "native" and what in ("count_more", "count_less", "datatype") \
            and MPI.Get_library_version().startswith("Open MPI"):
        # seen with Open MPI 5.0.11 (make test-openmpi): its own Iallreduce (libnbc) wrote
        # past the receive buffer of a rank whose peer sends more (count_more), and a
        # datatype mismatch ended in glibc's "corrupted size vs. prev_size"; MPI promises
        # nothing for an erroneous program, and mtcoll does not touch the buffers of a
        # native call
        pytest.skip("Open MPI's Iallreduce writes past the buffers when the sizes differ")
    if what == "datatype" and MPI.Get_library_version().startswith("Open MPI"):
        # NOT RESOLVED (found by make test-openmpi): under Open MPI 5.0.11 a float32 rank
        # among float64 ones crashes the job (abort/segfault) with the MPI library's own call,
        # the Python executor and the compiled engine alike; under MPICH it passes
        pytest.skip("a datatype mismatch crashes the job under Open MPI (open finding)")
    r, odd = comm.Get_rank(), size - 1
    me = r == odd
    monkeypatch.setenv("MTCOLL_CHECK", "0")
    monkeypatch.setenv("MTCOLL_TIMEOUT", str(TIMEOUT))
    algo = algorithm
    if what == "algorithm":
        algo = ("ring" if algorithm == "multitree" else "multitree") if me else algorithm
    c = fresh(algorithm=algo)
    n, dtype, op = N, np.float64, MPI.SUM
    if what == "count_more":
        n = N + 1000 * me  # the odd rank sends more than the others expect
    elif what == "count_less":
        n = N - 1000 * me
    elif what == "datatype":
        dtype = np.float32 if me else np.float64
    elif what == "op":
        op = MPI.MAX if me else MPI.SUM
    big = np.full(n + 2 * G, -7, dtype)
    recv = big[G:G + n]
    t0 = time.monotonic()
    try:
        c.Allreduce(np.full(n, r + 1, dtype), recv, op)
        outcome = "done"
    except StallError:
        outcome = "stall"
    except RuntimeError as e:
        assert "MPI error" in str(e), str(e)
        outcome = "mpi error"
    elapsed = time.monotonic() - t0
    assert elapsed <= 1.5 * TIMEOUT + SLACK, (outcome, elapsed)  # a stall: + presence round
    assert np.all(big[:G] == -7) and np.all(big[G + n:] == -7), "guard zone overwritten"
    assert (c._broken is not None) == (outcome != "done")
    outcomes = comm.allgather(outcome)
    if what == "op":  # same sizes everywhere: every rank completes
        assert outcomes == ["done"] * size
    c.Free()
    comm.Barrier()
    _world_ok(comm)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("wait_first", ["other", "failing"])
def test_mpi_error_charged_to_its_own_call(comm, fresh, need_size, monkeypatch,
                                           truncation_contained, wait_first):
    """Two Comms with calls in flight together; the first call's count is larger on every rank
    but 0, so rank 0 receives a message longer than its receive (MPI_ERR_TRUNCATE). Whichever
    request rank 0 waits for first, the error belongs to the first call: the second call
    completes with the right result and its Comm stays usable, the first call's ``Wait`` raises
    the MPI error and only its Comm is broken."""
    size = need_size(min_size=2, max_size=8)
    r = comm.Get_rank()
    monkeypatch.setenv("MTCOLL_CHECK", "0")
    monkeypatch.setenv("MTCOLL_TIMEOUT", str(TIMEOUT))
    bad, good = fresh(algorithm="ring"), fresh(algorithm="multitree")
    n = 4096 + 1024 * (r != 0)  # every message rank 0 receives is longer than it expects
    a = bad.Iallreduce(np.full(n, 1.0), np.zeros(n))
    out = np.zeros(N)
    b = good.Iallreduce(np.full(N, float(r)), out)
    first, then = (b, a) if wait_first == "other" else (a, b)
    outcome = {}
    for name, req in (("first", first), ("then", then)):
        try:
            req.Wait()
            outcome[req is a] = "done"
        except StallError:
            outcome[req is a] = "stall"
        except RuntimeError as e:
            outcome[req is a] = "mpi error" if "MPI error" in str(e) else str(e)
            if r == 0 and req is a:
                assert "ERR_TRUNCATE" in str(e) and "Iallreduce on rank 0" in str(e), str(e)
    assert outcome[False] == "done", outcome
    assert np.array_equal(out, _ranks_sum(size, N))
    assert good._broken is None
    if r == 0:
        assert outcome[True] == "mpi error", outcome
        assert "ERR_TRUNCATE" in bad._broken, bad._broken
        with pytest.raises(RuntimeError, match="mtcoll.Comm is broken: Iallreduce on rank 0 "
                                               "failed: MPI error ERR_TRUNCATE"):
            bad.Allreduce(np.ones(4), np.zeros(4))
    # the good Comm still works after the other one broke (once every rank is done with the
    # bad call: the last rank may take MTCOLL_TIMEOUT to give it up)
    comm.Barrier()
    out2 = np.zeros(8)
    good.Allreduce(np.full(8, float(r)), out2)
    assert np.array_equal(out2, _ranks_sum(size, 8))
    _world_ok(comm)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("how", ["Wait", "Test"])
def test_mpi_error_ends_the_other_calls_on_its_comm(comm, fresh, need_size, monkeypatch,
                                                    truncation_contained, how):
    """As above, but both calls on one Comm: rank 0 waits for the second call while the first
    one's message fails. The failure breaks the Comm and abandons the second call too, so its
    ``Wait`` (or a ``Test`` loop) must raise RuntimeError, not return as if complete with a
    result that never came."""
    size = need_size(min_size=2, max_size=8)
    r = comm.Get_rank()
    monkeypatch.setenv("MTCOLL_CHECK", "0")
    monkeypatch.setenv("MTCOLL_TIMEOUT", str(TIMEOUT))
    c = fresh(algorithm="ring")
    n = 4096 + 1024 * (r != 0)  # every message rank 0 receives is longer than it expects
    a = c.Iallreduce(np.full(n, 1.0), np.zeros(n))
    out = np.zeros(N)
    t0 = time.monotonic()
    try:
        # (the progress thread may find the first call's failure before the second starts:
        # the start raises then, the Comm being broken)
        b = c.Iallreduce(np.full(N, float(r)), out)
        if how == "Wait" or r != 0:  # (Test does not time out: the others would spin)
            b.Wait()
        else:
            while not b.Test():
                assert time.monotonic() - t0 < TIMEOUT + SLACK, "Test() never ends"
        outcome = "done"
    except (RuntimeError, StallError) as e:
        outcome = str(e)
    if r == 0:
        assert outcome != "done" or np.array_equal(out, _ranks_sum(size, N)), \
            "the second call returned as complete without its result"
        assert c._broken is not None and "ERR_TRUNCATE" in c._broken, c._broken
        with pytest.raises(RuntimeError, match="MPI error in a message of this call"):
            a.Wait()
    else:  # the first call stalls, or fails as the broken Comm's
        with pytest.raises((RuntimeError, StallError)):
            a.Wait()
    assert not execute.running()  # nothing of either call is left running
    comm.Barrier()
    _world_ok(comm)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("where", ["check", "planning"])
def test_no_call_starts_on_a_comm_broken_while_it_starts(comm, fresh, need_size, monkeypatch,
                                                        truncation_contained, where):
    """A call whose agreement check (or planning broadcast, on its algorithm's first use)
    advances the running calls, one of which fails there with an MPI error and breaks the Comm:
    the new call must raise RuntimeError instead of starting on the broken Comm (where its
    execution would be left running for good, its receives posted into the caller's buffer)."""
    size = need_size(min_size=2, max_size=8)
    r = comm.Get_rank()
    odd = 0 if where == "check" else size - 1  # the rank whose receives are truncated
    monkeypatch.setenv("MTCOLL_TIMEOUT", str(TIMEOUT))
    monkeypatch.setenv("MTCOLL_CHECK", "0")
    if where == "planning":  # "auto": ring for the first call, multitree (planned) for the next
        monkeypatch.setattr(mtcoll.comm._comm, "choose", lambda nbytes, nranks, topology, tuning=None:
                            "ring" if nbytes < 8 * N else "multitree")
        c = fresh(algorithm="auto")
    else:
        c = fresh(algorithm="ring")
    n = 4096 + 1024 * (r != odd)  # every message the odd rank receives is too long
    a = c.Iallreduce(np.full(n, 1.0), np.zeros(n))
    if where == "check":
        monkeypatch.setenv("MTCOLL_CHECK", "1")
    if r != odd:
        time.sleep(0.5)  # the odd rank waits in the check (the broadcast) meanwhile
    b = None
    if r == odd:
        with pytest.raises(RuntimeError, match=rf"mtcoll.Comm is broken: Iallreduce on rank "
                                               rf"{odd} failed: MPI error ERR_TRUNCATE"):
            c.Iallreduce(np.ones(N), np.zeros(N))
    else:
        try:
            b = c.Iallreduce(np.ones(N), np.zeros(N))
        except StallError as e:
            # the progress thread found the odd rank's failure before it reached this call:
            # it raised at once, and this rank's check names it as the one that did not join
            assert where == "check" and e.ranks == [odd], (where, e.ranks)
    for req in (b, a):  # on the other ranks: stall (the odd rank left), then the broken Comm's
        if req is not None:
            with pytest.raises((RuntimeError, StallError)):
                req.Wait()
    assert not execute.running()
    comm.Barrier()
    _world_ok(comm)
