"""The testbed: its layout (pure, any user) walked packet by packet against the topology's routes,
and, as root with network namespaces, a real one built, used by a tiny benchmark, counted,
failed and removed (skipped with the reason elsewhere)."""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from mtcoll.testbed import _net, address, layout, missing, parse_rate
from mtcoll.testbed._layout import ADDRESS_BASE
from mtcoll.testbed._plot import positions
from mtcoll.topology import parse

HERE = os.path.dirname(os.path.abspath(__file__))
SPECS = ["ring:5", "torus:4x4", "torus:2x3", "mesh:3x3", "full:4", "fattree:2x3",
         "bigraph:2x4", "torus:2x2x2"]


def walk(lay, u, v):
    """The namespaces the tables of ``lay`` send a packet from rank u to rank v through: the
    kernel's rule (a source's table first, the main table when it has no route), by hand."""
    s, d = lay.vertex_ns[u], lay.vertex_ns[v]
    path, x = [s], s
    for _ in range(len(lay.namespaces) + 1):
        if x == d:
            return path
        nxt = None
        if x != s:
            nxt = dict(lay.source_routes[x].get(s, [])).get(d)
        if nxt is None:
            nxt = dict(lay.main_routes[x]).get(d)
        assert nxt is not None, f"namespace {x} has no route to {d}"
        pair = (min(x, nxt), max(x, nxt))
        assert pair in lay.pairs, f"namespace {x} sends to {nxt} without a veth"
        path.append(nxt)
        x = nxt
    raise AssertionError(f"packet {u}->{v} loops: {path}")


@pytest.mark.parametrize("spec", SPECS)
def test_layout_tables_follow_the_topology_routes(spec):
    topo = parse(spec)
    lay = layout(topo, "mtcb-test-", 1e6)
    assert len(lay.namespaces) == topo.nvertices
    assert len(lay.links) == topo.nlinks
    for u in range(topo.nranks):
        for v in range(topo.nranks):
            if u != v:
                want = [int(topo.link_src[topo.routes(u, v)[0][0]])] + \
                    [int(topo.link_dst[l]) for l in topo.routes(u, v)[0]]
                assert walk(lay, u, v) == want == lay.hops[(u, v)]


