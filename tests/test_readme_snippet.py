"""The drop-in example of the README (docs/snippets/dropin.py) runs under mpiexec -n 4."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SNIPPET = ROOT / "docs" / "snippets" / "dropin.py"


def _mpiexec():
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def test_dropin_snippet_runs_on_4_ranks():
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_size() > 1:
        pytest.skip("starts its own mpiexec; run it serially")
    launcher = _mpiexec()
    if launcher is None:
        pytest.skip("no mpiexec")
    # a clean environment: no PMI variables of an enclosing launch, no mtcoll overrides
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "HYDRA_", "MPIR_CVAR_", "MTCOLL_", "OMPI_"))}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["MTCOLL_DEBUG"] = "1"
    env.pop("PYTHONUNBUFFERED", None)  # unbuffered print writes text and newline apart
    out = subprocess.run([launcher, "-n", "4", sys.executable, str(SNIPPET)],
                         capture_output=True, text=True, env=env, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    # ranks' lines may interleave in the launcher's output: match them anywhere
    found = re.findall(r"rank (\d+): (\S+) on (torus:2x2)", out.stdout)
    assert sorted(found) == [(str(r), "6.0", "torus:2x2") for r in range(4)], out.stdout
    # 4 MB per rank is a large message: auto picks a schedule, not the MPI library
    assert re.search(r"mtcoll\[rank 0\]: Allreduce .*algorithm=multitree", out.stderr), out.stderr


def test_readme_shows_the_snippet_verbatim():
    readme = (ROOT / "README.md").read_text()
    assert SNIPPET.read_text() in readme
