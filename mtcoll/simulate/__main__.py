"""``python -m mtcoll.simulate``: predicted allreduce times of the planned algorithms.

Examples::

    python -m mtcoll.simulate --topology torus:8x8 --algorithms ring,ring2d,dbtree,multitree \\
        --sizes 32K:64M
    python -m mtcoll.simulate --topology fattree:8x8 --sizes 8M:64M --json results.json
    python -m mtcoll.simulate --topology torus:4x4,torus:8x8,torus:16x16 --sizes 384K \\
        --per-node --plot weak.png
    python -m mtcoll.simulate --topology torus:4x4 --sizes 1M --simgrid
    python -m mtcoll.simulate --topology auto --ranks 64 --sizes 1M:64M

Sizes: ``A:B`` is every power of two from A to B, or a comma list; K, M, G mean KiB, MiB, GiB.
Ring is always simulated, as the reference of the speedup column. Algorithms that do not fit a
topology (ring2d off 2-D grids) are skipped with a note on stderr.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

from ..plan import ALGORITHMS
from .._cli import (add_json_option, add_topology_options, entry, pyplot, report,
                    resolve_topology, say)
from . import (ITEMSIZE, MODES, OVERHEAD, ROUTER_DELAY, SHARINGS, parse_sizes, simgrid_replay,
               sweep)
from ..topology import DEFAULT_BANDWIDTH, DEFAULT_LATENCY

#: the MultiTree paper's headline communication speedups (Huang et al., ISCA 2021)
PAPER = {"vs_ring": 2.3, "vs_best_prior": 1.56}


def _parser():
    p = argparse.ArgumentParser(prog="python -m mtcoll.simulate",
                                description=__doc__.splitlines()[0],
                                epilog="\n".join(__doc__.splitlines()[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_topology_options(p, "torus:8x8", many=True)
    p.add_argument("--algorithms", default=",".join(ALGORITHMS),
                   help=f"comma list from {', '.join(ALGORITHMS)} (default: all)")
    p.add_argument("--sizes", default="32K:64M",
                   help="A:B (powers of two) or a comma list, K/M/G suffixes "
                        "(default: %(default)s)")
    p.add_argument("--per-node", action="store_true",
                   help="sizes are per rank: the allreduce is size * nodes bytes (weak scaling)")
    p.add_argument("--ports", type=int, default=None,
                   help="per-rank port budget for planning (default: the topology's)")
    p.add_argument("--mode", default="step", choices=MODES,
                   help="step-synchronous or dataflow replay (default: %(default)s)")
    p.add_argument("--sharing", default="fair", choices=SHARINGS,
                   help="link sharing: max-min fair, earlier steps first, or each rank pair's "
                        "transfers in release order on its connection (default: %(default)s)")
    p.add_argument("--bandwidth", type=float, default=DEFAULT_BANDWIDTH, metavar="B/S",
                   help="bytes/s per link direction (default: %(default)g)")
    p.add_argument("--latency", type=float, default=DEFAULT_LATENCY, metavar="S",
                   help="seconds per link (default: %(default)g)")
    p.add_argument("--router-delay", type=float, default=ROUTER_DELAY, metavar="S",
                   help="seconds per hop on top of the link latency (default: %(default)g)")
    p.add_argument("--overhead", type=float, default=OVERHEAD, metavar="S",
                   help="seconds per message (default: %(default)g)")
    p.add_argument("--itemsize", type=int, default=ITEMSIZE,
                   help="bytes per element (default: %(default)s, float32)")
    p.add_argument("--simgrid", action="store_true",
                   help="also replay every case in SimGrid and report its time (slow)")
    add_json_option(p)
    p.add_argument("--plot", metavar="FILE.png", help="plot bandwidth and speedup (matplotlib)")
    return p


def run(args, log=None):
    """The JSON object the CLI prints: ``meta`` and ``results``."""
    from ..topology import parse

    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    known = ALGORITHMS + ("native",)  # native: the model of the MPI library's own allreduce
    bad = [a for a in algorithms if a not in known]
    if bad:
        raise ValueError(f"unknown algorithm(s) {', '.join(bad)}; choose from "
                         f"{', '.join(known)}")
    sizes = parse_sizes(args.sizes)
    specs = [s.strip() for s in args.topology.split(",") if s.strip()]
    params = dict(itemsize=args.itemsize, router_delay=args.router_delay,
                  overhead=args.overhead, sharing=args.sharing)
    results, notes, topos = [], [], []
    c0 = time.process_time()
    for spec in specs:
        topo = parse(spec, ports=args.ports, bandwidth=args.bandwidth, latency=args.latency)
        recs, nts = sweep(topo, algorithms, sizes, args.mode, per_node=args.per_node,
                          log=log, **params)
        if args.simgrid:
            _add_simgrid(recs, topo, args, log)
        results += recs
        notes += nts
        topos.append({"topology": topo.spec, "nodes": topo.nranks,
                      "ports": _ports(topo), "lower_bound": topo.lower_bound()})
    meta = {
        "tool": "mtcoll.simulate",
        "topologies": topos,
        "algorithms": algorithms,
        "sizes": sizes, "per_node": args.per_node,
        "mode": args.mode, "sharing": args.sharing,
        "bandwidth_Bps": args.bandwidth, "latency_s": args.latency,
        "router_delay_s": args.router_delay, "overhead_s": args.overhead,
        "itemsize": args.itemsize,
        "busbw": "algbw * 2(N-1)/N",
        "paper_speedup": PAPER,
        "notes": notes,
        "cpu_s": time.process_time() - c0,
        "python": platform.python_version(),
    }
    return {"meta": meta, "results": results}


def _ports(topo):
    p = topo.ports
    return int(p[0]) if (p == p[0]).all() else p.tolist()


def _ports_text(ports):
    return str(ports) if isinstance(ports, int) else f"{min(ports)}-{max(ports)}"


def _add_simgrid(recs, topo, args, log):
    from ..plan import plan

    ring = {}
    scheds = {}
    for r in recs:
        a = r["algorithm"]
        if a not in scheds:
            scheds[a] = plan(topo, a)
        out = simgrid_replay(scheds[a], topo, r["bytes"], args.mode, itemsize=args.itemsize,
                             router_delay=args.router_delay, overhead=args.overhead)
        r["simgrid_time_s"] = out["time"]
        r["simgrid_cpu_s"] = out["cpu_s"]
        if log:
            log(f"simgrid {topo.spec} {a} {r['bytes']} B: {out['time'] * 1e6:.2f} us")
    for r in recs:
        if r["algorithm"] == "ring":
            ring[r["bytes"]] = r["simgrid_time_s"]
    for r in recs:
        t = ring.get(r["bytes"])
        r["simgrid_speedup_vs_ring"] = t / r["simgrid_time_s"] if t else None


def _fmt_size(b):
    for unit, k in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if b >= 1 << k and b % (1 << k) == 0:
            return f"{b >> k} {unit}"
    return f"{b} B"


def table(out, file=None):
    """Print the results as one table per topology."""
    file = file or sys.stdout
    m = out["meta"]
    sg = any("simgrid_time_s" in r for r in out["results"])
    for t in m["topologies"]:
        rows = [r for r in out["results"] if r["topology"] == t["topology"]]
        if not rows:
            continue
        print(f"# {t['topology']}: {t['nodes']} nodes, ports {_ports_text(t['ports'])}, "
              f"mode {m['mode']}"
              f" ({m['sharing']} sharing); {m['bandwidth_Bps'] / 1e9:g} GB/s and "
              f"{m['latency_s'] * 1e9:g} ns per link, {m['router_delay_s'] * 1e9:g} ns per hop, "
              f"{m['overhead_s'] * 1e9:g} ns per message", file=file)
        steps = {}
        for r in rows:
            steps.setdefault(r["algorithm"], r)
        print("# steps per phase (step cost): " + ", ".join(
            f"{a} {r['steps_per_phase'][0]}+{r['steps_per_phase'][1]}"
            + ("" if r["step_cost_per_phase"] == r["steps_per_phase"] else
               f" ({r['step_cost_per_phase'][0]:g}+{r['step_cost_per_phase'][1]:g})")
            for a, r in steps.items()), file=file)
        if "multitree" in steps:
            print(f"# multitree ceiling over ring, (N-1)/T: "
                  f"{steps['multitree']['ceiling_vs_ring']:.2f}", file=file)
        head = (f"{'size':>9} {'algorithm':<10} {'time(us)':>11} {'algbw(GB/s)':>12} "
                f"{'busbw(GB/s)':>12} {'vs ring':>8} {'bound(us)':>11} {'/bound':>7}")
        if sg:
            head += f" {'simgrid(us)':>12} {'sg vs ring':>10}"
        print(head, file=file)
        for r in rows:
            size = _fmt_size(r["bytes"])
            if r["bytes_per_node"] is not None:
                size = _fmt_size(r["bytes_per_node"]) + "/n"
            line = (f"{size:>9} {r['algorithm']:<10} {r['time_s'] * 1e6:>11.2f} "
                    f"{r['algbw_GBps']:>12.3f} {r['busbw_GBps']:>12.3f} "
                    f"{r['speedup_vs_ring']:>8.2f} {r['bound_s'] * 1e6:>11.2f} "
                    f"{r['time_over_bound']:>7.2f}")
            if sg:
                line += (f" {r['simgrid_time_s'] * 1e6:>12.2f} "
                         f"{r['simgrid_speedup_vs_ring']:>10.2f}")
            print(line, file=file)
        for b in dict.fromkeys((r["bytes"], r["bound_kind"], r["bound_where"]) for r in rows):
            print(f"# bound at {_fmt_size(b[0])}: {b[1]} {b[2]}", file=file)
        print(file=file)


def plot(out, path):
    plt = pyplot("--plot")
    m = out["meta"]
    res = out["results"]
    algos = list(dict.fromkeys(r["algorithm"] for r in res))
    style = {"multitree": ("C3", "o"), "ring": ("C0", "s"), "ring2d": ("C2", "^"),
             "dbtree": ("C1", "v"), "rhd": ("C4", "D"), "timed": ("C5", "P")}
    weak = len(m["topologies"]) > 1
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12.5, 4.2))
    for a in algos:
        rows = [r for r in res if r["algorithm"] == a]
        x = [r["nodes"] if weak else r["bytes"] for r in rows]
        color, marker = style.get(a, (None, "x"))
        # multitree on top and smaller, so that a baseline it coincides with stays visible
        kw = dict(marker=marker, color=color, label=a, zorder=3 if a == "multitree" else 2,
                  ms=5 if a == "multitree" else 8)
        ax1.plot(x, [r["busbw_GBps"] for r in rows], **kw)
        ax2.plot(x, [r["speedup_vs_ring"] for r in rows], **kw)
    mt = [r for r in res if r["algorithm"] == "multitree"]
    if mt:
        # drawn under the curves, wide and pale, so that a curve on the ceiling stays visible
        if weak:
            ax2.plot([r["nodes"] for r in mt], [r["ceiling_vs_ring"] for r in mt], lw=6,
                     color="0.6", alpha=0.4, zorder=0, label="multitree (N-1)/T ceiling")
        else:
            ax2.axhline(mt[0]["ceiling_vs_ring"], lw=6, color="0.6", alpha=0.4, zorder=0,
                        label=f"multitree (N-1)/T = {mt[0]['ceiling_vs_ring']:.2f}")
    ax2.axhline(1.0, color="0.8", lw=0.8)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        if weak:
            ax.set_xlabel("nodes (torus)")
            ax.set_xticks([t["nodes"] for t in m["topologies"]])
            ax.set_xticklabels([f"{t['nodes']}\n{t['topology'].split(':')[1]}"
                                for t in m["topologies"]])
        else:
            ax.set_xlabel("allreduce size")
            xs = sorted({r["bytes"] for r in res})
            ax.set_xticks(xs)
            ax.set_xticklabels([_fmt_size(b).replace(" ", "") for b in xs], rotation=60,
                               fontsize=8)
        ax.grid(True, alpha=0.3)
    ax1.set_ylabel("bus bandwidth (GB/s), algbw x 2(N-1)/N")
    ax2.set_ylabel("speedup over ring")
    ax2.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    if weak:
        per = m["sizes"][0]
        title = f"weak scaling, {_fmt_size(per)} per node, {m['mode']} mode"
    else:
        t = m["topologies"][0]
        title = (f"{t['topology']} ({t['nodes']} nodes, ports {_ports_text(t['ports'])}), "
                 f"{m['mode']} mode")
    if m["sharing"] != "fair":
        title += f", {m['sharing']} sharing"
    fig.suptitle(f"simulated allreduce: {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        args.topology = resolve_topology(args.topology, args.ranks)
        out = run(args)
        for note in out["meta"]["notes"]:
            say(f"mtcoll.simulate: note: {note}")
        if args.plot:
            try:
                plot(out, args.plot)
            except OSError as e:
                raise ValueError(f"--plot: cannot write {args.plot}: {e.strerror or e}") from None
            say(f"mtcoll.simulate: plot written to {args.plot}")
        report(out, args.json, lambda: table(out), "mtcoll.simulate")
    except (ValueError, RuntimeError) as e:
        say(f"mtcoll.simulate: error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    entry(main)
