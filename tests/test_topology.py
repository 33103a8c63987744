"""Topologies: spec parsing, sizes, links, routes, ports, cycles and MPI virtual topologies."""

import math

import numpy as np
import pytest

from mtcoll.topology import SPEC_FORMS, auto_spec, hosts_spec, parse

FAMILIES = {
    "torus:4x4": (16, 64, 4, 4),  # nranks, directed links, default ports, diameter
    "torus:3x5": (15, 60, 4, 3),
    "mesh:3x4": (12, 34, None, 5),
    "ring:7": (7, 14, 2, 3),
    "full:5": (5, 20, 4, 1),
    "fattree:8x8": (64, 256, 1, 1),
    "bigraph:4x16": (64, 256, 1, 1),
    "hier:2x4": (8, 2 * 4 * 3 + 2 * 8 + 2 * 2, 4, 1),
    "torus:2x3x4": (24, None, None, 4),
}


@pytest.mark.parametrize("spec", sorted(FAMILIES))
def test_families(spec):
    n, nlinks, ports, diam = FAMILIES[spec]
    t = parse(spec)
    assert t.spec == spec and t.nranks == n and t.diameter == diam
    if nlinks is not None:
        assert t.nlinks == nlinks
    if ports is not None:
        assert (t.ports == ports).all()
    # every link joins two distinct vertices, and every link has its reverse
    pairs = set(zip(t.link_src.tolist(), t.link_dst.tolist()))
    assert all(a != b and (b, a) in pairs for a, b in pairs)
    assert (t.bandwidth > 0).all() and (t.latency > 0).all()


def test_mesh_ports_are_degrees():
    t = parse("mesh:3x4")
    assert t.ports[0] == 2 and t.ports[1] == 3 and t.ports[5] == 4
    # the corner's two ports set the bound: it must receive 11 shares
    assert t.lower_bound() == max(5, math.ceil(11 / 2))


def test_routes_follow_links_and_reverse():
    for spec in ("torus:4x4", "mesh:3x4", "fattree:2x3", "bigraph:2x4", "hier:2x3", "ring:5"):
        t = parse(spec)
        for u in range(t.nranks):
            for v in range(t.nranks):
                if u == v:
                    continue
                rs = t.routes(u, v)
                back = t.routes(v, u)
                assert len(rs) == len(back) >= 1
                for r, b in zip(rs, back):
                    path = [int(t.link_src[r[0]])] + [int(t.link_dst[x]) for x in r]
                    assert path[0] == u and path[-1] == v
                    assert all(t.link_dst[x] == t.link_src[y] for x, y in zip(r, r[1:]))
                    assert [(t.link_src[x], t.link_dst[x]) for x in r] == \
                        [(t.link_dst[x], t.link_src[x]) for x in reversed(b)]


def test_fattree_routes_cross_every_spine():
    t = parse("fattree:8x8")
    assert len(t.routes(0, 63)) == 8 and len(t.routes(0, 1)) == 1
    spines = {t.link_dst[r[1]] for r in t.routes(0, 63)}
    assert len(spines) == 8


@pytest.mark.parametrize("n,expect", [(1, "ring:1"), (2, "ring:2"), (7, "ring:7"),
                                      (4, "torus:2x2"), (6, "torus:2x3"), (12, "torus:3x4"),
                                      (16, "torus:4x4"), (64, "torus:8x8"), (18, "torus:3x6")])
def test_auto(n, expect):
    assert auto_spec(n) == expect
    assert parse("auto", nranks=n).spec == expect


@pytest.mark.parametrize("spec", ["torus:4x4", "torus:3x4", "mesh:4x4", "torus:3x3", "torus:5x7",
                                  "torus:2x3x4", "torus:3x3x3", "ring:9", "full:4",
                                  "fattree:2x2", "mesh:2x3", "hier:3x2"])
def test_hamiltonian_cycle(spec):
    t = parse(spec)
    c = t.hamiltonian_cycle()
    assert sorted(c) == list(range(t.nranks))
    assert all(c[(i + 1) % len(c)] in t.tree_neighbors(c[i]) for i in range(len(c)))


def test_no_cycle_on_odd_mesh():
    assert parse("mesh:3x3").hamiltonian_cycle() is None


