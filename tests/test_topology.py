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
