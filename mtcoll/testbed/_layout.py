"""From a :class:`~mtcoll.topology.Topology` to the pieces of an emulated network, as data.

Pure functions, no root needed: what :mod:`mtcoll.testbed._net` then builds with ``ip``/``tc``.

* one **namespace** per vertex (ranks first, then switches), named ``<prefix><vertex>``; on
  ``hier:HxR`` one per host (its R ranks and its NIC, which share memory) and one for the switch;
* one **veth pair** per linked pair of namespaces; the end in ``a``'s namespace is named
  ``v<b>``, so a name says where the link goes and is unique inside its namespace;
* each namespace's one **address** (``198.18.0.1 + k``, RFC 2544's benchmarking range), put on
  every veth of the namespace (OFI's tcp provider binds the address of the interface it picks);
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
from dataclasses import dataclass, field

from ..topology import format_rate_spec, parse, parse_rate  # one rate syntax: specs, --link-rate

__all__ = ["Layout", "layout", "address", "parse_rate", "format_rate", "ADDRESS_BASE",
           "RULE_PRIORITY", "TABLE_BASE"]

ADDRESS_BASE = ipaddress.IPv4Address("198.18.0.1")
_LAST = ipaddress.IPv4Address("198.19.255.254")
#: ``ip rule`` priority of the per-source rules (before the main table's 32766)
RULE_PRIORITY = 1000
#: routing table id of source vertex s is TABLE_BASE + s
TABLE_BASE = 1000

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

    Namespaces are numbered ``0 .. len(namespaces)-1``; on every topology but ``hier`` namespace
    ``k`` is vertex ``k``. On ``hier:HxR`` namespace ``h < H`` is host ``h`` -- its R ranks and
    its NIC vertex, joined by shared memory, not veths -- and namespace ``H`` the switch.

    Attributes
    ----------
    topology : Topology
        The topology, its ``bandwidth`` the rates the veth links are shaped to (bytes/s per
        directed link; a hier host's internal links keep the topology's figures); hand it to
        the simulator to predict this network.
    prefix : str
        Every namespace's name starts with it.
    namespaces : list of str
    vertex_ns : list of int
        Namespace of each vertex.
    ns_vertex : list of int
        The vertex each namespace stands for in reports (a hier host: its NIC vertex).
    pairs : list of (a, b)
        Namespace pairs joined by a veth pair (a < b).
    links : list of (a, b, rate)
        Directed namespace links with their rate in bytes/s (one tbf each).
    main_routes : dict namespace -> list of (dst, next_hop)
    source_routes : dict namespace -> dict source -> list of (dst, next_hop)
    hops : dict (u, v) -> list of namespaces
        The namespaces the packets of every pair of ranks in different namespaces must cross
        (``topology.routes(u, v)[0]``, hops inside one namespace left out).
    """

    topology: object
    prefix: str
    namespaces: list
    vertex_ns: list
    ns_vertex: list
    pairs: list
    links: list
    main_routes: dict
    source_routes: dict
    hops: dict = field(repr=False)

    def ifname(self, a, b):
        """Name of the veth end in namespace ``a`` that leads to namespace ``b``."""
        return f"v{b}"

    def rank_namespaces(self):
        """The namespace name of every rank, in rank order."""
        return [self.namespaces[self.vertex_ns[u]] for u in range(self.topology.nranks)]

    @property
    def ranks_per_namespace(self):
        return self.topology.nranks // len(set(self.vertex_ns[: self.topology.nranks]))


def _vertex_path(topo, route):
    if not route:
        return []
    path = [int(topo.link_src[route[0]])]
    for lid in route:
        if int(topo.link_src[lid]) != path[-1]:
            raise ValueError(f"route {route} of {topo.spec} is not a path")
        path.append(int(topo.link_dst[lid]))
    return path


def _namespace_of(topo):
    """Per vertex its namespace: one per host (its ranks and NIC share memory), first, then
    one per vertex on no host (every vertex of a network without hosts, a hier switch)."""
    hosts = [int(h) for h in topo.host_of]
    ids = {h: k for k, h in enumerate(sorted({h for h in hosts if h >= 0}))}
    out, k = [], len(ids)
    for h in hosts:
        if h >= 0:
            out.append(ids[h])
        else:
            out.append(k)
            k += 1
    return out


