"""``python -m mtcoll.plan``: plan an allreduce schedule, validate it and report.

Examples::

    python -m mtcoll.plan --topology torus:8x8
    python -m mtcoll.plan --topology auto --ranks 64   # what a 64-rank job gets
    python -m mtcoll.plan --topology fattree:8x8 --algorithm ring --json
    python -m mtcoll.plan --topology torus:4x4 --ports 1 --json plan.json --save plan.npz
    python -m mtcoll.plan --topology torus:4x4 --draw trees.png            # one panel per step
    python -m mtcoll.plan --topology torus:4x4 --draw tree0.png --tree 0   # one whole tree
    python -m mtcoll.plan --topology torus:4x4 --draw grow.png --tree 0 --steps 0-3  # growing
    python -m mtcoll.plan --topology ring:8 --algorithm rhd --draw rhd.png --phase reduce

--draw needs matplotlib (pip install 'mtcoll[plot]') and draws topologies of at most 64 ranks;
see mtcoll/plan/_draw.py for the layouts.
"""

from __future__ import annotations

import argparse
import time

from .._cli import add_json_option, add_topology_options, entry, report, resolve_topology, say
from . import ALGORITHMS, allreduce_bound, plan, tree_depth, validate
from ._draw import MAX_PANELS


def _parser():
    p = argparse.ArgumentParser(prog="python -m mtcoll.plan", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_topology_options(p, "torus:8x8")
    p.add_argument("--algorithm", default="multitree", choices=ALGORITHMS,
                   help="default: %(default)s")
    p.add_argument("--ports", type=int, default=None,
                   help="per-rank port budget (default: the topology's)")
    p.add_argument("--engine", default="auto", choices=("auto", "numba", "python"),
                   help="MultiTree and timed engine (default: %(default)s)")
    p.add_argument("--bytes", default="16M", metavar="SIZE",
                   help="allreduce size for the lower bound and the predicted time (simulator, "
                        "dataflow mode, connection sharing); K/M/G suffixes "
                        "(default: %(default)s)")
    add_json_option(p)
    p.add_argument("--save", metavar="FILE.npz", help="save the schedule (Schedule.load reads it)")
    d = p.add_argument_group("drawing (needs matplotlib, the 'plot' extra)")
    d.add_argument("--draw", metavar="FILE.png",
                   help="draw the schedule: one panel per step of a phase, arrows colored by tree")
    d.add_argument("--phase", choices=("gather", "reduce"), default="gather",
                   help="the phase drawn (default: %(default)s, where trees grow from their roots)")
    d.add_argument("--steps", metavar="LIST", type=_int_list,
                   help=f"steps to draw, e.g. 0-3,7 (default: the first {MAX_PANELS}); with "
                        "--tree, one panel per tree and step: the tree as it grows")
    d.add_argument("--tree", metavar="ROOTS", type=_int_list,
                   help="draw whole trees instead, one panel per root, e.g. 0 or 0,5: every "
                        "transfer carrying a chunk owned by the root, labelled with its step "
                        "(with --steps: one panel per step)")
    return p


def _int_list(text):
    out = []
    try:
        for part in text.split(","):
            a, sep, b = part.partition("-")
            lo, hi = int(a), int(b) if sep else int(a)
            if hi < lo:
                raise argparse.ArgumentTypeError(f"range {part!r} runs backwards: {text!r}")
            out += list(range(lo, hi + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers like 0-3,7: {text!r}") from None
    return out


#: schedules of more transfers are not simulated by ``run`` (the prediction would take minutes)
PREDICT_MAX_TRANSFERS = 200_000


def run(topology, algorithm="multitree", ports=None, engine="auto", nbytes=16 << 20):
    """Plan and validate; the report as a dict (what ``--json`` prints)."""
    t0 = time.perf_counter()
    sched = plan(topology, algorithm, ports=ports, engine=engine)
    t1 = time.perf_counter()
    topo = _with_ports(topology, ports)
    report = validate(sched, topo)
    t2 = time.perf_counter()
    n = sched.nranks
    bound = allreduce_bound(topo, nbytes)
    predicted = None
    if sched.ntransfers <= PREDICT_MAX_TRANSFERS and report.valid:
        from ..simulate import simulate

        predicted = simulate(sched, topo, nbytes, "dataflow", sharing="connection").time
    return {
        "topology": report.topology,
        "algorithm": algorithm,
        "nodes": n,
        "ports": sched.meta.get("ports"),
        "steps_per_phase": list(sched.steps),
        "step_cost_per_phase": list(sched.step_cost()),
        "lower_bound": report.lower_bound,
        # ring on a contention-free cycle: N-1 steps per phase
        "ring_steps_per_phase": max(n - 1, 0),
        "max_tree_depth": tree_depth(sched),
        "transfers": sched.ntransfers,
        **bound.as_dict(),
        "predicted_s": predicted,
        "predicted_over_bound": predicted / bound.time if predicted and bound.time else None,
        "valid": report.valid,
        "errors": report.errors,
        # planning_seconds + validation_seconds; "plan_seconds" is the same figure under its
        # old, misreadable name, kept for one version (docs/performance.md)
        "total_seconds": t2 - t0,
        "plan_seconds": t2 - t0,
        "planning_seconds": t1 - t0,
        "validation_seconds": t2 - t1,
    }, sched


def _with_ports(spec, ports):
    from ..topology import parse

    return parse(spec, ports=ports)


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        args.topology = resolve_topology(args.topology, args.ranks)
        if "," in args.topology:
            raise ValueError("--topology: plan takes one spec, not a comma list")
        if args.draw:
            from ._draw import check_size, load_matplotlib

            load_matplotlib()  # fail before planning, not after
            check_size(args.topology)
        from ..simulate import parse_sizes

        (nbytes,) = parse_sizes(args.bytes) if "," not in args.bytes else (None,)
        if nbytes is None:
            raise ValueError(f"--bytes takes one size, not {args.bytes!r}")
        out, sched = run(args.topology, args.algorithm, args.ports, args.engine,
                         nbytes - nbytes % 4)
        if args.draw:
            from ._draw import draw

            try:
                d = draw(sched, args.topology, args.draw, phase=args.phase, steps=args.steps,
                         trees=args.tree)
            except OSError as e:
                raise ValueError(f"--draw: cannot write {args.draw}: {e.strerror or e}") from None
            out["draw"] = {"path": d.path, "phase": args.phase, "steps": list(d.steps),
                           "trees": list(d.trees),
                           "panels": [{"title": t, "arrows": a} for t, a in d.panels]}
            say(f"mtcoll.plan: drew {len(d.panels)} panels, {d.arrows} transfers, to {d.path}")
        if args.save:
            try:
                sched.save(args.save)
            except OSError as e:
                raise ValueError(f"--save: cannot write {args.save}: {e.strerror or e}") from None
            say(f"mtcoll.plan: schedule saved to {args.save}")
        report(out, args.json, lambda: _table(out), "mtcoll.plan")
    except (ValueError, RuntimeError) as e:
        say(f"mtcoll.plan: error: {e}")
        return 2
    return 0 if out["valid"] else 1


def _over(ratio):
    # one rank: nothing to move, a bound of 0 s, no ratio
    return "no bound (nothing to move)" if ratio is None else f"{ratio:.2f}x the bound"


def _table(o):
    r, g = o["steps_per_phase"]
    rows = [
        ("topology", o["topology"]),
        ("algorithm", o["algorithm"]),
        ("nodes", o["nodes"]),
        ("ports", o["ports"]),
        ("steps per phase", f"{r} reduce-scatter + {g} all-gather"),
        ("step cost per phase", " + ".join(f"{c:g}" for c in o["step_cost_per_phase"])
         + "  (steps weighted by transfer size, units of 1/N of the buffer)"),
        ("lower bound", f"{o['lower_bound']} per phase  (max(diameter, ceil((N-1)/ports)))"),
        ("ring", f"{o['ring_steps_per_phase']} steps per phase"),
        ("max tree depth", o["max_tree_depth"]),
        ("transfers", o["transfers"]),
        ("lower bound time", f"{o['bound_s']:.6g} s for {o['bound_bytes']} B  "
                             f"({o['bound_kind']} {o['bound_where']})"),
        ("predicted time", "not simulated" if o["predicted_s"] is None else
         f"{o['predicted_s']:.6g} s, {_over(o['predicted_over_bound'])}  "
         "(simulator: dataflow, connection sharing)"),
        ("valid", "yes" if o["valid"] else "NO"),
        ("plan + validate", f"{o['total_seconds']:.3f} s  (plan {o['planning_seconds']:.3f} s, "
                            f"validate {o['validation_seconds']:.3f} s)"),
    ]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    for e in o["errors"]:
        print(f"  error: {e}")


if __name__ == "__main__":
    entry(main)
