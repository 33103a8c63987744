"""The validator rejects broken schedules and says which rule broke; fast and slow agree."""

import numpy as np
import pytest

from mtcoll.plan import plan, validate
from mtcoll.schedule import GATHER, REDUCE, Schedule
from mtcoll.topology import parse

ENGINES = ("numba", "python")


def _edit(s, keep=None, **changes):
    """A copy of schedule ``s`` with some transfers dropped (keep: bool mask) or changed
    (field=(index, value))."""
    cols = {f: np.array(getattr(s, f)) for f in ("phase", "step", "src", "dst", "lo", "hi",
                                                  "route")}
    for f, (i, v) in changes.items():
        cols[f][i] = v
    if keep is not None:
        cols = {f: a[keep] for f, a in cols.items()}
    route = cols.pop("route")
    return Schedule(s.algorithm, s.topology, s.nranks, s.nchunks, s.owner, **cols, route=route)


def _both(s, topo):
    reports = [validate(s, topo, engine=e) for e in ENGINES]
    assert reports[0].counts.keys() == reports[1].counts.keys()
    return reports


@pytest.mark.parametrize("engine", ENGINES)
def test_valid_schedules_pass(engine):
    for spec in ("torus:4x4", "fattree:2x3", "hier:2x3"):
        for a in ("multitree", "ring", "rhd", "dbtree"):
            assert validate(plan(spec, a), spec, engine=engine).valid


def test_link_used_twice_in_a_step():
    # two transfers forced onto one link in one step: move a gather edge onto the step and
    # link of another one
    s = plan("torus:4x4")
    g = np.flatnonzero(s.phase == GATHER)
    i, j = g[0], next(k for k in g if s.step[k] != s.step[g[0]])
    bad = _edit(s, step=(j, s.step[i]), src=(j, s.src[i]), dst=(j, s.dst[i]))
    for r in _both(bad, "torus:4x4"):
        assert not r.valid
        assert any("link used twice in one step" in e for e in r.errors)
        assert r.counts["link"] >= 1


def test_switched_path_counts_every_link():
    # on a fat tree, two transfers from one leaf to another through the same spine collide on
    # the leaf's uplink even though their ranks differ (both spine 0: (0+0)%2 == (1+1)%2)
    topo = parse("fattree:2x2")
    s = Schedule("x", topo.spec, 4, 4, [0, 1, 2, 3],
                 [GATHER] * 2, [0, 0], [0, 1], [2, 3], [0, 1], [1, 2], route=[0, 0])
    for r in _both(s, topo):
        assert any("link used twice" in e for e in r.errors), r


def test_port_budget():
    s = plan("full:4")  # one step: every rank sends 3 and receives 3
    for r in _both(s, parse("full:4", ports=2)):
        assert any("port budget exceeded" in e and "sends more than 2" in e for e in r.errors)
        assert any("receives more than 2" in e for e in r.errors)


