"""An emulated cluster on one Linux machine: a topology's network built from network namespaces,
veth pairs shaped with ``tc`` tbf, and kernel routes that follow the topology's own routes.

A consumer of :mod:`mtcoll.topology` beside ``bench`` and ``simulate``: it takes a
:class:`~mtcoll.topology.Topology` and knows nothing of plans or executors. Needs root and
``iproute2``; ``nft`` (Debian's ``nftables``) adds the per-node forwarded-byte counters.

>>> tb = Testbed("torus:2x2", rate="20mbit")       # doctest: +SKIP
>>> with tb:                                        # builds it, checks the routes, removes it
...     before = tb.counters()
...     tb.run(["python", "-m", "mtcoll.bench", "--sizes", "1M"])
...     traffic = tb.traffic(before, tb.counters())

Pieces: :mod:`._layout` (topology -> namespaces, veths, addresses, routes; pure),
:mod:`._net` (building, checking, counting and removing with ``ip``/``tc``/``nft``),
:mod:`._launch` (``mpiexec`` with a per-rank namespace wrapper), :mod:`._plot`.
See ``docs/testbed.md``.
"""

from __future__ import annotations

import os

from ..topology import parse
from ._layout import Layout, address, format_rate, layout, parse_rate
from ._net import PREFIX, TestbedError, cleanup, missing, testbeds

__all__ = ["Testbed", "Layout", "layout", "address", "parse_rate", "format_rate", "missing",
           "cleanup", "testbeds", "TestbedError", "PREFIX", "DEFAULT_RATE",
           "DEFAULT_CONGESTION_CONTROL"]

#: default rate of every link direction; low enough that the links, not the two CPUs of the
#: project machine, bound a 16-rank torus (docs/testbed.md)
DEFAULT_RATE = "20mbit"

#: TCP congestion control in the namespaces: Reno keeps a shaped link full where BBR, the
#: project machine's default, left a quarter of it idle when both directions carry data
#: (docs/testbed.md)
DEFAULT_CONGESTION_CONTROL = "reno"


