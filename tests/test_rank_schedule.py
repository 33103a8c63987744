"""A rank's part of a schedule (RankSchedule): the same transfers and program order as the
whole schedule's, a byte round trip, message bounds every rank derives alike, and the
allreduce through the per-rank path under mpiexec equal to the MPI library's."""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

import mtcoll
from mtcoll import execute
from mtcoll.plan import ALGORITHMS, plan
from mtcoll.schedule import RankSchedule, Schedule

from _comms import native

SPECS = ("torus:4x4", "ring:5", "full:7", "mesh:3x3", "hier:2x3", "fattree:2x4",
         "torus:4x4/20mbit/0-1=5mbit", "torus:3x5")
FIELDS = ("phase", "step", "src", "dst", "lo", "hi", "route")


def plans():
    for spec in SPECS:
        for algorithm in ALGORITHMS:
            try:
                yield spec, algorithm, plan(spec, algorithm)
            except ValueError:  # ring2d on a network that is not a 2-D grid
                continue


PLANS = list(plans())


def same_view(a, b):
    return a.rank == b.rank and all(np.array_equal(getattr(a, f), getattr(b, f)) for f in (
        "kind", "peer", "lo", "hi", "phase", "step"))


def test_every_algorithm_is_covered():
    assert {a for _, a, _ in PLANS} == set(ALGORITHMS)
    assert any(s.nranks % 2 for _, _, s in PLANS)


@pytest.mark.parametrize("spec,algorithm,s", PLANS, ids=[f"{a}-{p}" for p, a, _ in PLANS])
def test_part_holds_the_ranks_transfers_and_view(spec, algorithm, s):
    parts = list(RankSchedule.split(s))
    assert [p.rank for p in parts] == list(range(s.nranks))
    for r, part in enumerate(parts):
        mine = (s.src == r) | (s.dst == r)
        for f in FIELDS:
            assert np.array_equal(getattr(part, f), getattr(s, f)[mine]), (r, f)
        assert part == RankSchedule.of(s, r)
        assert part.steps == s.steps and np.array_equal(part.owner, s.owner)
        assert same_view(part.rank_view(r), s.rank_view(r))
    # every transfer is in the part of its sender and of its receiver
    assert sum(p.ntransfers for p in parts) == 2 * s.ntransfers


@pytest.mark.parametrize("spec,algorithm,s", PLANS[::3], ids=[f"{a}-{p}" for p, a, _ in PLANS[::3]])
def test_part_round_trips_through_bytes(spec, algorithm, s):
    for part in RankSchedule.split(s):
        back = RankSchedule.from_bytes(part.to_bytes())
        assert back == part and back.algorithm == part.algorithm
        assert back.meta == part.meta and back.topology == part.topology


def test_part_refuses_other_ranks_and_foreign_transfers():
    s = plan("torus:4x4", "multitree")
    part = RankSchedule.of(s, 3)
    with pytest.raises(ValueError, match="part of rank 3"):
        part.rank_view(4)
    other = RankSchedule.of(s, 4)
    with pytest.raises(ValueError, match="transfers of other ranks"):
        RankSchedule(s.algorithm, s.topology, s.nranks, s.nchunks, 3, s.owner, s.steps,
                     {f: getattr(other, f) for f in FIELDS}, other.pair_front,
                     other.width_counts)
    with pytest.raises(ValueError, match="not a serialised"):
        RankSchedule.from_bytes(b"junk" * 4)


@pytest.mark.parametrize("spec,algorithm,s", PLANS, ids=[f"{a}-{p}" for p, a, _ in PLANS])
def test_message_bounds_are_exact_on_even_chunks_and_never_low(spec, algorithm, s):
    part = RankSchedule.of(s, s.nranks - 1)
    for count in (s.nchunks * 1000, s.nchunks * 1000 + 7, 3):
        for phases in ((0, 1), (0,), (1,)):
            args = (s.chunk_bounds(count), phases, 8, 4096, 16, 1 << 30)
            exact = execute._executor._streams(s, *args)
            whole = execute.Layout(s, 0, count, 8, phases, 4096, 16, 1 << 30)
            cut = execute.Layout(part, part.rank, count, 8, phases, 4096, 16, 1 << 30)
            assert (whole.max_stream, whole.nmessages) == exact
            assert cut.max_stream >= exact[0] and cut.nmessages >= exact[1]
            if count % s.nchunks == 0 and algorithm in ("multitree", "ring", "timed"):
                assert (cut.max_stream, cut.nmessages) == exact, (count, phases)


def test_part_is_a_small_fraction_of_the_whole():
    s = plan("torus:16x16", "multitree")
    biggest = max(len(p.to_bytes()) for p in RankSchedule.split(s))
    whole = sum(getattr(s, f).nbytes for f in FIELDS)
    assert biggest * 50 < whole, (biggest, whole)


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_allreduce_through_the_per_rank_path(comm, algorithm):
    """Each rank's executor runs on its scattered part (not the whole schedule), and the
    results equal the MPI library's."""
    fresh = comm.Dup()  # mtcoll.Comm(comm) is comm's Comm of these options, maybe used before
    try:
        run_through_parts(comm, fresh, algorithm)
    finally:
        fresh.Free()


def run_through_parts(comm, fresh, algorithm):
    with mtcoll.Comm(fresh, topology="auto", algorithm=algorithm) as c:
        x = np.random.default_rng(comm.Get_rank()).integers(-99, 99, 5003).astype(np.int64)
        got = np.empty_like(x)
        try:
            c.Allreduce(x, got)
        except ValueError:
            pytest.skip(f"{algorithm} does not fit {c.network.spec}")
        assert np.array_equal(got, native(comm, x))
        y = x.astype(np.float64)
        c.Allreduce(MPI.IN_PLACE, y, op=MPI.MAX)
        assert np.array_equal(y, native(comm, x.astype(np.float64), MPI.MAX))
        if comm.Get_size() == 1:
            return  # one rank exchanges nothing: no schedule is planned
        held = c._executors[algorithm].schedule
        assert isinstance(held, RankSchedule) and held.rank == comm.Get_rank()
        assert not c._schedules  # the whole schedule was never sent here
        whole = c.schedule(algorithm)  # the public whole schedule, on request (collective)
        assert isinstance(whole, Schedule)
        assert same_view(whole.rank_view(held.rank), held.rank_view(held.rank))
