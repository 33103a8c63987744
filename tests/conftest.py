"""Test harness shared by every test: MPI-aware reporting, fail-fast aborts, fixtures.

The same suite runs serially (``python -m pytest --with-mpi``, one rank) and under
``mpiexec -n K python -m mpi4py -m pytest --with-mpi -m mpi``. With more than one rank:

* only rank 0 reports to the terminal and writes ``--junitxml``;
* a failure (or error) on any rank prints its report to stderr, tagged with the rank, and then
  calls ``MPI.COMM_WORLD.Abort(1)``: the other ranks may be blocked in a collective the failed
  rank will never enter, so the only failure mode we allow is a quick, loud one;
* a pytest-timeout expiry does the same (rank-tagged stacks, then ``Abort``); pytest-timeout's
  own thread method would write through the terminal reporter, silent on ranks > 0.

When ``MTCOLL_TEST_LOG`` names a file, each outcome is appended to it as one JSON line as soon as
it is known (rank 0: every test; other ranks: their failures). ``tests/run_suite.py`` counts from
this log, which survives an ``Abort`` that leaves no junit file behind.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback

import pytest

# The library's cross-rank agreement check is always on in the tests; it must be set before
# any test module imports mtcoll.
os.environ["MTCOLL_CHECK"] = "1"
# Tests choose their algorithms themselves: a developer's tuning file must not change them.
os.environ["MTCOLL_TUNING"] = "off"
# ... nor may a calibration measured on this (shared, noisy) machine: auto follows its
# built-in rule unless a test turns calibration on (tests/comm/test_calibrate.py).
os.environ["MTCOLL_CALIBRATE"] = "off"

_rank = 0
_size = 1
_config = None
_ABORT_GRACE = 1.0  # seconds


def _launched_by_mpiexec() -> bool:
    # Hydra/MPICH and Intel MPI set PMI_SIZE, Open MPI OMPI_COMM_WORLD_SIZE.
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        try:
            if int(os.environ.get(var, "1")) > 1:
                return True
        except ValueError:
            pass
    return False


def _abort(code: int = 1) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    # mpiexec tears the job down without draining the ranks' output pipes: give it a moment to
    # forward the report just written, or it is lost (seen with hydra, output redirected).
    time.sleep(_ABORT_GRACE)
    try:
        from mpi4py import MPI

        MPI.COMM_WORLD.Abort(code)
    finally:
        os._exit(code)


def _log(**event) -> None:
    path = os.environ.get("MTCOLL_TEST_LOG")
    if not path:
        return
    event["rank"] = _rank
    line = (json.dumps(event) + "\n").encode()
    # One O_APPEND write per event, so that lines from several ranks never interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _detect(config) -> None:
    global _rank, _size, _config
    if _config is config:
        return
    _config = config
    if config.getoption("with_mpi", False) or config.getoption("only_mpi", False) \
            or _launched_by_mpiexec():
        from mpi4py import MPI

        _rank, _size = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    # Called for this (initial) conftest before any pytest_configure, in particular before the
    # junitxml plugin opens its file: only rank 0 writes it.
    _detect(config)
    if _rank != 0:
        config.option.xmlpath = None
    # Before hypothesis's own pytest_configure, so --hypothesis-* options still apply on top.
    _hypothesis_profile()


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    _detect(config)
    if _rank != 0:
        # Swap in a reporter that writes to /dev/null (after the terminal plugin registered
        # the real one): rank 0 speaks for all, failures on this rank go to stderr instead.
        from _pytest.terminal import TerminalReporter

        loud = config.pluginmanager.getplugin("terminalreporter")
        if loud is not None:
            config.pluginmanager.unregister(loud)
            config.pluginmanager.register(TerminalReporter(config, open(os.devnull, "w")),
                                          "terminalreporter")


def _hypothesis_profile() -> None:
    try:
        from hypothesis import settings
    except ImportError:
        return
    # numba compiles on first call, far beyond hypothesis's default 200 ms deadline.
    settings.register_profile("mtcoll", deadline=None)
    # Under MPI every rank must draw the same examples, or the ranks call different collectives.
    settings.register_profile("mtcoll-mpi", deadline=None, derandomize=True, database=None)
    settings.load_profile("mtcoll-mpi" if _size > 1 else "mtcoll")


def pytest_report_header(config):
    if _size > 1:
        return f"mtcoll: {_size} MPI ranks; only rank 0 reports; a failure on any rank aborts"
    return None


def pytest_runtest_logstart(nodeid, location):
    if _rank == 0:
        _log(event="start", nodeid=nodeid)


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report):
    status = _config.hook.pytest_report_teststatus(report=report, config=_config)
    category = status[0] if status else ""
    if category and (_rank == 0 or report.failed):
        _log(event="outcome", nodeid=report.nodeid, when=report.when, category=category)
    if report.failed and _size > 1:
        _print_failure(report, f"{report.nodeid} ({report.when})")
        _abort(1)


@pytest.hookimpl(trylast=True)
def pytest_collectreport(report):
    if not report.failed:
        return
    _log(event="outcome", nodeid=report.nodeid or "<collection>", when="collect",
         category="error")
    if _size > 1:
        _print_failure(report, f"collecting {report.nodeid or 'tests'}")
        _abort(1)


def _print_failure(report, what: str) -> None:
    text = [f"\n{'=' * 20} [rank {_rank} of {_size}] FAILED {what} {'=' * 20}\n",
            report.longreprtext, "\n"]
    for title, content in getattr(report, "sections", []):
        text += [f"{'-' * 10} [rank {_rank}] {title} {'-' * 10}\n", content, "\n"]
    text.append(f"[rank {_rank}] aborting the MPI job\n")
    capman = _config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        with capman.global_and_fixture_disabled():
            sys.stderr.write("".join(text))
            sys.stderr.flush()
    else:
        sys.stderr.write("".join(text))
        sys.stderr.flush()


# --- timeouts ----------------------------------------------------------------------------------

@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item, settings):
    if _size == 1:
        return None  # pytest-timeout's own handling reports fine on a single rank
    timer = threading.Timer(settings.timeout, _timeout_expired, (item, settings))
    timer.daemon = True
    timer.name = f"mtcoll timeout {item.nodeid}"
    item._mtcoll_timer = timer
    timer.start()
    return True


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_cancel_timer(item):
    timer = getattr(item, "_mtcoll_timer", None)
    if timer is None:
        return None
    timer.cancel()
    return True


def _timeout_expired(item, settings) -> None:
    try:
        capman = item.config.pluginmanager.getplugin("capturemanager")
        out = err = ""
        if capman is not None:
            capman.suspend_global_capture(item)
            out, err = capman.read_global_capture()
        _log(event="outcome", nodeid=item.nodeid, when="timeout", category="failed")
        me = threading.get_ident()
        text = [f"\n{'+' * 20} [rank {_rank} of {_size}] TIMEOUT (>{settings.timeout}s) "
                f"{item.nodeid} {'+' * 20}\n"]
        if out:
            text += [f"[rank {_rank}] captured stdout:\n", out, "\n"]
        if err:
            text += [f"[rank {_rank}] captured stderr:\n", err, "\n"]
        for ident, frame in sys._current_frames().items():
            if ident != me:
                stack = [f for f in traceback.extract_stack(frame) if not _harness_frame(f)]
                text += [f"{'~' * 10} [rank {_rank}] stack of thread {ident} {'~' * 10}\n",
                         "".join(traceback.format_list(stack))]
        text.append(f"[rank {_rank}] aborting the MPI job\n")
        sys.stderr.write("".join(text))
    finally:
        _abort(1)


def _harness_frame(frame: traceback.FrameSummary) -> bool:
    # pytest, pluggy and the runpy/mpi4py launch frames above the test say nothing about a hang.
    name = frame.filename.replace(os.sep, "/")
    return any(part in name for part in ("/_pytest/", "/pluggy/", "/mpi4py/run.py",
                                         "/mpi4py/__main__.py", "/pytest/__main__.py",
                                         "<frozen runpy>"))


# --- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def comm():
    """``MPI.COMM_WORLD`` (size 1 in the serial run)."""
    from mpi4py import MPI

    return MPI.COMM_WORLD


@pytest.fixture
def need_size(comm):
    """Skip the test unless the communicator size fits.

    ``need_size(min_size=2)``, ``need_size(max_size=8)``, ``need_size(multiple_of=4)`` or
    ``need_size(fits=lambda n: n in (4, 8, 16), why="a 2-D torus")``; returns the size. The
    size is the same on every rank, so every rank skips together.
    """
    def check(min_size: int = 1, max_size: int | None = None, multiple_of: int = 1,
              fits=None, why: str = "") -> int:
        n = comm.Get_size()
        ok = n >= min_size and (max_size is None or n <= max_size) and n % multiple_of == 0 \
            and (fits is None or fits(n))
        if not ok:
            want = [f">= {min_size}" if min_size > 1 else "",
                    f"<= {max_size}" if max_size is not None else "",
                    f"a multiple of {multiple_of}" if multiple_of > 1 else "", why]
            pytest.skip(f"needs {', '.join(w for w in want if w) or 'another'} ranks, have {n}")
        return n

    return check
