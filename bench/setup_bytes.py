"""Set-up traffic of a Comm's schedule: the bytes rank 0 sends to distribute it (a benchmark).

    mpiexec -n 16 python bench/setup_bytes.py               # measured through mtcoll.Comm
    python bench/setup_bytes.py --plan-only torus:64x64     # the same figures, no MPI

Per rank, its part of the schedule (:class:`mtcoll.schedule.RankSchedule`, serialised as
rank 0 scatters it); the set-up traffic is the parts of ranks 1..N-1 (rank 0 keeps its own)
plus the status broadcast. Beside it, what broadcasting the whole schedule costs: N-1 copies
of ``Schedule.save`` (compressed npz). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import pickle
import resource
import sys
import time

import numpy as np


def whole_bytes(schedule):
    out = io.BytesIO()
    schedule.save(out)
    return out.getbuffer().nbytes


def figures(parts, nranks, whole):
    status = len(pickle.dumps(("ok",)))
    return {"ranks": nranks, "part_bytes_max": int(max(parts)),
            "part_bytes_mean": float(np.mean(parts)),
            "setup_bytes": int(sum(parts[1:]) + (nranks - 1) * status),
            "whole_broadcast_bytes": int((nranks - 1) * whole),
            "whole_schedule_bytes": int(whole)}


def plan_only(spec, algorithm):
    from mtcoll.plan import plan, rank_parts
    from mtcoll.topology import parse

    t0 = time.perf_counter()
    # the parts as a Comm's rank 0 cuts them (rank_parts: from tree 0 where MultiTree is
    # translated, without the whole schedule)
    parts = [len(p.to_bytes()) for p in rank_parts(parse(spec), algorithm)]
    t1 = time.perf_counter()
    s = plan(spec, algorithm)  # the whole schedule, only for the broadcast it replaces
    t2 = time.perf_counter()
    out = figures(parts, s.nranks, whole_bytes(s))
    out.update(topology=spec, algorithm=algorithm, transfers=s.ntransfers,
               parts_s=t1 - t0, plan_s=t2 - t1,
               peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def under_mpi(algorithm):
    from mpi4py import MPI

    import mtcoll

    world = MPI.COMM_WORLD
    with mtcoll.Comm(world, algorithm=algorithm) as c:
        x = np.ones(world.Get_size() * 4)
        c.Allreduce(MPI.IN_PLACE, x)
        assert (x == world.Get_size()).all()
        part = c._executors[algorithm].schedule
        parts = world.gather(len(part.to_bytes()), root=0)
        spec = c.network.spec
    if world.Get_rank():
        return None
    from mtcoll.plan import plan

    out = figures(parts, world.Get_size(), whole_bytes(plan(spec, algorithm)))
    out.update(topology=spec, algorithm=algorithm)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plan-only", metavar="SPEC", help="no MPI: plan SPEC and cut its parts")
    p.add_argument("--algorithm", default="multitree")
    args = p.parse_args(argv)
    out = plan_only(args.plan_only, args.algorithm) if args.plan_only else \
        under_mpi(args.algorithm)
    if out is not None:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
