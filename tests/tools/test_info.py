"""python -m mtcoll --info: versions, the auto topology for the communicator, paths."""

import json
import subprocess
import sys

import pytest
from mpi4py import MPI

from mtcoll.__main__ import info
from mtcoll.topology import auto_spec


def test_info_cli_json():
    if MPI.COMM_WORLD.Get_size() > 1:
        pytest.skip("starts its own interpreter; run it serially")
    out = subprocess.run([sys.executable, "-m", "mtcoll", "--info", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["mtcoll"] and d["mpi4py"] and d["numba"] and d["numpy"]
    assert d["mpi_library"].startswith(("MPICH", "Open MPI", "Intel"))
    assert d["ranks"] == 1 and d["auto_topology"] == "ring:1"
    assert d["tuning_source"] in ("default", "off", "MTCOLL_TUNING")


@pytest.mark.mpi
@pytest.mark.mpi_short
def test_info_reports_the_auto_topology_of_the_communicator():
    comm = MPI.COMM_WORLD
    d = info(comm)
    assert d["ranks"] == comm.size and d["auto_topology"] == auto_spec(comm.size)
