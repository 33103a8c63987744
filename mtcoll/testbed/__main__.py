"""``python -m mtcoll.testbed``: an emulated cluster (network namespaces, veth, tbf) for a topology,
and any MPI program run on it.

Examples (as root)::

    python -m mtcoll.testbed --topology torus:4x4 --rate 20mbit -- \\
        python -m mtcoll.bench --sizes 1M,4M,16M
    python -m mtcoll.testbed --topology ring:4 --json traffic.json -- python -m mtcoll.bench
    python -m mtcoll.testbed --topology torus:4x4 --fail-link 0-1@5 --timeout 60 -- \\
        env MTCOLL_TIMEOUT=5 python -m mpi4py -m mtcoll.bench --sizes 4M
    python -m mtcoll.testbed up --topology torus:2x2     # prints the testbed's id
    python -m mtcoll.testbed status
    python -m mtcoll.testbed --id ID -- python -m mtcoll.bench --sizes 1M
    python -m mtcoll.testbed down ID
    python -m mtcoll.testbed --cleanup                   # leftovers of crashed runs

The run form builds the network, checks every route in the kernel against the topology's,
launches ``mpiexec -n N`` with one rank per rank namespace (``python`` as the command's first
word is this interpreter; ``MTCOLL_TOPOLOGY`` is set to the topology), reads the byte counters
of every link before and after, removes everything (also on Ctrl-C, SIGTERM, a failing command
or the timeout; if this process is killed outright, a guard process it started does it), and
exits with the command's status (124 on --timeout).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

from .._cli import add_json_option, entry, pyplot, report, say
from ..topology import parse
from . import (DEFAULT_CONGESTION_CONTROL, DEFAULT_RATE, Testbed, TestbedError, _net, missing,
               parse_rate)

_PAIR = re.compile(r"^(\d+)([->])(\d+)=(.+)$")
_FAIL = re.compile(r"^(\d+)-(\d+)@([0-9.]+)$")


def _say(text):
    say(f"mtcoll.testbed: {text}")


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m mtcoll.testbed",
        description="An emulated cluster on this machine (network namespaces, veth links "
                    "shaped with tc tbf, the topology's routes) and a command run on it under "
                    "mpiexec (as root).",
        epilog="\n".join(__doc__.splitlines()[2:]),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", nargs="?", choices=("up", "down", "status"),
                   help="up: build and keep; down ID (or --all): remove; status: list")
    p.add_argument("target", nargs="?", help="down: the testbed id")
    p.add_argument("--topology", help="topology spec (torus:4x4, ring:4, fattree:2x4, ...)")
    p.add_argument("--rate", default=DEFAULT_RATE,
                   help="rate of every link direction, tc style: 20mbit, 1gbit, 10mbps "
                        "(bytes) (default: %(default)s)")
    p.add_argument("--link-rate", action="append", default=[], metavar="A-B=RATE",
                   help="another rate for the link between vertices A and B (both ways; A>B: "
                        "that direction only); vertices are ranks, then switches; repeatable")
    p.add_argument("--congestion-control", default=DEFAULT_CONGESTION_CONTROL, metavar="NAME",
                   help="TCP congestion control inside the namespaces (one of "
                        "/proc/sys/net/ipv4/tcp_allowed_congestion_control; default: "
                        "%(default)s)")
    p.add_argument("--queue", default=None, metavar="TIME",
                   help="tbf queue of every link, as time at its rate (tc's latency: 200ms, "
                        "2s; default 200ms); a longer one drops fewer packets")
    p.add_argument("--fail-link", action="append", default=[], metavar="A-B@SECONDS",
                   help="take the link between vertices A and B down SECONDS after the launch")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="stop the command after this long (exit status 124)")
    p.add_argument("--mpiexec", default=None,
                   help="the mpiexec to launch with (default: beside this Python, else PATH)")
    p.add_argument("--id", dest="tb_id", default=None,
                   help="run on the testbed made by 'up' with this id (it is kept)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the route check after set-up")
    p.add_argument("--cleanup", action="store_true",
                   help="remove every testbed whose owner process is gone, and stray "
                        "mtcb- namespaces")
    p.add_argument("--all", action="store_true",
                   help="with down or --cleanup: every testbed, also live ones and 'up' ones")
    add_json_option(p)
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="draw the topology, each link colored by the bytes it carried "
                        "(needs mtcoll[plot])")
    return p


def _link_rates(items):
    out = {}
    for item in items:
        m = _PAIR.match(item.strip())
        if not m:
            raise ValueError(f"--link-rate {item!r}: expected A-B=RATE or A>B=RATE")
        try:
            rate = parse_rate(m.group(4))
        except ValueError as e:
            raise ValueError(f"--link-rate {item!r}: {e}") from None
        a, kind, b = int(m.group(1)), m.group(2), int(m.group(3))
        out[(a, b)] = rate
        if kind == "-":
            out[(b, a)] = rate
    return out


def _fail_links(items, topo):
    out = []
    for item in items:
        m = _FAIL.match(item.strip())
        if not m:
            raise ValueError(f"--fail-link {item!r}: expected A-B@SECONDS, e.g. 0-1@5")
        a, b, at = int(m.group(1)), int(m.group(2)), float(m.group(3))
        try:
            topo.link(a, b)
        except KeyError:
            raise ValueError(f"--fail-link {item!r}: {topo.spec} has no link between vertices "
                             f"{a} and {b}") from None
        out.append((a, b, at))
    return out


def _mb(x):
    return "n/a" if x is None else f"{x / 1e6:.2f} MB"


def _table(meta, traffic, result):
    lines = [f"mtcoll.testbed: {meta['topology']}, {meta['namespaces']} namespaces, "
             f"{meta['veth_pairs']} veth pairs, {len(traffic['links'])} directed links at "
             f"{meta['rate']} (set-up {meta['setup_s']:.1f} s, {meta['route_hops_checked']} "
             f"route hops checked)"]
    if result is not None:
        cpu = result["cpu"]
        lines.append(f"command: exit status {result['returncode']}, {result['elapsed_s']:.1f} s; "
                     f"CPU: job user {cpu['job_user_s']:.1f} s, system {cpu['job_system_s']:.1f} "
                     f"s; machine ({cpu['machine_cores']} cores) busy "
                     f"{100 * cpu['machine_busy_fraction']:.0f} %, softirq "
                     f"{cpu['machine_softirq_s']:.1f} s; load average "
                     f"{cpu['loadavg_start'][0]:.1f} -> {cpu['loadavg_end'][0]:.1f}")
        for ev in result["events"]:
            lines.append(f"event at {ev['at_s']:.1f} s: {ev['what']}"
                         + (f" (failed: {ev['error']})" if "error" in ev else ""))
    tcp = traffic.get("tcp_total", {})
    if tcp:
        lines.append(f"tbf queues dropped {traffic.get('total_dropped_packets', 0)} packets; TCP "
                     f"sent {tcp.get('OutSegs', 0)} segments, retransmitted "
                     f"{tcp.get('RetransSegs', 0)}, {tcp.get('TCPTimeouts', 0)} "
                     "retransmission timeouts")
    links = sorted(traffic["links"], key=lambda x: -x["bytes"])
    tot = traffic["total_link_bytes"]
    lines.append(f"links: {_mb(tot)} in total; busiest "
                 + ", ".join(f"{x['from']}->{x['to']} {_mb(x['bytes'])}" for x in links[:4])
                 + f"; least {links[-1]['from']}->{links[-1]['to']} {_mb(links[-1]['bytes'])}"
                 if links else "links: none")
    fwd = traffic["forwarded"]
    lines.append("forwarded by vertex: " + ", ".join(f"{v} {_mb(b)}" for v, b in fwd.items()))
    return "\n".join(lines) + "\n"


def _guard(tb_id):
    # started by a run with its stdin a pipe from that run: EOF means the run has ended (or was
    # killed); whatever of its testbed is still there is removed
    try:
        sys.stdin.buffer.read()
    except (OSError, KeyboardInterrupt):
        pass
    if os.path.exists(os.path.join(_net.STATE_DIR, f"{tb_id}.json")) or any(
            n.startswith(f"{_net.PREFIX}{tb_id}-") for n in _net.netns_list()):
        _net.destroy(tb_id)
    return 0


def _start_guard(tb_id):
    env = dict(os.environ, MPI4PY_RC_INITIALIZE="0")
    return subprocess.Popen([sys.executable, "-m", "mtcoll.testbed", "_guard", tb_id],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, env=env)


def _from_state(tb_id):
    for st in _net.testbeds():
        if st["id"] == tb_id:
            rates = {(a, b): r for a, b, r in st.get("link_rates", [])}
            return Testbed(st["spec"], rate=st["rate"], link_rates=rates, tb_id=tb_id,
                           congestion_control=st.get("congestion_control"),
                           queue=st.get("queue")), st
    raise TestbedError(f"no testbed with id {tb_id!r} (see: python -m mtcoll.testbed status)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["_guard"]:
        return _guard(argv[1])
    command = []
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1:]
    p = _parser()
    args = p.parse_args(argv)

    if args.action == "status":
        return _status()
    reason = missing()
    if reason:
        _say(f"error: {reason}")
        return 2
    if args.cleanup:
        return _cleanup(args.all)
    if args.action == "down":
        return _down(p, args)
    return _run(p, args, command)


def _status():
    """The status form: every testbed in the state directory, then stray namespaces."""
    beds = _net.testbeds()
    for st in beds:
        owner = "kept (up)" if st.get("pid") is None else \
            f"pid {st['pid']} {'running' if st['alive'] else 'gone'}"
        print(f"{st['id']}  {st['spec']}  {len(st['namespaces'])} namespaces  {owner}")
    stray = sorted({n for n in _net.netns_list() if n.startswith(_net.PREFIX)}
                   - {n for st in beds for n in st["namespaces"]})
    if stray:
        print(f"stray namespaces (remove with --cleanup): {' '.join(stray)}")
    if not beds and not stray:
        print("no testbed")
    return 0


def _cleanup(everything):
    """--cleanup: the testbeds of gone owners (every one with --all) and stray namespaces."""
    gone = _net.cleanup(everything=everything)
    _say(f"cleanup: removed {len(gone)} namespaces" + (f" ({' '.join(gone)})" if gone else ""))
    return 0


def _down(p, args):
    """The down form: the testbed named, or every one with --all."""
    ids = [st["id"] for st in _net.testbeds()] if args.all else [args.target]
    if ids == [None]:
        p.error("down needs a testbed id (see status), or --all")
    for tb_id in ids:
        gone = _net.destroy(tb_id)
        _say(f"down {tb_id}: removed {len(gone)} namespaces")
    return 0


def _run(p, args, command):
    """The run and 'up' forms; the exit status main returns."""
    # leftovers of crashed runs would only confuse the counters of nobody, but they hold memory
    stale = _net.cleanup()
    if stale:
        _say(f"removed {len(stale)} namespaces left by crashed runs")
    try:
        tb, keep = _testbed(p, args)
        fails = _fail_links(args.fail_link, tb.topology)
    except (ValueError, TestbedError) as e:
        _say(f"error: {e}")
        return 2
    if args.action != "up" and not command:
        p.error("give the command to run after '--' (or use 'up')")
    if args.plot and not args.action:
        try:
            pyplot("--plot")
        except RuntimeError as e:
            _say(f"error: {e}")
            return 2
    meta = _meta(tb, command)
    code, result, traffic = _up_and_run(args, tb, keep, fails, meta, command)
    if code is not None:
        return code
    return _report(args, tb, meta, result, traffic, command)


def _testbed(p, args):
    """(the Testbed the options describe, whether it stays after the run); ValueError names
    the option at fault, before anything is built."""
    if args.tb_id:
        if args.topology:
            p.error("--id and --topology exclude each other")
        tb, _ = _from_state(args.tb_id)
        return tb, True
    if not args.topology:
        p.error("--topology is required (or --id of a testbed made by 'up')")
    try:
        parse(args.topology)
    except ValueError as e:
        raise ValueError(f"--topology: {e}") from None
    try:
        rate = parse_rate(args.rate)
    except ValueError as e:
        raise ValueError(f"--rate: {e}") from None
    tb = Testbed(args.topology, rate=rate, link_rates=_link_rates(args.link_rate),
                 congestion_control=args.congestion_control, queue=args.queue)
    return tb, args.action == "up"


def _meta(tb, command):
    """The report's meta record as known before set-up (set-up adds its time and hops)."""
    return {"topology": tb.topology.spec, "id": tb.id, "rate": f"{tb.rate * 8 / 1e6:g} Mbit/s",
            "congestion_control": tb.congestion_control, "queue": tb.queue,
            "rate_Bps": tb.rate, "namespaces": len(tb.layout.namespaces),
            "veth_pairs": len(tb.layout.pairs), "command": command}