@pytest.mark.parametrize("bad", ["torus", "torus:", "tor:4x4", "torus:4", "ring:0", "ring:2x2",
                                 "mesh:4x-1", "fattree:8", "bigraph:2x3", "hier:1x2x3", "", "auto"])
def test_bad_specs_name_the_spec_and_the_forms(bad):
    with pytest.raises(ValueError) as e:
        parse(bad)
    msg = str(e.value)
    if bad != "auto":
        assert repr(bad) in msg
        assert all(f in msg for f in SPEC_FORMS)
    else:
        assert "number of ranks" in msg


def test_non_string_spec():
    with pytest.raises(ValueError, match="accepted forms"):
        parse(16)


def test_size_mismatch_names_both_numbers():
    with pytest.raises(ValueError, match=r"'torus:4x4' has 16 ranks but the communicator has 8"):
        parse("torus:4x4", nranks=8)


def test_ports_override_and_validation():
    assert (parse("torus:4x4", ports=1).ports == 1).all()
    with pytest.raises(ValueError, match="at least 1"):
        parse("torus:4x4", ports=0)
    t = parse("torus:4x4")
    assert t.with_ports(2).lower_bound() == 8 and t.lower_bound() == 4


@pytest.mark.mpi
@pytest.mark.mpi_short
def test_mpi_virtual_topology():
    from mpi4py import MPI

    from mtcoll.topology import from_comm, mpi_topology

    comm = MPI.COMM_WORLD
    topo = from_comm(comm)
    assert topo.nranks == comm.size
    vt = mpi_topology(comm, topo)
    try:
        if topo.kind in ("torus", "ring"):
            assert vt.Get_topology() == MPI.CART
            assert list(vt.dims) == list(topo.dims)
            assert all(vt.periods)
        else:
            assert vt.Get_topology() == MPI.DIST_GRAPH
        assert vt.Get_rank() == comm.rank  # never reordered
    finally:
        vt.Free()
    # a spec of the wrong size names both numbers on every rank
    with pytest.raises(ValueError, match=f"has {comm.size + 1} ranks but the communicator has "
                                         f"{comm.size}"):
        from_comm(comm, f"ring:{comm.size + 1}")
    # a graph topology for a non-grid spec
    g = mpi_topology(comm, parse(f"full:{comm.size}"))
    try:
        assert g.Get_topology() == MPI.DIST_GRAPH
        src, dst, _ = g.Get_dist_neighbors()
        assert sorted(src) == sorted(dst) == [r for r in range(comm.size) if r != comm.rank]
    finally:
        g.Free()


def test_ranks_are_row_major():
    t = parse("torus:3x4")
    # rank 5 = (1, 1): neighbours (0,1)=1, (2,1)=9, (1,0)=4, (1,2)=6
    assert sorted(t.tree_neighbors(5)) == [1, 4, 6, 9]
    assert np.array_equal(np.sort(parse("mesh:3x4").tree_neighbors(0)), [1, 4])


@pytest.mark.parametrize("leaders,expect", [
    ([0, 0, 0, 0], None),                          # one host
    ([0, 0, 2, 2], "hier:2x2"),
    ([0, 0, 0, 3, 3, 3, 6, 6, 6], "hier:3x3"),
    ([0, 0, 0, 3], None),                          # unequal hosts
    ([0, 1, 0, 1], None),                          # ranks of a host not consecutive
    ([0, 1, 2], "hier:3x1"),                       # one rank per host
])
def test_hier_detection_from_host_leaders(leaders, expect):
    assert hosts_spec(leaders) == expect
    if expect:
        assert parse(expect).nranks == len(leaders)


# -- link rates and hosts in the spec ------------------------------------------------------------

MBIT = 1e6 / 8


def test_spec_network_rate_and_one_slow_link():
    t = parse("torus:4x4/20mbit/0-1=5mbit")
    assert t.spec == "torus:4x4/20mbit/0-1=5mbit"
    slow = {(int(a), int(b)) for a, b, bw in zip(t.link_src, t.link_dst, t.bandwidth)
            if bw == 5 * MBIT}
    assert slow == {(0, 1), (1, 0)}
    assert np.count_nonzero(t.bandwidth == 20 * MBIT) == t.nlinks - 2


