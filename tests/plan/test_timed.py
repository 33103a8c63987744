"""The timed planner (mtcoll/plan/_timed.py) and the network's lower bound (_bound.py): valid
schedules on links of any speed and on hosts, determinism, the kernel equal to its Python twin,
never slower than MultiTree in its own time model, and the bound below every simulated time."""

import numpy as np
import pytest

from mtcoll.plan import ALGORITHMS, allreduce_bound, plan, validate
from mtcoll.plan import _timed
from mtcoll.plan._graph import flatten
from mtcoll.simulate import simulate
from mtcoll.topology import parse

UNEQUAL = [
    "torus:4x4/20mbit/0-1=5mbit",
    "torus:4x4/20mbit/dim1=40mbit",
    "torus:3x5/1gbit/2>3=100mbit",
    "mesh:3x4/20mbit/5-6=2mbit",
    "ring:6/10mbit/0-1=1mbit",
    "full:5/1gbit/0-1=10mbit",
    "hier:4x4/20mbit",
    "hier:3x2/20mbit/shm=1gbit",
    "fattree:2x4/1gbit/0-8=100mbit",
    "torus:2x2/per-host=4/20mbit",
    "torus:4x2/per-host=2/20mbit/dim0=40mbit",
    "ring:3/per-host=3",
    "mesh:2x3/per-host=2/20mbit",
    "full:3/per-host=2/20mbit",
]


@pytest.mark.parametrize("spec", UNEQUAL)
def test_timed_validates_on_unequal_links_and_hosts(spec):
    s = plan(spec, "timed")
    for engine in ("python", "numba"):
        r = validate(s, spec, engine=engine)
        assert r.valid, str(r)


@pytest.mark.parametrize("spec", UNEQUAL[:4] + ["hier:4x4/20mbit", "torus:2x2/per-host=4"])
def test_timed_kernel_equals_python_twin(spec):
    topo = parse(spec)
    g = flatten(topo)
    for k in _timed.pieces_per_rank(topo.nranks):
        rdur = _timed.route_durations(g, topo, _timed.PLAN_BYTES / (topo.nranks * k))
        from mtcoll.plan._kernels import grow_timed

        args = (topo.nranks, k, g.ports, g.nbr_ptr, g.nbr, g.edge_route_ptr, g.route_link_ptr,
                g.route_links, g.nlinks, rdur)
        a = _timed.grow_timed_py(*args)
        b = grow_timed(*args)
        assert a[-1] == b[-1] == 0
        for x, y in zip(a[:-1], b[:-1]):
            assert x.dtype == y.dtype and np.array_equal(x, y)
    assert plan(spec, "timed", engine="python") == plan(spec, "timed", engine="numba")


def test_timed_is_deterministic():
    spec = "torus:4x4/20mbit/dim1=40mbit/0-1=5mbit"
    a, b = plan(spec, "timed"), plan(spec, "timed")
    assert a == b and a.meta == b.meta


@pytest.mark.parametrize("spec", ["torus:4x4", "torus:8x8", "mesh:3x4", "ring:7", "full:5",
                                  "fattree:2x4", "hier:4x4"] + UNEQUAL[:3])
def test_timed_never_slower_than_multitree_in_its_model(spec):
    s = plan(spec, "timed")
    assert s.meta["planned_gather_s"] <= s.meta["multitree_gather_s"]
    if not s.meta["grown"]:  # MultiTree was as good: its schedule, under the timed name
        m = plan(spec, "multitree")
        assert np.array_equal(s.src, m.src) and np.array_equal(s.step, m.step)