def _up_and_run(args, tb, keep, fails, meta, command):
    """Build the testbed (unless reused by --id), run the command on it and read the traffic,
    then remove it unless kept, whatever happened: (exit status to stop with or None, the
    run's result, its traffic)."""
    guard = None
    try:
        if not args.tb_id:
            if not keep:
                guard = _start_guard(tb.id)
            setup = tb.up(owner_pid=None if keep else "self", check=not args.no_check)
            meta["setup_s"] = round(setup, 2)
            meta["route_hops_checked"] = getattr(tb, "checked_hops", 0)
            _say(f"{tb.topology.spec}: {meta['namespaces']} namespaces, {meta['veth_pairs']} "
                 f"veth pairs, links at {meta['rate']}, routes checked "
                 f"({meta['route_hops_checked']} hops); set-up {setup:.1f} s; id {tb.id}")
        else:
            meta["setup_s"], meta["route_hops_checked"] = 0.0, 0
        if args.action == "up":
            print(tb.id)
            return 0, None, None
        events = [(at, (lambda a=a, b=b: tb.set_link(a, b, False)), f"link {a}-{b} down")
                  for a, b, at in fails]
        before = tb.counters()
        result = tb.run(command, mpiexec=args.mpiexec, timeout=args.timeout, events=events,
                        log=_say, stdout_to_stderr=args.json == "-")
        return None, result, tb.traffic(before, tb.counters())
    except TestbedError as e:
        _say(f"error: {e}")
        return 2, None, None
    except KeyboardInterrupt:
        _say("interrupted; removing the testbed")
        return 130, None, None
    finally:
        if not keep and tb.built:
            gone = tb.down()
            _say(f"removed {len(gone)} namespaces")
        if guard is not None:
            guard.stdin.close()
            guard.wait(timeout=30)


def _report(args, tb, meta, result, traffic, command):
    """Table and/or JSON, the plot; the command's exit status as the testbed's own."""
    try:
        report({"meta": meta, "run": result, "traffic": traffic}, args.json,
               lambda: sys.stdout.write(_table(meta, traffic, result)), "mtcoll.testbed")
    except ValueError as e:  # --json FILE not writable
        _say(f"error: {e}")
        return 2
    if args.plot:
        from ._plot import plot
        plot(args.plot, tb.topology, traffic, title=f"{tb.topology.spec} at {meta['rate']}: "
             f"{' '.join(command)[:60]}")
        _say(f"plot written to {args.plot}")
    if result["timed_out"]:
        return 124
    return result["returncode"] if result["returncode"] >= 0 else 128 - result["returncode"]


if __name__ == "__main__":
    entry(main)
