"""The simulator: closed forms on hand-built schedules, the fluid sharing model against hand
arithmetic and against its pure-Python twin, the dependency rule against a brute-force
twin, MultiTree against the baselines, the CLI, and SimGrid where it is installed."""

import json
import subprocess
import sys
import zlib

import numpy as np
import pytest

from mtcoll.plan import plan
from mtcoll.schedule import REDUCE, Schedule
from mtcoll.simulate import (OVERHEAD, ROUTER_DELAY, busbw, ceiling, parse_sizes, simgrid_python,
                             simgrid_replay, simulate)
from mtcoll.simulate import __main__ as cli
from mtcoll.simulate._replay import dataflow_deps
from mtcoll.topology import DEFAULT_BANDWIDTH as B, DEFAULT_LATENCY as LAT, parse

MiB = 1 << 20
NO_EXTRAS = dict(overhead=0.0, router_delay=0.0)
BOTH_ENGINES = pytest.mark.parametrize("engine", ["numba", "python"])


def hand(spec, nranks, nchunks, rows, owner=None):
    """A schedule from rows (phase, step, src, dst, lo, hi[, route])."""
    rows = [r if len(r) == 7 else (*r, 0) for r in rows]
    cols = list(zip(*rows))
    return Schedule("hand", spec, nranks, nchunks,
                    owner if owner is not None else np.zeros(nchunks, int), *cols[:6],
                    route=cols[6])


_plans = {}


def planned(spec, algorithm, ports=None):
    key = (spec, algorithm, ports)
    if key not in _plans:
        _plans[key] = plan(spec, algorithm, ports=ports)
    return _plans[key]


# -- hand arithmetic -----------------------------------------------------------------------------

@BOTH_ENGINES
@pytest.mark.parametrize("mode", ["step", "dataflow"])
def test_one_transfer_on_one_link(engine, mode):
    s = hand("ring:2", 2, 1, [(REDUCE, 0, 0, 1, 0, 1)], owner=[1])
    nbytes = 3 * MiB
    r = simulate(s, "ring:2", nbytes, mode, engine=engine, **NO_EXTRAS)
    assert r.time == pytest.approx(LAT + nbytes / B, rel=1e-12)
    # the documented extras, added exactly once
    r = simulate(s, "ring:2", nbytes, mode, engine=engine, overhead=2e-6, router_delay=5e-8)
    assert r.time == pytest.approx(2e-6 + LAT + 5e-8 + nbytes / B, rel=1e-12)
    assert r.slowed == 0
    # and the defaults are the documented ones
    r = simulate(s, "ring:2", nbytes, mode, engine=engine)
    assert r.time == pytest.approx(OVERHEAD + LAT + ROUTER_DELAY + nbytes / B, rel=1e-12)


@BOTH_ENGINES
def test_two_transfers_on_one_link_take_twice_as_long(engine):
    # step 0 carries two chunks from rank 0: both over link 0->1, or over 0->1 and 0->3
    shared = hand("ring:4", 4, 2, [(REDUCE, 0, 0, 1, 0, 1), (REDUCE, 0, 0, 1, 1, 2)])
    apart = hand("ring:4", 4, 2, [(REDUCE, 0, 0, 1, 0, 1), (REDUCE, 0, 0, 3, 1, 2)])
    nbytes = 8 * MiB  # 4 MiB per transfer
    kw = dict(latency=0.0, engine=engine, **NO_EXTRAS)
    t_shared = simulate(shared, "ring:4", nbytes, **kw)
    t_apart = simulate(apart, "ring:4", nbytes, **kw)
    assert t_apart.time == pytest.approx(4 * MiB / B, rel=1e-12)
    assert t_shared.time == pytest.approx(2 * t_apart.time, rel=1e-12)
    assert (t_shared.slowed, t_apart.slowed) == (2, 0)
    # with latency and the extras the bandwidth term doubles, the rest does not
    lat = OVERHEAD + LAT + ROUTER_DELAY
    assert simulate(shared, "ring:4", nbytes, engine=engine).time == \
        pytest.approx(lat + 2 * 4 * MiB / B, rel=1e-12)