def test_hier_hosts_share_a_namespace():
    topo = parse("hier:3x4")
    lay = layout(topo, "p", 1e6, {(12, 15): 2e6})  # host 0's NIC -> switch faster
    assert len(lay.namespaces) == 4  # 3 hosts and the switch
    assert lay.rank_namespaces() == ["p0"] * 4 + ["p1"] * 4 + ["p2"] * 4
    assert lay.pairs == [(0, 3), (1, 3), (2, 3)]
    assert lay.ns_vertex == [12, 13, 14, 15]
    assert sorted((a, b) for a, b, _ in lay.links) == [(0, 3), (1, 3), (2, 3), (3, 0), (3, 1),
                                                       (3, 2)]
    assert dict(((a, b), r) for a, b, r in lay.links)[(0, 3)] == 2e6
    assert lay.topology.bandwidth[topo.link(12, 15)] == 2e6
    assert lay.topology.bandwidth[topo.link(13, 15)] == 1e6
    assert lay.topology.bandwidth[topo.link(0, 1)] == topo.bandwidth[topo.link(0, 1)]
    for u in range(12):
        for v in range(12):
            if u // 4 != v // 4:
                assert walk(lay, u, v) == [u // 4, 3, v // 4] == lay.hops[(u, v)]
    assert (0, 1) not in lay.hops  # one host: shared memory
    with pytest.raises(ValueError, match="share a host"):
        layout(topo, "p", 1e6, {(0, 1): 1e6})


def test_torus_routes_need_source_tables():
    # a torus route from a higher to a lower rank is the reverse of the one back (the other
    # dimension first), so some vertex sends packets for one destination on to different next
    # hops depending on their source: a destination-only table cannot hold the routes
    lay = layout(parse("torus:4x4"), "p", 1e6)
    nxt = {}
    for path in lay.hops.values():
        for i in range(len(path) - 1):
            nxt.setdefault((path[i], path[-1]), set()).add(path[i + 1])
    assert any(len(hops) > 1 for hops in nxt.values())
    assert any(lay.source_routes[x] for x in range(16))


def test_rates_and_overrides():
    assert parse_rate("50mbit") == 50e6 / 8
    assert parse_rate("1gbit") == 1e9 / 8
    assert parse_rate("10mbps") == 10e6
    assert parse_rate("800kbit") == 1e5
    for bad in ("fast", "0mbit", "-3mbit", "10 furlongs"):
        with pytest.raises(ValueError, match="rate"):
            parse_rate(bad)
    topo = parse("ring:4")
    lay = layout(topo, "p", 1e6, {(0, 1): 5e5})
    rates = {(a, b): r for a, b, r in lay.links}
    assert rates[(0, 1)] == 5e5 and rates[(1, 0)] == 1e6
    assert lay.topology.bandwidth[topo.link(0, 1)] == 5e5
    assert lay.topology.bandwidth[topo.link(1, 2)] == 1e6
    assert topo.bandwidth[topo.link(0, 1)] != 5e5  # the caller's topology is left alone
    with pytest.raises(ValueError, match="no link from vertex 0 to vertex 2"):
        layout(topo, "p", 1e6, {(0, 2): 1e6})


def test_the_spec_rates_are_the_shaped_rates():
    # what the planner plans for is what the testbed shapes: the spec's rates win over --rate,
    # --link-rate over both
    topo = parse("torus:4x4/20mbit/0-1=5mbit")
    lay = layout(topo, "p", 1e6)
    rates = {(a, b): r for a, b, r in lay.links}
    assert rates[(0, 1)] == rates[(1, 0)] == 5e6 / 8 and rates[(0, 4)] == 20e6 / 8
    assert np.array_equal(lay.topology.bandwidth, topo.bandwidth)
    half = layout(parse("torus:4x4/0-1=5mbit"), "p", 1e6)  # the rest at --rate
    assert {r for a, b, r in half.links if (a, b) != (0, 1) and (a, b) != (1, 0)} == {1e6}
    over = layout(topo, "p", 1e6, {(0, 1): 1e5})
    assert {(a, b): r for a, b, r in over.links}[(0, 1)] == 1e5
    # ... and the shaped network's spec (MTCOLL_TOPOLOGY of the job) says so too
    assert lay.topology.spec == topo.spec
    assert half.topology.spec == "torus:4x4/0-1=5mbit/8mbit"
    assert over.topology.spec == "torus:4x4/20mbit/0-1=5mbit/0>1=800kbit"
    for shaped in (lay, half, over):
        assert np.array_equal(parse(shaped.topology.spec).bandwidth, shaped.topology.bandwidth)
    cli = layout(parse("torus:4x4"), "p", 20e6 / 8, {(0, 1): 5e6 / 8, (1, 0): 5e6 / 8})
    assert cli.topology.spec == "torus:4x4/20mbit/0>1=5mbit/1>0=5mbit"


def test_hosts_on_a_torus_share_a_namespace_each():
    topo = parse("torus:2x2/per-host=4/20mbit")
    lay = layout(topo, "p", 1e6)
    assert len(lay.namespaces) == 4 and lay.ranks_per_namespace == 4
    assert lay.vertex_ns[:8] == [0, 0, 0, 0, 1, 1, 1, 1] and lay.ns_vertex == [16, 17, 18, 19]
    # host 0 reaches host 3 (diagonal) through host 2, the first axis first, as the topology
    # routes it
    assert lay.hops[(0, 12)] == [0, 2, 3]
    assert {r for _, _, r in lay.links} == {20e6 / 8}


def test_addresses_stay_in_the_benchmarking_range():
    assert address(0) == str(ADDRESS_BASE) == "198.18.0.1"
    assert address(300) == "198.18.1.45"
    with pytest.raises(ValueError, match="198.18.0.0/15"):
        address(1 << 17)


@pytest.mark.parametrize("spec", ["torus:4x4", "ring:5", "fattree:2x3", "bigraph:2x4"])
def test_plot_positions(spec):
    # every vertex has its own spot
    topo = parse(spec)
    pos = positions(topo)
    assert len(pos) == topo.nvertices
    assert len(set(pos)) == topo.nvertices  # no two vertices drawn on one spot


# -- a real testbed ------------------------------------------------------------------------------

REASON = missing() if sys.platform.startswith("linux") else "network namespaces need Linux"
real = pytest.mark.skipif(REASON is not None, reason=f"no testbed here: {REASON}")


def run_testbed(args, timeout=150, env=None):
    cmd = [sys.executable, "-m", "mtcoll.testbed"] + args
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


def leftovers(tb_id):
    return [n for n in _net.netns_list() if n.startswith(f"{_net.PREFIX}{tb_id}-")]


@real
def test_bench_on_a_torus_2x2(tmp_path):
    bench_json, tb_json = tmp_path / "bench.json", tmp_path / "tb.json"
    r = run_testbed(["--topology", "torus:2x2", "--rate", "200mbit", "--json", str(tb_json), "--",
                 "python", "-m", "mtcoll.bench", "--sizes", "256K", "--algorithms",
                 "multitree,native", "--iters", "2", "--json", str(bench_json)])
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(tb_json.read_text())
    bench = json.loads(bench_json.read_text())
    # the job plans for the network the testbed shaped: the spec carries its rate
    assert bench["meta"]["nranks"] == 4 and bench["meta"]["topology"] == "torus:2x2/200mbit"
    assert [x["wrong"] for x in bench["results"]] == [0, 0]
    assert out["meta"]["route_hops_checked"] == 16  # 8 neighbour pairs 1 hop, 4 diagonal 2
    assert not leftovers(out["meta"]["id"])
    links = {(x["from"], x["to"]): x["bytes"] for x in out["traffic"]["links"]}
    assert sorted(links) == [(0, 1), (0, 2), (1, 0), (1, 3), (2, 0), (2, 3), (3, 1), (3, 2)]
    # each of the 3 calls per algorithm moves at least 2(N-1)/N of 256 KiB out of every rank,
    # over two links
    low = 2 * 3 * 2 * 3 / 4 * 256 * 1024 / 2
    assert all(b > low / 4 for b in links.values()), links
    assert out["traffic"]["total_link_bytes"] > low * 4
    assert out["run"]["returncode"] == 0 and out["run"]["cpu"]["job_user_s"] > 0
    # the drops, the kernel's TCP counters and the load are recorded; TCP sent at least the
    # bytes the links carried, in segments of at most 1514 bytes
    assert all(x["dropped_packets"] >= 0 for x in out["traffic"]["links"])
    assert out["traffic"]["total_dropped_packets"] >= 0
    tcp = out["traffic"]["tcp_total"]
    assert tcp["OutSegs"] > out["traffic"]["total_link_bytes"] / 1514 / 2
    assert 0 <= tcp["RetransSegs"] <= tcp["OutSegs"] and tcp["TCPTimeouts"] >= 0
    assert set(out["traffic"]["tcp"]) == {"0", "1", "2", "3"}
    assert len(out["run"]["cpu"]["loadavg_start"]) == 3
    assert out["meta"]["queue"] == "200ms"


@real
@pytest.mark.skipif(shutil.which("nft") is None,
                    reason="the forwarded-byte counters need nftables (Debian: nftables)")
def test_multitree_alone_is_not_forwarded_and_native_is(tmp_path):
    script = os.path.join(HERE, "testbed_script.py")
    seen = {}
    for algo in ("multitree", "native"):
        dest = tmp_path / f"{algo}.json"
        r = run_testbed(["--topology", "ring:4", "--rate", "200mbit", "--json", str(dest), "--",
                     "python", script, "loop", algo, "1M", "3"])
        assert r.returncode == 0, r.stderr[-3000:]
        seen[algo] = json.loads(dest.read_text())["traffic"]
    # ring:4: MultiTree only sends to neighbours; the MPI library's recursive doubling
    # exchanges 0<->2 and 1<->3 through a middle vertex. Mtcoll's set-up (a few small
    # collectives through the MPI library) may forward a few kilobytes.
    assert seen["multitree"]["ranks_forwarded_bytes"] < 64 * 1024
    assert seen["native"]["ranks_forwarded_bytes"] > 1 << 20


@real
def test_failed_link_raises_stallerror_and_cleans_up(tmp_path):
    script = os.path.join(HERE, "testbed_script.py")
    dest = tmp_path / "tb.json"
    t0 = time.monotonic()
    r = run_testbed(["--topology", "ring:4", "--rate", "200mbit", "--fail-link", "1-2@4",
                 "--timeout", "60", "--json", str(dest), "--",
                 "python", "-m", "mpi4py", script, "loop", "multitree", "1M", "100000"],
                env={"MTCOLL_TIMEOUT": "2", "MTCOLL_CHECK": "0"})  # the data path's watchdog
    elapsed = time.monotonic() - t0
    assert r.returncode not in (0, 124), r.stderr[-3000:]
    assert "StallError" in r.stderr and "MTCOLL_TIMEOUT" in r.stderr, r.stderr[-3000:]
    out = json.loads(dest.read_text())
    assert [e["what"] for e in out["run"]["events"]] == ["link 1-2 down"]
    down_at = out["run"]["events"][0]["at_unix"]
    # the stall is noticed within MTCOLL_TIMEOUT + 2 s of the failure
    stall = [line for line in r.stderr.splitlines() if line.startswith("stall at")]
    assert stall, r.stderr[-3000:]
    assert min(float(line.split()[2]) for line in stall) - down_at < 2 + 2, stall
    assert elapsed < 50
    assert not leftovers(out["meta"]["id"])


@real
def test_measured_links_find_the_one_slow_link(tmp_path):
    # ring:4 at 40 Mbit/s with 0-1 at 10 Mbit/s; mtcoll is told only "ring:4" (the testbed would
    # tell it the rates): the measurement must name 0-1, both ways, and no other link
    script = os.path.join(HERE, "testbed_script.py")
    dest = tmp_path / "tb.json"
    t0 = time.monotonic()
    r = run_testbed(["--topology", "ring:4", "--rate", "40mbit", "--link-rate", "0-1=10mbit",
                     "--timeout", "60", "--json", str(dest), "--",
                     "python", script, "links", "multitree", "64K", "2"],
                    # measured, not read from a cache
                    env={"MTCOLL_CALIBRATE": "off", "MTCOLL_TOPOLOGY": "ring:4"})
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads([line for line in r.stdout.splitlines() if line.startswith("{")][-1])
    assert got["base"] == "ring:4" and got["source"] == "measured", got
    assert sorted(got["overrides"]) == ["0>1", "1>0"], got
    net = parse(got["spec"])
    slow = net.bandwidth[net.link(0, 1)]
    assert net.bandwidth[net.link(1, 0)] == slow
    others = [net.bandwidth[i] for i in range(net.nlinks)
              if {int(net.link_src[i]), int(net.link_dst[i])} != {0, 1}]
    assert all(b == others[0] for b in others) and 0.15 < slow / others[0] < 0.45, got
    assert got["seconds"] < 10 and time.monotonic() - t0 < 60
    assert not leftovers(json.loads(dest.read_text())["meta"]["id"])


@real
def test_killed_run_is_cleaned_by_its_guard():
    p = subprocess.Popen([sys.executable, "-m", "mtcoll.testbed", "--topology", "ring:3",
                          "--", "sleep", "60"], stderr=subprocess.PIPE, text=True)
    tb_id = None
    for line in p.stderr:
        if "; id " in line:
            tb_id = line.rsplit("; id ", 1)[1].split()[0]
        if "launching" in line:
            break
    assert tb_id and leftovers(tb_id)
    p.kill()  # SIGKILL: no cleanup in the run itself
    p.wait()
    for _ in range(100):
        if not leftovers(tb_id):
            break
        time.sleep(0.1)
    assert not leftovers(tb_id)
    p.stderr.close()


def test_error_without_root_or_command():
    if os.geteuid() == 0:
        r = run_testbed(["--topology", "ring:3"])
        assert r.returncode == 2 and "command to run after '--'" in r.stderr
        r = run_testbed(["--topology", "ring:4", "--fail-link", "0-2@1", "--", "true"])
        assert r.returncode == 2 and "no link between vertices 0 and 2" in r.stderr
        for args, text in ((["--rate", "0"], "--rate: rate '0' must be positive"),
                           (["--link-rate", "0-1=fast"], "--link-rate '0-1=fast': bad rate"),
                           (["--link-rate", "0-2=1mbit"], "ring:4 has no link from vertex 0"),
                           (["--congestion-control", "nope"], "'nope' is not allowed"),
                           (["--queue", "2x"], "bad queue '2x'")):
            r = run_testbed(["--topology", "ring:4"] + args + ["--", "true"])
            assert r.returncode == 2 and text in r.stderr, (args, r.stderr)
        r = run_testbed(["--topology", "blob:4", "--", "true"])
        assert r.returncode == 2 and "--topology: bad topology spec 'blob:4'" in r.stderr
    else:
        r = run_testbed(["--topology", "ring:3", "--", "true"])
        assert r.returncode == 2 and "needs root" in r.stderr
