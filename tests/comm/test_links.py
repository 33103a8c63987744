"""Measured links (mtcoll/comm/_links.py, ``measure_links``).

Serial tests hold the analysis on made-up rates: which links get an override, the spec that
results, what is not measured and why, the message size, the errors. The MPI tests measure
for real (shared memory here, so the rates themselves are noise) and hold what does not depend
on them: every result equals the MPI library's, every rank ends with the same network, the
cache is read back, the option and its environment variable are checked.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
from mpi4py import MPI

import mtcoll
from mtcoll.comm import _links
from mtcoll.comm._links import measurable, measured_spec, message_bytes, rate_text
from mtcoll.topology import auto_spec, parse


def _uniform(topo, rate, **special):
    """Rates of every link of ``topo`` at ``rate`` bytes/s, ``special`` as ``{"a_b": rate}``."""
    rates = {(int(a), int(b)): rate for a, b in zip(topo.link_src, topo.link_dst)}
    for k, v in special.items():
        a, b = map(int, k[1:].split("_"))
        rates[(a, b)] = v
    return rates


def test_one_slow_link_both_ways_is_one_override_at_its_share_of_the_spec_rate():
    topo = parse("torus:4x4/20mbit")
    rates = _uniform(topo, 1.0e6, l0_1=0.25e6, l1_0=0.26e6)
    spec, over = measured_spec(topo, rates)
    assert spec == "torus:4x4/20mbit/0-1=5100kbit"
    assert set(over) == {(0, 1), (1, 0)}
    net = parse(spec)
    assert net.bandwidth[net.link(0, 1)] == net.bandwidth[net.link(1, 0)] == 5.1e6 / 8
    assert all(net.bandwidth[i] == 20e6 / 8 for i in range(net.nlinks)
               if (int(net.link_src[i]), int(net.link_dst[i])) not in over)


def test_links_within_the_tolerance_keep_the_spec_rate():
    topo = parse("ring:8/10mbit")
    rng = np.random.default_rng(1)
    rates = {l: r * rng.uniform(0.8, 1.2) for l, r in _uniform(topo, 3e6).items()}
    spec, over = measured_spec(topo, rates)
    assert spec == topo.spec and over == {}


def test_one_direction_a_fast_link_and_disagreeing_directions():
    topo = parse("ring:6/20mbit")
    rates = _uniform(topo, 2e6, l2_3=0.5e6, l4_5=4e6, l0_5=0.2e6, l5_0=0.6e6)
    spec, over = measured_spec(topo, rates)
    # 2>3 only; 4>5 faster than the rest (2x); 0<->5 both slow, 3x apart: two overrides
    assert spec == "ring:6/20mbit/0>5=2mbit/2>3=5mbit/4>5=40mbit/5>0=6mbit"
    assert set(over) == {(2, 3), (4, 5), (0, 5), (5, 0)}


def test_the_ratio_is_to_each_links_own_spec_rate():
    # rows twice as fast as columns in the spec, and measured so: nothing differs
    topo = parse("torus:4x4/20mbit/dim1=40mbit")
    rates = {l: 0.9 * float(topo.bandwidth[topo.link(*l)]) for l in _uniform(topo, 1)}
    assert measured_spec(topo, rates) == (topo.spec, {})
    # a spec without rates keeps the default speed and scales only the link that differs
    topo = parse("ring:4")
    spec, over = measured_spec(topo, _uniform(topo, 5e6, l0_1=1.25e6, l1_0=1.25e6))
    assert spec == "ring:4/0-1=32gbit" and parse(spec).bandwidth[parse(spec).link(1, 2)] == 16e9


def test_bad_rates_raise_naming_the_link():
    topo = parse("ring:4")
    with pytest.raises(ValueError, match="no link was measured"):
        measured_spec(topo, {})
    with pytest.raises(ValueError, match="measured link 0>2: ring:4 has no link from vertex 0 "
                                         "to vertex 2"):
        measured_spec(topo, {**_uniform(topo, 1e6), (0, 2): 1e6})
    for bad in (0.0, -1.0, float("nan"), float("inf"), "fast"):
        with pytest.raises(ValueError, match="measured link 1>2: rate .* is not a positive"):
            measured_spec(topo, _uniform(topo, 1e6, l1_2=bad))


def test_what_is_measured_and_what_is_not():
    for spec in ("torus:4x4", "mesh:2x3", "ring:5", "full:4", "torus:2x2"):
        topo = parse(spec)
        links, why = measurable(topo)
        assert why is None and len(links) == topo.nlinks
        assert all(a < topo.nranks and b < topo.nranks for a, b in links)
    for spec in ("fattree:2x3", "bigraph:2x4", "hier:2x2", "torus:2x2/per-host=2"):
        links, why = measurable(parse(spec))
        assert links is None and "switches or host NICs" in why
    assert measurable(parse("ring:1")) == (None, "ring:1 has no links")


def test_message_size():
    assert message_bytes(parse("torus:4x4")) == _links.MIN_BYTES  # no rate named
    assert message_bytes(parse("torus:4x4/20mbit/0-1=5mbit")) == _links.MIN_BYTES
    assert message_bytes(parse("ring:4/100gbit")) == _links.MAX_BYTES
    n = message_bytes(parse("ring:4/2gbit"))  # 2 ms of 250 MB/s
    assert n == 500_000 // 1024 * 1024 and _links.MIN_BYTES < n < _links.MAX_BYTES
    assert rate_text(612_500) == "4.9mbit" and rate_text(4e9) == "32gbit"
    assert rate_text(100) == "800bit" and rate_text(1234.5) == "9.9kbit"


def test_the_option_is_checked_before_any_message():
    with pytest.raises(TypeError, match="measure_links must be True or False, got 'yes'"):
        mtcoll.Comm(MPI.COMM_SELF, measure_links="yes")


# -- under mpiexec --------------------------------------------------------------------------

def _same_everywhere(comm, value):
    got = comm.allgather(value)
    assert all(g == got[0] for g in got), got


@pytest.fixture
def cache_on(comm, monkeypatch):
    """Caching on, in a fresh directory all ranks share."""
    d = tempfile.mkdtemp(prefix="mtcoll-links-") if comm.rank == 0 else None
    d = comm.bcast(d, root=0)
    monkeypatch.setenv("MTCOLL_CALIBRATE", "on")
    monkeypatch.setenv("MTCOLL_CACHE_DIR", d)
    monkeypatch.setenv("MTCOLL_TUNING", "off")
    yield d
    comm.Barrier()


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["timed", "multitree", "auto"])
def test_a_measured_comm_sums_as_the_library_and_agrees_on_its_network(comm, algorithm):
    with mtcoll.Comm(comm, algorithm=algorithm, measure_links=True) as c:
        m = c.measured_links
        assert m is not None and m.base == auto_spec(comm.size)
        assert c.network.spec == m.spec
        _same_everywhere(comm, c.network.spec)
        _same_everywhere(comm, c.network.bandwidth.tolist())
        if comm.size > 1:
            assert m.source == "measured" and len(m.rates) == c.network.nlinks
            assert all(r > 0 for r in m.rates.values())
            assert set(m.overrides) <= set(m.rates)
        for n in (1, 1000, 65536 + 3):
            x = (np.arange(n, dtype=np.float64) * 0.5 + comm.rank) % 11
            y, want = np.empty_like(x), np.empty_like(x)
            c.Allreduce(x, y, MPI.SUM)
            comm.Allreduce(x, want, MPI.SUM)
            assert np.array_equal(y, want), n


@pytest.mark.mpi
def test_the_measured_spec_is_cached_and_read_back(comm, cache_on, monkeypatch):
    if comm.size < 2:
        pytest.skip("one rank has no links to measure")
    with mtcoll.Comm(comm, measure_links=True) as c:
        first = c.measured_links
        assert first.source == "measured"
        if comm.rank == 0:
            assert first.path and os.path.dirname(first.path) == cache_on
            assert os.path.isfile(first.path)
    with mtcoll.Comm(comm, measure_links=True) as c:
        assert c.measured_links.source == "cache"
        assert c.network.spec == first.spec and c.measured_links.rates == first.rates
    with mtcoll.Comm(comm, topology=f"ring:{comm.size}/10mbit", measure_links=True) as c:
        assert c.measured_links.source == "measured"  # another network: another key
    monkeypatch.setenv("MTCOLL_CALIBRATE", "refresh")
    with mtcoll.Comm(comm, measure_links=True) as c:
        assert c.measured_links.source == "measured"
    monkeypatch.setenv("MTCOLL_CALIBRATE", "on")
    from mtcoll.__main__ import info

    got = info(comm).get("measured_links")
    if comm.rank == 0:
        assert got is not None and "cached" in got  # the second measure rewrote the file


@pytest.mark.mpi
def test_the_environment_variable_turns_it_on_and_is_checked(comm, monkeypatch):
    plain = mtcoll.Comm(comm)
    assert plain.measured_links is None
    monkeypatch.setenv("MTCOLL_MEASURE_LINKS", "1")
    with mtcoll.Comm(comm) as c:
        assert c is not plain  # a Comm under other variables is another Comm
        assert c.measured_links is not None
        _same_everywhere(comm, c.network.spec)
    assert "MTCOLL_MEASURE_LINKS" in mtcoll.comm.ENV_VARS
    monkeypatch.setenv("MTCOLL_MEASURE_LINKS", "maybe")
    with pytest.raises(ValueError, match=r"MTCOLL_MEASURE_LINKS='maybe' \(rank \d+"):
        mtcoll.Comm(comm)
    plain.Free()


@pytest.mark.mpi
def test_switched_networks_are_left_as_their_spec_says(comm):
    spec = f"fattree:1x{comm.size}/20mbit"
    with mtcoll.Comm(comm, topology=spec, measure_links=True) as c:
        assert c.network.spec == spec
        assert c.measured_links.source.startswith("skipped: ")
        assert "switches or host NICs" in c.measured_links.source or comm.size == 1
        _same_everywhere(comm, c.measured_links.source)


@pytest.mark.mpi
def test_a_duplicate_keeps_the_measurement_and_a_split_measures_its_own(comm):
    with mtcoll.Comm(comm, measure_links=True) as c:
        d = c.Dup()
        try:
            assert d.measured_links is c.measured_links and d.network.spec == c.network.spec
        finally:
            d.Free()
        half = c.Split(comm.rank % 2, comm.rank)
        try:
            m = half.measured_links
            assert m is not None and m.base == auto_spec(half.Get_size())
            _same_everywhere(half, half.network.spec)
        finally:
            half.Free()
