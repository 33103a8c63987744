"""mpi4py's own test suite, run once on plain mpi4py and once with ``mtcoll.Comm`` in its place.

Usage (from the project root, with the project's interpreter; ``make conformance`` does this)::

    .venv/bin/python tests/mpi4py_conformance.py [--sizes 1 2 3] [--modules test_comm ...]
                                                 [--algorithms multitree ring ...] [--json FILE]

The ``test/`` directory of the installed mpi4py's source release comes from the package index
(``pip download --no-binary :all: mpi4py==VERSION``) once, and is kept in
``MTCOLL_CONFORMANCE_CACHE`` (default ``~/.cache/mtcoll/mpi4py-VERSION-test``); nothing else is
fetched. Each module that takes a communicator runs in its own ``mpiexec`` (so that a crash
cannot hide the other modules), at every size of ``--sizes``:

* ``plain``: the module as mpi4py ships it;
* ``mtcoll``: every test class's communicator is an ``mtcoll.Comm`` of it -- the class
  attribute ``COMM`` (``MPI.COMM_WORLD``, ``MPI.COMM_SELF``) wrapped at import, and what
  ``setUp`` assigns (``MPI.COMM_WORLD.Dup()``...) made from an mtcoll Comm, the one-line switch
  a user makes (one helper of mpi4py's tests is adapted, :data:`ADAPTED`: test_comm_topo's
  ``checkHandle`` asserts that a handle's round trip gives back the same Python class, which no
  subclass of mpi4py's communicators can give; the adapted check asserts that
  ``mtcoll.Comm`` of the round trip is the very Comm, and the rest of each test runs as
  shipped);
* at the largest size, ``mtcoll`` again with each algorithm forced by ``MTCOLL_ALGO``, for the
  modules that call a collective mtcoll runs itself (``Allreduce``, ``Iallreduce``,
  ``Reduce_scatter_block``, ``Allgather``).

Every rank appends each test's outcome to its own file as the test ends (and a ``started``
line before it), so a crash still tells which tests passed and which one was running. A test
counts as passed when it passed on every rank. The table per module and size shows the tests
passed plain, passed with mtcoll, and ``worse``: passed plain but not with mtcoll (failed,
errored, skipped or never run). The exit status is 1 when any test is worse, else 0.

As in the test suite, ``MTCOLL_TUNING`` and ``MTCOLL_CALIBRATE`` are ``off`` (``auto`` follows
its built-in rule, so the run does not depend on a calibration measured on a loaded machine).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from run_suite import mpiexec  # noqa: E402  (the launcher run_suite uses)

#: mpi4py's modules that take a communicator (a ``COMM`` class attribute or ``self.COMM`` in
#: ``setUp``): all 28 of its ``test/`` directory at version 4.1.
MODULES = (
    "test_cco_buf", "test_cco_nb_buf", "test_cco_nb_vec", "test_cco_ngh_buf", "test_cco_ngh_obj",
    "test_cco_obj", "test_cco_pr_buf", "test_cco_pr_ngh_buf", "test_cco_pr_vec", "test_cco_vec",
    "test_comm", "test_comm_topo", "test_file", "test_io", "test_msgzero", "test_p2p_buf",
    "test_p2p_buf_matched", "test_p2p_buf_part", "test_p2p_obj", "test_p2p_obj_matched",
    "test_pack", "test_rma", "test_rma_nb", "test_spawn", "test_ulfm", "test_util_pkl5",
    "test_util_sync", "test_win",
)

#: the calls mtcoll runs on its own schedules: a module calling one of them also runs with
#: every algorithm forced
OWN_CALLS = re.compile(r"\.(Allreduce|Iallreduce|Reduce_scatter_block|Allgather)\(")

MODULE_TIMEOUT = float(os.environ.get("MTCOLL_CONFORMANCE_TIMEOUT", "300"))

PASSED = "passed"


# -- the child: one module on one rank ---------------------------------------------------------

def _wrap_classes(module, MPI, mtcoll):
    """Give every test class of ``module`` an mtcoll communicator: its ``COMM`` class attribute
    wrapped once (in a fixed order, the same on every rank: the construction is collective),
    and ``setUp`` run with ``MPI.COMM_WORLD``/``MPI.COMM_SELF`` standing for mtcoll Comms of
    them, so that ``self.COMM = MPI.COMM_WORLD.Dup()`` gives an mtcoll communicator."""
    import unittest

    world = mtcoll.Comm(MPI.COMM_WORLD)
    self_ = mtcoll.Comm(MPI.COMM_SELF)
    wrapped = [(MPI.COMM_WORLD, world), (MPI.COMM_SELF, self_)]
    plain = {"COMM_WORLD": MPI.COMM_WORLD, "COMM_SELF": MPI.COMM_SELF}

    def run_with_mtcoll(fn):
        def inner(self, *args, **kwargs):
            MPI.COMM_WORLD, MPI.COMM_SELF = world, self_
            try:
                return fn(self, *args, **kwargs)
            finally:
                MPI.COMM_WORLD, MPI.COMM_SELF = plain["COMM_WORLD"], plain["COMM_SELF"]
        return inner

    for name in sorted(vars(module)):
        cls = getattr(module, name)
        if not (isinstance(cls, type) and issubclass(cls, unittest.TestCase)):
            continue
        comm = getattr(cls, "COMM", None)
        if type(comm) is MPI.Intracomm and comm != MPI.COMM_NULL:
            for base, mt in wrapped:
                if comm is base or comm == base:
                    cls.COMM = mt
                    break
        if "setUp" in vars(cls):
            cls.setUp = run_with_mtcoll(vars(cls)["setUp"])
        if callable(getattr(cls, "checkHandle", None)):
            cls.checkHandle = _check_handle(mtcoll, MPI)


ADAPTED = ("checkHandle",)


def _check_handle(mtcoll, MPI):
    """test_comm_topo's ``checkHandle`` with mtcoll's round trip of a handle: mpi4py makes
    the object of an integer or Fortran handle from the handle alone (``Comm.fromint``,
    ``Comm.f2py``: a fixed table of its own classes), so no subclass of its communicators --
    mtcoll's or ``mpi4py.util.pkl5``'s -- comes back as itself, and ``type(new) == type(old)``
    cannot hold. What mtcoll promises instead: ``mtcoll.Comm(new)`` is the very Comm."""
    def check(self, oldcomm):
        handles = [(MPI.Comm.fromint, oldcomm.toint()), (MPI.Comm.f2py, oldcomm.py2f())]
        for make, handle in handles:
            if handle != -1:
                newcomm = make(handle)
                self.assertEqual(newcomm, oldcomm)
                self.assertIs(mtcoll.Comm(newcomm), oldcomm)
    return check


def child(args):
    import unittest

    sys.path.insert(0, args.testdir)
    os.chdir(args.workdir)
    # as mpi4py's own runner does by default: no GPU array backends (numba.cuda, CuPy) in the
    # tests' array helpers; numba itself is back for mtcoll once they are imported
    hidden = {name: sys.modules.get(name) for name in ("numba", "cupy")}
    sys.modules.update(dict.fromkeys(hidden))
    import arrayimpl  # noqa: F401
    for name, was in hidden.items():
        if was is None:
            del sys.modules[name]
        else:
            sys.modules[name] = was
    from mpi4py import MPI

    rank = MPI.COMM_WORLD.Get_rank()
    out = open(Path(args.out) / f"rank{rank}.jsonl", "w", buffering=1)

    class Recorder(unittest.TestResult):
        def _put(self, test, outcome, detail=""):
            out.write(json.dumps({"id": test.id(), "outcome": outcome,
                                  "detail": detail[-2000:]}) + "\n")

        def startTest(self, test):
            super().startTest(test)
            self._put(test, "started")

        def addSuccess(self, test):
            self._put(test, PASSED)

        def addFailure(self, test, err):
            self._put(test, "failed", self._exc_info_to_string(err, test))

        def addError(self, test, err):
            self._put(test, "error", self._exc_info_to_string(err, test))

        def addSkip(self, test, reason):
            self._put(test, "skipped", reason)

        def addExpectedFailure(self, test, err):
            self._put(test, "xfail")

        def addUnexpectedSuccess(self, test):
            self._put(test, PASSED)

        def addSubTest(self, test, subtest, err):
            if err is not None:
                self._put(test, "failed", self._exc_info_to_string(err, test))

    module = __import__(args.module)
    if args.mode == "mtcoll":
        import mtcoll
        _wrap_classes(module, MPI, mtcoll)
    suite = unittest.defaultTestLoader.loadTestsFromModule(module)
    suite.run(Recorder())
    out.write(json.dumps({"id": "", "outcome": "done"}) + "\n")
    out.close()


# -- the driver ----------------------------------------------------------------------------------

def fetch_tests(version):
    """The ``test/`` directory of mpi4py ``version``'s source release, from the cache or the
    package index."""
    cache = Path(os.environ.get("MTCOLL_CONFORMANCE_CACHE")
                 or Path.home() / ".cache" / "mtcoll" / f"mpi4py-{version}-test")
    if (cache / "mpiunittest.py").exists():
        return cache
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--no-binary", ":all:",
                        f"mpi4py=={version}", "-d", tmp], check=True)
        (sdist,) = Path(tmp).glob("mpi4py-*.tar.gz")
        with tarfile.open(sdist) as tar:
            prefix = f"{tar.getnames()[0].split('/')[0]}/test/"
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()]
            for m in members:
                m.name = m.name[len(prefix):]
            staging = Path(tmp) / "test"
            tar.extractall(staging, members=members, filter="data")
        cache.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(cache, ignore_errors=True)
        shutil.copytree(staging, cache)
    return cache


def read_outcomes(outdir, size):
    """Per test: its outcome on every rank folded to one (passed only if passed everywhere);
    a test a rank started and never finished is ``crashed``. Returns (outcomes, done) where
    ``done`` says whether every rank reached the end of the module."""
    order = {"passed": 0, "skipped": 1, "xfail": 1, "failed": 2, "error": 2, "crashed": 3}
    result, done = {}, True
    for r in range(size):
        path = Path(outdir) / f"rank{r}.jsonl"
        seen, finished = {}, False
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec["outcome"] == "done":
                    finished = True
                elif rec["outcome"] == "started":
                    seen.setdefault(rec["id"], ("crashed", ""))
                elif seen.get(rec["id"], ("crashed",))[0] in ("crashed", PASSED):
                    seen[rec["id"]] = (rec["outcome"], rec.get("detail", ""))
        done = done and finished
        for tid, (outcome, detail) in seen.items():
            old = result.get(tid)
            if old is None or order[outcome] > order[old[0]]:
                result[tid] = (outcome, detail)
    return result, done


def run_module(testdir, module, size, mode, algorithm=None):
    env = dict(os.environ, MTCOLL_TUNING="off", MTCOLL_CALIBRATE="off")
    env.pop("MTCOLL_ALGO", None)
    if algorithm:
        env["MTCOLL_ALGO"] = algorithm
    with tempfile.TemporaryDirectory() as out, tempfile.TemporaryDirectory() as work:
        cmd = [*mpiexec(), "-n", str(size), sys.executable, "-m", "mpi4py", __file__,
               "--child", "--testdir", str(testdir), "--module", module, "--mode", mode,
               "--out", out, "--workdir", work]
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            log, _ = proc.communicate(timeout=MODULE_TIMEOUT)
            status = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
            status = "timeout"
        outcomes, done = read_outcomes(out, size)
    return {"outcomes": outcomes, "done": done, "status": status,
            "seconds": time.monotonic() - t0, "log": log.decode(errors="replace")[-4000:]}


def compare(plain, other):
    """Tests that passed plain and not in ``other`` (crashed, failed, skipped, never run)."""
    return sorted(t for t, (o, _) in plain["outcomes"].items()
                  if o == PASSED and other["outcomes"].get(t, ("not run",))[0] != PASSED)


def markdown(rows, version):
    """One line per module and rank count: passed plain, with mtcoll, and the fewest passed
    with an algorithm forced (where the module calls what mtcoll runs itself)."""
    out = [f"| module (mpi4py {version}) | ranks | passed plain | passed with mtcoll | "
           f"fewest passed, each algorithm forced | worse |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    keyed = {}
    for r in rows:
        keyed.setdefault((r["module"], r["ranks"]), []).append(r)
    for (module, ranks), group in keyed.items():
        base = next(g for g in group if g["run"] == "mtcoll")
        forced = [g["passed_mtcoll"] for g in group if g["run"] != "mtcoll"]
        worse = sum(len(g["worse"]) for g in group)
        out.append(f"| {module} | {ranks} | {base['passed_plain']} | {base['passed_mtcoll']} | "
                   f"{min(forced) if forced else '-'} | {worse} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--modules", nargs="+", default=list(MODULES))
    p.add_argument("--algorithms", nargs="*", default=None,
                   help="forced at the largest size (default: every planner algorithm)")
    p.add_argument("--json", metavar="FILE", help="write every outcome to FILE")
    p.add_argument("--markdown", metavar="FILE",
                   help="write the table as Markdown (docs/testing.md's conformance table)")
    p.add_argument("--show", type=int, default=5, help="worse tests to print per run")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--testdir", "--module", "--mode", "--out", "--workdir"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)

    import mpi4py

    from mtcoll.plan import ALGORITHMS
    algorithms = list(ALGORITHMS) if args.algorithms is None else args.algorithms
    testdir = fetch_tests(mpi4py.__version__)
    print(f"conformance: mpi4py {mpi4py.__version__}'s tests from {testdir}", flush=True)
    print(f"{'module':<22} {'ranks':>5} {'run':<14} {'plain':>6} {'mtcoll':>6} {'worse':>5}"
          f" {'seconds':>8}", flush=True)
    report, total_worse, rows = [], 0, []
    for module in args.modules:
        source = (testdir / f"{module}.py").read_text()
        for size in args.sizes:
            plain = run_module(testdir, module, size, "plain")
            runs = [("mtcoll", None)]
            if size == max(args.sizes) and OWN_CALLS.search(source):
                runs += [(f"MTCOLL_ALGO={a}", a) for a in algorithms]
            npass = sum(o == PASSED for o, _ in plain["outcomes"].values())
            for label, algorithm in runs:
                res = run_module(testdir, module, size, "mtcoll", algorithm)
                worse = compare(plain, res)
                total_worse += len(worse)
                mpass = sum(o == PASSED for o, _ in res["outcomes"].values())
                note = "" if res["done"] else f"  (ended early: status {res['status']})"
                print(f"{module:<22} {size:>5} {label:<14} {npass:>6} {mpass:>6} "
                      f"{len(worse):>5} {res['seconds']:>8.1f}{note}", flush=True)
                for t in worse[:args.show]:
                    outcome, detail = res["outcomes"].get(t, ("not run", ""))
                    last = detail.strip().splitlines()[-1] if detail.strip() else ""
                    print(f"    worse: {t}: {outcome} {last[:160]}", flush=True)
                if not res["done"] and res["log"].strip():
                    print("    log: " + res["log"].strip().splitlines()[-1][:200], flush=True)
                rows.append({"module": module, "ranks": size, "run": label,
                             "passed_plain": npass, "passed_mtcoll": mpass,
                             "worse": worse, "done": res["done"], "status": str(res["status"]),
                             "outcomes": {t: o for t, (o, _) in res["outcomes"].items()}})
            report.append({"module": module, "ranks": size, "plain_done": plain["done"],
                           "plain": {t: o for t, (o, _) in plain["outcomes"].items()}})
    print(f"conformance: {total_worse} tests pass plain and not with mtcoll", flush=True)
    if args.markdown:
        Path(args.markdown).write_text(markdown(rows, mpi4py.__version__))
    if args.json:
        Path(args.json).write_text(json.dumps({"mpi4py": mpi4py.__version__, "rows": rows,
                                               "plain": report}, indent=1))
    return 1 if total_worse else 0


if __name__ == "__main__":
    sys.exit(main())
