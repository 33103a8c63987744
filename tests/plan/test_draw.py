"""Schedule pictures (``python -m mtcoll.plan --draw``): PNGs are written, every transfer of a
drawn step (or tree) is one arrow on the figure, the layouts, the errors, and the clear message
when matplotlib is missing."""

import json
import sys

import numpy as np
import pytest

from mtcoll.plan import plan
from mtcoll.plan import __main__ as cli
from mtcoll.plan._draw import MAX_PANELS, MAX_RANKS, _layout, draw
from mtcoll.schedule import GATHER, REDUCE
from mtcoll.topology import parse

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# every family (2-D and 3-D grids, circle, hosts, layers) and every algorithm at least once
PAIRS = [
    ("torus:4x4", "multitree"),
    ("mesh:3x4", "ring2d"),
    ("torus:2x2x3", "multitree"),
    ("ring:5", "ring"),
    ("full:4", "dbtree"),
    ("hier:2x3", "multitree"),
    ("fattree:2x3", "rhd"),
    ("bigraph:2x4", "dbtree"),
]


def _png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    # width and height from the IHDR chunk
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return len(data), w, h


@pytest.mark.parametrize("spec,algorithm", PAIRS)
@pytest.mark.parametrize("phase", [GATHER, REDUCE])
def test_one_arrow_per_transfer_of_each_drawn_step(tmp_path, spec, algorithm, phase):
    pytest.importorskip("matplotlib")
    s = plan(spec, algorithm)
    out = tmp_path / "steps.png"
    d = draw(s, spec, out, phase=phase)
    nsteps = s.steps[phase]
    assert d.steps == tuple(range(min(nsteps, MAX_PANELS)))
    want = [int(((s.phase == phase) & (s.step == t)).sum()) for t in d.steps]
    assert [a for _, a in d.panels] == want
    assert d.arrows == sum(want) > 0
    size, w, h = _png(out)
    assert 5_000 < size < 2_000_000
    assert 300 < w < 3000 and 200 < h < 4000


def test_trees_mode_draws_spanning_trees(tmp_path):
    pytest.importorskip("matplotlib")
    s = plan("torus:4x4", "multitree")
    d = draw(s, "torus:4x4", tmp_path / "t.png", trees=[0, 5, 15])
    # tree r reaches the other 15 ranks with one gather transfer each
    assert [a for _, a in d.panels] == [15, 15, 15]
    assert d.trees == (0, 5, 15) and d.steps == ()
    _png(tmp_path / "t.png")


def test_growing_trees(tmp_path):
    pytest.importorskip("matplotlib")
    s = plan("torus:4x4", "multitree")
    d = draw(s, "torus:4x4", tmp_path / "g.png", trees=[0, 5], steps=range(5))
    assert d.steps == (0, 1, 2, 3, 4) and d.trees == (0, 5) and len(d.panels) == 10
    g = s.phase == GATHER
    for i, r in enumerate((0, 5)):
        got = [a for _, a in d.panels[5 * i:5 * i + 5]]
        want = [int((g & (s.lo == r) & (s.step == t)).sum()) for t in range(5)]
        assert got == want and sum(got) == 15  # the faint earlier edges are not counted


def test_trees_mode_on_ranges(tmp_path):
    pytest.importorskip("matplotlib")
    # rhd transfers carry chunk ranges: a tree is every transfer whose range holds a chunk
    # the root owns; ranks owning nothing have empty trees
    s = plan("ring:6", "rhd")
    roots = [0, 1]
    d = draw(s, "ring:6", tmp_path / "t.png", trees=roots, phase="reduce")
    red = s.phase == REDUCE
    for r, (_, a) in zip(roots, d.panels):
        mine = np.flatnonzero(s.owner == r)
        want = sum(1 for lo, hi in zip(s.lo[red], s.hi[red]) if ((mine >= lo) & (mine < hi)).any())
        assert a == want
    assert d.panels[0][1] == 0 and d.panels[1][1] > 0  # rank 0 owns no chunk on 6 ranks


def test_steps_subset_and_cap(tmp_path):
    pytest.importorskip("matplotlib")
    s = plan("ring:20", "ring")
    d = draw(s, "ring:20", tmp_path / "a.png")
    assert len(d.panels) == MAX_PANELS < s.steps[GATHER]
    d = draw(s, "ring:20", tmp_path / "b.png", steps=[18, 0, 3])
    assert d.steps == (0, 3, 18) and [a for _, a in d.panels] == [20, 20, 20]
    with pytest.raises(ValueError, match="step 19 is not in"):
        draw(s, "ring:20", tmp_path / "c.png", steps=[19])