@BOTH_ENGINES
def test_staggered_sharing_is_max_min_fluid(engine):
    # a 1-hop and a 2-hop transfer meet on link 1->2 of ring:4 (route 0->2 is 0->1->2): the
    # 1-hop one has the link alone for one latency, then they split it, then the 2-hop one is
    # alone again
    s = hand("ring:4", 4, 2, [(REDUCE, 0, 1, 2, 0, 1), (REDUCE, 0, 0, 2, 1, 2)])
    nbytes = 2 * MiB
    b = MiB  # per transfer
    r = simulate(s, "ring:4", nbytes, engine=engine, **NO_EXTRAS)
    alone = LAT * B  # bytes the 1-hop transfer moves before the other arrives
    t_first = 2 * LAT + (b - alone) / (B / 2)
    t_second = t_first + (b - (t_first - 2 * LAT) * B / 2) / B
    assert r.finish[0] == pytest.approx(t_first, rel=1e-12)
    assert r.finish[1] == pytest.approx(t_second, rel=1e-12)
    assert r.time == pytest.approx(t_second, rel=1e-12)


@BOTH_ENGINES
@pytest.mark.parametrize("mode", ["step", "dataflow"])
@pytest.mark.parametrize("n", [2, 5, 8])
def test_ring_matches_closed_form(engine, mode, n):
    spec = f"ring:{n}"
    s = planned(spec, "ring")
    m = 24 * n * MiB // 8  # a multiple of n elements, so chunks are equal
    r = simulate(s, spec, m, mode, engine=engine)
    alpha = OVERHEAD + LAT + ROUTER_DELAY  # one hop per step
    closed = 2 * (n - 1) * (alpha + m / (n * B))
    assert r.time == pytest.approx(closed, rel=0.01)
    assert r.time == pytest.approx(closed, rel=1e-9)  # the model is exact here
    if mode == "step":
        assert r.step_times.sum() == pytest.approx(r.time, rel=1e-12)
        assert np.allclose(r.step_times, alpha + m / (n * B), rtol=1e-9)


def test_zero_bytes_and_empty_chunks():
    s = planned("torus:4x4", "multitree")
    r = simulate(s, "torus:4x4", 0)
    steps = sum(s.steps)
    assert r.time == pytest.approx(steps * (OVERHEAD + LAT + ROUTER_DELAY), rel=1e-12)
    r = simulate(s, "torus:4x4", 8)  # 2 elements for 16 chunks
    assert r.time > 0


def test_bad_inputs():
    s = planned("torus:4x4", "ring")
    with pytest.raises(ValueError, match="multiple of itemsize"):
        simulate(s, "torus:4x4", 1001)
    with pytest.raises(ValueError, match="mode must be"):
        simulate(s, "torus:4x4", 1024, "eager")
    with pytest.raises(ValueError, match="sharing must be"):
        simulate(s, "torus:4x4", 1024, sharing="fifo")
    with pytest.raises(ValueError, match="has 8 ranks"):
        simulate(s, "torus:2x4", 1024)
    bad = hand("fattree:2x2", 4, 1, [(REDUCE, 0, 0, 3, 0, 1, 5)])
    with pytest.raises(ValueError, match="uses route 5"):
        simulate(bad, "fattree:2x2", 1024)


# -- the dependency rule and the engines ---------------------------------------------------------

def deps_brute(s):
    """Transfer i waits for j when j is a receive of i's sender, earlier in (phase, step), with
    overlapping chunks."""
    out = set()
    for i in range(s.ntransfers):
        for j in range(s.ntransfers):
            if (s.dst[j] == s.src[i] and (s.phase[j], s.step[j]) < (s.phase[i], s.step[i])
                    and s.lo[j] < s.hi[i] and s.lo[i] < s.hi[j]):
                out.add((j, i))
    return out


def random_schedule(rng, spec, nchunks, ntransfers):
    """Transfers between random ranks over random routes: they contend."""
    topo = parse(spec)
    n = topo.nranks
    rows = []
    for _ in range(ntransfers):
        src, dst = (int(x) for x in rng.choice(n, 2, replace=False))
        lo = int(rng.integers(0, nchunks))
        hi = int(rng.integers(lo + 1, nchunks + 1))
        route = int(rng.integers(0, len(topo.routes(src, dst))))
        rows.append((int(rng.integers(0, 2)), int(rng.integers(0, 4)), src, dst, lo, hi, route))
    return hand(spec, n, nchunks, rows, owner=rng.integers(0, n, nchunks))


