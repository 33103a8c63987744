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
from ._baselines import plan_baseline, _ports_meta
from ._bound import Bound, allreduce_bound
from ._graph import flatten
from ._multitree import grow_trees_py, schedule_from_trees
from ._validate import Report, validate

__all__ = ["plan", "validate", "Report", "ALGORITHMS", "tree_depth", "allreduce_bound",
           "Bound"]

ALGORITHMS = ("multitree", "ring", "ring2d", "dbtree", "rhd", "timed")

# below this many ranks the pure-Python MultiTree is quicker than compiling the kernel
NUMBA_FROM = 65


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
    engine : {"auto", "numba", "python"}
        How MultiTree is grown: the numba kernel or its pure-Python twin (identical output);
        ``auto`` takes Python below :data:`NUMBA_FROM` ranks.

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
    if engine == "auto":
        engine = "python" if topo.nranks < NUMBA_FROM else "numba"
    g = flatten(topo)
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
    meta = {"ports": _ports_meta(topo), "engine": engine}
    if algorithm == "timed":
        from ._timed import plan_timed

        return plan_timed(topo, g, engine, edges, meta)
    return schedule_from_trees(edges, topo.spec, topo.nranks, meta)


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