class Testbed:
    """The emulated network of ``topology``, shaped to ``rate`` per link direction.

    Parameters
    ----------
    topology : str or Topology
    rate : str or float
        A tc-style rate (``"50mbit"``) or bytes/s.
    link_rates : dict (a, b) -> rate, optional
        Per directed link (vertex ids, ranks first then switches) overrides.
    queue : str, optional
        How much each link's tbf queue holds, as time at its rate (``tc``'s ``latency``:
        ``200ms``, ``2s``; default :data:`mtcoll.testbed._net.TBF_LATENCY`). Packets beyond it
        are dropped; a longer queue drops fewer and delays more.
    congestion_control : str, optional
        TCP congestion control in every namespace (default :data:`DEFAULT_CONGESTION_CONTROL`;
        None: the kernel's default; only those in
        ``/proc/sys/net/ipv4/tcp_allowed_congestion_control`` can be set in a namespace).
    tb_id : str, optional
        The testbed's id (default: a fresh random one); its namespaces are ``mtcb-<id>-<v>``.

    Use it as a context manager, or :meth:`up` / :meth:`down`; :meth:`up` removes what it made
    when it fails, and ``down`` also kills what still runs in the namespaces.
    """

    def __init__(self, topology, rate=DEFAULT_RATE, link_rates=None, tb_id=None,
                 congestion_control=DEFAULT_CONGESTION_CONTROL, queue=None):
        from . import _net

        self.topology = parse(topology)
        self.rate = rate if isinstance(rate, (int, float)) else parse_rate(rate)
        self.link_rates = {k: (v if isinstance(v, (int, float)) else parse_rate(v))
                           for k, v in (link_rates or {}).items()}
        self.id = tb_id or _net.new_id()
        self.layout = layout(self.topology, f"{PREFIX}{self.id}-", self.rate, self.link_rates)
        self.congestion_control = congestion_control
        # how long each tbf queue may hold packets before it drops (None: _net.TBF_LATENCY)
        self.queue = _net.tbf_latency(queue) if queue is not None else _net.TBF_LATENCY
        self.built = False

    @property
    def shaped_topology(self):
        """The topology with each link's bandwidth set to its shaped rate (for the simulator)."""
        return self.layout.topology

    def up(self, owner_pid="self", check=True, log=None):
        """Build the network (and check its routes); ``owner_pid`` None keeps it after this
        process ends (``up``), until :meth:`down` or ``--cleanup``. Returns seconds taken."""
        import time

        from . import _net

        reason = missing()
        if reason:
            raise TestbedError(reason)
        t0 = time.monotonic()
        pid = os.getpid() if owner_pid == "self" else owner_pid
        _net.build(self.layout, self.id, {"spec": self.topology.spec, "rate": self.rate,
                                          "link_rates": [[a, b, r] for (a, b), r in
                                                         self.link_rates.items()],
                                          "congestion_control": self.congestion_control,
                                          "queue": self.queue},
                   pid, log=log)
        self.built = True
        if check:
            try:
                self.checked_hops = _net.check_routes(self.layout)
            except BaseException:
                self.down()
                raise
        return time.monotonic() - t0

    def down(self):
        """Remove everything this testbed made; returns the namespaces deleted."""
        from . import _net

        self.built = False
        return _net.destroy(self.id, self.layout.namespaces)

    def __enter__(self):
        self.up()
        return self

    def __exit__(self, *exc):
        self.down()
        return False

    def counters(self):
        from . import _net

        return _net.counters(self.layout)

    def set_link(self, a, b, up):
        from . import _net

        _net.set_link(self.layout, a, b, up)

    def run(self, command, **kw):
        """Run ``command`` under mpiexec on the testbed (see :func:`._launch.run`)."""
        from . import _launch

        return _launch.run(self.layout, command, **kw)

    def traffic(self, before, after):
        """What the links carried between two :meth:`counters`: a JSON-able dict with
        ``links`` (one entry per directed link: from, to, bytes, rate_Bps, dropped_packets:
        what its tbf queue could not hold), ``forwarded`` (bytes per vertex; None without
        nft), ``tcp`` (per vertex: segments sent and retransmitted, retransmission timeouts)
        and totals. Vertices are the topology's; a hier host is reported as its NIC vertex."""
        from . import _net

        lay = self.layout
        links = []
        for a, b, rate in lay.links:
            nbytes = after["links"].get((a, b), 0) - before["links"].get((a, b), 0)
            nd = after.get("drops", {}).get((a, b), 0) - before.get("drops", {}).get((a, b), 0)
            links.append({"from": lay.ns_vertex[a], "to": lay.ns_vertex[b], "bytes": nbytes,
                          "rate_Bps": rate, "dropped_packets": nd})
        tcp = {}
        for k in range(len(lay.namespaces)):
            t0, t1 = before.get("tcp", {}).get(k, {}), after.get("tcp", {}).get(k, {})
            tcp[str(lay.ns_vertex[k])] = {name: t1[name] - t0.get(name, 0) for name in t1}
        tcp_total = {name: sum(v.get(name, 0) for v in tcp.values())
                     for _, name in _net.TCP_COUNTERS}
        fwd = {}
        for k in range(len(lay.namespaces)):
            x0, x1 = before["forwarded"].get(k), after["forwarded"].get(k)
            fwd[str(lay.ns_vertex[k])] = None if x0 is None or x1 is None else x1 - x0
        rank_ns = sorted(set(lay.vertex_ns[: self.topology.nranks]))
        rank_fwd = [fwd[str(lay.ns_vertex[k])] for k in rank_ns]
        return {"links": links, "forwarded": fwd, "tcp": tcp, "tcp_total": tcp_total,
                "total_link_bytes": sum(x["bytes"] for x in links),
                "total_dropped_packets": sum(x["dropped_packets"] for x in links),
                "ranks_forwarded_bytes": None if None in rank_fwd else sum(rank_fwd)}
