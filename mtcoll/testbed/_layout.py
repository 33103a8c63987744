"""From a :class:`~mtcoll.topology.Topology` to the pieces of an emulated network, as data.

Pure functions, no root needed: what :mod:`mtcoll.testbed._net` then builds with ``ip``/``tc``.

* one **namespace** per vertex (ranks first, then switches), named ``<prefix><vertex>``;
* one **veth pair** per linked pair of vertices; the end in ``a``'s namespace is named
  ``v<b>``, so a name says where the link goes and is unique inside its namespace;
* each vertex's one **address** (``198.18.0.1 + vertex``, RFC 2544's benchmarking range), put on
  every veth of its namespace (OFI's tcp provider binds the address of the interface it picks);
* one **tbf** per direction, on the sending end's egress, at that directed link's rate;
* **routes** so that a packet from rank ``u`` to rank ``v`` crosses exactly the links of
  ``topology.routes(u, v)[0]``. Routes of mtcoll's topologies depend on the source as well as the
  destination (a torus route from a higher to a lower rank is the reverse of the route back, so
  the dimensions are corrected in the other order), which a destination-only table cannot hold.
  So each namespace has a main table (its own traffic's next hops, and for a switch the most
  common next hop per destination) and, for each source whose forwarded packets must leave by
  another next hop, a table of those exceptions selected by ``ip rule from <source>``. A lookup
  that finds nothing in a source's table falls through to the main table.
"""

from __future__ import annotations

import collections
import ipaddress
import re
from dataclasses import dataclass, field

__all__ = ["Layout", "layout", "address", "parse_rate", "format_rate", "ADDRESS_BASE",
           "RULE_PRIORITY", "TABLE_BASE"]

ADDRESS_BASE = ipaddress.IPv4Address("198.18.0.1")
_LAST = ipaddress.IPv4Address("198.19.255.254")
#: ``ip rule`` priority of the per-source rules (before the main table's 32766)
RULE_PRIORITY = 1000
#: routing table id of source vertex s is TABLE_BASE + s
TABLE_BASE = 1000

_RATE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*([kmg]?)(bit|bps)?$")
_MULT = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}


def parse_rate(text):
    """A rate such as ``50mbit``, ``1gbit``, ``800kbit`` or ``10mbps`` (bytes) as bytes/s.

    ``bit`` units are bits per second (tc's spelling, powers of 1000); ``bps`` bytes per
    second; a bare number is bits per second. ValueError on anything else or on zero.
    """
    m = _RATE.match(str(text).strip().lower())
    if not m:
        raise ValueError(f"bad rate {text!r}: expected a number with a unit such as 50mbit, "
                         f"1gbit, 800kbit or 10mbps (bytes/s)")
    value = float(m.group(1)) * _MULT[m.group(2)]
    value = value if m.group(3) == "bps" else value / 8
    if not value > 0:
        raise ValueError(f"rate {text!r} must be positive")
    return value


def format_rate(bytes_per_s):
    """Bytes/s as tc's ``<integer>bit``."""
    return f"{int(round(bytes_per_s * 8))}bit"


def address(vertex):
    """The address of ``vertex`` (a string in 198.18.0.0/15)."""
    a = ADDRESS_BASE + int(vertex)
    if a > _LAST:
        raise ValueError(f"vertex {vertex} is beyond the 198.18.0.0/15 addresses")
    return str(a)


@dataclass(frozen=True)
class Layout:
    """The emulated network of one topology (see the module docstring).

    Attributes
    ----------
    topology : Topology
        The topology, its ``bandwidth`` the rates the links are shaped to (bytes/s per directed
        link); hand it to the simulator to predict this network.
    prefix : str
        Every namespace's name starts with it.
    namespaces : list of str
        Namespace of each vertex.
    pairs : list of (a, b)
        Vertex pairs joined by a veth pair (a < b).
    links : list of (a, b, rate)
        Directed links with their rate in bytes/s (one tbf each).
    main_routes : dict vertex -> list of (dst, next_hop)
    source_routes : dict vertex -> dict source -> list of (dst, next_hop)
    hops : dict (u, v) -> list of vertices
        The path every rank pair's packets must take (``topology.routes(u, v)[0]``).
    """

    topology: object
    prefix: str
    namespaces: list
    pairs: list
    links: list
    main_routes: dict
    source_routes: dict
    hops: dict = field(repr=False)

    def ifname(self, a, b):
        """Name of the veth end in ``a``'s namespace that leads to ``b``."""
        return f"v{b}"

    def rank_namespaces(self):
        return self.namespaces[: self.topology.nranks]


