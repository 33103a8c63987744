"""Planning: a pure function from (topology, algorithm, ports) to a :class:`~mtcoll.Schedule`.

No communicator is involved: every rank that plans the same thing gets the same schedule, and
the planner is tested serially for thousands of virtual ranks.

>>> from mtcoll.plan import plan, validate
>>> s = plan("torus:4x4", "multitree")
>>> s.steps, validate(s, "torus:4x4").valid
((5, 5), True)
"""

from __future__ import annotations

from ..topology import parse
from ._baselines import plan_baseline, ports_meta
from ._bound import Bound, allreduce_bound
from ._graph import flatten
from ._multitree import grow_trees_py, schedule_from_trees
from ._validate import Report, validate

__all__ = ["plan", "validate", "Report", "ALGORITHMS", "tree_depth", "allreduce_bound",
           "Bound", "translate", "TRANSLATE_FROM", "rank_parts"]

ALGORITHMS = ("multitree", "ring", "ring2d", "dbtree", "rhd", "timed")

# below this many ranks the pure-Python MultiTree is quicker than compiling the kernel
NUMBA_FROM = 65
# from this many ranks, engine="auto" plans MultiTree on a plain 2-D torus by translation: on
# every such torus tested (tests/plan/test_translated.py) its steps are the general grower's or
# one fewer, in a fraction of the time and memory (torus:32x32: 0.08 s and 51 MiB against
# 3.7 s and 372 MiB; torus:64x64: 0.19 s against 27 s). Below it the general grower stays:
# there translation is sometimes a step longer (torus:4x10, torus:5x16).
TRANSLATE_FROM = 1024
# timed plans in Python up to this many (candidate edges x ranks): torus:8x8 is 16,384
TIMED_PYTHON_WORK = 20_000


def plan(topology, algorithm="multitree", ports=None, engine="auto"):
    """Plan an allreduce.

    Parameters
    ----------
    topology : str or Topology
        A spec (``"torus:8x8"``; see :mod:`mtcoll.topology`) or a built topology.
    algorithm : str
        One of :data:`ALGORITHMS`.
    ports : int, optional
        Per-rank port budget (transfers sent, and received, per step); default: the
        topology's (a rank's link count on direct networks, 1 on switched ones).
    engine : {"auto", "numba", "python", "translate"}
        How MultiTree and timed are grown: the numba kernels or their pure-Python twins
        (identical output); ``auto`` takes Python below :data:`NUMBA_FROM` ranks (for timed,
        only when candidate edges times ranks is at most :data:`TIMED_PYTHON_WORK`).
        ``translate`` (MultiTree on a plain 2-D torus only, see :func:`translate`): every tree
        a translate of one, a different schedule of about the same steps; ``auto`` takes it
        for MultiTree on such a torus of :data:`TRANSLATE_FROM` ranks or more.

    Returns
    -------
    Schedule

    Raises
    ------
    ValueError
        Unknown algorithm, a bad spec, or an algorithm that does not fit the topology
        (ring2d needs a 2-D torus or mesh).
    """
    topo = parse(topology, ports=ports)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    if algorithm not in ("multitree", "timed"):
        return plan_baseline(topo, algorithm)
    if engine == "auto" and algorithm == "multitree" and topo.nranks >= TRANSLATE_FROM:
        from ._translated import fits

        if fits(topo):
            engine = "translate"
    if engine == "translate":
        if algorithm != "multitree":
            raise ValueError(f"engine 'translate' plans multitree, not {algorithm!r}")
        return translate(topo).schedule()
    g = flatten(topo)
    if engine == "auto":
        # timed's Python twin pays per candidate edge and rank: all-pairs networks of tens of
        # ranks (hier:8x8, fattree:8x8) take it 15-20 s, the kernel under a second
        big = algorithm == "timed" and len(g.nbr) * topo.nranks > TIMED_PYTHON_WORK
        engine = "python" if topo.nranks < NUMBA_FROM and not big else "numba"
    if engine == "python":
        edges = grow_trees_py(g)
    elif engine == "numba":
        if topo.nranks > 32767:
            raise ValueError(f"multitree plans at most 32767 ranks, not {topo.nranks}")
        from ._kernels import grow_trees

        *edges, err = grow_trees(g.nranks, g.ports, g.nbr_ptr, g.nbr, g.edge_route_ptr,
                                 g.route_link_ptr, g.route_links, g.nlinks)
        if err:
            raise ValueError(f"the topology {topo.spec!r} is not connected: "
                             "MultiTree cannot span it")
    else:
        raise ValueError(f"engine must be 'auto', 'numba' or 'python', got {engine!r}")
    meta = {"ports": ports_meta(topo), "engine": engine}
    if algorithm == "timed":
        from ._timed import plan_timed

        return plan_timed(topo, g, engine, edges, meta)
    return schedule_from_trees(edges, topo.spec, topo.nranks, meta)


def rank_parts(topology, algorithm="multitree", ports=None):
    """Every rank's :class:`~mtcoll.schedule.RankSchedule` of ``plan(topology, algorithm,
    ports)``, in rank order (an iterator): the parts a communicator scatters. Where ``plan``
    translates (MultiTree on a plain 2-D torus of :data:`TRANSLATE_FROM` ranks or more), each
    part comes from tree 0 alone, O(its transfers), and the whole schedule (O(N^2) transfers:
    737 MB on torus:64x64) is never built. Raises like :func:`plan`."""
    from ..schedule import RankSchedule

    topo = parse(topology, ports=ports)
    if algorithm == "multitree" and topo.nranks >= TRANSLATE_FROM:
        from ._translated import fits

        if fits(topo):
            tr = translate(topo)
            summary = tr.summary()
            return (tr.rank_part(r, summary) for r in range(topo.nranks))
    return RankSchedule.split(plan(topo, algorithm))


def translate(topology):
    """MultiTree on a 2-D torus (sides of 3 or more, default ports, no link options) in its
    compact form: tree 0, every other tree its translate (:class:`~mtcoll.plan._translated.
    Translated`: ``check()`` validates it, ``rank_part(r)`` is rank r's part, ``schedule()``
    the whole schedule). Raises ValueError on any other network."""
    from ._translated import Translated, fits

    topo = parse(topology)
    if not fits(topo):
        raise ValueError(f"translation plans plain 2-D tori with sides of 3 or more, not "
                         f"{topo.spec!r}")
    return Translated(topo.dims, topo.spec, {"ports": ports_meta(topo), "engine": "translate"})


def tree_depth(schedule):
    """Deepest tree of a schedule: the longest chain of gather-phase transfers of one chunk
    from its owner (MultiTree: the deepest of the N trees)."""
    import numpy as np

    g = schedule.phase == 1
    depth = np.zeros((schedule.nranks, schedule.nchunks), np.int64)
    # gather transfers are in step order, so a sender's depth is final when it sends
    for s, d, lo, hi in zip(schedule.src[g], schedule.dst[g], schedule.lo[g], schedule.hi[g]):
        depth[d, lo:hi] = depth[s, lo:hi] + 1
    return int(depth.max()) if depth.size else 0