@pytest.mark.parametrize("seed", range(4))
def test_dataflow_deps_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    s = random_schedule(rng, "torus:3x3", 5, 60)
    before, after = dataflow_deps(s.phase, s.step, s.src, s.dst, s.lo, s.hi, s.nranks, s.nchunks)
    got = set(zip(before.tolist(), after.tolist()))
    assert len(got) == len(before)  # no duplicate edges
    assert got == deps_brute(s)
    for spec, algorithm in (("torus:4x4", "multitree"), ("torus:4x4", "rhd"),
                            ("mesh:3x4", "dbtree")):
        p = planned(spec, algorithm)
        before, after = dataflow_deps(p.phase, p.step, p.src, p.dst, p.lo, p.hi, p.nranks,
                                      p.nchunks)
        assert set(zip(before.tolist(), after.tolist())) == deps_brute(p)


@pytest.mark.parametrize("mode", ["step", "dataflow"])
@pytest.mark.parametrize("sharing", ["fair", "priority", "connection"])
@pytest.mark.parametrize("spec", ["torus:3x3", "mesh:2x3x2", "fattree:2x3", "bigraph:2x4"])
@pytest.mark.parametrize("burst", [0, 3000])
def test_numba_engine_equals_python_twin(mode, sharing, spec, burst):
    rng = np.random.default_rng(zlib.crc32(f"{mode} {sharing} {spec}".encode()))
    slowed = 0
    for _ in range(3):
        s = random_schedule(rng, spec, 7, 40)
        kw = dict(mode=mode, sharing=sharing, burst=burst)
        a = simulate(s, spec, 7 * 4096, engine="numba", **kw)
        b = simulate(s, spec, 7 * 4096, engine="python", **kw)
        np.testing.assert_allclose(a.start, b.start, rtol=1e-9)
        assert a.slowed == b.slowed
        slowed += a.slowed
        np.testing.assert_allclose(a.finish, b.finish, rtol=1e-9)
        np.testing.assert_allclose(a.release, b.release, rtol=1e-9)
    assert slowed > 0  # the comparison did cover sharing


def test_planned_schedules_do_not_contend_in_step_mode():
    for algorithm in ("multitree", "ring", "ring2d", "dbtree", "rhd"):
        r = simulate(planned("torus:4x4", algorithm), "torus:4x4", 4 * MiB)
        assert r.slowed == 0, algorithm
        assert r.time >= r.busiest_link_time


def test_priority_sharing_lets_earlier_steps_go_first():
    # two transfers of one rank on one link: with priority the step-0 one gets it all first
    s = hand("ring:4", 4, 2, [(REDUCE, 0, 0, 1, 0, 1), (REDUCE, 1, 0, 1, 1, 2)])
    kw = dict(mode="dataflow", latency=0.0, **NO_EXTRAS)
    fair = simulate(s, "ring:4", 8 * MiB, sharing="fair", **kw)
    prio = simulate(s, "ring:4", 8 * MiB, sharing="priority", **kw)
    one = 4 * MiB / B
    np.testing.assert_allclose(fair.finish, [2 * one, 2 * one], rtol=1e-12)
    np.testing.assert_allclose(prio.finish, [one, 2 * one], rtol=1e-12)


@BOTH_ENGINES
def test_connection_sharing_keeps_release_order_per_pair(engine):
    # rank 0 -> 1: A (chunks 1-3, step 2) is ready at once; B (chunk 0, step 1) waits for
    # chunk 0 from rank 3 (one unit u). Priority lets B overtake A, fair sharing splits the
    # link, the pair's connection sends A (released first) and then B.
    s = hand("ring:4", 4, 4, [(REDUCE, 0, 3, 0, 0, 1), (REDUCE, 1, 0, 1, 0, 1),
                              (REDUCE, 2, 0, 1, 1, 4)])
    kw = dict(mode="dataflow", latency=0.0, engine=engine, **NO_EXTRAS)
    u = 1 * MiB / B
    got = {m: simulate(s, "ring:4", 4 * MiB, sharing=m, **kw).finish[1:]
           for m in ("priority", "fair", "connection")}
    np.testing.assert_allclose(got["priority"], [2 * u, 4 * u], rtol=1e-12)  # B, A
    np.testing.assert_allclose(got["fair"], [3 * u, 4 * u], rtol=1e-12)
    np.testing.assert_allclose(got["connection"], [4 * u, 3 * u], rtol=1e-12)


