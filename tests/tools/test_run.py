"""The zero-line mode, ``python -m mtcoll.run``: unmodified mpi4py programs under mpiexec at 1,
2 and 3 ranks run their collectives on mtcoll, and behave as ``python script.py`` does
(``sys.argv``, ``__main__``, exit status, exceptions, ``python -m mpi4py``'s abort)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from mpi4py import MPI

import _mpirun
import mtcoll

ROOT = Path(__file__).resolve().parents[2]
SNIPPET = ROOT / "docs" / "snippets" / "dropin.py"
CART = ROOT / "tests" / "tools" / "cart_program.py"
SIZES = [1, 2, 3]
QUIET = dict(MTCOLL_TUNING="off", MTCOLL_CALIBRATE="off")  # no probe: the tests stay short


def zero_line(n, argv, **env):
    """``mpiexec -n n python -m mpi4py -m mtcoll.run *argv``, stderr apart."""
    return _mpirun.run(n, ["-m", "mpi4py", "-m", "mtcoll.run", *argv], timeout=180,
                       **{**QUIET, **env})


def debug_lines(stderr, **fields):
    """Rank 0's debug lines of calls whose fields (``count=7``...) are all as given."""
    out = []
    for line in stderr.splitlines():
        if not line.startswith("mtcoll[rank 0]: ") or " count=" not in line:
            continue
        have = dict(re.findall(r"(\w+)=(\S+)", line))
        if all(have.get(k) == str(v) for k, v in fields.items()):
            out.append(line)
    return out


def plain_dropin():
    """The README's snippet with its mtcoll lines undone: a plain mpi4py program."""
    lines = []
    for line in SNIPPET.read_text().splitlines():
        if line.strip() == "import mtcoll":
            continue
        line = line.replace("mtcoll.Comm(MPI.COMM_WORLD)", "MPI.COMM_WORLD")
        line = line.replace(" on {comm.network.spec}", "")  # (mtcoll's attribute)
        lines.append(line)
    text = "\n".join(lines) + "\n"
    assert "mtcoll" not in text.split("#")[0], text
    return text


@pytest.mark.parametrize("n", SIZES)
def test_plain_dropin_program_runs_its_allreduce_on_mtcoll(tmp_path, n):
    script = tmp_path / "dropin_plain.py"
    script.write_text(plain_dropin())
    out = zero_line(n, [str(script)], MTCOLL_DEBUG="1")
    assert out.returncode == 0, out.stdout + out.stderr
    total = float(sum(range(n)))
    found = sorted(re.findall(r"rank (\d+): (\S+)", out.stdout))
    assert found == [(str(r), str(total)) for r in range(n)], out.stdout
    assert "run: MPI.COMM_WORLD is <mtcoll.Comm" in out.stderr, out.stderr
    assert "as it was before the switch" not in out.stderr, out.stderr  # nothing took it
    served = debug_lines(out.stderr, count=1_000_000, dtype="float32")
    assert len(served) == 1, out.stderr
    if n > 1:  # 4 MB: the built-in rule's MultiTree, on the world's network
        assert "algorithm=multitree" in served[0], served
    assert re.search(r"run: mtcoll served 1 of the program's calls on rank 0", out.stderr)


def test_plain_dropin_program_is_plain_mpi4py(tmp_path):
    # the same file without the zero-line mode: mpi4py alone runs it, and mtcoll says nothing
    script = tmp_path / "dropin_plain.py"
    script.write_text(plain_dropin())
    out = _mpirun.run(2, ["-m", "mpi4py", str(script)], timeout=120, MTCOLL_DEBUG="1")
    assert out.returncode == 0, out.stdout + out.stderr
    assert sorted(re.findall(r"rank (\d+): (\S+)", out.stdout)) == [("0", "1.0"), ("1", "1.0")]
    assert "mtcoll" not in out.stderr, out.stderr


def _sub_is_mtcoll():
    return mtcoll.comm.Cartcomm.Sub is not MPI.Cartcomm.Sub


