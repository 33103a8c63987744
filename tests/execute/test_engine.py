"""The compiled progress engine (:mod:`mtcoll.execute._engine`) against its slow twin, the Python
executor, and against the MPI library: the same bits, for every algorithm and op, and the
same errors. Each test checks that the engine it means to exercise ran (``_engine.served``)."""

from __future__ import annotations

import ctypes
import re
import sys
import time

import numpy as np
import pytest
from mpi4py import MPI

import mtcoll
from mtcoll import execute
from mtcoll.execute import _engine
from mtcoll.plan import ALGORITHMS, plan
from mtcoll.topology import parse

# (dtype, op): an exact op (the MPI library must agree bit for bit) or an order-dependent one
# (the MPI library's order differs: compared with a tolerance; the Python executor bitwise)
CASES = [("float64", MPI.SUM), ("float32", MPI.MAX), ("complex128", MPI.SUM),
         ("int32", MPI.BXOR), ("int8", MPI.MIN), ("uint16", MPI.LXOR), ("bool", MPI.LAND),
         ("int64", MPI.SUM), ("float64", MPI.MIN)]
EXACT = {"SUM": False, "PROD": False}


def inputs(rank, count, dtype):
    rng = np.random.default_rng([15, rank, count])
    dt = np.dtype(dtype)
    if dt.kind == "b":
        return rng.random(count) < 0.8
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return rng.integers(max(info.min, -1000), min(info.max, 1000), count).astype(dt)
    x = rng.standard_normal(count) * 10.0 ** rng.integers(-6, 7, count)
    if dt.kind == "c":
        x = x + 1j * rng.standard_normal(count)
    x = x.astype(dt)
    if count > 3:
        x[3] = np.nan  # MIN/MAX: the NaN is the result, as numpy's minimum/maximum
    return x


