"""The benchmark (python -m mtcoll.bench) and the tuning table that algorithm="auto" reads.

The benchmark runs are subprocesses (mpiexec -n 2 and -n 4, tiny sizes, short time budgets),
started from serial tests like tests/tools/test_readme_snippet.py; they check the output, not speed.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import _mpirun
import pytest

import mtcoll.comm
from mtcoll import _tuning
from mtcoll.comm import _planning
from mtcoll.bench import format_size, memory_cap, parse_size, parse_sizes, tuning_table
from mtcoll.topology import parse

ROOT = Path(__file__).resolve().parents[2]


def _serial_only():
    _mpirun.require()


def _bench(n, args, tmp_path, timeout=240, **env_extra):
    """Run the benchmark on n ranks in a clean environment; returns the CompletedProcess."""
    # never the user's tuning file
    return _mpirun.run(n, ["-m", "mtcoll.bench", *args], timeout,
                       XDG_CACHE_HOME=str(tmp_path / "cache"), **env_extra)


def _rows(table):
    rows = []
    for line in table.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        f = line.split()
        assert len(f) == 11, line
        rows.append({"bytes": int(f[0]), "count": int(f[1]), "dtype": f[2], "algorithm": f[3],
                     "avg": float(f[4]), "min": float(f[5]), "max": float(f[6]),
                     "algbw": float(f[7]), "busbw": float(f[8]), "wrong": int(f[9]),
                     "speedup": f[10]})
    return rows


# -- sizes and memory (serial) -------------------------------------------------------------------

def test_parse_sizes():
    assert parse_size("8") == 8 and parse_size("64K") == 65536 and parse_size("4MiB") == 4 << 20
    default = parse_sizes("8:64M")
    assert default[0] == 8 and default[-1] == 64 << 20
    assert default[1:] == [4 ** k for k in range(2, 14)]  # 16 .. 64M, powers of 4
    assert parse_sizes("1K:64K:2") == [1024 << k for k in range(7)]
    assert parse_sizes("1K,64K,4M") == [1024, 65536, 4 << 20]
    assert parse_sizes("4M,1K,1K") == [1024, 4 << 20]
    assert [format_size(s) for s in (8, 1024, 3 << 20, 1500)] == ["8", "1K", "3M", "1500"]
    for bad in ("", "1X", "64M:1K", "1K:4M:1", "a,b"):
        with pytest.raises(ValueError):
            parse_sizes(bad)


def test_memory_cap():
    gib = 1 << 30
    # 64 ranks, 6 mtcoll algorithms: 3 + 6 buffers per rank, under half of 24 GiB
    cap = memory_cap(64, 6, total=24 * gib)
    assert 64 * 9 * cap <= 12 * gib < 64 * 9 * (cap + 1)
    assert memory_cap(8, 6, total=0) is None


# -- the tuning table (serial) -------------------------------------------------------------------

def _table_file(tmp_path, tables):
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps({"mtcoll_tuning": 1, "tables": tables}))
    return path


def test_tuning_rules_and_choose(tmp_path):
    rules = _tuning.rules_from_winners([(1024, "native"), (65536, "native"), (1 << 20, "ring"),
                                        (4 << 20, "multitree")])
    assert rules == [{"max_bytes": 262144, "algorithm": "native"},
                     {"max_bytes": 2097152, "algorithm": "ring"},
                     {"max_bytes": None, "algorithm": "multitree"}]
    path = _table_file(tmp_path, [{"nranks": 4, "topology": "torus:2x2", "rules": rules}])
    table = _tuning.load(path, ("multitree", "ring", "rhd"))
    t = parse("torus:2x2")
    choose = mtcoll.comm.choose
    assert [choose(b, 4, t, tuning=table) for b in (8, 262144, 262145, 2 << 20, 1 << 30)] == \
        ["native", "native", "ring", "ring", "multitree"]
    # another rank count or topology: the built-in rule
    assert choose(1 << 20, 8, parse("torus:2x4"), tuning=table) == "multitree"
    assert choose(1 << 20, 4, parse("ring:4"), tuning=table) == "multitree"
    assert choose(8, 4, t, tuning=None) == "native"


@pytest.mark.parametrize("text, why", [
    ("{not json", "not valid JSON"),
    ('{"tables": []}', '"mtcoll_tuning": 1'),
    ('{"mtcoll_tuning": 1, "tables": [{"nranks": 4, "topology": "torus:2x2", "rules": []}]}',
     "rules must be a non-empty list"),
    ('{"mtcoll_tuning": 1, "tables": [{"nranks": 4, "topology": "torus:2x2", '
     '"rules": [{"max_bytes": null, "algorithm": "fastest"}]}]}', "'fastest' is not an"),
    ('{"mtcoll_tuning": 1, "tables": [{"nranks": 4, "topology": "torus:2x2", '
     '"rules": [{"max_bytes": 10, "algorithm": "ring"}, {"max_bytes": 5, "algorithm": "rhd"}]}]}',
     "max_bytes must increase"),
])
def test_bad_tuning_file_names_the_file(tmp_path, text, why):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError) as e:
        _tuning.load(path, ("multitree", "ring", "rhd"))
    assert str(path) in str(e.value) and why in str(e.value)


def test_comm_reads_the_tuning_file(tmp_path, monkeypatch):
    from mpi4py import MPI

    rules = [{"max_bytes": None, "algorithm": "native"}]
    path = _table_file(tmp_path, [{"nranks": 1, "topology": "ring:1", "rules": rules},
                                  {"nranks": 4, "topology": "torus:2x2", "rules": rules}])
    monkeypatch.setenv("MTCOLL_TUNING", str(path))
    with mtcoll.Comm(MPI.COMM_SELF) as c:
        assert c.tuning_path == str(path)
        assert c.tuning == {(1, "ring:1"): ((None, "native"),)}
    # the default file is read only if it exists; "off" reads none
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "nowhere"))
    monkeypatch.delenv("MTCOLL_TUNING")
    with mtcoll.Comm(MPI.COMM_SELF) as c:
        assert c.tuning is None and c.tuning_path is None
    monkeypatch.setenv("MTCOLL_TUNING", "off")
    with mtcoll.Comm(MPI.COMM_SELF) as c:
        assert c.tuning is None
    # a bad or missing named file: a clear error naming it
    bad = tmp_path / "broken.json"
    bad.write_text("[1, 2")
    for named in (bad, tmp_path / "missing.json"):
        monkeypatch.setenv("MTCOLL_TUNING", str(named))
        with pytest.raises(ValueError, match=re.escape(str(named))):
            mtcoll.Comm(MPI.COMM_SELF)


def test_tune_merges_tables(tmp_path):
    path = tmp_path / "sub" / "t.json"
    meta = {"nranks": 4, "topology": "torus:2x2", "date": "d", "mpi_library": "m",
            "dtype": "float32", "op": "sum", "inplace": False}
    recs = [{"algorithm": a, "bytes": b, "time_avg_us": t, "time_median_us": t, "wrong": w}
            for a, b, t, w in [("auto", 8, 1.0, 0), ("ring", 8, 2.9, 0), ("native", 8, 3.0, 0),
                               ("ring", 64, 2.0, 0), ("native", 64, 3.0, 0),
                               ("rhd", 64, 1.0, 7)]]  # a wrong result never wins
    # 8 B: ring is faster, but by less than the margin, so the MPI library keeps it
    _tuning.merge(path, tuning_table(meta, recs))
    _tuning.merge(path, tuning_table(dict(meta, nranks=8, topology="torus:2x4"), recs))
    _tuning.merge(path, tuning_table(meta, recs))  # replaces, does not duplicate
    table = _tuning.load(path)
    assert set(table) == {(4, "torus:2x2"), (8, "torus:2x4")}
    assert table[(4, "torus:2x2")] == ((22, "native"), (None, "ring"))


# -- the benchmark under mpiexec -----------------------------------------------------------------

def test_bench_table_on_2_ranks(tmp_path):
    _serial_only()
    out = _bench(2, ["--sizes", "1K,64K", "--algorithms", "multitree,ring,native",
                     "--time-per-size", "0.02"], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    head = [x for x in out.stdout.splitlines() if x.startswith("#")]
    assert any("ranks 2, topology ring:2" in x and "MultiTree steps per phase" in x
               for x in head), out.stdout
    assert any(x.startswith("# MPI: ") for x in head)
    rows = _rows(out.stdout)
    assert [(r["bytes"], r["algorithm"]) for r in rows] == [
        (b, a) for b in (1024, 65536) for a in ("multitree", "ring", "native")]
    for r in rows:
        assert r["wrong"] == 0 and r["dtype"] == "float32" and r["count"] == r["bytes"] // 4
        assert r["min"] <= r["avg"] <= r["max"]
        assert r["busbw"] == pytest.approx(r["algbw"] * 2 * (2 - 1) / 2, abs=1e-4)
    assert "#wrong total 0" in out.stdout
    # progress goes to stderr, from rank 0 only
    assert out.stderr.count("mtcoll.bench: done in") == 1


def test_bench_json_and_tuning_round_trip_on_4_ranks(tmp_path):
    _serial_only()
    tune = tmp_path / "tuning.json"
    out = _bench(4, ["--sizes", "1K,64K", "--algorithms", "auto,multitree,ring,rhd,native",
                     "--time-per-size", "0.02", "--json", "--tune", str(tune)], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    doc = json.loads(out.stdout)  # --json without FILE: JSON on stdout instead of the table
    meta, results = doc["meta"], doc["results"]
    for key in ("mpi_library", "nranks", "topology", "ports", "versions", "date",
                "multitree_steps"):
        assert key in meta, key
    assert meta["nranks"] == 4 and meta["topology"] == "torus:2x2" and meta["sizes"] == [1024,
                                                                                         65536]
    assert len(results) == 2 * 5
    for r in results:
        for key in ("algorithm", "bytes", "count", "dtype", "time_avg_us", "time_min_us",
                    "time_max_us", "algbw_GBps", "busbw_GBps", "wrong"):
            assert key in r, key
        assert r["wrong"] == 0 and r["iters"] >= 2
        assert r["algbw_GBps"] == pytest.approx(r["bytes"] / r["time_avg_us"] / 1e3)
        assert r["busbw_GBps"] == pytest.approx(r["algbw_GBps"] * 2 * 3 / 4)
    assert sorted({r["bytes"] for r in results}) == [1024, 65536]
    # the tuning table holds the fastest measured algorithm per size (auto left out) ...
    table = _tuning.load(tune)
    assert list(table) == [(4, "torus:2x2")]
    topo = parse("torus:2x2")
    for size in (1024, 65536):
        mine = {r["algorithm"]: r for r in results
                if r["bytes"] == size and r["algorithm"] != "auto"}
        best = min(mine.values(), key=lambda r: r["time_median_us"])
        if best["time_median_us"] > 0.95 * mine["native"]["time_median_us"]:
            best = mine["native"]  # the MPI library keeps sizes it (nearly) ties
        best = best["algorithm"]
        # ... and choose() follows it
        assert mtcoll.comm.choose(size, 4, topo, tuning=table) == best


def test_auto_follows_a_tuning_file_on_4_ranks(tmp_path):
    _serial_only()
    path = _table_file(tmp_path, [{"nranks": 4, "topology": "torus:2x2", "rules": [
        {"max_bytes": 4096, "algorithm": "ring"}, {"max_bytes": None, "algorithm": "rhd"}]}])
    out = _bench(4, ["--sizes", "1K,64K", "--algorithms", "auto,native", "--iters", "1"],
                 tmp_path, MTCOLL_TUNING=str(path), MTCOLL_DEBUG="1")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"# auto: tuning table {path}" in out.stdout
    debug = [x for x in out.stderr.splitlines() if x.startswith("mtcoll[rank 0]: Allreduce")]
    small = {x for x in debug if "count=256 " in x and "(chosen by auto" in x}
    large = {x for x in debug if "count=16384 " in x and "(chosen by auto" in x}
    assert small and all("algorithm=ring " in x and "tuning table" in x for x in small), debug
    assert large and all("algorithm=rhd " in x for x in large), debug
    # a bad tuning file stops every rank with an error naming it, instead of a hang
    bad = tmp_path / "bad.json"
    bad.write_text('{"mtcoll_tuning": 1, "tables": [{"nranks": "four"}]}')
    out = _bench(2, ["--sizes", "1K", "--algorithms", "auto", "--iters", "1"], tmp_path,
                 timeout=120, MTCOLL_TUNING=str(bad))
    assert out.returncode != 0
    assert f"tuning file {bad}" in out.stderr and "nranks" in out.stderr, out.stderr


def test_wait_mode(monkeypatch):
    """How ranks wait: 'sleep' on an oversubscribed host (the benchmark's runs above), else
    'busy'; the argument and MTCOLL_WAIT choose it, a bad value names itself."""
    from mpi4py import MPI

    monkeypatch.delenv("MTCOLL_WAIT", raising=False)
    with mtcoll.Comm(MPI.COMM_SELF) as c:
        assert c.wait == ("sleep" if 1 > (os.cpu_count() or 1) else "busy")
    with mtcoll.Comm(MPI.COMM_SELF, wait="sleep") as c:
        assert c.wait == "sleep"
        assert _planning.executor(c, "ring").segmenting() == (1 << 20, 4)  # SLEEP_ defaults
    monkeypatch.setenv("MTCOLL_WAIT", "busy")
    with mtcoll.Comm(MPI.COMM_SELF, wait="sleep") as c:
        assert c.wait == "busy"
    monkeypatch.setenv("MTCOLL_WAIT", "spin")
    with pytest.raises(ValueError, match="MTCOLL_WAIT='spin'"):
        mtcoll.Comm(MPI.COMM_SELF)
