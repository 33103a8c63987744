"""For the serial tests that start their own ``mpiexec`` (the README snippet, the bench, the
trainer): one launcher, one clean environment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def mpiexec():
    """The mpiexec beside this interpreter (the venv's, from the mpich wheel), else PATH's."""
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def require():
    """The launcher, or a skip: under mpiexec already, or no mpiexec here."""
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_size() > 1:
        pytest.skip("starts its own mpiexec; run it serially")
    launcher = mpiexec()
    if launcher is None:
        pytest.skip("no mpiexec")
    return launcher


def run(n, argv, timeout=240, merged=False, **env_extra):
    """``mpiexec -n n python *argv`` in a clean environment; the CompletedProcess.

    Skips (the same on every rank) when the test itself runs under mpiexec, or there is no
    mpiexec. The environment drops an enclosing launch's PMI/hydra/Open MPI variables (but
    Open MPI's permission to run as root) and every
    ``MTCOLL_*`` override, puts the source tree first on PYTHONPATH, keeps BLAS to one thread
    (ranks share two cores), and drops PYTHONUNBUFFERED (unbuffered print writes text and
    newline apart, and the launcher interleaves ranks' lines). ``merged``: stderr into the
    same pipe as stdout, as ``2>&1`` does (the result's ``stdout`` holds both).
    """
    launcher = require()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "HYDRA_", "MPIR_CVAR_", "MTCOLL_", "OMPI_"))
           or k.startswith("OMPI_ALLOW_RUN_AS_ROOT")}  # (Open MPI's launcher, as root)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = env["OPENBLAS_NUM_THREADS"] = "1"
    env.pop("PYTHONUNBUFFERED", None)
    env.update(env_extra)
    return subprocess.run([launcher, "-n", str(n), sys.executable, *argv],
                          stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT if merged else subprocess.PIPE,
                          text=True, env=env, timeout=timeout)