def test_missing_contribution():
    s = plan("torus:4x4")
    red = np.flatnonzero(s.phase == REDUCE)
    drop = red[len(red) // 2]
    keep = np.ones(s.ntransfers, bool)
    keep[drop] = False
    fast, slow = _both(_edit(s, keep=keep), "torus:4x4")
    for r in (fast, slow):
        assert any("missing or doubled contribution" in e for e in r.errors), r
    # the exact twin names who is missing: the dropped sender (and its subtree)
    assert any("missing ranks [" in e and str(s.src[drop]) in e for e in slow.errors)


def test_doubled_contribution():
    s = plan("ring:4", "ring")
    # the last partial reaching a chunk's owner is sent again one step later
    red = np.flatnonzero((s.phase == REDUCE) & (s.dst == s.owner[s.lo]))
    i = red[0]
    cols = {f: np.append(getattr(s, f), getattr(s, f)[i]) for f in
            ("phase", "step", "src", "dst", "lo", "hi", "route")}
    cols["step"][-1] = s.steps[0]
    route = cols.pop("route")
    bad = Schedule("ring", s.topology, 4, 4, s.owner, **cols, route=route)
    fast, slow = _both(bad, "ring:4")
    assert not fast.valid and not slow.valid
    assert any("doubled ranks [" in e for e in slow.errors), slow
    assert any("missing or doubled contribution" in e for e in fast.errors), fast


def test_send_before_data_is_complete():
    # a MultiTree child reduces into its parent one step too early: before its own child has
    # reduced into it
    s = plan("ring:5", "multitree")
    red = np.flatnonzero(s.phase == REDUCE)
    late = [i for i in red if s.step[i] > 0]
    i = late[0]
    bad = _edit(s, step=(i, s.step[i] - 1))
    for r in _both(bad, "ring:5"):
        assert any("sent before its data is complete" in e for e in r.errors), r


def test_gather_before_holding_the_chunk():
    s = plan("torus:3x3", "ring")
    g = np.flatnonzero(s.phase == GATHER)
    i = g[-1]
    bad = _edit(s, step=(i, 0))  # forwards a chunk in step 0 it only receives later
    for r in _both(bad, "torus:3x3"):
        assert any("forwards chunk" in e for e in r.errors), r


def test_missing_chunk_at_the_end():
    s = plan("torus:4x4")
    g = np.flatnonzero((s.phase == GATHER) & (s.step == s.steps[1] - 1))
    keep = np.ones(s.ntransfers, bool)
    keep[g[0]] = False
    for r in _both(_edit(s, keep=keep), "torus:4x4"):
        assert any(f"rank {s.dst[g[0]]} never receives reduced chunk {s.lo[g[0]]}" in e
                   for e in r.errors), r


def test_step_bound_is_checked():
    topo = parse("torus:4x4")
    s = plan(topo)
    topo.diameter = 9  # a network the schedule cannot be that fast on
    for r in _both(s, topo):
        assert any("below the lower bound 9" in e for e in r.errors)


def test_wrong_size():
    with pytest.raises(ValueError, match="has 16 ranks but the communicator has 9"):
        validate(plan("torus:3x3"), "torus:4x4")


def test_report_lists_at_most_max_errors():
    s = plan("full:8")
    r = validate(s, parse("full:8", ports=1), max_errors=3)
    assert len(r.errors) == 3 and sum(r.counts.values()) > 3
    assert "more" in str(r)


def _lookup_routes_loop(src, dst, alt, nbr_ptr, nbr, edge_route_ptr):
    """The slow twin of mtcoll.plan._graph.lookup_routes: the first candidate edge u->v."""
    out = np.full(len(src), -1, np.int32)
    for i, (u, v, a) in enumerate(zip(src.tolist(), dst.tolist(), alt.tolist())):
        for e in range(nbr_ptr[u], nbr_ptr[u + 1]):
            if nbr[e] == v:
                if 0 <= a and edge_route_ptr[e] + a < edge_route_ptr[e + 1]:
                    out[i] = edge_route_ptr[e] + a
                break
    return out


@pytest.mark.parametrize("slice_", [None, 7])
@pytest.mark.parametrize("spec", ["torus:4x4", "mesh:3x5", "ring:2", "ring:7", "full:5",
                                  "fattree:2x3", "bigraph:2x4", "hier:2x3"])
def test_route_lookup_equals_its_loop_twin(spec, slice_, monkeypatch):
    """The vectorised route lookup equals its loop twin, also when it looks up a few
    transfers at a time (as it does millions)."""
    if slice_:
        monkeypatch.setattr("mtcoll.plan._graph._SLICE", slice_)
    from mtcoll.plan import ALGORITHMS
    from mtcoll.plan._graph import flatten, lookup_routes

    topo = parse(spec)
    g = flatten(topo)
    rng = np.random.default_rng(0)
    for algorithm in ALGORITHMS:
        try:
            s = plan(topo, algorithm)
        except ValueError:  # ring2d off grids
            continue
        # the schedule's own transfers (rhd and dbtree: some are not tree edges), then the
        # same pairs with route numbers past the last route, and random pairs
        alt = s.route.astype(np.int64)
        cases = [(s.src, s.dst, alt), (s.src, s.dst, alt + 3)]
        n = topo.nranks
        cases.append((rng.integers(0, n, 200), rng.integers(0, n, 200), rng.integers(0, 3, 200)))
        for src, dst, a in cases:
            got = lookup_routes(src, dst, a, g.nbr_ptr, g.nbr, g.edge_route_ptr)
            want = _lookup_routes_loop(src, dst, a, g.nbr_ptr, g.nbr, g.edge_route_ptr)
            assert got.dtype == np.int32 and np.array_equal(got, want), (spec, algorithm)


def test_validating_a_small_schedule_does_not_load_numba():
    import subprocess
    import sys

    code = ("import sys; from mtcoll.plan import plan, validate; "
            "assert validate(plan('torus:8x8'), 'torus:8x8').valid; "
            "print('numba' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