def test_spec_one_direction_only():
    t = parse("ring:4/1mbit/2>3=2mbit")
    assert t.bandwidth[t.link(2, 3)] == 2 * MBIT and t.bandwidth[t.link(3, 2)] == 1 * MBIT
    assert t.spec == "ring:4/1mbit/2>3=2mbit"


def test_spec_uneven_dimensions():
    t = parse("torus:4x4/20mbit/dim1=40mbit")
    rows = t.bandwidth[t.link(0, 1)]  # axis 1: along a row
    cols = t.bandwidth[t.link(0, 4)]
    assert rows == 40 * MBIT and cols == 20 * MBIT


def test_spec_without_options_keeps_its_meaning():
    for spec in FAMILIES:
        t = parse(spec)
        assert t.spec == spec and t.options == ""
    assert (parse("torus:4x4").bandwidth == 16e9).all()
    h = parse("hier:2x4")
    assert sorted(set(h.bandwidth.tolist())) == [12.5e9, 16e9]


def test_spec_canonical_form_parses_to_the_same_network():
    for spec in ("torus:4x4/0-1=5mbit/20MBIT", "hier:4x4/shm=10gbit/20mbit",
                 "mesh:2x3/dim0=1gbit/3-4=100mbit", "torus:2x2/per-host=4/20mbit"):
        t = parse(spec)
        u = parse(t.spec)
        assert u.spec == t.spec and np.array_equal(u.bandwidth, t.bandwidth)


def test_spec_hier_rates_apply_to_nics_and_shm():
    t = parse("hier:2x4/20mbit/shm=8gbit")
    inside = t.link_in_host
    assert (t.bandwidth[inside] == 1e9).all() and (t.bandwidth[~inside] == 20 * MBIT).all()
    assert inside.sum() == 2 * (4 * 3 + 2 * 4)


def test_hosts_on_a_torus():
    t = parse("torus:2x2/per-host=4/20mbit")
    assert t.nranks == 16 and t.nvertices == 20 and t.kind == "hosts"
    assert list(t.host_of[:8]) == [0, 0, 0, 0, 1, 1, 1, 1] and list(t.host_of[16:]) == [0, 1, 2, 3]
    # host 0 and host 3 are diagonal on the 2x2 host torus: two host links apart
    (r,) = t.routes(0, 12)
    path = [int(t.link_src[r[0]])] + [int(t.link_dst[x]) for x in r]
    assert path[0] == 0 and path[-1] == 12 and path[1] == 16 and len(path) == 5
    assert (t.bandwidth[~t.link_in_host] == 20 * MBIT).all()
    assert t.diameter == 2 and (t.ports == 4).all()
    # a tree edge joins ranks of one host or of neighbouring hosts, never diagonal ones
    assert 12 not in t.tree_neighbors(0) and 4 in t.tree_neighbors(0)


def test_hosts_routes_reverse():
    t = parse("torus:3x2/per-host=2")
    for u in range(t.nranks):
        for v in range(t.nranks):
            if u != v:
                fwd = t.routes(u, v)[0]
                back = t.routes(v, u)[0]
                pairs = [(int(t.link_src[x]), int(t.link_dst[x])) for x in fwd]
                rpairs = [(int(t.link_dst[x]), int(t.link_src[x])) for x in back][::-1]
                assert pairs == rpairs


@pytest.mark.parametrize("spec, named", [
    ("torus:4x4/0-9=5mbit", "0-9"),
    ("torus:4x4/0-1=5mbt", "5mbt"),
    ("torus:4x4/0-1=0mbit", "0mbit"),
    ("torus:4x4/speed=1gbit", "speed=1gbit"),
    ("torus:4x4/dim2=1gbit", "dim2"),
    ("torus:4x4/shm=1gbit", "shm"),
    ("torus:4x4/1gbit/2gbit", "2gbit"),
    ("fattree:2x2/per-host=2", "per-host"),
    ("torus:2x2/per-host=0", "per-host=0"),
])
def test_spec_errors_name_the_bad_option(spec, named):
    with pytest.raises(ValueError) as e:
        parse(spec)
    assert named in str(e.value) and spec in str(e.value)