@BOTH_ENGINES
def test_connections_share_a_link_and_keep_their_own_order(engine):
    # ring:4, u = 1 MiB of link time. Pair 0->2 (route 0->1->2) sends a1 then a2, 1 MiB each;
    # pair 1->2 sends b1, 3 MiB; all three are ready at once and meet on link 1->2. Each
    # connection carries one transfer at a time and the connections split the link: a1 and
    # b1 at half rate until 2u, then a2 and b1 until 4u, then b1 alone. Priority classes that
    # were global across pairs (the former model) held a2 back until b1 was done (5u), and
    # fair sharing runs all three at once (a third each).
    s = hand("ring:4", 4, 5, [(REDUCE, 0, 0, 2, 0, 1), (REDUCE, 0, 1, 2, 2, 5),
                              (REDUCE, 1, 0, 2, 1, 2)])
    kw = dict(mode="dataflow", latency=0.0, engine=engine, **NO_EXTRAS)
    u = MiB / B
    conn = simulate(s, "ring:4", 5 * MiB, sharing="connection", **kw)
    np.testing.assert_allclose(conn.finish, [2 * u, 5 * u, 4 * u], rtol=1e-12)
    np.testing.assert_allclose(conn.start, [0, 0, 2 * u], atol=1e-15)
    fair = simulate(s, "ring:4", 5 * MiB, sharing="fair", **kw)
    np.testing.assert_allclose(fair.finish, [3 * u, 5 * u, 3 * u], rtol=1e-12)


@BOTH_ENGINES
def test_a_connection_carries_one_transfer_at_a_time(engine):
    # pair 0->1 has a1 (3 MiB) and a2 (1 MiB), both ready at once: the connection sends a1
    # and then a2, where fair sharing splits the link between them
    u = MiB / B
    kw = dict(mode="dataflow", latency=0.0, engine=engine, **NO_EXTRAS)
    s = hand("ring:4", 4, 4, [(REDUCE, 0, 0, 1, 0, 3), (REDUCE, 1, 0, 1, 3, 4)])
    np.testing.assert_allclose(simulate(s, "ring:4", 4 * MiB, sharing="connection", **kw).finish,
                               [3 * u, 4 * u], rtol=1e-12)
    np.testing.assert_allclose(simulate(s, "ring:4", 4 * MiB, sharing="fair", **kw).finish,
                               [4 * u, 2 * u], rtol=1e-12)
    # a1 released later (it waits for chunk 0 from rank 3, 1 MiB): a2 goes first
    s = hand("ring:4", 4, 4, [(REDUCE, 0, 3, 0, 0, 1), (REDUCE, 0, 0, 1, 3, 4),
                              (REDUCE, 1, 0, 1, 0, 3)])
    r = simulate(s, "ring:4", 4 * MiB, sharing="connection", **kw)
    np.testing.assert_allclose(r.finish, [u, u, 4 * u], rtol=1e-12)
    np.testing.assert_allclose(r.start, [0, 0, u], atol=1e-15)


@pytest.mark.parametrize("seed", range(3))
def test_connection_replay_keeps_each_pairs_order(seed):
    # on random schedules: a pair's transfers never overlap, and they go in the order they
    # were released (ties: schedule order)
    rng = np.random.default_rng(seed)
    spec = "torus:3x3"
    waited = 0
    for _ in range(3):
        s = random_schedule(rng, spec, 7, 60)
        r = simulate(s, spec, 7 * 4096, "dataflow", sharing="connection", latency=0.0,
                     engine="numba", **NO_EXTRAS)
        pair = s.src * s.nranks + s.dst
        for p in np.unique(pair):
            idx = np.flatnonzero(pair == p)
            order = idx[np.lexsort((idx, r.release[idx]))]
            assert (np.diff(r.start[order]) >= 0).all()
            assert (r.start[order[1:]] >= r.finish[order[:-1]] * (1 - 1e-12)).all()
        waited += int((r.start > r.release + 1e-12).sum())
    assert waited > 0  # some transfers did wait for their connection