@pytest.mark.parametrize("n", SIZES)
def test_cartesian_program_runs_grid_and_split_calls_on_mtcoll(n):
    out = zero_line(n, [str(CART)], MTCOLL_DEBUG="1")
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(re.findall(r"cart_program: rank \d+ of \d+ ok", out.stdout)) == n, out.stdout
    dims = MPI.Compute_dims(n, 2)
    assert debug_lines(out.stderr, count=7), out.stderr  # the world
    grid = debug_lines(out.stderr, count=11)  # the grid: its network is the torus
    assert grid and f"topology=torus:{dims[0]}x{dims[1]}" in grid[0], out.stderr
    assert debug_lines(out.stderr, count=19), out.stderr  # a Split of the world


@pytest.mark.xfail(not _sub_is_mtcoll(), strict=True,
                   reason="Cartcomm.Sub returns a plain mpi4py communicator")
@pytest.mark.parametrize("n", [2, 3])
def test_cartesian_program_runs_sub_communicator_calls_on_mtcoll(n):
    out = zero_line(n, [str(CART)], MTCOLL_DEBUG="1")
    assert out.returncode == 0, out.stdout + out.stderr
    dims = MPI.Compute_dims(n, 2)
    assert debug_lines(out.stderr, count=13 * dims[1]), out.stderr  # a row's Allgather
    assert debug_lines(out.stderr, count=17 * dims[0]), out.stderr  # a column's


ARGV_SCRIPT = """\
import os, sys
from mpi4py import MPI
import mtcoll
assert __name__ == "__main__", __name__
assert sys.argv == [{path!r}, "a", "--flag"], sys.argv
assert sys.path[0] == os.path.dirname(os.path.realpath({path!r})), sys.path[0]
assert isinstance(MPI.COMM_WORLD, mtcoll.Comm), type(MPI.COMM_WORLD)
assert isinstance(MPI.COMM_WORLD.Dup(), mtcoll.Comm)
assert __file__ == {path!r}, __file__
def f(x: int): pass
assert f.__annotations__["x"] is int, "mtcoll.run's __future__ imports leaked"
class Kept:  # classes of __main__ pickle (the script is sys.modules["__main__"])
    pass
import pickle
assert isinstance(pickle.loads(pickle.dumps(Kept())), Kept)
print("argv ok", MPI.COMM_WORLD.Get_rank())
sys.exit(3)
"""


@pytest.mark.parametrize("n", SIZES)
def test_script_sees_its_argv_main_and_path_and_its_exit_status_is_kept(tmp_path, n):
    script = tmp_path / "argv_script.py"
    script.write_text(ARGV_SCRIPT.format(path=str(script)))
    out = zero_line(n, [str(script), "a", "--flag"])
    assert out.stdout.count("argv ok") == n, out.stdout + out.stderr
    assert out.returncode == 3, out.stdout + out.stderr


RAISES = """\
from mpi4py import MPI
import numpy as np
comm = MPI.COMM_WORLD
if comm.Get_rank() == comm.Get_size() - 1:
    raise ValueError("bad input on the last rank")
comm.Allreduce(MPI.IN_PLACE, np.ones(4))  # the others wait here for the last rank
"""


@pytest.mark.parametrize("n", SIZES)
def test_uncaught_exception_aborts_the_job_under_mpi4py(tmp_path, n):
    script = tmp_path / "raises.py"
    script.write_text(RAISES)
    try:
        out = zero_line(n, [str(script)])
    except subprocess.TimeoutExpired:
        pytest.fail("the ranks waiting for the one that raised were not aborted")
    assert out.returncode != 0
    assert "ValueError: bad input on the last rank" in out.stderr, out.stderr
    # the traceback starts at the program, as python script.py prints it
    tb = out.stderr.split("Traceback (most recent call last):", 1)[1]
    first = re.search(r'File "([^"]+)"', tb).group(1)
    assert first == str(script), out.stderr


def test_exception_without_mpi4py_exits_1_like_python(tmp_path):
    script = tmp_path / "raises.py"
    script.write_text(RAISES)
    out = zero_line_serial([str(script)])
    assert out.returncode == 1, out.stderr
    assert out.stderr.rstrip().endswith("ValueError: bad input on the last rank"), out.stderr


def zero_line_serial(argv, **env):
    """``python -m mtcoll.run *argv`` without mpiexec (a singleton MPI process)."""
    return _mpirun.run(1, ["-m", "mtcoll.run", *argv], timeout=120, **{**QUIET, **env})


MODULE = """\
import sys
from mpi4py import MPI
import mtcoll
assert __name__ == "__main__", __name__
assert isinstance(MPI.COMM_WORLD, mtcoll.Comm)
print("module ok", sys.argv[1:])
"""