def test_timed_sends_little_over_a_slow_link():
    spec = "torus:4x4/20mbit/0-1=5mbit"
    topo = parse(spec)
    nbytes = 4 << 20

    def bytes_on(s, a, b):
        link = topo.link(a, b)
        r = simulate(s, topo, nbytes, "dataflow", sharing="connection")
        sel = [i for i in range(s.ntransfers)
               if link in topo.routes(int(s.src[i]), int(s.dst[i]))[int(s.route[i])]]
        return len(sel), r.time

    n_mt, t_mt = bytes_on(plan(spec, "multitree"), 0, 1)
    n_td, t_td = bytes_on(plan(spec, "timed"), 0, 1)
    assert n_td < n_mt and t_td * 2 < t_mt


def test_timed_beats_multitree_on_a_degraded_torus_and_uneven_dimensions():
    for spec, factor in (("torus:4x4/20mbit/0-1=5mbit", 2.5), ("torus:4x4/20mbit/dim1=40mbit",
                                                               1.2)):
        mt = simulate(plan(spec, "multitree"), spec, 4 << 20, "step").time
        td = simulate(plan(spec, "timed"), spec, 4 << 20, "dataflow", sharing="connection").time
        assert td * factor <= mt, (spec, td, mt)


def test_timed_planning_is_pure_of_the_spec_text():
    # the same network spelt two ways plans the same schedule
    a = plan("torus:4x4/0-1=5mbit/20mbit", "timed")
    b = plan("torus:4x4/20mbit/1-0=5mbit", "timed")
    assert a == b


# -- the bound ----------------------------------------------------------------------------------

BOUND_SPECS = ["torus:4x4", "torus:4x4/20mbit/0-1=5mbit", "torus:4x4/20mbit/dim1=40mbit",
               "mesh:3x4", "ring:5", "full:4", "fattree:2x4", "bigraph:2x4", "hier:4x4/20mbit",
               "torus:2x2/per-host=4/20mbit"]


@pytest.mark.parametrize("spec", BOUND_SPECS)
def test_bound_below_every_simulated_time(spec):
    topo = parse(spec)
    for nbytes in (64 << 10, 4 << 20):
        b = allreduce_bound(topo, nbytes)
        assert b.time > 0
        for algorithm in ALGORITHMS:
            try:
                s = plan(topo, algorithm)
            except ValueError:
                continue  # ring2d off 2-D grids
            for mode, sharing in (("step", "fair"), ("dataflow", "fair"),
                                  ("dataflow", "connection"), ("dataflow", "priority")):
                t = simulate(s, topo, nbytes, mode, sharing=sharing).time
                assert b.time <= t * (1 + 1e-9), (algorithm, mode, sharing, b, t)


def test_bound_of_a_uniform_torus_is_the_classic_volume():
    topo = parse("torus:4x4/20mbit")
    b = allreduce_bound(topo, 1 << 20)
    bw = 20e6 / 8
    assert b.kind == "volume"
    assert b.time == pytest.approx(2 * 15 / 16 * (1 << 20) / (4 * bw) + 150e-9)


def test_bound_of_hosts_is_their_nic():
    b = allreduce_bound(parse("hier:4x4/20mbit"), 1 << 20)
    assert b.kind == "cut" and "host" in b.where
    assert b.time == pytest.approx((1 << 20) / (20e6 / 8) + 1e-6)


def test_bound_rejects_a_negative_size():
    with pytest.raises(ValueError, match="nbytes"):
        allreduce_bound(parse("ring:4"), -1)


def test_plan_cli_reports_the_bound_and_the_prediction_over_it(capsys):
    import json

    from mtcoll.plan.__main__ import main

    assert main(["--topology", "torus:4x4/20mbit/0-1=5mbit", "--algorithm", "timed",
                 "--bytes", "4M", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bound_bytes"] == 4 << 20 and out["bound_kind"] == "volume"
    assert out["bound_s"] == pytest.approx(allreduce_bound(parse(out["topology"]),
                                                           4 << 20).time)
    assert 1 <= out["predicted_over_bound"] < 2
    assert main(["--topology", "torus:4x4", "--bytes", "1M,2M"]) == 2
    assert "--bytes takes one size" in capsys.readouterr().err
