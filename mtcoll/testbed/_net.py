"""Build, check, read and remove a :class:`~mtcoll.testbed._layout.Layout` with ``ip``, ``tc``
and ``nft``.

Everything made lives in namespaces named with the testbed's prefix; the veths are created
from inside a namespace with their peer placed straight into another, so the root namespace
never holds one of them, and no address, route or rule outside the testbed's namespaces is
touched. Each testbed writes a state file ``/run/mtcoll-testbed/<id>.json`` naming its owner
process, so that :func:`cleanup` can tell a crashed run's leftovers from a live one.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time

from ._layout import RULE_PRIORITY, TABLE_BASE, address, format_rate

__all__ = ["PREFIX", "STATE_DIR", "TBF_LATENCY", "tbf_burst", "tbf_latency", "missing", "new_id", "build",
           "check_routes", "counters", "destroy", "cleanup", "testbeds", "set_link", "TestbedError"]

#: every namespace of every testbed starts with this
PREFIX = "mtcb-"
STATE_DIR = "/run/mtcoll-testbed"
NFT_TABLE = "mtcoll_testbed"
#: tbf queue: how long a packet may wait before tbf drops it
TBF_LATENCY = "200ms"


def tbf_latency(text):
    """A tbf queue length as ``tc`` takes it (``200ms``, ``2s``); ValueError otherwise."""
    text = str(text).strip()
    if not re.fullmatch(r"[0-9]+(ms|s)", text):
        raise ValueError(f"bad queue {text!r}: give milliseconds or seconds, such as 200ms or 2s")
    return text


def tbf_burst(rate):
    """The tbf bucket (bytes) of a link shaped to ``rate`` bytes/s: 10 ms of the rate, at
    least 32 KiB. What the link lets through at once after it idled (the simulator's
    ``burst``)."""
    return max(32 * 1024, int(rate / 100))


class TestbedError(RuntimeError):
    """Setting up, checking or using the emulated network failed (the message says what)."""


def missing():
    """What this machine lacks to build a testbed, as a sentence, or None."""
    if os.geteuid() != 0:
        return ("the testbed needs root (network namespaces, veth and tc need CAP_NET_ADMIN "
                "and CAP_SYS_ADMIN); run it as root")
    for tool, pkg in (("ip", "iproute2"), ("tc", "iproute2")):
        if shutil.which(tool) is None:
            return f"the testbed needs '{tool}' (Debian package {pkg})"
    probe = f"{PREFIX}probe-{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"network namespaces are not available here: ip netns add: {r.stderr.strip()}"
    try:
        r = subprocess.run(["ip", "-n", probe, "link", "add", "name", "a", "type", "veth",
                            "peer", "name", "b"], capture_output=True, text=True)
        if r.returncode != 0:
            return f"veth links are not available here: {r.stderr.strip()}"
        r = subprocess.run(["tc", "-n", probe, "qdisc", "add", "dev", "a", "root", "tbf",
                            "rate", "1mbit", "burst", "32kb", "latency", "10ms"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            return f"tc's tbf qdisc is not available here: {r.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def new_id():
    return secrets.token_hex(3)


def _run(args, input=None, what=None):
    r = subprocess.run(args, input=input, capture_output=True, text=True)
    if r.returncode != 0:
        raise TestbedError(f"{what or ' '.join(args[:4])} failed: "
                           f"{(r.stderr or r.stdout).strip()} (command: {' '.join(args)})")
    return r.stdout


def _batch(tool, ns, lines, what):
    if lines:
        _run([tool, "-n", ns, "-batch", "-"], input="\n".join(lines) + "\n",
             what=f"{what} in namespace {ns}")


def _in_ns(ns, args, input=None, what=None):
    return _run(["ip", "netns", "exec", ns] + list(args), input=input, what=what)


def _write_state(tb_id, state):
    os.makedirs(STATE_DIR, exist_ok=True)
    tmp = os.path.join(STATE_DIR, f".{tb_id}.tmp")
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.replace(tmp, os.path.join(STATE_DIR, f"{tb_id}.json"))


def testbeds():
    """The testbeds with a state file: list of dicts (``id``, ``prefix``, ``pid``, ``spec``,
    ``namespaces``, ``created``, and ``alive``: whether the owner process still runs)."""
    out = []
    if not os.path.isdir(STATE_DIR):
        return out
    for name in sorted(os.listdir(STATE_DIR)):
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(STATE_DIR, name)) as f:
                st = json.load(f)
        except (OSError, ValueError):
            continue
        pid = st.get("pid")
        st["alive"] = pid is None or _alive(pid, st.get("pid_start"))
        out.append(st)
    return out


def _proc_start(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid, start):
    s = _proc_start(pid)
    return s is not None and (start is None or s == start)


def build(lay, tb_id, meta, owner_pid, log=None):
    """Create every namespace, veth, address, tbf, route and counter of ``lay``.

    The state file is written first, so a crash half-way leaves something :func:`cleanup` can
    find. On any failure what was made is removed and :class:`TestbedError` raised.
    """
    topo = lay.topology
    _write_state(tb_id, dict(meta, id=tb_id, prefix=lay.prefix, pid=owner_pid,
                             pid_start=_proc_start(owner_pid) if owner_pid else None,
                             namespaces=lay.namespaces, created=time.time()))
    try:
        _build(lay, topo, meta.get("congestion_control"), meta.get("queue") or TBF_LATENCY)
    except BaseException:
        destroy(tb_id, lay.namespaces)
        raise


def _build(lay, topo, congestion_control=None, queue=TBF_LATENCY):
    ns = lay.namespaces
    _run(["ip", "-batch", "-"], input="".join(f"netns add {x}\n" for x in ns),
         what="creating the namespaces")
    sysctl = ("echo 1 > /proc/sys/net/ipv4/ip_forward && "
              "echo 0 > /proc/sys/net/ipv4/conf/all/rp_filter && "
              "echo 0 > /proc/sys/net/ipv4/conf/default/rp_filter")
    if congestion_control:
        try:
            with open("/proc/sys/net/ipv4/tcp_allowed_congestion_control") as f:
                allowed = f.read().split()
        except OSError:
            allowed = [congestion_control]
        if congestion_control not in allowed or not re.fullmatch(r"[a-z0-9_]+",
                                                                  congestion_control):
            raise TestbedError(f"TCP congestion control {congestion_control!r} is not allowed "
                               f"in a namespace here (allowed: {' '.join(allowed)})")
        sysctl += f" && echo {congestion_control} > /proc/sys/net/ipv4/tcp_congestion_control"
    nft = (f"table ip {NFT_TABLE} {{\n chain forward {{\n  type filter hook forward priority 0;"
           f" policy accept;\n  counter\n }}\n}}\n")
    have_nft = shutil.which("nft") is not None
    for x in ns:
        _in_ns(x, ["sh", "-c", sysctl], what="setting ip_forward=1, rp_filter=0")
        if have_nft:
            _in_ns(x, ["nft", "-f", "-"], input=nft, what="adding the forwarding counter")
    links = {x: [] for x in range(len(ns))}
    for a, b in lay.pairs:
        links[a].append(f"link add name {lay.ifname(a, b)} type veth peer name "
                        f"{lay.ifname(b, a)} netns {ns[b]}")
    for x in range(len(ns)):
        _batch("ip", ns[x], links[x], "creating veth pairs")
    peers = {x: [] for x in range(len(ns))}
    for a, b in lay.pairs:
        peers[a].append(b)
        peers[b].append(a)
    for x in range(len(ns)):
        me = address(x)
        lines = ["link set lo up"]
        for p in peers[x]:
            dev = lay.ifname(x, p)
            lines += [f"addr add {me}/32 dev {dev}", f"link set {dev} up"]
        for d, y in lay.main_routes[x]:
            lines.append(f"route add {address(d)}/32 via {address(y)} dev {lay.ifname(x, y)} "
                         f"onlink")
        for s, routes in sorted(lay.source_routes[x].items()):
            table = TABLE_BASE + s
            lines.append(f"rule add from {address(s)}/32 lookup {table} "
                         f"priority {RULE_PRIORITY + s}")
            for d, y in routes:
                lines.append(f"route add {address(d)}/32 via {address(y)} "
                             f"dev {lay.ifname(x, y)} onlink table {table}")
        _batch("ip", ns[x], lines, "adding addresses and routes")
    shaping = {x: [] for x in range(len(ns))}
    for a, b, rate in lay.links:
        burst = tbf_burst(rate)
        shaping[a].append(f"qdisc add dev {lay.ifname(a, b)} root tbf rate {format_rate(rate)} "
                          f"burst {burst} latency {tbf_latency(queue)}")
    for x in range(len(ns)):
        _batch("tc", ns[x], shaping[x], "adding tbf")


def check_routes(lay):
    """Ask the kernel of every namespace on every rank pair's path where it sends the packet,
    and compare with the topology's route. Returns the number of hops checked; raises
    :class:`TestbedError` listing the first mismatches."""
    asks = {x: [] for x in range(len(lay.namespaces))}
    for path in {tuple(p) for p in lay.hops.values()}:
        u, v = path[0], path[-1]
        for i in range(len(path) - 1):
            x, y = path[i], path[i + 1]
            iif = "" if i == 0 else f" iif {lay.ifname(x, path[i - 1])}"
            asks[x].append((u, v, y, f"route get {address(v)} from {address(u)}{iif}"))
    bad, checked = [], 0
    for x, items in asks.items():
        if not items:
            continue
        r = subprocess.run(["ip", "-n", lay.namespaces[x], "-j", "-force", "-batch", "-"],
                           input="".join(q + "\n" for *_, q in items), capture_output=True,
                           text=True)
        answers = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
        if len(answers) != len(items):
            bad.append(f"namespace {lay.namespaces[x]}: {r.stderr.strip()[:200]}")
            continue
        for (u, v, y, q), ans in zip(items, answers):
            got = ans[0] if ans else {}
            want_dev, want_gw = lay.ifname(x, y), address(y)
            checked += 1
            if got.get("dev") != want_dev or got.get("gateway") != want_gw:
                bad.append(f"in namespace {x}, {u}->{v} leaves by {got.get('dev')} via "
                           f"{got.get('gateway')}, the topology says {want_dev} via {want_gw}")
    if bad:
        raise TestbedError("kernel routes differ from the topology's: " + "; ".join(bad[:5]))
    return checked


#: the kernel's TCP counters read per namespace (/proc/net/snmp and /proc/net/netstat)
TCP_COUNTERS = (("Tcp", "OutSegs"), ("Tcp", "RetransSegs"), ("TcpExt", "TCPTimeouts"))


def _tcp_counters(text):
    """{name: value} of :data:`TCP_COUNTERS` from the text of /proc/net/snmp + netstat (each
    section is a line of names and a line of values)."""
    lines = [line.split() for line in text.splitlines() if ":" in line]
    table = {}
    for names, values in zip(lines[::2], lines[1::2]):
        if names and values and names[0] == values[0]:
            table.update({(names[0][:-1], k): v for k, v in zip(names[1:], values[1:])})
    return {name: int(table[(sec, name)]) for sec, name in TCP_COUNTERS if (sec, name) in table}


def counters(lay):
    """Counters now, by namespace: ``links`` {(a, b): bytes sent on a->b, from its tbf},
    ``drops`` {(a, b): packets its tbf dropped (queue full)}, ``tcp`` {namespace: segments
    sent, retransmitted, retransmission timeouts} and ``forwarded`` {namespace: bytes its
    kernel forwarded} (None without ``nft``)."""
    links, drops, tcp, fwd = {}, {}, {}, {}
    have_nft = shutil.which("nft") is not None
    for x, ns in enumerate(lay.namespaces):
        out = _run(["tc", "-n", ns, "-s", "-j", "qdisc", "show"], what="reading tc counters")
        for q in json.loads(out or "[]"):
            dev = q.get("dev", "")
            if q.get("kind") == "tbf" and dev.startswith("v"):
                links[(x, int(dev[1:]))] = int(q.get("bytes", 0))
                drops[(x, int(dev[1:]))] = int(q.get("drops", 0))
        tcp[x] = _tcp_counters(_in_ns(ns, ["cat", "/proc/net/snmp", "/proc/net/netstat"],
                                      what="reading the TCP counters"))
        if have_nft:
            out = _in_ns(ns, ["nft", "-j", "list", "table", "ip", NFT_TABLE],
                         what="reading the forwarding counter")
            total = 0
            for item in json.loads(out).get("nftables", []):
                for e in item.get("rule", {}).get("expr", []):
                    if "counter" in e:
                        total += int(e["counter"]["bytes"])
            fwd[x] = total
        else:
            fwd[x] = None
    return {"links": links, "drops": drops, "tcp": tcp, "forwarded": fwd}


def set_link(lay, a, b, up):
    """Take the veth pair between vertices ``a`` and ``b`` down (both directions) or up."""
    a, b = lay.vertex_ns[a], lay.vertex_ns[b]
    if (min(a, b), max(a, b)) not in lay.pairs:
        raise TestbedError(f"no veth joins vertices {a} and {b}")
    _run(["ip", "-n", lay.namespaces[a], "link", "set", lay.ifname(a, b),
          "up" if up else "down"], what=f"setting link {a}-{b} {'up' if up else 'down'}")


def netns_list():
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def destroy(tb_id, namespaces=None):
    """Remove testbed ``tb_id``: kill what still runs in its namespaces, delete them (their
    veths go with them) and its state file. Returns the namespaces deleted."""
    prefix = f"{PREFIX}{tb_id}-"
    present = [n for n in netns_list() if n.startswith(prefix)]
    names = sorted(set(present) | set(n for n in (namespaces or []) if n in present))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = set()
        for n in names:
            r = subprocess.run(["ip", "netns", "pids", n], capture_output=True, text=True)
            pids |= {int(p) for p in r.stdout.split()}
        pids.discard(os.getpid())
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        if not pids:
            break
        time.sleep(0.3)
    if names:
        subprocess.run(["ip", "-force", "-batch", "-"], capture_output=True, text=True,
                       input="".join(f"netns del {n}\n" for n in names))
    try:
        os.unlink(os.path.join(STATE_DIR, f"{tb_id}.json"))
    except FileNotFoundError:
        pass
    left = [n for n in netns_list() if n.startswith(prefix)]
    if left:
        raise TestbedError(f"could not delete namespaces {', '.join(left)}")
    return names


def cleanup(everything=False):
    """Remove the leftovers of crashed runs: every testbed whose owner process is gone, and any
    ``mtcb-`` namespace no state file accounts for. ``everything`` also removes live ones and
    those made by ``up``. Returns the namespaces deleted."""
    gone = []
    known = set()
    for st in testbeds():
        known.add(st["id"])
        if everything or not st["alive"]:
            gone += destroy(st["id"], st.get("namespaces"))
    names = [n for n in netns_list() if n.startswith(PREFIX)]
    probe = f"{PREFIX}probe-"
    for n in names:  # missing()'s probe of a process that is gone
        if n.startswith(probe) and n[len(probe):].isdigit() \
                and _proc_start(int(n[len(probe):])) is None:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)
            gone.append(n)
    orphans = sorted({n[len(PREFIX):].split("-")[0] for n in names
                      if not n.startswith(probe)} - known)
    for tb_id in orphans:
        gone += destroy(tb_id)
    return gone
