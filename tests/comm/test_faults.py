"""A rank that fails in the middle of a collective ends the whole job.

Serial tests: each starts ``mpiexec -n 4 python -m mpi4py tests/comm/fault_script.py MODE`` through
tests/_mpirun.py and checks that the launcher ends with a non-zero status within 30 s and that
no rank process is left behind. The measured times are in docs/reliability.md
("Failing ranks").
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest

from _mpirun import ROOT, run

SCRIPT = str(Path(__file__).resolve().parent / "fault_script.py")
LIMIT = 30.0  # seconds: the bound for the job to end


def _leftovers(token):
    """PIDs of processes whose command line carries ``token`` (ranks that outlived mpiexec)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if token.encode() in cmd:
            found.append(int(pid))
    return found


def _launch(mode):
    token = f"fault-{uuid.uuid4().hex}"
    t0 = time.monotonic()
    proc = run(4, ["-m", "mpi4py", SCRIPT, mode, token], timeout=120)
    elapsed = time.monotonic() - t0
    left = []
    for _ in range(20):  # the launcher has returned; its ranks should be gone already
        left = _leftovers(token)
        if not left:
            break
        time.sleep(0.1)
    return proc, elapsed, left


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["raise", "exit", "sigkill", "between"])
def test_failing_rank_ends_job(mode):
    proc, elapsed, left = _launch(mode)
    out = proc.stdout + proc.stderr
    assert f"rank 1 fails mid-collective ({mode})" in out, out[-3000:]
    assert proc.returncode != 0, out[-3000:]
    assert "finished" not in proc.stdout, out[-3000:]
    assert elapsed < LIMIT, (elapsed, out[-3000:])
    assert not left, f"rank processes {left} outlived mpiexec"
    if mode in ("raise", "between"):
        assert "RuntimeError: rank 1 fails" in out  # mpi4py's traceback, then MPI_Abort
    print(f"{mode}: exit status {proc.returncode}, {elapsed:.2f} s")


@pytest.mark.slow
def test_control_run_succeeds():
    """The same script without a failure: every rank finishes, status 0 (the tests above are
    not passing because the script is broken)."""
    proc, elapsed, left = _launch("none")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert all(f"finished {r}" in proc.stdout for r in range(4))
    assert "fails" not in proc.stderr
    assert not left


def test_script_is_in_tree():
    assert Path(SCRIPT).is_relative_to(ROOT)
