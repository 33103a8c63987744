"""Run the whole test suite, serially and under mpiexec at several sizes; stop at the first failure.

Usage (from the project root, with the project's interpreter; ``make test`` does exactly this)::

    .venv/bin/python tests/run_suite.py

Runs, in order:

1. ``python -m pytest --with-mpi``: serial tests and the MPI tests that allow one rank;
2. ``mpiexec -n K python -m mpi4py -m pytest --with-mpi -m mpi`` for each K in ``MPI_SIZES``;
3. ``mpiexec -n MPI_SHORT_SIZE python -m mpi4py -m pytest --with-mpi -m mpi_short``: the tests
   cheap enough for a heavily oversubscribed run.

Environment overrides:

``MPI_SIZES``       sizes of step 2 (default ``"2 3 4 5 8"``; ``""`` skips step 2)
``MPI_SHORT_SIZE``  size of step 3 (default ``16``; ``0`` skips it)
``PYTEST_ARGS``     extra pytest arguments for every run, e.g. ``"-k allreduce -x"``
``MPIEXEC``         launcher command, e.g. ``"mpiexec --oversubscribe"`` for Open MPI (default:
                    the ``mpiexec`` beside this interpreter, from the ``mpich`` wheel, else PATH)
``SUITE_TIMEOUT``   seconds one run may take before its whole process group is killed (default
                    1200; pytest-timeout's per-test limit normally fires long before this)

Counting: tests/conftest.py appends every outcome to ``MTCOLL_TEST_LOG`` (one JSON line each) as
it happens, so a run that ends in ``MPI_Abort`` is still counted. A test counts once per run, by
its worst outcome on any rank. A run that fails without any recorded failure (a crash, a kill)
counts as one failed test. Rank 0 also writes ``build/test-results/<run>.xml`` (junit).

The last line printed is ``suite: N passed, M failed[, K skipped]``, totalled over all runs.
Exit status: 0 if every run passed and at least one test ran, 1 otherwise. A run whose selection
is empty at its size (pytest's exit status 5) is fine.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "build" / "test-results"

NO_TESTS_COLLECTED = 5
# pytest's report categories, folded into the three we print.
FOLD = {"passed": "passed", "xpassed": "passed", "failed": "failed", "error": "failed",
        "skipped": "skipped", "xfailed": "skipped"}
SEVERITY = {"skipped": 0, "passed": 1, "failed": 2}


def say(*parts: object) -> None:
    print("run_suite:", *parts, flush=True)


def mpiexec() -> list[str]:
    if os.environ.get("MPIEXEC"):
        return shlex.split(os.environ["MPIEXEC"])
    beside = Path(sys.executable).parent / "mpiexec"  # the venv's bin/, not the resolved one
    if beside.exists():
        return [str(beside)]
    found = shutil.which("mpiexec")
    if found:
        return [found]
    sys.exit("run_suite: no mpiexec: install the 'mpich' extra or set MPIEXEC")


def versions(launcher: list[str] | None) -> None:
    from importlib import metadata

    found = []
    for dist in ("mtcoll", "pytest", "mpi4py", "mpich", "numpy", "numba", "hypothesis"):
        try:
            found.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    say(f"python {sys.version.split()[0]} ({sys.executable});", ", ".join(found))
    if launcher:
        try:
            text = subprocess.run(launcher + ["--version"], capture_output=True, text=True,
                                  timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired) as exc:
            text = f"({exc})"
        # Hydra's first lines are a title and 'Version: x'; Open MPI's first line says it all.
        head = " ".join(" ".join(text.splitlines()[:2]).split())
        say(shlex.join(launcher), "--version:", head)


def runs() -> list[tuple[str, list[str]]]:
    py = sys.executable
    sizes = [int(k) for k in os.environ.get("MPI_SIZES", "2 3 4 5 8").split()]
    short = int(os.environ.get("MPI_SHORT_SIZE", "16") or 0)
    # Every rank would write pytest's cache at the same time; the serial run keeps it (--lf).
    under_mpi = ["-m", "mpi4py", "-m", "pytest", "--with-mpi", "-p", "no:cacheprovider"]
    todo = [("serial", [py, "-m", "pytest", "--with-mpi"])]
    if sizes or short:
        launcher = mpiexec()
        todo += [(f"mpi-{k}", launcher + ["-n", str(k), py] + under_mpi + ["-m", "mpi"])
                 for k in sizes]
        if short:
            todo.append((f"mpi-{short}-short",
                         launcher + ["-n", str(short), py] + under_mpi + ["-m", "mpi_short"]))
    return todo


def run(name: str, cmd: list[str], timeout: float) -> tuple[int, float]:
    """Run one pytest session in its own process group; return (exit status, seconds)."""
    env = dict(os.environ, MTCOLL_TEST_LOG=str(RESULTS / f"{name}.jsonl"))
    if name != "serial":
        # Many ranks on few cores: one compute thread each.
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "NUMBA_NUM_THREADS"):
            env.setdefault(var, "1")
    say(f"[{name}] $", shlex.join(cmd))
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        status = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        say(f"[{name}] still running after {timeout:.0f}s: killing its process group")
        _kill(proc)
        status = 124
    except BaseException as exc:  # Ctrl-C, or SIGTERM (see main): the job is in its own group
        _kill(proc, signal.SIGINT if isinstance(exc, KeyboardInterrupt) else signal.SIGTERM)
        raise
    return status, time.monotonic() - start


def _kill(proc: subprocess.Popen, first: int = signal.SIGTERM) -> None:
    # mpiexec and its ranks share the group we created; MPI processes may ignore a polite signal.
    for sig, grace in ((first, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            pass


def tally(log: Path) -> tuple[dict[str, int], list[str]]:
    """Count a run's outcomes; also return the tests that started but never reported."""
    worst: dict[str, str] = {}
    started: list[str] = []
    if log.exists():
        for line in log.read_text().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if event.get("event") == "start":
                started.append(event["nodeid"])
                continue
            outcome = FOLD.get(event.get("category", ""))
            if outcome is None:
                continue
            node = event["nodeid"]
            if node not in worst or SEVERITY[outcome] > SEVERITY[worst[node]]:
                worst[node] = outcome
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for outcome in worst.values():
        counts[outcome] += 1
    return counts, [node for node in started if node not in worst]


