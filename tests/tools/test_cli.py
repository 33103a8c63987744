"""What every tool shares (mtcoll/_cli.py): whole progress lines, stderr flushed before the
table, ``--ranks`` for ``auto``, saying where a file went, ``--info``'s values, the plan's time
keys, and a quiet exit on a closed pipe. Serial: each test starts its own interpreter."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
from mpi4py import MPI

from mtcoll import _cli

import _mpirun

pytestmark = pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1,
                                reason="starts its own interpreters; run it serially")


def _tool(*args, **kw):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          timeout=300, **kw)


# -- 2. whole lines, stderr before stdout ---------------------------------------------------------

class _Stream(io.StringIO):
    """A stream that logs every write and flush, as (name, event, text)."""

    def __init__(self, name, log):
        super().__init__()
        self.name, self.log = name, log

    def write(self, text):
        self.log.append((self.name, "write", text))
        return super().write(text)

    def flush(self):
        self.log.append((self.name, "flush", ""))


def test_say_writes_the_whole_line_at_once_and_flushes(monkeypatch):
    log = []
    monkeypatch.setattr(sys, "stderr", _Stream("err", log))
    _cli.say("mtcoll.x: a progress line")
    assert log == [("err", "write", "mtcoll.x: a progress line\n"), ("err", "flush", "")]


def test_report_flushes_stderr_before_the_table(monkeypatch, tmp_path):
    log = []
    monkeypatch.setattr(sys, "stderr", _Stream("err", log))
    monkeypatch.setattr(sys, "stdout", _Stream("out", log))
    _cli.report({"a": 1}, None, lambda: sys.stdout.write("the table\n"), "mtcoll.x")
    assert log[0] == ("err", "flush", "")
    assert [e for e in log if e[1] == "write"] == [("out", "write", "the table\n")]
    assert log[-1] == ("out", "flush", "")
    # --json FILE: the file is named on stderr, in one whole line, before the table
    log.clear()
    path = tmp_path / "r.json"
    _cli.report({"a": 1}, str(path), lambda: sys.stdout.write("the table\n"), "mtcoll.x")
    writes = [e for e in log if e[1] == "write"]
    assert writes == [("err", "write", f"mtcoll.x: JSON written to {path}\n"),
                      ("out", "write", "the table\n")]
    assert json.loads(path.read_text()) == {"a": 1}


def _no_glued_lines(text, prefix):
    """Every occurrence of ``prefix`` starts a line: no progress line was cut by the table."""
    bad = [ln for ln in text.splitlines() if prefix in ln and not ln.startswith(prefix)]
    assert not bad, f"lines with {prefix!r} inside: {bad}"


# Which of two pipes mpiexec forwards first is not ours to order (a stderr line written just
# before the table can still arrive after it under load): these tests check that no line is
# cut, and that the table, written at once, arrives in one piece.

def test_bench_progress_and_table_do_not_interleave_under_2_and_1():
    out = _mpirun.run(2, ["-m", "mtcoll.bench", "--sizes", "1K,8K", "--algorithms",
                          "ring,native", "--time-per-size", "0.05"], merged=True)
    assert out.returncode == 0, out.stdout
    _no_glued_lines(out.stdout, "mtcoll.bench:")
    _no_glued_lines(out.stdout, "# mtcoll.bench allreduce")
    lines = out.stdout.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("# mtcoll.bench allreduce"))
    end = next(i for i, ln in enumerate(lines) if ln.startswith("# 4 measurements"))
    assert not any(ln.startswith("mtcoll.bench:") for ln in lines[head:end])
    assert sum(ln.startswith("mtcoll.bench: [") for ln in lines) == 4


def test_train_banner_and_table_do_not_interleave_under_2_and_1():
    out = _mpirun.run(2, ["-m", "mtcoll.train", "--stages", "2", "--epochs", "1"], merged=True)
    assert out.returncode == 0, out.stdout
    _no_glued_lines(out.stdout, "mtcoll.train:")
    _no_glued_lines(out.stdout, "epoch")
    lines = out.stdout.splitlines()
    assert sum(ln.startswith("mtcoll.train: ") for ln in lines) == 1
    assert sum(ln.split()[:1] == ["epoch"] for ln in lines) == 1


# -- 3. --ranks for auto --------------------------------------------------------------------------

@pytest.mark.parametrize("tool", ["mtcoll.plan", "mtcoll.simulate"])
def test_auto_needs_and_takes_ranks(tool):
    extra = ["--sizes", "1M"] if tool == "mtcoll.simulate" else []
    out = _tool(tool, "--topology", "auto", *extra)
    assert out.returncode == 2
    assert "--topology auto needs --ranks N" in out.stderr and "Traceback" not in out.stderr
    out = _tool(tool, "--topology", "auto", "--ranks", "12", "--json", *extra)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    spec = d["topology"] if tool == "mtcoll.plan" else d["meta"]["topologies"][0]["topology"]
    assert spec == "torus:3x4"
    out = _tool(tool, "--topology", "torus:4x4", "--ranks", "15", *extra)
    assert out.returncode == 2
    assert "--topology torus:4x4 has 16 ranks, not the 15 of --ranks" in out.stderr
    out = _tool(tool, "--topology", "auto", "--ranks", "0", *extra)
    assert out.returncode == 2 and "--ranks must be a positive integer" in out.stderr


def test_resolve_topology_keeps_a_comma_list():
    assert _cli.resolve_topology("auto, ring:4", 4) == "torus:2x2,ring:4"
    assert _cli.resolve_topology("torus:2x3", None) == "torus:2x3"


# -- 4. tools say where they wrote a file ----------------------------------------------------------

def test_simulate_says_where_plot_and_json_went(tmp_path):
    pytest.importorskip("matplotlib")
    png, js = tmp_path / "s.png", tmp_path / "s.json"
    out = _tool("mtcoll.simulate", "--topology", "ring:4", "--sizes", "1M", "--plot", str(png),
                "--json", str(js))
    assert out.returncode == 0, out.stderr
    assert f"mtcoll.simulate: plot written to {png}\n" in out.stderr
    assert f"mtcoll.simulate: JSON written to {js}\n" in out.stderr
    assert png.stat().st_size > 0 and json.loads(js.read_text())["results"]
    out = _tool("mtcoll.simulate", "--topology", "ring:4", "--sizes", "1M", "--plot",
                str(tmp_path / "no" / "such" / "dir.png"))
    assert out.returncode == 2 and "--plot: cannot write" in out.stderr


def test_plan_says_where_the_schedule_went(tmp_path):
    npz = tmp_path / "p.npz"
    out = _tool("mtcoll.plan", "--topology", "ring:4", "--save", str(npz))
    assert out.returncode == 0, out.stderr
    assert f"mtcoll.plan: schedule saved to {npz}\n" in out.stderr and npz.exists()


# -- 5. --info's values ---------------------------------------------------------------------------

def test_info_values_are_clean():
    out = _tool("mtcoll", "--info", "--json")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert "  " not in d["mpi_library"] and d["mpi_library"] == d["mpi_library"].strip()
    dirs = d["numba_cache_dirs"]
    assert dirs and all(os.path.isabs(p) and "*" not in p for p in dirs)
    env = dict(os.environ, NUMBA_CACHE_DIR="/tmp/mtcoll-nbc")
    d = json.loads(_tool("mtcoll", "--info", "--json", env=env).stdout)
    assert d["numba_cache_dirs"] == ["/tmp/mtcoll-nbc"]


# -- 6. the plan's time keys ----------------------------------------------------------------------

def test_plan_time_keys_cannot_be_misread():
    out = _tool("mtcoll.plan", "--topology", "torus:4x4", "--json")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["total_seconds"] == pytest.approx(d["planning_seconds"] + d["validation_seconds"])
    assert d["plan_seconds"] == d["total_seconds"]  # the old name, kept for one version


# -- 7. a closed pipe -----------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["mtcoll.simulate", "--topology", "torus:4x4", "--sizes", "1M,4M"],
    ["mtcoll.plan", "--topology", "torus:4x4"],
    ["mtcoll", "--info"],
])
def test_a_closed_pipe_ends_the_tool_quietly(argv):
    # the reading end is closed before the tool writes anything, so its first write fails
    p = subprocess.Popen([sys.executable, "-m", *argv], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=300) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_simulate_auto_engine_matches_both_engines():
    from mtcoll.plan import plan
    from mtcoll.simulate import NUMBA_FROM, simulate

    small = plan("torus:4x4", "multitree")
    assert small.ntransfers < NUMBA_FROM
    for mode, sharing in (("step", "fair"), ("step", "priority"), ("dataflow", "fair")):
        kw = dict(nbytes=1 << 20, mode=mode, sharing=sharing)
        auto = simulate(small, **kw)
        assert auto.time == simulate(small, engine="python", **kw).time
        assert auto.time == simulate(small, engine="numba", **kw).time