def test_bad_input(tmp_path):
    s = plan("torus:4x4")
    with pytest.raises(ValueError, match=f"at most {MAX_RANKS} ranks.*torus:9x9 has 81"):
        draw(s, "torus:9x9", tmp_path / "x.png")  # refused before anything is drawn
    with pytest.raises(ValueError, match="has 9 ranks but the schedule has 16"):
        draw(s, "torus:3x3", tmp_path / "x.png")
    with pytest.raises(ValueError, match="roots must be ranks in"):
        draw(s, "torus:4x4", tmp_path / "x.png", trees=[16])
    with pytest.raises(ValueError, match="phase must be"):
        draw(s, "torus:4x4", tmp_path / "x.png", phase="both")
    assert not (tmp_path / "x.png").exists()


def test_layouts():
    # torus wrap-around links become stubs: 4 rows and 4 columns, both directions
    t = _layout(parse("torus:4x4"))
    assert len(t.wrap) == 16 and (0, 3) in t.wrap and (12, 0) in t.wrap and (0, 1) not in t.wrap
    assert np.allclose(t.wrap[(0, 3)], [-1, 0])  # 0 -> 3 leaves rank 0 to the left
    assert np.allclose(t.wrap[(12, 0)], [0, -1])  # 12 -> 0 leaves the bottom row downward
    assert np.allclose(t.pos[5], [1, -1])  # row 1, column 1
    assert _layout(parse("mesh:4x4")).wrap == {}
    assert _layout(parse("torus:2x2")).wrap == {}  # a side of 2 has no wrap-around link
    t3 = _layout(parse("torus:3x3x3"))
    assert len(t3.wrap) == 3 * 9 * 2 and len({tuple(p) for p in t3.pos}) == 27
    for spec in ("ring:7", "full:5", "hier:3x2", "fattree:2x3", "bigraph:2x4"):
        lay = _layout(parse(spec))
        n = parse(spec).nranks
        assert lay.pos.shape == (n, 2) and len({tuple(np.round(p, 6)) for p in lay.pos}) == n
    assert len(_layout(parse("fattree:2x3")).switches) == 2 + 3
    assert len(_layout(parse("bigraph:2x4")).switches) == 4


def test_without_matplotlib(monkeypatch, tmp_path, capsys):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    s = plan("ring:4")
    with pytest.raises(RuntimeError, match=r"needs matplotlib.*'plot' extra.*mtcoll\[plot\]"):
        draw(s, "ring:4", tmp_path / "x.png")
    monkeypatch.setattr(cli, "run", lambda *a, **k: pytest.fail("planned before the check"))
    code = cli.main(["--topology", "ring:4", "--draw", str(tmp_path / "x.png")])
    out, err = capsys.readouterr()
    assert code == 2 and "needs matplotlib" in err and "mtcoll[plot]" in err
    assert out == ""  # no report
    assert not (tmp_path / "x.png").exists()


def test_cli(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "trees.png"
    code = cli.main(["--topology", "torus:4x4", "--draw", str(png), "--json"])
    out, err = capsys.readouterr()
    assert code == 0
    o = json.loads(out)
    assert o["draw"]["path"] == str(png) and o["draw"]["steps"] == [0, 1, 2, 3, 4]
    assert sum(p["arrows"] for p in o["draw"]["panels"]) == o["transfers"] // 2
    assert "drew 5 panels, 240 transfers" in err
    _png(png)
    code = cli.main(["--topology", "torus:4x4", "--draw", str(png), "--tree", "0,3",
                     "--phase", "reduce", "--json"])
    o = json.loads(capsys.readouterr()[0])
    assert code == 0 and [p["arrows"] for p in o["draw"]["panels"]] == [15, 15]
    code = cli.main(["--topology", "torus:4x4", "--draw", str(png), "--steps", "1-2,4",
                     "--json"])
    o = json.loads(capsys.readouterr()[0])
    assert code == 0 and o["draw"]["steps"] == [1, 2, 4]
    code = cli.main(["--topology", "torus:9x9", "--draw", str(png)])
    assert code == 2 and "at most 64 ranks" in capsys.readouterr()[1]
    code = cli.main(["--topology", "ring:4", "--draw", str(tmp_path / "no" / "such.png")])
    err = capsys.readouterr()[1]
    assert code == 2 and "--draw: cannot write" in err and "such.png" in err
    with pytest.raises(SystemExit):
        cli.main(["--topology", "torus:4x4", "--draw", str(png), "--steps", "one"])
    assert "not a list of integers" in capsys.readouterr()[1]
    with pytest.raises(SystemExit):
        cli.main(["--topology", "torus:4x4", "--draw", str(png), "--tree", "0,3-1"])
    assert "--tree: range '3-1' runs backwards" in capsys.readouterr()[1]
