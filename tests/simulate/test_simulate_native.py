"""The simulator's model of the MPI library's own allreduce (mtcoll/simulate/_native.py):
MPICH's pick by size, Rabenseifner's rounds as an allreduce the validator accepts, and its
predicted time against hand arithmetic."""

import numpy as np
import pytest

from mtcoll.plan import validate
from mtcoll.simulate import simulate, sweep
from mtcoll.simulate._native import algorithm_for, native_schedule
from mtcoll.topology import parse

MiB = 1 << 20
NO_EXTRAS = dict(overhead=0.0, router_delay=0.0, latency=0.0)


def test_mpich_pick_by_size():
    assert algorithm_for(16, 2048) == "recursive_doubling"
    assert algorithm_for(16, 2052) == "reduce_scatter_allgather"
    assert algorithm_for(16, 32) == "recursive_doubling"  # fewer elements than pof2
    assert algorithm_for(6, 4 * MiB) == "reduce_scatter_allgather"


@pytest.mark.parametrize("spec", ["full:8", "full:6", "full:5", "full:16"])
def test_rabenseifner_is_an_allreduce(spec):
    # on a fully connected network no two messages share a link: the validator finds nothing
    s = native_schedule(parse(spec), 4 * MiB)
    r = validate(s, spec)
    assert r.counts == {} or set(r.counts) == {"bound"}, r.errors[:3]


@pytest.mark.parametrize("spec", ["torus:4x4", "ring:6"])
def test_rabenseifner_on_multi_hop_routes_only_shares_links(spec):
    r = validate(native_schedule(parse(spec), 4 * MiB), spec)
    assert set(r.counts) == {"link"}  # rounds share links; nothing else is wrong


def test_rounds_start_with_the_nearest_partner():
    s = native_schedule(parse("torus:4x4"), 4 * MiB)
    first = (s.phase == 0) & (s.step == 0)
    assert ((s.src[first] ^ s.dst[first]) == 1).all()
    assert ((s.hi - s.lo)[first] == 8).all()  # half of the 16 chunks
    last = (s.phase == 1) & (s.step == s.steps[1] - 1)
    assert ((s.src[last] ^ s.dst[last]) == 1).all()
    # every rank sends 2(N-1)/N of the buffer in all
    sent = np.bincount(s.src, weights=s.hi - s.lo, minlength=16)
    assert (sent == 2 * 15).all()


def test_time_on_a_torus_by_hand():
    # torus:4x4, B bytes/s per link: rounds with mask 1, 2, 4, 8 move S/2, S/4, S/8, S/16.
    # mask 1 and 4 partners are neighbours; mask 2 and 8 are two hops away on a ring of 4, and
    # the two pairs of a ring (0<->2 over 1, 1<->3 over 2) share link 1->2: half speed.
    B, S = 1e6, 4 * MiB
    topo = parse("torus:4x4", bandwidth=B)
    t = simulate(native_schedule(topo, S), topo, S, "step", **NO_EXTRAS).time
    phase = S / 2 / B + 2 * S / 4 / B + S / 8 / B + 2 * S / 16 / B
    assert t == pytest.approx(2 * phase, rel=1e-9)


def test_sweep_takes_native():
    recs, notes = sweep("torus:4x4", ["native", "multitree"], [4 * MiB], **NO_EXTRAS)
    by = {r["algorithm"]: r for r in recs}
    assert set(by) == {"native", "multitree"}
    assert by["native"]["time_s"] > by["multitree"]["time_s"]