@BOTH_ENGINES
def test_burst_delivers_a_bucket_at_once_after_idling(engine):
    # ring:4, one link 0->1, u = 1 MiB of link time, a bucket of 256 KiB (u/4)
    u = MiB / B
    q = MiB // 4
    kw = dict(mode="dataflow", latency=0.0, engine=engine, sharing="connection", **NO_EXTRAS)
    one = hand("ring:2", 2, 1, [(REDUCE, 0, 0, 1, 0, 1)], owner=[1])
    assert simulate(one, "ring:2", MiB, burst=q, **kw).time == pytest.approx(0.75 * u, rel=1e-12)
    assert simulate(one, "ring:2", MiB // 8, burst=q, **kw).time == 0.0  # all in the bucket
    assert simulate(one, "ring:2", MiB, burst=0, **kw).time == pytest.approx(u, rel=1e-12)
    # back to back on one connection: the second transfer finds the bucket empty
    two = hand("ring:2", 2, 2, [(REDUCE, 0, 0, 1, 0, 1), (REDUCE, 1, 0, 1, 1, 2)], owner=[1, 1])
    np.testing.assert_allclose(simulate(two, "ring:2", 2 * MiB, burst=q, **kw).finish,
                               [0.75 * u, 1.75 * u], rtol=1e-12)
    # step by step, the second waits an overhead of u/8 after the first: the bucket has
    # refilled by u/8 of the link
    step = {**kw, "mode": "step", "overhead": u / 8}
    np.testing.assert_allclose(
        simulate(two, "ring:2", 2 * MiB, burst=q, **step).finish,
        [u / 8 + 0.75 * u, u / 8 + 0.75 * u + u / 8 + (1 - 1 / 8) * u], rtol=1e-12)
    with pytest.raises(ValueError, match="burst"):
        simulate(one, "ring:2", MiB, burst=-1, **kw)


def test_dataflow_never_slower_than_step_without_contention():
    # ring's dependencies chain exactly one hop per step: dataflow equals step
    s = planned("torus:4x4", "ring")
    a = simulate(s, "torus:4x4", 4 * MiB, "step")
    b = simulate(s, "torus:4x4", 4 * MiB, "dataflow")
    assert b.time == pytest.approx(a.time, rel=1e-12)
    # MultiTree with step priority in the routers: no slower than the strict schedule
    s = planned("torus:4x4", "multitree")
    a = simulate(s, "torus:4x4", 4 * MiB, "step")
    b = simulate(s, "torus:4x4", 4 * MiB, "dataflow", sharing="priority")
    assert b.time <= a.time * (1 + 1e-9)


# -- MultiTree against the baselines -------------------------------------------------------------

def test_multitree_near_its_ceiling_on_8x8_torus():
    mt = planned("torus:8x8", "multitree", ports=4)
    ring = planned("torus:8x8", "ring", ports=4)
    t_mt = simulate(mt, "torus:8x8", 64 * MiB).time
    t_ring = simulate(ring, "torus:8x8", 64 * MiB).time
    assert t_ring / t_mt >= 0.9 * 63 / 17
    assert t_ring / t_mt <= ceiling(mt) * 1.001  # no faster than its step count allows


@pytest.mark.parametrize("spec", ["torus:4x4", "torus:8x8", "mesh:4x4", "mesh:8x8"])
def test_multitree_beats_every_baseline_from_1mib(spec):
    mt = planned(spec, "multitree")
    for size in parse_sizes("1M:64M"):
        t_mt = simulate(mt, spec, size).time
        for algorithm in ("ring", "ring2d", "dbtree", "rhd"):
            t = simulate(planned(spec, algorithm), spec, size).time
            assert t_mt < t, f"{spec} {size} B: multitree {t_mt:.3e} s, {algorithm} {t:.3e} s"


# -- sizes, helpers, CLI -------------------------------------------------------------------------

def test_parse_sizes():
    assert parse_sizes("32K:64M") == [1 << k for k in range(15, 27)]
    assert parse_sizes("1M,3M, 8K") == [MiB, 3 * MiB, 8192]
    assert parse_sizes("1G") == [1 << 30]
    assert parse_sizes("100:1000") == [128, 256, 512]
    for bad in ("", "3X", "64M:1M", "K"):
        with pytest.raises(ValueError):
            parse_sizes(bad)
    assert busbw(100, 1.0, 4) == pytest.approx(150.0)


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json(capsys):
    code, out, err = run_cli(capsys, "--topology", "torus:4x4", "--sizes", "1M,2M", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["meta"]["topologies"][0]["topology"] == "torus:4x4"
    res = doc["results"]
    assert {r["algorithm"] for r in res} == {"multitree", "ring", "ring2d", "dbtree", "rhd",
                                             "timed"}
    # every figure has the network's bound beside it, and none beats it
    assert all(r["bound_s"] > 0 and r["time_over_bound"] >= 1 for r in res)
    assert len(res) == 12  # six algorithms at two sizes
    for r in res:
        assert {"algorithm", "bytes", "time_s", "speedup_vs_ring", "busbw_GBps"} <= set(r)
        assert r["busbw_GBps"] == pytest.approx(r["algbw_GBps"] * 2 * 15 / 16)
        assert r["algbw_GBps"] == pytest.approx(r["bytes"] / r["time_s"] / 1e9)
        if r["algorithm"] == "ring":
            assert r["speedup_vs_ring"] == 1.0
        else:
            ring = next(x for x in res if x["algorithm"] == "ring" and x["bytes"] == r["bytes"])
            assert r["speedup_vs_ring"] == pytest.approx(ring["time_s"] / r["time_s"])
    direct = simulate(planned("torus:4x4", "multitree"), "torus:4x4", MiB).time
    assert next(r for r in res if r["algorithm"] == "multitree")["time_s"] == direct


def test_cli_table_file_skips_and_errors(capsys, tmp_path):
    path = tmp_path / "out.json"
    code, out, err = run_cli(capsys, "--topology", "fattree:2x2", "--algorithms",
                             "multitree,ring2d", "--sizes", "64K", "--json", str(path))
    assert code == 0
    assert "ring2d skipped on fattree:2x2" in err
    assert "multitree" in out and "vs ring" in out  # the table is still printed
    doc = json.loads(path.read_text())
    assert [r["algorithm"] for r in doc["results"]] == ["multitree"]  # ring: reference only
    code, out, err = run_cli(capsys, "--sizes", "12Q")
    assert code == 2 and "bad size" in err
    code, out, err = run_cli(capsys, "--algorithms", "ring,bogus")
    assert code == 2 and "bogus" in err


def test_cli_weak_scaling_and_plot(capsys, tmp_path):
    png = tmp_path / "weak.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        code, out, err = run_cli(capsys, "--topology", "torus:2x2", "--sizes", "1K",
                                 "--plot", str(png))
        assert code == 2 and "needs matplotlib" in err
        return
    code, out, err = run_cli(capsys, "--topology", "torus:2x2,torus:2x4", "--sizes", "1K",
                             "--per-node", "--algorithms", "multitree,ring", "--json",
                             "--plot", str(png))
    assert code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(out)
    assert [r["bytes"] for r in doc["results"]] == [4096, 4096, 8192, 8192]


def test_cli_as_module():
    r = subprocess.run([sys.executable, "-m", "mtcoll.simulate", "--topology", "ring:4",
                        "--sizes", "4K", "--algorithms", "ring", "--json", "-"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    (rec,) = json.loads(r.stdout)["results"]
    assert rec["time_s"] == pytest.approx(6 * (OVERHEAD + LAT + ROUTER_DELAY + 1024 / B))


# -- SimGrid -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def simgrid():
    # looked up when a SimGrid test runs, not at collection: that spawns interpreters
    python = simgrid_python()
    if python is None:
        pytest.skip("SimGrid's Python bindings not found (Debian: apt-get install "
                    "python3-simgrid; or set MTCOLL_SIMGRID_PYTHON to an interpreter that has "
                    "them)")
    return python


@pytest.mark.parametrize("mode", ["step", "dataflow"])
def test_simgrid_agrees_on_torus(simgrid, mode):
    spec = "torus:4x4"
    times = {}
    for algorithm in ("multitree", "ring"):
        s = planned(spec, algorithm)
        ours = simulate(s, spec, MiB, mode).time
        theirs = simgrid_replay(s, spec, MiB, mode)["time"]
        times[algorithm] = ours, theirs
        # same platform, same max-min sharing (every route here is one hop, so SimGrid's
        # RTT-weighted shares are equal shares): the same time up to rounding
        assert theirs == pytest.approx(ours, rel=1e-6), algorithm
    ratio_ours = times["ring"][0] / times["multitree"][0]
    ratio_sg = times["ring"][1] / times["multitree"][1]
    assert ratio_sg == pytest.approx(ratio_ours, rel=0.15)


def test_simgrid_sees_contention(simgrid):
    # two transfers on one link in one step: SimGrid shares it as we do
    s = hand("ring:4", 4, 2, [(REDUCE, 0, 0, 1, 0, 1), (REDUCE, 0, 0, 1, 1, 2)])
    ours = simulate(s, "ring:4", 8 * MiB).time
    theirs = simgrid_replay(s, "ring:4", 8 * MiB)["time"]
    assert theirs == pytest.approx(ours, rel=1e-6)
    assert ours > 2 * 4 * MiB / B


def test_simgrid_missing_is_a_clear_error(monkeypatch):
    from mtcoll.simulate import _simgrid

    monkeypatch.setattr(_simgrid, "find_python", lambda: None)
    with pytest.raises(RuntimeError, match="python3-simgrid"):
        simgrid_replay(planned("ring:4", "ring"), "ring:4", 4096)


# -- the executor's pieces -----------------------------------------------------------------------

@pytest.mark.parametrize("algorithm,nbytes", [("rhd", 16 * MiB), ("ring2d", 16 * MiB),
                                              ("multitree", 4 * MiB), ("dbtree", 1 * MiB)])
def test_pieces_carry_the_executors_bytes(algorithm, nbytes):
    # every transfer becomes its piece count of pieces of (almost) equal bytes, which add up
    # to the transfer's; rhd's first steps at 16 MiB are 16 pieces, next to 8 and 4 (the
    # sub-chunks once outnumbered the elements and most pieces carried nothing)
    from mtcoll.simulate._pieces import piece_counts, pieces

    s = planned("torus:4x4", algorithm)
    k = piece_counts(s, nbytes, 4, 256 * 1024, 16)
    p = pieces(s, nbytes)
    b = s.chunk_bounds(nbytes // 4) * 4
    pb = p.chunk_bounds(nbytes // 4) * 4
    want = b[s.hi] - b[s.lo]
    got = pb[p.hi] - pb[p.lo]
    assert p.ntransfers == k.sum()
    assert got.sum() == want.sum()
    share = np.sort(np.repeat(want / k, k))
    assert np.abs(np.sort(got) - share).max() <= 4 * 4  # a few elements of rounding
    assert got.min() > 0


@pytest.mark.parametrize("planned, algorithm, network", [
    ("torus:4x4", "multitree", "torus:4x4"), ("torus:8x8", "ring", "torus:8x8"),
    ("torus:8x8", "rhd", "torus:8x8"),
    # planned for other networks: their steps share links here
    ("full:16", "rhd", "ring:16"), ("full:16", "dbtree", "torus:4x4")])
@pytest.mark.parametrize("nbytes", [4, 4096, 1 << 20])
def test_step_by_step_replay_equals_the_event_engine(planned, algorithm, network, nbytes):
    s = plan(planned, algorithm)
    a = simulate(s, network, nbytes, engine="numba")
    b = simulate(s, network, nbytes, engine="steps")
    assert b.time == pytest.approx(a.time, rel=1e-12)
    assert b.reduce_time == pytest.approx(a.reduce_time, rel=1e-12)
    assert (b.slowed, b.busiest_link_time) == (a.slowed, a.busiest_link_time)
    for x, y in ((a.step_times, b.step_times), (a.release, b.release), (a.start, b.start),
                 (a.finish, b.finish)):
        np.testing.assert_allclose(y, x, rtol=1e-12, atol=1e-18)
    c = simulate(s, network, nbytes, engine="steps", per_transfer=False)
    assert c.time == b.time and c.release is None and c.finish is None


def test_step_by_step_replay_refuses_what_it_does_not_model():
    s = plan("torus:4x4", "ring")
    for kw in (dict(mode="dataflow"), dict(sharing="connection"), dict(burst=1e3)):
        with pytest.raises(ValueError, match="engine 'steps'"):
            simulate(s, engine="steps", **kw)