def summary(counts: dict[str, int]) -> str:
    line = f"{counts['passed']} passed, {counts['failed']} failed"
    if counts["skipped"]:
        line += f", {counts['skipped']} skipped"
    return line


def _terminated(signum, frame):
    raise SystemExit(128 + signum)


def main() -> int:
    signal.signal(signal.SIGTERM, _terminated)
    RESULTS.mkdir(parents=True, exist_ok=True)
    extra = shlex.split(os.environ.get("PYTEST_ARGS", ""))
    timeout = float(os.environ.get("SUITE_TIMEOUT", "1200"))
    todo = runs()
    versions(mpiexec() if len(todo) > 1 else None)
    total = {"passed": 0, "failed": 0, "skipped": 0}
    failed_run = None
    for i, (name, cmd) in enumerate(todo):
        for old in (RESULTS / f"{name}.jsonl", RESULTS / f"{name}.xml"):
            old.unlink(missing_ok=True)
        cmd = cmd + [f"--junitxml={RESULTS / f'{name}.xml'}"] + extra
        status, seconds = run(name, cmd, timeout)
        counts, unfinished = tally(RESULTS / f"{name}.jsonl")
        recorded = sum(counts.values())
        ok = (status == 0 or (status == NO_TESTS_COLLECTED and recorded == 0)) \
            and counts["failed"] == 0
        if not ok and counts["failed"] == 0:
            counts["failed"] = 1
            where = f"during {unfinished[-1]}" if unfinished else "outside any test"
            say(f"[{name}] ended with exit status {status} {where}, no failure reported:"
                " counted as one failed test")
        for key in total:
            total[key] += counts[key]
        note = " (nothing selected at this size)" if ok and recorded == 0 else ""
        say(f"[{name}] {summary(counts)} in {seconds:.1f}s, exit status {status}{note}")
        if not ok:
            failed_run = name
            rest = [later for later, _ in todo[i + 1:]]
            if rest:
                say("stopping at the first failing run; not run:", " ".join(rest))
            break
    ran = total["passed"] + total["failed"]
    if failed_run is None and ran == 0:
        say("no test ran at all: failing the suite")
    print(f"suite: {summary(total)}", flush=True)
    return 1 if failed_run is not None or ran == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