def _vertex_path(topo, route):
    if not route:
        return []
    path = [int(topo.link_src[route[0]])]
    for lid in route:
        if int(topo.link_src[lid]) != path[-1]:
            raise ValueError(f"route {route} of {topo.spec} is not a path")
        path.append(int(topo.link_dst[lid]))
    return path


def layout(topo, prefix, rate, link_rates=None):
    """The :class:`Layout` of ``topo`` with every namespace named ``prefix<vertex>``.

    Parameters
    ----------
    topo : Topology
    prefix : str
    rate : float
        Bytes/s of every directed link not in ``link_rates``.
    link_rates : dict (a, b) -> bytes/s, optional
        Per-link overrides; a key (a, b) sets the link a->b (use both orders for both ways).

    Raises
    ------
    ValueError
        ``link_rates`` names a pair that is not a link of ``topo``, or a rate that is not
        positive; a directed link without its reverse (a veth carries both).
    """
    import numpy as np

    link_rates = dict(link_rates or {})
    src = [int(x) for x in topo.link_src]
    dst = [int(x) for x in topo.link_dst]
    directed = set(zip(src, dst))
    for (a, b), r in link_rates.items():
        if (a, b) not in directed:
            raise ValueError(f"--link-rate {a}-{b}: {topo.spec} has no link from vertex {a} to "
                             f"vertex {b}")
        if not r > 0:
            raise ValueError(f"--link-rate {a}-{b}: the rate must be positive, got {r!r}")
    if not rate > 0:
        raise ValueError(f"--rate must be positive, got {rate!r}")
    for a, b in directed:
        if (b, a) not in directed:
            raise ValueError(f"{topo.spec}: link {a}->{b} has no reverse; a veth carries both "
                             f"directions")
    bw = np.array([float(link_rates.get((a, b), rate)) for a, b in zip(src, dst)])
    shaped = object.__new__(type(topo))
    shaped.__dict__.update(topo.__dict__)
    bw.setflags(write=False)
    shaped.bandwidth = bw

    namespaces = [f"{prefix}{v}" for v in range(topo.nvertices)]
    pairs = sorted({(min(a, b), max(a, b)) for a, b in directed})
    links = [(a, b, float(bw[i])) for i, (a, b) in enumerate(zip(src, dst))]

    n = topo.nranks
    hops = {}
    # next_hop[x][(s, d)]: where vertex x sends a packet from rank s to rank d
    next_hop = collections.defaultdict(dict)
    for u in range(n):
        for v in range(n):
            if u == v:
                continue
            path = _vertex_path(topo, topo.routes(u, v)[0])
            hops[(u, v)] = path
            for x, y in zip(path, path[1:]):
                next_hop[x][(u, v)] = y
    main, per_source = {}, {}
    for x in range(topo.nvertices):
        table = next_hop.get(x, {})
        by_dst = collections.defaultdict(list)
        for (s, d), y in table.items():
            by_dst[d].append((s, y))
        routes, extra = [], collections.defaultdict(list)
        for d in sorted(by_dst):
            own = [y for s, y in by_dst[d] if s == x]
            if own:
                default = own[0]
            else:
                default = collections.Counter(y for _, y in by_dst[d]).most_common(1)[0][0]
            routes.append((d, default))
            for s, y in sorted(by_dst[d]):
                if y != default:
                    extra[s].append((d, y))
        # the node's neighbours are reached directly even when no rank pair's route says so
        # (switches' addresses, ARP replies): an on-link route to each
        have = {d for d, _ in routes}
        for a, b in pairs:
            for me, peer in ((a, b), (b, a)):
                if me == x and peer not in have:
                    routes.append((peer, peer))
        main[x] = routes
        per_source[x] = dict(extra)
    return Layout(shaped, prefix, namespaces, pairs, links, main, per_source, hops)