def shaped_spec(topo, rate, link_rates, bandwidth):
    """``topo``'s spec with the rates the testbed shapes: ``--rate`` as the spec's base rate
    (unless a rate option of the spec sets every link) and each ``--link-rate`` as an
    ``A>B=RATE`` option, so that a job planning from the spec (``MTCOLL_TOPOLOGY``) plans for
    the shaped network. Checked: the spec parses to ``bandwidth`` on every shaped link."""
    import numpy as np

    vns = _namespace_of(topo)
    shaped = [i for i, (a, b) in enumerate(zip(topo.link_src, topo.link_dst)) if vns[a] != vns[b]]
    spec = topo.spec
    if not all(topo.link_rated[i] for i in shaped):
        spec += f"/{format_rate_spec(rate)}"
    for (a, b), r in link_rates.items():
        spec += f"/{a}>{b}={format_rate_spec(r)}"
    got = parse(spec, nranks=topo.nranks).bandwidth
    if not np.allclose(np.asarray(got)[shaped], np.asarray(bandwidth)[shaped], rtol=1e-9):
        raise ValueError(f"{topo.spec}: the shaped rates have no spec form ({spec!r} differs)")
    return spec


def layout(topo, prefix, rate, link_rates=None):
    """The :class:`Layout` of ``topo`` with every namespace named ``prefix<k>``.

    Parameters
    ----------
    topo : Topology
    prefix : str
    rate : float
        Bytes/s of every directed veth link not in ``link_rates`` and not set by a rate option
        of the spec (``torus:4x4/20mbit/0-1=5mbit`` shapes what it says: the testbed shapes
        the network the planner planned for).
    link_rates : dict (a, b) -> bytes/s, optional
        Per-link overrides, by vertex ids; a key (a, b) sets the link a->b (give both orders
        for both ways).

    Raises
    ------
    ValueError
        ``link_rates`` names a pair that is not a link of ``topo`` or lies inside one hier host,
        or a rate that is not positive; a directed link without its reverse (a veth carries
        both).
    """
    import numpy as np

    link_rates = dict(link_rates or {})
    vns = _namespace_of(topo)
    nns = max(vns) + 1
    # the vertex that stands for a namespace: a host's NIC (its last vertex), else the vertex
    ns_vertex = [max(v for v in range(topo.nvertices) if vns[v] == k) for k in range(nns)]
    src = [int(x) for x in topo.link_src]
    dst = [int(x) for x in topo.link_dst]
    directed = set(zip(src, dst))
    for (a, b), r in link_rates.items():
        if (a, b) not in directed:
            raise ValueError(f"--link-rate {a}-{b}: {topo.spec} has no link from vertex {a} to "
                             f"vertex {b}")
        if vns[a] == vns[b]:
            raise ValueError(f"--link-rate {a}-{b}: vertices {a} and {b} share a host "
                             f"(shared memory, not a shaped link)")
        if not r > 0:
            raise ValueError(f"--link-rate {a}-{b}: the rate must be positive, got {r!r}")
    if not rate > 0:
        raise ValueError(f"--rate must be positive, got {rate!r}")
    for a, b in directed:
        if (b, a) not in directed:
            raise ValueError(f"{topo.spec}: link {a}->{b} has no reverse; a veth carries both "
                             f"directions")
    bw = np.array(topo.bandwidth, dtype=float)
    links, seen = [], {}
    for i, (a, b) in enumerate(zip(src, dst)):
        na, nb = vns[a], vns[b]
        if na == nb:
            continue
        if (na, nb) in seen:
            raise ValueError(f"{topo.spec}: two links join namespaces {na} and {nb}")
        bw[i] = float(link_rates.get((a, b), topo.bandwidth[i] if topo.link_rated[i] else rate))
        seen[(na, nb)] = i
        links.append((na, nb, float(bw[i])))
    shaped = object.__new__(type(topo))
    shaped.__dict__.update(topo.__dict__)
    bw.setflags(write=False)
    shaped.bandwidth = bw
    shaped.spec = shaped_spec(topo, rate, link_rates, bw)

    namespaces = [f"{prefix}{k}" for k in range(nns)]
    pairs = sorted({(min(a, b), max(a, b)) for a, b, _ in links})

    n = topo.nranks
    hops = {}
    # next_hop[x][(s, d)]: where namespace x sends a packet from namespace s to namespace d
    next_hop = collections.defaultdict(dict)
    for u in range(n):
        for v in range(n):
            if u == v or vns[u] == vns[v]:
                continue
            path = [vns[x] for x in _vertex_path(topo, topo.routes(u, v)[0])]
            path = [x for i, x in enumerate(path) if i == 0 or x != path[i - 1]]
            hops[(u, v)] = path
            for x, y in zip(path, path[1:]):
                old = next_hop[x].setdefault((path[0], path[-1]), y)
                if old != y:
                    raise ValueError(f"{topo.spec}: ranks of one namespace take different "
                                     f"routes to another; the kernel cannot tell them apart")
    main, per_source = {}, {}
    for x in range(nns):
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
    return Layout(shaped, prefix, namespaces, vns, ns_vertex, pairs, links, main, per_source,
                  hops)