@pytest.mark.parametrize("n", [1, 2])
def test_module_command_and_directory_forms_run_on_mtcoll(tmp_path, n):
    (tmp_path / "zl_module.py").write_text(MODULE)
    out = zero_line(n, ["-m", "zl_module", "x", "y"],
                    PYTHONPATH=f"{tmp_path}:{ROOT}")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("module ok ['x', 'y']") == n, out.stdout
    code = ("import sys; from mpi4py import MPI; import mtcoll; "
            "assert isinstance(MPI.COMM_WORLD, mtcoll.Comm); print('command ok', sys.argv)")
    out = zero_line(n, ["-c", code, "z"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("command ok ['-c', 'z']") == n, out.stdout
    app = tmp_path / "app"  # a directory with a __main__.py, as python app/ runs it
    app.mkdir()
    (app / "__main__.py").write_text(MODULE.replace("module ok", "directory ok"))
    out = zero_line(n, [str(app), "w"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("directory ok ['w']") == n, out.stdout


def test_bad_command_lines_say_so_and_exit_2(tmp_path):
    out = zero_line_serial([])
    assert out.returncode == 2 and out.stderr.startswith("usage: python -m mtcoll.run"), out
    out = zero_line_serial(["--help"])
    assert out.returncode == 0 and "python -m mtcoll.run -m module" in out.stdout, out
    out = zero_line_serial(["--bogus"])
    assert out.returncode == 2 and "unknown option '--bogus'" in out.stderr, out
    out = zero_line_serial(["-m"])
    assert out.returncode == 2 and "argument expected for option -m" in out.stderr, out
    missing = tmp_path / "no_such_script.py"
    out = zero_line_serial([str(missing)])
    assert out.returncode == 2, out
    assert f"can't open file '{missing}': [Errno 2]" in out.stderr, out.stderr


BYPASS = """\
from mpi4py import MPI
import numpy as np
plain = MPI.Intracomm(MPI.COMM_WORLD)  # a communicator of the same handle, mpi4py's own
plain.Allreduce(MPI.IN_PLACE, np.ones(5))
print("bypass ok")
"""


def test_debug_says_when_no_call_reached_mtcoll(tmp_path):
    script = tmp_path / "bypass.py"
    script.write_text(BYPASS)
    out = zero_line(2, [str(script)], MTCOLL_DEBUG="1")
    assert out.returncode == 0, out.stdout + out.stderr
    assert not debug_lines(out.stderr), out.stderr
    assert "run: no call of the program reached mtcoll on rank 0" in out.stderr, out.stderr


def test_debug_names_a_world_taken_before_the_switch(tmp_path):
    # sitecustomize runs at start-up, before mtcoll.run: what it keeps is mpi4py's world
    (tmp_path / "sitecustomize.py").write_text(
        "from mpi4py import MPI\nEARLY_WORLD = MPI.COMM_WORLD\n")
    script = tmp_path / "nothing.py"
    script.write_text("print('ran')\n")
    out = zero_line(1, [str(script)], MTCOLL_DEBUG="1", PYTHONPATH=f"{tmp_path}:{ROOT}")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "run: sitecustomize.EARLY_WORLD holds MPI.COMM_WORLD as it was before the switch" \
        in out.stderr, out.stderr


def test_module_is_importable_without_running_anything():
    # importing it (docs, tools) switches nothing: only python -m mtcoll.run and switch() do
    out = subprocess.run([sys.executable, "-c", "import mtcoll.run; from mpi4py import MPI; "
                          "import mtcoll; print(isinstance(MPI.COMM_WORLD, mtcoll.Comm))"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", out.stdout


FINALIZES = """\
from mpi4py import MPI
import numpy as np
x = np.ones(3)
MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, x)
assert np.all(x == MPI.COMM_WORLD.Get_size())
MPI.Finalize()
print("finalized")
"""


def test_program_that_finalizes_mpi_itself_ends_cleanly(tmp_path):
    script = tmp_path / "finalizes.py"
    script.write_text(FINALIZES)
    out = zero_line(2, [str(script)], MTCOLL_DEBUG="1")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("finalized") == 2, out.stdout
    assert "run: mtcoll served 1 of the program's calls on rank 0" in out.stderr, out.stderr
