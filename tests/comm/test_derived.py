"""Every derived communicator is a whole mtcoll communicator, and a Comm cannot leak.

One test per way to derive a communicator (``Dup``/``Clone``/``Dup_with_info``, ``Idup``,
``Split``, the ``Split_type`` variants, ``Create``/``Create_group``, ``Create_from_group``,
``Create_cart`` and ``Cartcomm.Sub``, ``Create_graph``, ``Create_dist_graph(_adjacent)``,
``Create_intercomm``'s ``Merge``): the result is an mtcoll communicator whose calls go through
mtcoll, and its ``Allreduce``, ``Allgather`` and ``Reduce_scatter_block`` agree with the MPI
library's own calls on the same communicator, with every algorithm forced through
``MTCOLL_ALGO`` (a derived communicator keeps it where it fits its network, else ``auto``).
Then the lifetime rules: ``mtcoll.Comm(c)`` of a communicator that has one is that one (no MPI
communicator made, the handle's round trip included), a Comm is released when its
communicator is freed, and ``Free()`` is idempotent.
"""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

import mtcoll
from mtcoll.plan import ALGORITHMS, plan

FORCED = ("native",) + tuple(ALGORITHMS)
K = 300  # elements per rank's block


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("MTCOLL_ALGO", "MTCOLL_TOPOLOGY", "MTCOLL_DEBUG", "MTCOLL_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(params=FORCED)
def parent(request, comm, monkeypatch):
    """An mtcoll.Comm on COMM_WORLD with ``MTCOLL_ALGO`` forcing each algorithm in turn."""
    monkeypatch.setenv("MTCOLL_ALGO", request.param)
    c = mtcoll.Comm(comm)
    assert c.algorithm == request.param
    yield c
    c.Free()


@pytest.fixture
def spied(monkeypatch):
    """The Comms whose calls reached mtcoll's own path (MTCOLL_CHECK=1: every call does)."""
    seen = []
    real = mtcoll.comm._dispatch.start

    def spy(self, kind, *args, **kw):
        seen.append(self)
        return real(self, kind, *args, **kw)

    monkeypatch.setattr(mtcoll.comm._dispatch, "start", spy)
    return seen


def agrees_with_mpi(d, parent, seen):
    """``d`` is a set-up mtcoll communicator; its three calls run through mtcoll and give the
    MPI library's results (native calls on the same communicator as the oracle)."""
    assert isinstance(d, mtcoll.Comm) and isinstance(d, MPI.Intracomm)
    plain = MPI.Intracomm(d)
    n, r = d.Get_size(), d.Get_rank()
    x = np.arange(n * K, dtype=np.float64) + 7.0 * r  # integers: any order sums them exactly
    seen.clear()
    got, want = np.zeros(n * K), np.zeros(n * K)
    d.Allreduce(x, got)
    plain.Allreduce(x, want)
    assert np.array_equal(got, want)
    mine = x[:K].copy()
    got, want = np.zeros(n * K), np.zeros(n * K)
    d.Allgather(mine, got)
    plain.Allgather(mine, want)
    assert np.array_equal(got, want)
    got, want = np.zeros(K), np.zeros(K)
    d.Reduce_scatter_block(x, got)
    plain.Reduce_scatter_block(x, want)
    assert np.array_equal(got, want)
    assert seen == [d, d, d]  # through mtcoll, not around it
    if d.algorithm != parent.algorithm:  # auto only where the forced algorithm does not fit
        assert d.algorithm == "auto" and parent.algorithm not in ("auto", "native")
        with pytest.raises(ValueError):
            plan(d.network, parent.algorithm)
    assert d.comm == d and d.network.nranks == n


def free_comms(limit=4000):
    # how many more communicators MPI can make (collective: the same on every rank)
    made = []
    try:
        while len(made) < limit:
            made.append(MPI.COMM_WORLD.Dup())
    except MPI.Exception:
        pass
    finally:
        for c in made:
            c.Free()
    return len(made)


# -- every derivation ----------------------------------------------------------------------------

@pytest.mark.mpi
def test_dup_clone_and_dup_with_info_are_mtcoll(comm, parent, spied):
    for d in (parent.Dup(), parent.Clone(), parent.Dup_with_info(MPI.INFO_NULL)):
        try:
            assert type(d) is mtcoll.Comm and MPI.Comm.Compare(d, comm) == MPI.CONGRUENT
            assert d.network.spec == parent.network.spec
            agrees_with_mpi(d, parent, spied)
        finally:
            d.Free()
        assert d == MPI.COMM_NULL  # mpi4py's Free: the handle is gone too


@pytest.mark.mpi
def test_idup_communicator_is_set_up_at_its_first_call(comm, parent, spied):
    d, req = parent.Idup()
    assert isinstance(d, mtcoll.Comm)
    req.Wait()
    assert MPI.Comm.Compare(d, comm) == MPI.CONGRUENT  # mpi4py's own methods work at once
    with pytest.raises(AttributeError, match="set up at its first mtcoll call"):
        d.network
    try:
        agrees_with_mpi(d, parent, spied)  # the first call sets it up, collectively
        assert d.network.spec == parent.network.spec
    finally:
        d.Free()
    assert d == MPI.COMM_NULL
    # not waited for by the program: the first mtcoll call completes the request
    d, req = parent.Idup_with_info(MPI.INFO_NULL)
    try:
        agrees_with_mpi(d, parent, spied)
        assert req == MPI.REQUEST_NULL
    finally:
        d.Free()
    # never used: Free frees the communicator alone
    for info in (None, MPI.INFO_NULL):
        d, req = parent.Idup(info)
        req.Wait()
        d.Free()
        assert d == MPI.COMM_NULL
        d.Free()  # idempotent


@pytest.mark.mpi
def test_split_and_split_type_variants_are_mtcoll(comm, parent, spied):
    rank, size = comm.Get_rank(), comm.Get_size()
    shared_info = MPI.Info.Create()
    shared_info["mpi_hw_resource_type"] = "mpi_shared_memory"
    made = [parent.Split(rank % 2, size - rank),
            parent.Split_type(MPI.COMM_TYPE_SHARED, key=size - rank),
            parent.Split_type(MPI.COMM_TYPE_HW_GUIDED, info=shared_info),
            parent.Split_type(MPI.COMM_TYPE_RESOURCE_GUIDED, info=shared_info)]
    # where MPI gives no communicator (UNDEFINED; HW_UNGUIDED on one node), neither does mtcoll
    for kind in (MPI.UNDEFINED, MPI.COMM_TYPE_HW_UNGUIDED):
        d = parent.Split_type(kind)
        if d == MPI.COMM_NULL:
            assert not isinstance(d, mtcoll.Comm)
        else:
            made.append(d)
    assert parent.Split(MPI.UNDEFINED) == MPI.COMM_NULL
    shared_info.Free()
    try:
        for d in made:
            agrees_with_mpi(d, parent, spied)
    finally:
        for d in made:
            d.Free()


@pytest.mark.mpi
def test_create_and_create_group_are_mtcoll(comm, parent, spied):
    group = comm.Get_group()
    odd = group.Excl([0]) if comm.Get_size() > 1 else group.Dup()
    made = [parent.Create(group), parent.Create_group(group, tag=3)]
    sub = parent.Create(odd)  # every rank calls Create; rank 0 is left out
    group.Free()
    try:
        for d in made + ([sub] if sub != MPI.COMM_NULL else []):
            agrees_with_mpi(d, parent, spied)
    finally:
        for d in made + ([sub] if sub != MPI.COMM_NULL else []):
            d.Free()
        odd.Free()


@pytest.mark.mpi
def test_create_from_group_on_the_instance_and_the_class(comm, parent, spied):
    group = comm.Get_group()
    try:
        d = parent.Create_from_group(group, "mtcoll.test.instance")
        e = mtcoll.Comm.Create_from_group(group, stringtag="mtcoll.test.class")
    finally:
        group.Free()
    try:
        agrees_with_mpi(d, parent, spied)
        assert d.algorithm in (parent.algorithm, "auto")
        assert type(e) is mtcoll.Comm and e.algorithm in (parent.algorithm, "auto")
        seen = len(spied)
        x, out = np.ones(5), np.zeros(5)
        e.Allreduce(x, out)
        assert len(spied) == seen + 1 and np.array_equal(out, np.full(5, comm.Get_size()))
    finally:
        d.Free()
        e.Free()


@pytest.mark.mpi
def test_create_cart_and_sub_keep_the_grid(comm, parent, spied):
    size = comm.Get_size()
    dims = MPI.Compute_dims(size, 2)
    for periods, kind in (([True, True], "torus"), ([True, False], "mesh")):
        cart = parent.Create_cart(dims, periods=periods)
        try:
            assert type(cart) is mtcoll.comm.Cartcomm and cart.topology == MPI.CART
            assert cart.network.spec == f"{kind}:{dims[0]}x{dims[1]}"
            agrees_with_mpi(cart, parent, spied)
            for keep, wraps in (([True, False], periods[0]), ([False, True], periods[1])):
                sub = cart.Sub(keep)
                try:
                    assert type(sub) is mtcoll.comm.Cartcomm and sub.dims == [d for d, k in
                                                                        zip(dims, keep) if k]
                    n = sub.dims[0]
                    assert sub.network.spec == (f"ring:{n}" if wraps else f"mesh:1x{n}")
                    agrees_with_mpi(sub, parent, spied)
                finally:
                    sub.Free()
            dup = cart.Dup()
            assert type(dup) is mtcoll.comm.Cartcomm and dup.network.spec == cart.network.spec
            dup.Free()
        finally:
            cart.Free()


@pytest.mark.mpi
def test_create_cart_with_zero_dimensions_is_one_rank(comm, parent, spied):
    zero = parent.Create_cart([])
    if comm.Get_rank() != 0:
        assert zero == MPI.COMM_NULL
        return
    try:
        assert type(zero) is mtcoll.comm.Cartcomm and zero.dim == 0 and zero.Get_size() == 1
        assert zero.network.spec == "full:1"
        agrees_with_mpi(zero, parent, spied)
    finally:
        zero.Free()


@pytest.mark.mpi
def test_create_graph_is_mtcoll_with_the_detected_network(comm, parent, spied):
    size = comm.Get_size()
    index, edges = [], []
    for i in range(size):  # a ring of neighbours (on one rank, itself)
        edges.extend(sorted({(i - 1) % size, (i + 1) % size}))
        index.append(len(edges))
    graph = parent.Create_graph(index, edges)
    try:
        assert type(graph) is mtcoll.comm.Graphcomm and graph.topology == MPI.GRAPH
        assert graph.edges == edges
        agrees_with_mpi(graph, parent, spied)
    finally:
        graph.Free()


@pytest.mark.mpi
def test_create_dist_graph_and_adjacent_are_mtcoll(comm, parent, spied):
    rank, size = comm.Get_rank(), comm.Get_size()
    right, left = (rank + 1) % size, (rank - 1) % size
    made = [parent.Create_dist_graph_adjacent([left], [right]),
            parent.Create_dist_graph([rank], [1], [right]),
            parent.Create_dist_graph_adjacent([], [])]
    try:
        for d in made:
            assert type(d) is mtcoll.comm.Distgraphcomm and d.topology == MPI.DIST_GRAPH
            agrees_with_mpi(d, parent, spied)
        assert made[0].Get_dist_neighbors()[:2] == ([left], [right])
    finally:
        for d in made:
            d.Free()


@pytest.mark.mpi(min_size=2)
def test_intercomm_merge_is_mtcoll(comm, parent, spied, need_size):
    need_size(min_size=2)
    rank = comm.Get_rank()
    low = rank < comm.Get_size() // 2
    local = parent.Split(int(low), rank)
    try:
        remote_leader = comm.Get_size() // 2 if low else 0
        inter = local.Create_intercomm(0, comm, remote_leader, tag=11)
        assert isinstance(inter, MPI.Intercomm) and not isinstance(inter, mtcoll.Comm)
        # its own collectives are mpi4py's, across the groups
        assert inter.allreduce(1) == inter.Get_remote_size()
        merged = inter.Merge(high=not low)
        inter.Free()
        try:
            assert type(merged) is mtcoll.Comm and merged.Get_size() == comm.Get_size()
            agrees_with_mpi(merged, parent, spied)
        finally:
            merged.Free()
    finally:
        local.Free()


# -- one Comm per communicator and options; released with the communicator ------------------------

@pytest.mark.mpi
def test_repeated_construction_is_a_lookup(comm):
    first = mtcoll.Comm(comm)
    try:
        before = free_comms()
        for _ in range(2000):
            again = mtcoll.Comm(comm)
            assert again is first
        assert mtcoll.Comm() is first and mtcoll.Comm(MPI.Intracomm(comm)) is first
        assert free_comms() == before  # not one MPI communicator more
        other = mtcoll.Comm(comm, algorithm="native")
        assert other is not first and mtcoll.Comm(comm, algorithm="native") is other
        other.Free()
    finally:
        first.Free()
    first.Free()  # idempotent
    with pytest.raises(RuntimeError, match="freed"):
        first.Allreduce(np.ones(2), np.zeros(2))
    fresh = mtcoll.Comm(comm)
    assert fresh is not first  # a freed Comm is never handed out again
    fresh.Free()


@pytest.mark.mpi
def test_comm_is_released_when_its_communicator_is_freed(comm):
    base = free_comms()
    for _ in range(30):
        c = comm.Dup()
        m = mtcoll.Comm(c)
        m.Allreduce(np.ones(3), np.zeros(3))
        del m  # dropped: released with c, below
        kept = mtcoll.Comm(c, algorithm="native")
        c.Free()  # collective: every rank releases its Comms of c here
        with pytest.raises(RuntimeError, match="freed"):
            kept.Allreduce(np.ones(3), np.zeros(3))
        kept.Free()  # harmless afterwards
    assert free_comms() == base


@pytest.mark.mpi
def test_handle_round_trip_gives_the_same_comm(comm):
    with mtcoll.Comm(comm) as c:
        size = comm.Get_size()
        cart = c.Create_cart([size], periods=[True])
        try:
            for back in (MPI.Comm.fromint(cart.toint()), MPI.Comm.f2py(cart.py2f()),
                         MPI.Comm.fromhandle(cart.handle), MPI.Cartcomm(cart)):
                # mpi4py makes a plain object of the handle; mtcoll.Comm of it is the original
                assert type(back) is MPI.Cartcomm and back == cart
                assert mtcoll.Comm(back) is cart
            sub = cart.Sub([True])
            assert mtcoll.Comm(MPI.Cartcomm(sub)) is sub
            sub.Free()
        finally:
            cart.Free()


@pytest.mark.mpi
def test_comm_of_a_plain_cartesian_communicator_is_a_cartcomm(comm, spied):
    size = comm.Get_size()
    plain = MPI.Intracomm(comm).Create_cart([size, 1], periods=[False, False])
    try:
        c = mtcoll.Comm(plain)
        assert type(c) is mtcoll.comm.Cartcomm and c.network.spec == f"mesh:{size}x1"
        row = c.Sub([True, False])
        try:
            assert type(row) is mtcoll.comm.Cartcomm
            x, out = np.arange(4.0), np.zeros(4)
            spied.clear()
            row.Allreduce(x, out)
            assert spied == [row] and np.array_equal(out, x * size)
        finally:
            row.Free()
        c.Free()
        assert plain != MPI.COMM_NULL  # the program's communicator is left alone
    finally:
        plain.Free()


@pytest.mark.mpi
def test_freeing_the_communicator_completes_the_calls_in_flight(comm):
    n = comm.Get_size()
    for algorithm in ("multitree", "native"):
        c = comm.Dup()
        m = mtcoll.Comm(c, algorithm=algorithm)
        outs = [np.zeros(20_000) for _ in range(3)]
        reqs = [m.Iallreduce(np.full(20_000, float(i + comm.Get_rank())), out)
                for i, out in enumerate(outs)]
        c.Free()  # the release (inside MPI_Comm_free) waits for them
        assert all(r.Test() for r in reqs)
        for i, out in enumerate(outs):
            assert np.array_equal(out, np.full(20_000, n * i + n * (n - 1) / 2))
        with pytest.raises(RuntimeError, match="freed"):
            m.Iallreduce(np.ones(2), np.zeros(2))
