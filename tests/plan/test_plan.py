"""The planner: every algorithm on every topology family validates; numba == Python twin;
MultiTree meets the paper's step counts; schedules are immutable values; the CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest

from mtcoll.plan import ALGORITHMS, plan, tree_depth, validate
from mtcoll.plan._graph import flatten
from mtcoll.plan._kernels import grow_trees
from mtcoll.plan._multitree import grow_trees_py
from mtcoll.schedule import GATHER, RECV, REDUCE, SEND, Schedule
from mtcoll.topology import parse

# N = 1, 2, 3, primes, non-square and 3-D sizes for each family
SPECS = [
    "ring:1", "ring:2", "ring:3", "ring:7", "ring:11",
    "torus:1x1", "torus:2x2", "torus:4x4", "torus:3x5", "torus:2x7", "torus:3x3", "torus:2x3x4",
    "torus:8x8",
    "mesh:2x2", "mesh:3x3", "mesh:3x4", "mesh:1x5", "mesh:2x2x2",
    "full:1", "full:2", "full:5", "full:8",
    "fattree:1x1", "fattree:2x3", "fattree:3x2", "fattree:4x4", "fattree:8x8",
    "bigraph:1x2", "bigraph:2x4", "bigraph:3x6", "bigraph:4x16",
    "hier:1x1", "hier:2x3", "hier:3x2", "hier:4x4", "hier:5x1",
]


def _fits(spec, algorithm):
    return algorithm != "ring2d" or (spec.split(":")[0] in ("torus", "mesh")
                                     and len(spec.split(":")[1].split("x")) == 2)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("spec", SPECS)
def test_every_algorithm_validates(spec, algorithm):
    if not _fits(spec, algorithm):
        with pytest.raises(ValueError, match="ring2d needs a 2-D torus or mesh"):
            plan(spec, algorithm)
        return
    s = plan(spec, algorithm)
    n = parse(spec).nranks
    assert s.nranks == n and s.algorithm == algorithm
    engines = ("numba", "python") if n <= 64 else ("numba",)
    for engine in engines:
        r = validate(s, spec, engine=engine)
        assert r.valid, str(r)
    if n == 1:
        assert s.ntransfers == 0


@pytest.mark.parametrize("spec,ports", [
    ("torus:4x4", None), ("torus:4x4", 1), ("torus:3x5", 2), ("mesh:3x4", None),
    ("ring:6", None), ("full:6", 2), ("fattree:2x4", None), ("bigraph:2x4", None),
    ("hier:2x4", None), ("torus:2x3x4", None), ("torus:8x8", None), ("mesh:5x5", None),
    ("fattree:8x8", None), ("ring:1", None), ("ring:2", None),
])
def test_numba_kernel_equals_python_twin(spec, ports):
    g = flatten(parse(spec, ports=ports))
    slow = grow_trees_py(g)
    *fast, err = grow_trees(g.nranks, g.ports, g.nbr_ptr, g.nbr, g.edge_route_ptr,
                            g.route_link_ptr, g.route_links, g.nlinks)
    assert err == 0
    for a, b in zip(slow, fast):
        assert np.array_equal(a, b)
    assert plan(spec, ports=ports, engine="numba") == plan(spec, ports=ports, engine="python")


@pytest.mark.parametrize("side", [4, 6, 8, 10, 12, 14, 16])
def test_multitree_torus_within_one_step_of_bound(side):
    spec = f"torus:{side}x{side}"
    s = plan(spec, ports=4, engine="numba")
    lb = parse(spec, ports=4).lower_bound()
    assert lb == max(side, -(-(side * side - 1) // 4))
    assert lb <= s.steps[0] <= lb + 1 and s.steps[0] == s.steps[1]
    assert validate(s, parse(spec, ports=4)).valid


@pytest.mark.parametrize("side", [4, 6, 8, 10, 12, 14, 16])
def test_multitree_one_port_takes_n_minus_1(side):
    s = plan(f"torus:{side}x{side}", ports=1, engine="numba")
    assert s.steps == (side * side - 1,) * 2


def test_multitree_switched_networks_reach_the_bound():
    for spec in ("fattree:8x8", "bigraph:4x16"):
        s = plan(spec)
        assert s.steps == (63, 63)
        assert validate(s, spec).valid


def test_multitree_is_one_tree_per_rank():
    s = plan("torus:4x4")
    g = s.phase == GATHER
    # chunk r travels only on tree r, which reaches every other rank exactly once from root r
    for r in range(16):
        on = g & (s.lo == r)
        assert np.all(s.hi[on] == r + 1)
        assert sorted(s.dst[on].tolist()) == [x for x in range(16) if x != r]
        assert r in s.src[on] and r not in s.dst[on]
    # reduce-scatter is the same edges reversed in time
    red = s.phase == REDUCE
    last = s.steps[0] - 1
    fwd = set(zip(s.step[g].tolist(), s.src[g].tolist(), s.dst[g].tolist(), s.lo[g].tolist()))
    back = set(zip((last - s.step[red]).tolist(), s.dst[red].tolist(), s.src[red].tolist(),
                   s.lo[red].tolist()))
    assert fwd == back
    assert 1 <= tree_depth(s) <= s.steps[1]


def test_ring_follows_the_cycle_and_baseline_steps():
    s = plan("torus:4x4", "ring")
    assert s.steps == (15, 15)
    t = parse("torus:4x4")
    assert all(d in t.tree_neighbors(x) for x, d in zip(s.src.tolist(), s.dst.tolist()))
    assert plan("torus:4x4", "ring2d").steps == (6, 6)
    assert plan("ring:8", "rhd").nchunks == 8
    assert plan("ring:6", "rhd").nchunks == 4  # largest power of two <= 6


def test_contention_costs_baselines_steps():
    # recursive halving's long hops collide on a torus: the packer spreads them, so its cost
    # (steps weighted by transfer size) exceeds the contention-free (N-1) units
    assert plan("torus:4x4", "rhd").step_cost()[0] > 15
    assert plan("full:16", "rhd").step_cost()[0] == 15


def test_plan_rejects_unknown_algorithm():
    with pytest.raises(ValueError, match="unknown algorithm 'tree'.*multitree"):
        plan("torus:4x4", "tree")
    with pytest.raises(ValueError, match="engine"):
        plan("torus:4x4", engine="gpu")


def test_schedule_is_immutable_and_round_trips(tmp_path):
    s = plan("fattree:2x3")
    with pytest.raises(ValueError):
        s.step[0] = 3
    path = tmp_path / "s.npz"
    s.save(path)
    t = Schedule.load(path)
    assert t == s and t.algorithm == s.algorithm and t.meta == s.meta
    assert (t.route == s.route).all()


def test_schedule_is_size_free_and_chunks_cover_any_count():
    s = plan("torus:3x5")
    for count in (0, 1, 14, 15, 16, 1000, 2**20 + 3):
        b = s.chunk_bounds(count)
        assert b[0] == 0 and b[-1] == count and len(b) == s.nchunks + 1
        sizes = np.diff(b)
        assert sizes.max() - sizes.min() <= (1 if count else 0)
    with pytest.raises(ValueError):
        s.chunk_bounds(-1)


def test_rank_views_partition_the_transfers():
    s = plan("torus:3x5", "ring2d")
    sends = recvs = 0
    for r in range(s.nranks):
        v = s.rank_view(r)
        sends += int((v.kind == SEND).sum())
        recvs += int((v.kind == RECV).sum())
        # program order: (phase, step), sends before receives within a step
        key = v.phase.astype(int) * 10**6 + v.step * 2 + v.kind
        assert (np.diff(key) >= 0).all()
    assert sends == recvs == s.ntransfers
    with pytest.raises(ValueError):
        s.rank_view(15)


def test_malformed_schedules_are_rejected_at_construction():
    with pytest.raises(ValueError, match="to itself"):
        Schedule("x", "ring:2", 2, 2, [0, 1], [0], [0], [1], [1], [0], [1])
    with pytest.raises(ValueError, match="chunk ranges"):
        Schedule("x", "ring:2", 2, 2, [0, 1], [0], [0], [0], [1], [1], [1])
    with pytest.raises(ValueError, match="owner"):
        Schedule("x", "ring:2", 2, 2, [0], [], [], [], [], [], [])


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mtcoll.plan", *args], capture_output=True,
                          text=True, timeout=300)


def test_cli_json_and_table(tmp_path):
    out = _cli("--topology", "torus:4x4", "--json")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    for key in ("topology", "algorithm", "nodes", "ports", "steps_per_phase", "lower_bound",
                "valid", "plan_seconds"):
        assert key in d
    assert d["nodes"] == 16 and d["steps_per_phase"] == [5, 5] and d["lower_bound"] == 4
    assert d["valid"] is True and d["ring_steps_per_phase"] == 15 and d["plan_seconds"] > 0
    f = tmp_path / "p.json"
    out = _cli("--topology", "fattree:2x3", "--algorithm", "ring", "--json", str(f),
               "--save", str(tmp_path / "p.npz"))
    assert out.returncode == 0 and "steps per phase" in out.stdout
    assert json.loads(f.read_text())["algorithm"] == "ring"
    assert Schedule.load(tmp_path / "p.npz").nranks == 6
    out = _cli("--topology", "torus:4")
    assert out.returncode == 2 and "accepted forms" in out.stderr


def test_cli_table_of_one_rank():
    """One rank has nothing to move: a bound of 0 s and no ratio over it, printed as such."""
    out = _cli("--topology", "ring:1")
    assert out.returncode == 0, out.stderr
    assert "no bound (nothing to move)" in out.stdout and "valid                yes" in out.stdout


def test_both_phases_kernel_equals_numpy_path():
    from mtcoll.plan._kernels import both_phases
    from mtcoll.plan._multitree import schedule_from_trees

    g = flatten(parse("torus:3x5"))
    edges = grow_trees_py(g)
    small = schedule_from_trees(edges, "torus:3x5", 15, {})  # numpy path (few edges)
    cols = both_phases(*edges)
    for name, col in zip(("phase", "step", "src", "dst", "lo", "hi", "route"), cols):
        assert np.array_equal(getattr(small, name), col), name


@pytest.mark.parametrize("spec", ["torus:4x4", "torus:3x5", "torus:3x3x3", "mesh:4x4", "mesh:3x3",
                                  "ring:7", "full:5", "fattree:4x4", "hier:2x4",
                                  "torus:4x4/20mbit"])
def test_ring_built_in_rounds_equals_the_packed_ring(spec):
    from mtcoll.plan._baselines import pack, ports_meta, ring
    from mtcoll.schedule import Schedule
    from mtcoll.topology import parse

    topo = parse(spec)
    tr, nchunks, owner = ring(topo)
    *cols, route = pack(topo, tr, nchunks)
    packed = Schedule("ring", topo.spec, topo.nranks, nchunks, owner, *cols, route=route,
                      meta={"ports": ports_meta(topo)})
    assert plan(spec, "ring") == packed
