"""The drop-in example of the README (docs/snippets/dropin.py) runs under mpiexec -n 4."""

from __future__ import annotations

import re
from pathlib import Path

import _mpirun

ROOT = Path(__file__).resolve().parents[2]
SNIPPET = ROOT / "docs" / "snippets" / "dropin.py"


def test_dropin_snippet_runs_on_4_ranks(tmp_path):
    # as a new user runs it: no tuning file, an empty calibration cache (auto learns on the call)
    out = _mpirun.run(4, [str(SNIPPET)], MTCOLL_DEBUG="1", MTCOLL_TUNING="off",
                      MTCOLL_CACHE_DIR=str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    # ranks' lines may interleave in the launcher's output: match them anywhere
    found = re.findall(r"rank (\d+): (\S+) on (torus:2x2)", out.stdout)
    assert sorted(found) == [(str(r), "6.0", "torus:2x2") for r in range(4)], out.stdout
    # auto chose as it learns: the snippet's one call is the first trial call of its class
    assert re.search(r"mtcoll\[rank 0\]: Allreduce .*chosen by auto, learning: call 1 of",
                     out.stderr), out.stderr


def test_readme_shows_the_snippet_verbatim():
    readme = (ROOT / "README.md").read_text()
    assert SNIPPET.read_text() in readme


def _quickstart_commands(text: str) -> list[str]:
    # the first sh block after the "## Quickstart" heading, comments stripped
    section = text.split("## Quickstart", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines()
            if line.split("#", 1)[0].strip()]


def test_ci_runs_the_readme_quickstart_as_written():
    readme = _quickstart_commands((ROOT / "README.md").read_text())
    assert readme == ["make bench", "make test"], readme
    ci = [line.split("<", 1)[0].strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if re.match(r"make\b", line)]
    # CI adds two passes of its own between the two: mpi4py's test suite with mtcoll.Comm, and
    # the Open MPI one
    extra = ("make conformance", "make test-openmpi")
    assert ci == ["make bench", *extra, "make test"], ci
    assert [x for x in ci if x not in extra] == readme, ci