def run(c, x, op, engine, monkeypatch, inplace=False):
    monkeypatch.setenv("MTCOLL_ENGINE", engine)
    before = _engine.served
    if inplace:
        out = x.copy()
        c.Allreduce(MPI.IN_PLACE, out, op)
    else:
        out = np.empty_like(x)
        c.Allreduce(x, out, op)
    ran = _engine.served - before
    return out, ran


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("MTCOLL_ALGO", "MTCOLL_TOPOLOGY", "MTCOLL_DEBUG", "MTCOLL_ENGINE"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def engine_ok():
    why = _engine.available()
    if why:
        pytest.skip(f"compiled engine unavailable: {why}")


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_same_bits_as_python_executor_and_library(comm, engine_ok, monkeypatch, algorithm):
    c = mtcoll.Comm(comm, algorithm=algorithm, segment_bytes=512)
    try:
        c.schedule()
    except ValueError as e:
        pytest.skip(str(e))
    r = comm.Get_rank()
    for count in (1, 37, 3001):
        for dtype, op in CASES:
            x = inputs(r, count, dtype)
            fast, ran = run(c, x, op, "compiled", monkeypatch, inplace=count == 37)
            assert ran == 1, (dtype, count)
            slow, ran = run(c, x, op, "python", monkeypatch)
            assert ran == 0
            assert fast.tobytes() == slow.tobytes(), (algorithm, dtype, op, count)
            ref = np.empty_like(x)
            comm.Allreduce(x, ref, op)
            if EXACT.get(mtcoll._ops.op_name(op), True):
                assert fast.tobytes() == ref.tobytes(), (algorithm, dtype, op, count)
            else:
                assert np.allclose(fast, ref, rtol=1e-4, atol=1e-6, equal_nan=True)
    c.Free()
    _engine.warm()
    assert len(_engine._kernel().run.signatures) == 1  # the warm-up compiles what calls use


@pytest.mark.mpi(min_size=2)
def test_block_calls_and_readonly_input(comm, engine_ok, monkeypatch):
    r, size = comm.Get_rank(), comm.Get_size()
    c = mtcoll.Comm(comm, algorithm="multitree")
    k = 5
    x = inputs(r, size * k, "float64")
    x.setflags(write=False)  # the kernel reads a read-only input without writing it
    for engine in ("compiled", "python"):
        monkeypatch.setenv("MTCOLL_ENGINE", engine)
        before = _engine.served
        rs = np.empty(k)
        c.Reduce_scatter_block(x, rs)
        ag = np.empty(size * k)
        c.Allgather(x[:k], ag)
        out = np.empty_like(x)
        c.Allreduce(x, out)
        assert _engine.served - before == (3 if engine == "compiled" else 0)
        if engine == "compiled":
            first = (rs, ag, out)
    for a, b in zip(first, (rs, ag, out)):
        assert a.tobytes() == b.tobytes()
    ref = np.empty(k)
    comm.Reduce_scatter_block(x, ref)
    assert np.allclose(rs, ref, equal_nan=True)
    ref = np.empty(size * k)
    comm.Allgather(x[:k], ref)
    assert ref.tobytes() == ag.tobytes()
    c.Free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("mode", ["sleep", "timeout"])
def test_waits_that_poll(comm, engine_ok, monkeypatch, mode):
    """wait="sleep" and MTCOLL_TIMEOUT: the kernel tests and sleeps in itself, or tests and
    returns for Python to check the deadline and call it again."""
    if mode == "timeout":
        monkeypatch.setenv("MTCOLL_TIMEOUT", "60")
    c = mtcoll.Comm(comm, algorithm="multitree", wait="sleep" if mode == "sleep" else "busy",
                    segment_bytes=1024)
    x = inputs(comm.Get_rank(), 20_000, "float64")
    fast, ran = run(c, x, MPI.SUM, "compiled", monkeypatch)
    assert ran == 1
    slow, _ = run(c, x, MPI.SUM, "python", monkeypatch)
    assert fast.tobytes() == slow.tobytes()
    c.Free()


def _timer_slack():
    return ctypes.CDLL(None).prctl(30, 0, 0, 0, 0)  # PR_GET_TIMERSLACK, in ns


@pytest.mark.mpi(min_size=2)
def test_sleeping_kernel_gives_up_on_time_and_restores_timer_slack(comm, engine_ok,
                                                                  monkeypatch):
    """wait="sleep": the kernel sleeps without returning to Python, yet a wait with a timeout
    gives up on time while a peer is late (the kernel comes back within its sleep budget), the
    late call then completes with the right sum, and the thread's timer slack, lowered while
    the kernel sleeps, is what it was before."""
    monkeypatch.setenv("MTCOLL_ENGINE", "compiled")
    linux = sys.platform.startswith("linux")
    slack = _timer_slack() if linux else None
    rank, n = comm.Get_rank(), comm.Get_size()
    dup = comm.Dup()
    ex = execute.Executor(dup, plan(parse(f"ring:{n}"), "ring"), wait="sleep")
    acc = np.arange(1000.0) + rank
    e = ex.start(acc, np.add, 0, blocking=True) if rank else None
    if rank:
        assert e.engine == "compiled"
        _engine.warm()  # the kernel loaded before the clock starts
        t0 = time.monotonic()
        assert e.wait(timeout=0.2) is False  # rank 0 has not started its part
        took = time.monotonic() - t0
        # (a kernel that never came back would hang here until rank 0 starts: never)
        assert 0.2 <= took < 30.0, took
    comm.Barrier()  # rank 0 starts once the others have given up once
    if not rank:
        e = ex.start(acc, np.add, 0, blocking=True)
        assert e.engine == "compiled"
    assert e.wait() is True
    assert np.array_equal(acc, n * np.arange(1000.0) + n * (n - 1) / 2)
    if linux:
        assert _timer_slack() == slack
    dup.Free()


@pytest.mark.mpi(min_size=2)
def test_nonblocking_and_calls_in_flight_stay_on_python(comm, engine_ok, monkeypatch):
    c = mtcoll.Comm(comm, algorithm="ring")
    x = inputs(comm.Get_rank(), 1000, "float64")
    before = _engine.served
    a, b, d = np.empty_like(x), np.empty_like(x), np.empty_like(x)
    with mtcoll.comm._progress.LOCK:  # the progress thread cannot complete it meanwhile
        req = c.Iallreduce(x, a)
        assert _engine.served == before
        ex = next(iter(c._executors.values()))
        lay = ex.layout(x.size, x.itemsize)
        if mtcoll.execute.running():  # (it may have completed already, if every rank is quick)
            assert "in flight" in _engine._why_not(ex, lay, b, np.add, True)
    c.Allreduce(x, b)  # served by either engine, whether or not the Iallreduce is still running
    req.Wait()
    served = _engine.served
    c.Allreduce(x, d)  # nothing in flight: the compiled engine
    assert _engine.served == served + 1
    assert a.tobytes() == b.tobytes() == d.tobytes()
    c.Free()


@pytest.mark.mpi(min_size=2)
def test_debug_names_the_engine(comm, engine_ok, monkeypatch, capfd):
    monkeypatch.setenv("MTCOLL_DEBUG", "1")
    c = mtcoll.Comm(comm, algorithm="ring")
    c.Allreduce(np.ones(64), np.empty(64))
    c.Iallreduce(np.ones(64), np.empty(64)).Wait()
    err = capfd.readouterr().err
    if comm.Get_rank() == 0:
        assert "engine=compiled" in err
        assert "engine=python (a nonblocking call" in err
    c.Free()


def test_bad_engine_value_names_variable(monkeypatch):
    monkeypatch.setenv("MTCOLL_ENGINE", "fast")
    with pytest.raises(ValueError, match=r"MTCOLL_ENGINE='fast' \(rank \d+ of MPI.COMM_WORLD\)"):
        _engine.engine_setting()


def test_unknown_reduction_falls_back():
    """Dtypes and reductions the kernel lacks are named, and left to the Python executor."""
    from mtcoll import execute
    from mtcoll.plan import plan
    from mtcoll.topology import parse

    class Fake:
        def Get_size(self):
            return 2

        def Get_rank(self):
            return 0

        def Get_attr(self, key):
            return 2**30

    ex = execute.Executor(Fake(), plan(parse("ring:2"), "ring"))
    lay = ex.layout(10, 2)
    why = _engine._why_not(ex, lay, np.zeros(10, np.float16), np.add, True)
    assert "float16" in why
    lay = ex.layout(10, 8)
    assert "reduction" in _engine._why_not(ex, lay, np.zeros(10), np.logaddexp, True)
    assert "nonblocking" in _engine._why_not(ex, lay, np.zeros(10), np.add, False)
    lay = ex.layout(10, 16)
    assert "complex PROD" in _engine._why_not(ex, lay, np.zeros(10, complex), np.multiply, True)


def test_one_kernel_signature(engine_ok):
    """Every call uses the one signature compiled ahead (bytes + dtype code), so a new dtype
    costs no compilation (see _engine.warm)."""
    _engine.warm()
    sigs = _engine._kernel().run.signatures
    assert len(sigs) == 1, sigs


LOADING = """\
from mpi4py import MPI
import numpy as np
import mtcoll
c = mtcoll.Comm(MPI.COMM_WORLD, algorithm="ring")
x = np.ones(1000)
for i in range(3):
    c.Allreduce(MPI.IN_PLACE, x)
assert np.all(x == c.Get_size() ** 3), x[:3]
print("loading ok", c.Get_rank())
"""


def test_first_call_runs_while_the_engine_loads_and_the_next_waits(tmp_path, engine_ok):
    # a new process: its first schedule call does not wait for the compiled engine (the
    # Python executor runs it), the second waits for the load and is compiled, as is the third
    import _mpirun

    script = tmp_path / "loading.py"
    script.write_text(LOADING)
    out = _mpirun.run(2, ["-m", "mpi4py", str(script)], timeout=180, MTCOLL_DEBUG="1",
                      MTCOLL_TUNING="off", MTCOLL_CALIBRATE="off")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("loading ok") == 2, out.stdout
    engines = re.findall(r"mtcoll\[rank 0\]: engine=(.*)", out.stderr)
    assert engines == ["python (the compiled engine is still loading, in the background)",
                       "compiled", "compiled"], out.stderr


CART_PROBE = """\
from mpi4py import MPI
import numpy as np
import mtcoll
from mtcoll import _calibrate
grid = mtcoll.Comm(MPI.COMM_WORLD).Create_cart([2], periods=[True])
_calibrate.calibrate(grid, debug=True)  # the full probe (python -m mtcoll --calibrate's)
grid.Allreduce(MPI.IN_PLACE, np.ones(1 << 16))
"""


def test_calibration_probe_prints_no_engine_lines(tmp_path, engine_ok):
    # the full probe of a new network (dozens of schedule calls): under MTCOLL_DEBUG only the
    # user's call prints, its call line and its engine line
    import _mpirun

    script = tmp_path / "cart_probe.py"
    script.write_text(CART_PROBE)
    out = _mpirun.run(2, ["-m", "mpi4py", str(script)], timeout=180, MTCOLL_DEBUG="1",
                      MTCOLL_TUNING="off", MTCOLL_ENGINE="compiled",
                      MTCOLL_CACHE_DIR=str(tmp_path / "cache"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "calibration source probe" in out.stderr, out.stderr  # the probe ran
    calls = re.findall(r"mtcoll\[rank 0\]: Allreduce count=65536 .*", out.stderr)
    engines = re.findall(r"mtcoll\[rank 0\]: engine=.*", out.stderr)
    assert len(calls) == 1, out.stderr
    assert len(engines) == (0 if "algorithm=native" in calls[0] else 1), out.stderr
