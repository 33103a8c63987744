"""``python -m mtcoll.bench.gather``: the sweep's table and plot, from hand-made bench JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mtcoll.bench import gather

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _record(algorithm, nbytes, busbw, speedup=None, wrong=0):
    # the keys of mtcoll.bench's JSON results that gather reads, plus a few it ignores
    r = {"algorithm": algorithm, "bytes": nbytes, "count": nbytes // 4, "dtype": "float32",
         "busbw_GBps": busbw, "algbw_GBps": busbw / 1.5, "time_avg_us": 10.0, "wrong": wrong}
    if speedup is not None:
        r["speedup_vs_native"] = speedup
    return r


def _write(path, nranks, topology, results):
    path.write_text(json.dumps({"meta": {"benchmark": "allreduce", "nranks": nranks,
                                         "topology": topology}, "results": results}))
    return str(path)


@pytest.fixture
def runs(tmp_path):
    # written in the "wrong" order (4 ranks first), native first: the table sorts and moves it
    a = _write(tmp_path / "n4.json", 4, "torus:2x2", [
        _record("native", 1024, 0.5, 1.0), _record("multitree", 1024, 0.25, 0.5),
        _record("native", 65536, 2.0, 1.0), _record("multitree", 65536, 3.0, 1.5),
        _record("ring", 65536, 1.0, 0.5)])
    b = _write(tmp_path / "n2.json", 2, "ring:2", [
        _record("multitree", 1024, 0.125, 0.25), _record("native", 1024, 0.5, 1.0)])
    return a, b


def test_rows_and_table(runs):
    algorithms, table = gather.rows([(f, *gather.load(f)) for f in runs])
    assert algorithms == ["multitree", "ring", "native"]
    assert [(r["ranks"], r["topology"], r["bytes"]) for r in table] == [
        (2, "ring:2", 1024), (4, "torus:2x2", 1024), (4, "torus:2x2", 65536)]
    text = gather.format_markdown(algorithms, table)
    lines = text.splitlines()
    assert lines[0] == "| ranks | topology | size | multitree | ring | native |"
    assert lines[2] == "| 2 | ring:2 | 1K | 0.125 (0.25x) | - | 0.5 (1.00x) |"
    assert lines[3] == "| 4 | torus:2x2 | 1K | 0.25 (0.50x) | - | 0.5 (1.00x) |"
    assert lines[4] == "| 4 | torus:2x2 | 64K | 3 (1.50x) | 1 (0.50x) | 2 (1.00x) |"
    assert "0 result(s) with #wrong > 0" in text


def test_main_writes_table_and_plot(runs, tmp_path, capsys):
    prefix = str(tmp_path / "out" / "sweep")
    Path(prefix).parent.mkdir()
    assert gather.main([prefix, *runs]) == 0
    printed = capsys.readouterr().out
    assert Path(prefix + ".md").read_text() == printed
    assert sum(ln.startswith("| ") for ln in printed.splitlines()) == 4  # header, 3 rows
    assert Path(prefix + ".png").read_bytes()[:8] == PNG_MAGIC
    assert gather.main([prefix + "2", "--no-plot", *runs]) == 0
    assert not Path(prefix + "2.png").exists()


def test_wrong_and_missing_results(runs, tmp_path, capsys):
    bad = _write(tmp_path / "n8.json", 8, "torus:2x4", [
        _record("multitree", 1024, 0.1, wrong=3), _record("native", 1024, 0.2)])
    prefix = str(tmp_path / "t")
    missing = str(tmp_path / "n16.json")
    assert gather.main([prefix, *runs, bad, missing]) == 1
    text = Path(prefix + ".md").read_text()
    # no speedup_vs_native in these records: "(-)"
    assert "| 8 | torus:2x4 | 1K | 0.1 (-) ! | - | 0.2 (-) |" in text
    assert "1 result(s) with #wrong > 0" in text
    assert f"- {missing}: missing" in text
    assert f"{missing}: missing" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ("{not json", "not JSON"),
    ('{"results": []}', "not mtcoll.bench JSON"),
    ('{"meta": {}, "results": []}', "meta has no 'nranks'"),
    ('{"meta": {"nranks": 2}, "results": [{"algorithm": "ring", "bytes": 8}]}',
     "results[0] has no busbw_GBps, wrong"),
    ('{"meta": {"nranks": 2}, "results": [3]}', "results[0] is not an object"),
    (PNG_MAGIC + b"\xff\xfe", "not JSON"),  # a binary file given by mistake
])
def test_bad_input_names_the_file(tmp_path, capsys, content, message):
    path = tmp_path / "bad.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert gather.main([str(tmp_path / "t"), str(path)]) == 2
    err = capsys.readouterr().err
    assert f"error: {path}: {message}" in err
    assert not (tmp_path / "t.md").exists()


def test_two_files_of_one_run_are_refused(runs, tmp_path, capsys):
    again = _write(tmp_path / "again.json", 2, "ring:2", [_record("native", 1024, 0.4, 1.0)])
    assert gather.main([str(tmp_path / "t"), *runs, again]) == 2
    err = capsys.readouterr().err
    assert f"{runs[1]} and {again} both have 2 ranks on ring:2 at 1024 B" in err


def test_unwritable_prefix_is_named(runs, tmp_path, capsys):
    prefix = str(tmp_path / "no" / "such" / "sweep")
    assert gather.main([prefix, *runs]) == 2
    assert f"error: OUT_PREFIX: cannot write {prefix}.md" in capsys.readouterr().err


def test_nothing_to_read(tmp_path, capsys):
    assert gather.main([str(tmp_path / "t"), str(tmp_path / "none.json")]) == 2
    assert "no FILE could be read" in capsys.readouterr().err


def test_module_entry_point(runs, tmp_path):
    # as the sweep's gather job runs it
    prefix = str(tmp_path / "cli")
    out = subprocess.run([sys.executable, "-m", "mtcoll.bench.gather", prefix, *runs],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout == Path(prefix + ".md").read_text()
    assert "2 run(s), 3 rows written" in out.stderr
    assert Path(prefix + ".png").read_bytes()[:8] == PNG_MAGIC


def test_without_matplotlib_the_table_stands(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    prefix = str(tmp_path / "t")
    assert gather.main([prefix, *runs]) == 1
    assert Path(prefix + ".md").read_text().count("\n| ") == 3
    assert not Path(prefix + ".png").exists()
    assert f"{prefix}.png not written: the plot needs matplotlib" in capsys.readouterr().err
