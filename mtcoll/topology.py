"""Network topologies: which ranks are linked, by which directed links, at what speed.

A :class:`Topology` is built from a spec string (:func:`parse`) and knows

* its **vertices**: the ranks ``0 .. nranks-1`` first, then any switches;
* its **directed links** between vertices, each with a bandwidth (bytes/s) and a latency (s);
* for every ordered pair of ranks, one or more **routes** (tuples of link ids), the first being
  the default; on a switched network every route crosses the switches;
* the **tree edges**: the ordered rank pairs a MultiTree edge may use in one step (neighbours on
  direct networks, every pair on switched ones);
* a per-rank **port budget**: how many transfers a rank may send, and receive, in one step.

Spec strings
------------
``torus:AxB[xC...]``  periodic grid, rank = row-major index of its coordinates (MPI order).
``mesh:AxB[xC...]``   the same grid without wrap-around links.
``ring:N``            a 1-D torus.
``full:N``            every pair of ranks linked directly.
``fattree:LxM``       L leaf switches with M ranks each and M spine switches; every leaf is linked
                      to every spine (the MultiTree paper's 64-node tree is ``fattree:8x8``).
``bigraph:MxS``       S switches, the first S/2 "upper" and the rest "lower", every upper switch
                      linked to every lower one, M ranks on each switch (``bigraph:4x16``).
``hier:HxR``          H hosts of R ranks; the ranks of a host are fully connected; each host
                      reaches one central switch through a single NIC (one port each).
``auto``              needs a rank count: the most square 2-D torus that factors it (a ring
                      for primes), or ``hier`` when detected from a communicator spanning hosts.

Options follow the base spec, each after a ``/`` (no spaces; ``/`` because ``,`` separates
specs in the tools' lists). Rates take tc's units (``20mbit``, ``1gbit``, ``800kbit``: bits per
second, powers of 1000) or ``bps`` for bytes per second (``10mbps``):

``/RATE``             every network link (every link but those inside a host) at RATE.
``/dimK=RATE``        the grid links along axis K (0: the first size; on ``torus:4x4``,
                      ``dim1`` runs along a row) at RATE; on hosts, the host grid's axis K.
``/shm=RATE``         the links inside a host (rank to rank, rank to NIC) at RATE.
``/A-B=RATE``         the links A->B and B->A; ``/A>B=RATE`` only A->B. A and B are vertex ids:
                      ranks ``0 .. N-1``, then switches or NICs (the testbed's ``--link-rate``).
``/per-host=R``       each vertex of a direct network (torus, mesh, ring, full) is a host of R
                      ranks: ranks ``h*R .. h*R+R-1`` and a NIC (vertex ``N + h``) share memory
                      (fully connected, linked to the NIC); the NICs are linked as the hosts'
                      network is, at the NIC default. A tree edge joins ranks of one host or of
                      neighbouring hosts; a route from another host goes NIC to NIC.

Later, more specific options win: the network rate, then axes, then ``shm``, then single links.
A spec's canonical form (``Topology.spec``) lists its options in that order, so it parses back
to the same network: ``torus:4x4/20mbit/0-1=5mbit``, ``hier:4x4/20mbit/shm=10gbit``,
``torus:2x2/per-host=4/20mbit``. A spec without options means what it always meant.

Defaults (overridable with the ``bandwidth``/``latency`` arguments of :func:`parse`): every link
carries 16 GB/s per direction with 150 ns latency (the MultiTree paper's setup), except a
``hier`` host's NIC link to the switch and the NIC-to-NIC links of ``per-host`` networks,
12.5 GB/s (100 Gb/s) with 1 us. Port budget: a rank's
number of links on direct networks (torus, mesh, ring, full, and ``hier``, whose ranks link to
their host peers and to the NIC), 1 on the switched ``fattree`` and ``bigraph``.
"""

from __future__ import annotations

import itertools
import math
import re

import numpy as np

__all__ = ["Topology", "parse", "auto_spec", "from_comm", "host_leaders", "hosts_spec",
           "mpi_topology", "parse_rate", "format_rate_spec",
           "SPEC_FORMS",
           "DEFAULT_BANDWIDTH", "DEFAULT_LATENCY"]

DEFAULT_BANDWIDTH = 16e9  # bytes/s per link direction
DEFAULT_LATENCY = 150e-9  # s per link
NIC_BANDWIDTH = 12.5e9
NIC_LATENCY = 1e-6

SPEC_FORMS = ("torus:AxB[xC...]", "mesh:AxB[xC...]", "ring:N", "full:N", "fattree:LxM",
              "bigraph:MxS", "hier:HxR", "auto", "any of them + /OPTION (RATE, A-B=RATE, "
              "dimK=RATE, shm=RATE, per-host=R)")


class Topology:
    """A network of ``nranks`` ranks (and possibly switches) joined by directed links.

    Build one with :func:`parse`; the constructor takes the raw pieces. Attributes:

    ``spec`` (canonical spec string), ``kind`` (``hosts`` for ``per-host`` networks),
    ``dims``, ``nranks``, ``nvertices``, ``switched`` (bool), ``link_src``/``link_dst`` (vertex
    ids per link), ``bandwidth`` and ``latency`` (per link), ``link_rated`` (per link, True
    where a rate option of the spec set its bandwidth), ``link_axis`` (per link, the grid
    axis it runs along, -1 if none), ``host_of`` (per vertex, its host, -1 if none),
    ``ports`` (per rank), ``diameter`` (in tree-edge hops), ``options`` (the spec's canonical
    ``/...`` suffix).
    """

    def __init__(self, spec, kind, dims, nranks, nvertices, links, route_fn, tree_fn, switched,
                 diameter, ports=None, bandwidth=DEFAULT_BANDWIDTH, latency=DEFAULT_LATENCY,
                 link_speed=None, link_axis=None, host_of=None):
        self.spec = spec
        self.kind = kind
        self.dims = tuple(dims)
        self.nranks = nranks
        self.nvertices = nvertices
        self.switched = switched
        self.diameter = diameter
        links = list(dict.fromkeys(links))  # dedupe, keep order
        self.link_src = np.array([a for a, _ in links], dtype=np.int32)
        self.link_dst = np.array([b for _, b in links], dtype=np.int32)
        self._link_id = {l: i for i, l in enumerate(links)}
        bw = np.full(len(links), float(bandwidth))
        lat = np.full(len(links), float(latency))
        for i, l in enumerate(links):
            if link_speed is not None and (sp := link_speed(*l)) is not None:
                bw[i], lat[i] = sp
        self.bandwidth, self.latency = bw, lat
        # the grid axis each link runs along (-1: none), and each vertex's host (-1: none, a
        # switch; ranks of one host and its NIC share memory)
        self.link_axis = np.array([-1 if link_axis is None else link_axis(*l) for l in links],
                                  dtype=np.int32)
        self.host_of = np.array([-1 if host_of is None else host_of(v) for v in range(nvertices)],
                                dtype=np.int32)
        self.options = ""  # the canonical "/..." suffix of the spec (see parse)
        self.link_rated = np.zeros(len(links), bool)  # set by a rate option of the spec
        self._cycle = False  # not computed yet
        self._route_fn = route_fn
        self._tree_fn = tree_fn
        degree = np.bincount(self.link_src[self.link_src < nranks], minlength=nranks)
        if ports is None:
            ports = np.ones(nranks, np.int32) if switched else degree
        self.ports = np.broadcast_to(np.asarray(ports, dtype=np.int32), (nranks,)).copy()
        if nranks > 1 and (self.ports < 1).any():
            raise ValueError(f"port budget must be at least 1 per rank, got {ports!r}")
        for a in (self.link_src, self.link_dst, self.bandwidth, self.latency, self.ports,
                  self.link_axis, self.host_of):
            a.setflags(write=False)

    @property
    def nlinks(self):
        return len(self.link_src)

    @property
    def link_in_host(self):
        """Per link, True when both ends are on one host (shared memory, not the network)."""
        h = self.host_of
        return (h[self.link_src] >= 0) & (h[self.link_src] == h[self.link_dst])

    def link(self, a, b):
        """Id of the directed link from vertex ``a`` to vertex ``b`` (KeyError if none)."""
        return self._link_id[(a, b)]

    def routes(self, u, v):
        """Routes from rank ``u`` to rank ``v``: a list of tuples of link ids, default first.

        Route ``k`` from ``v`` to ``u`` is route ``k`` from ``u`` to ``v`` reversed, so a
        schedule's reduce phase can run its gather edges backwards on the same route indices.
        """
        if u == v:
            return [()]
        # the route functions are asked for u < v only; the other way is the same paths reversed
        paths = self._route_fn(u, v) if u < v else [p[::-1] for p in self._route_fn(v, u)]
        return [tuple(self._link_id[h] for h in zip(p, p[1:])) for p in paths]

    def tree_neighbors(self, u):
        """Ranks that rank ``u`` may send to over one tree edge (sorted)."""
        return self._tree_fn(u)

    def with_ports(self, ports):
        """A copy of this topology with another port budget (an int, or one per rank)."""
        if ports is None:
            return self
        t = object.__new__(Topology)
        t.__dict__.update(self.__dict__)
        p = np.broadcast_to(np.asarray(ports, dtype=np.int32), (self.nranks,)).copy()
        if self.nranks > 1 and (p < 1).any():
            raise ValueError(f"ports must be at least 1, got {ports!r}")
        p.setflags(write=False)
        t.ports = p
        return t

    def with_links(self, bandwidth=None, latency=None):
        """A copy of this topology with every link's bandwidth (bytes/s, > 0) and/or latency
        (s, >= 0) set to one value."""
        t = object.__new__(Topology)
        t.__dict__.update(self.__dict__)
        for name, value in (("bandwidth", bandwidth), ("latency", latency)):
            if value is not None:
                if not (float(value) > 0 or (name == "latency" and float(value) == 0)):
                    raise ValueError(f"{name} must be positive, got {value!r}")
                a = np.full(self.nlinks, float(value))
                a.setflags(write=False)
                setattr(t, name, a)
        return t

    def lower_bound(self):
        """Steps per phase no schedule can beat: ``max(diameter, ceil((N-1)/ports))``.

        Every rank must receive the other N-1 ranks' shares in each phase, so the rank with the
        smallest port budget sets the second term (a mesh corner with 2 ports, for instance).
        """
        if self.nranks <= 1:
            return 0
        return max(self.diameter, math.ceil((self.nranks - 1) / int(self.ports.min())))

    def hamiltonian_cycle(self):
        """A cycle through every rank whose consecutive ranks are tree neighbours, or None.

        Grids with an even side get a snake: along that side's first row, back and forth over
        the rest, home along the first column. Grids with every side odd: a bounded search
        (mesh: none exists, the grid being bipartite with an odd number of ranks). Ring, full
        and switched networks: rank order.
        """
        if self._cycle is False:
            self._cycle = _hamiltonian_cycle(self)
        return self._cycle

    def __repr__(self):
        return f"Topology({self.spec!r}, nranks={self.nranks}, links={self.nlinks})"


def _hamiltonian_cycle(topo):
    n = topo.nranks
    if topo.kind not in ("torus", "mesh") or n <= 2:
        return list(range(n))
    dims = topo.dims
    strides = [math.prod(dims[i + 1:]) for i in range(len(dims))]
    even = [i for i, d in enumerate(dims) if d % 2 == 0 and d > 1]
    if even:
        a = even[0]
        rest = [i for i in range(len(dims)) if i != a]
        path = _boustrophedon([dims[i] for i in rest])  # Hamiltonian path of the other axes
        cols = [sum(c * strides[i] for c, i in zip(p, rest)) for p in path]
        rows = [k * strides[a] for k in range(dims[a])]
        if len(cols) == 1:
            return rows if topo.kind == "torus" or dims[a] == 2 else None
        cyc = [rows[0] + c for c in cols]
        for k in range(1, dims[a]):
            seq = cols[:0:-1] if k % 2 else cols[1:]
            cyc += [rows[k] + c for c in seq]
        cyc += [rows[k] + cols[0] for k in range(dims[a] - 1, 0, -1)]
        return cyc
    if topo.kind == "mesh":
        return None
    return _search_cycle(topo)


def _boustrophedon(dims):
    if not dims:
        return [()]
    inner = _boustrophedon(dims[1:])
    out = []
    for k in range(dims[0]):
        out += [(k,) + p for p in (inner if k % 2 == 0 else inner[::-1])]
    return out


def _search_cycle(topo, budget=200_000):
    # depth-first search, fewest onward moves first (Warnsdorff), bounded
    n = topo.nranks
    if n > 4096:
        return None
    nbrs = [topo.tree_neighbors(u) for u in range(n)]
    seen = [False] * n
    path = [0]
    seen[0] = True
    stack = [iter(sorted(nbrs[0]))]
    work = 0
    while stack:
        work += 1
        if work > budget:
            return None
        if len(path) == n:
            if 0 in nbrs[path[-1]]:
                return path
        advanced = False
        for v in stack[-1]:
            if not seen[v]:
                seen[v] = True
                path.append(v)
                cand = [w for w in nbrs[v] if not seen[w]]
                cand.sort(key=lambda w: sum(not seen[x] for x in nbrs[w]))
                stack.append(iter(cand))
                advanced = True
                break
        if not advanced:
            stack.pop()
            seen[path.pop()] = False
    return None


# -- spec parsing --------------------------------------------------------------------------------

def _bad(spec, why=""):
    forms = ", ".join(SPEC_FORMS)
    return ValueError(f"bad topology spec {spec!r}{': ' + why if why else ''}; "
                      f"accepted forms: {forms}")


def auto_spec(nranks):
    """The spec ``auto`` stands for with ``nranks`` ranks: the most square 2-D torus."""
    nranks = int(nranks)
    if nranks < 1:
        raise ValueError(f"auto topology needs at least 1 rank, got {nranks}")
    a = max(d for d in range(1, math.isqrt(nranks) + 1) if nranks % d == 0)
    return f"ring:{nranks}" if a == 1 else f"torus:{a}x{nranks // a}"


def parse(spec, nranks=None, ports=None, bandwidth=DEFAULT_BANDWIDTH, latency=DEFAULT_LATENCY):
    """Build a :class:`Topology` from a spec string (see the module docstring).

    Parameters
    ----------
    spec : str or Topology
        The spec, ``BASE[/OPTION...]``; a Topology is returned as it is (with ``ports``
        applied).
    nranks : int, optional
        Needed for ``auto``; for any other spec, the size it must have (else ValueError
        giving both numbers).
    ports : int or array of int, optional
        Port budget per rank, overriding the default.
    bandwidth, latency : float
        Per-link defaults in bytes/s and seconds (a spec's rate options override them).

    Raises
    ------
    ValueError
        A malformed spec (the message names it and lists the accepted forms), a bad rate or a
        link the topology does not have (the message names the option), or a size that
        differs from ``nranks``.
    """
    if isinstance(spec, Topology):
        topo = spec.with_ports(ports)
    else:
        if not isinstance(spec, str):
            raise _bad(spec, "a spec must be a string")
        text, *opts = [x.strip() for x in spec.strip().lower().split("/")]
        if text == "auto":
            if nranks is None:
                raise ValueError("topology 'auto' needs the number of ranks")
            text = auto_spec(nranks)
        options = _parse_options(spec, opts)
        kind, sep, rest = text.partition(":")
        if not sep or kind not in _BUILDERS:
            raise _bad(spec)
        if not re.fullmatch(r"[1-9][0-9]*(x[1-9][0-9]*)*", rest):
            raise _bad(spec, "sizes must be positive integers joined by 'x'")
        dims = tuple(int(x) for x in rest.split("x"))
        builder, arity = _BUILDERS[kind]
        if arity == 1 and len(dims) != 1:
            raise _bad(spec, f"{kind} takes one size")
        if arity == 2 and len(dims) != 2:
            raise _bad(spec, f"{kind} takes two sizes")
        if arity == 0 and len(dims) < 2:
            raise _bad(spec, f"{kind} takes two or more sizes")
        per_host = options.pop("per-host", None)
        if per_host is not None:
            if kind not in ("torus", "mesh", "ring", "full"):
                raise _bad(spec, f"per-host needs a direct host network (torus, mesh, ring, "
                                 f"full), not {kind}")
            topo = _hosted(kind, dims, per_host, spec, ports=ports, bandwidth=bandwidth,
                           latency=latency)
        else:
            topo = builder(dims, spec, ports=ports, bandwidth=bandwidth, latency=latency)
        topo = _apply_options(topo, spec, options, per_host)
    if nranks is not None and topo.nranks != int(nranks):
        raise ValueError(f"topology {topo.spec!r} has {topo.nranks} ranks but the communicator "
                         f"has {int(nranks)}")
    return topo


# -- spec options: hosts and link rates ------------------------------------------------------------

_RATE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*([kmg]?)(bit|bps)?$")
_MULT = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}
_LINK = re.compile(r"^([0-9]+)([->])([0-9]+)$")


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


def format_rate_spec(bytes_per_s):
    """Bytes/s in a spec's spelling: the largest of gbit, mbit, kbit, bit that is whole."""
    bits = float(bytes_per_s) * 8
    for unit, mult in (("g", 1e9), ("m", 1e6), ("k", 1e3)):
        if bits >= mult and (bits / mult).is_integer():
            return f"{int(bits / mult)}{unit}bit"
    text = f"{bits:.6f}".rstrip("0").rstrip(".")
    return f"{text}bit"


def _parse_options(spec, opts):
    """The options of a spec as a dict: ``rate``, ``shm``, ``per-host``, ``dims`` {axis: rate},
    ``links`` {(a, b): rate} in the order given (later wins)."""
    out = {"dims": {}, "links": {}}
    for opt in opts:
        key, eq, value = opt.partition("=")
        try:
            if not eq:
                if "rate" in out:
                    raise _bad(spec, f"two network rates ({opt!r})")
                out["rate"] = parse_rate(key)
            elif key == "per-host":
                if not re.fullmatch(r"[1-9][0-9]*", value):
                    raise _bad(spec, f"per-host={value!r}: a positive number of ranks")
                out["per-host"] = int(value)
            elif key == "shm":
                out["shm"] = parse_rate(value)
            elif re.fullmatch(r"dim[0-9]+", key):
                out["dims"][int(key[3:])] = parse_rate(value)
            elif (m := _LINK.match(key)):
                a, b = int(m.group(1)), int(m.group(3))
                rate = parse_rate(value)
                out["links"][(a, b)] = rate
                if m.group(2) == "-":
                    out["links"][(b, a)] = rate
            else:
                raise _bad(spec, f"unknown option {opt!r} (options: RATE, A-B=RATE, A>B=RATE, "
                                 f"dimK=RATE, shm=RATE, per-host=R)")
        except ValueError as e:
            if str(e).startswith("bad topology spec"):
                raise
            raise _bad(spec, f"option {opt!r}: {e}") from None
    return out


def _apply_options(topo, spec, options, per_host):
    """``topo`` with the rate options applied, in order of precedence: the network rate, then
    per-axis rates, then shm, then single links; its spec gets the canonical options."""
    bw = np.array(topo.bandwidth, dtype=float)
    before = bw.copy()
    inside = topo.link_in_host
    canon = [] if per_host is None else [f"per-host={per_host}"]
    if "rate" in options:
        bw[~inside] = options["rate"]
        canon.append(format_rate_spec(options["rate"]))
    for axis, rate in sorted(options["dims"].items()):
        hit = (topo.link_axis == axis) & ~inside
        if not hit.any():
            raise _bad(spec, f"option dim{axis}: {topo.spec} has no links along axis {axis}")
        bw[hit] = rate
        canon.append(f"dim{axis}={format_rate_spec(rate)}")
    if "shm" in options:
        if not inside.any():
            raise _bad(spec, f"option shm: {topo.spec} has no hosts of several ranks")
        bw[inside] = options["shm"]
        canon.append(f"shm={format_rate_spec(options['shm'])}")
    links = options["links"]
    done = set()
    for (a, b), rate in sorted(links.items()):
        try:
            bw[topo.link(a, b)] = rate
        except KeyError:
            raise _bad(spec, f"option {a}-{b}: {topo.spec} has no link from vertex {a} to "
                             f"vertex {b} (vertices: ranks 0..{topo.nranks - 1}"
                             + (f", then switches and NICs up to {topo.nvertices - 1}"
                                if topo.nvertices > topo.nranks else "") + ")") from None
        if (a, b) in done:
            continue
        if links.get((b, a)) == rate and a < b:
            canon.append(f"{a}-{b}={format_rate_spec(rate)}")
            done.add((b, a))
        elif (b, a) not in done:
            canon.append(f"{a}>{b}={format_rate_spec(rate)}")
    if not canon:
        return topo
    t = object.__new__(Topology)
    t.__dict__.update(topo.__dict__)
    bw.setflags(write=False)
    t.bandwidth = bw
    rated = bw != before
    if "rate" in options:
        rated |= ~inside
    for axis in options["dims"]:
        rated |= (topo.link_axis == axis) & ~inside
    if "shm" in options:
        rated |= inside
    for a, b in links:
        rated[topo.link(a, b)] = True
    rated.setflags(write=False)
    t.link_rated = rated
    t.options = "".join("/" + c for c in canon)
    t.spec = topo.spec + t.options
    return t


# -- grids: torus, mesh, ring --------------------------------------------------------------------

def _grid(dims, spec, periodic, kind=None, raw=False, **kw):
    dims = tuple(dims)
    n = math.prod(dims)
    strides = [math.prod(dims[i + 1:]) for i in range(len(dims))]

    def coords(r):
        return [(r // s) % d for s, d in zip(strides, dims)]

    def step(r, axis, delta):
        c = coords(r)
        x = c[axis] + delta
        if periodic:
            x %= dims[axis]
        elif not 0 <= x < dims[axis]:
            return None
        return r + (x - c[axis]) * strides[axis]

    def neighbors(r):
        out = set()
        for axis in range(len(dims)):
            for delta in (1, -1):
                v = step(r, axis, delta)
                if v is not None and v != r:
                    out.add(v)
        return sorted(out)

    def route(u, v):
        # dimension-order routing, shortest way round on a torus (ties go the + way)
        path, cu, cv = [u], coords(u), coords(v)
        for axis, d in enumerate(dims):
            diff = cv[axis] - cu[axis]
            if periodic:
                diff %= d
                if diff > d - diff:
                    diff -= d
            delta = 1 if diff > 0 else -1
            for _ in range(abs(diff)):
                path.append(step(path[-1], axis, delta))
        return [path]

    links = [(u, v) for u in range(n) for v in neighbors(u)]
    diam = sum(d // 2 if periodic else d - 1 for d in dims)
    kind = kind or ("torus" if periodic else "mesh")
    canon = f"{kind}:" + "x".join(map(str, dims))
    if raw:
        return n, links, route, neighbors, diam, lambda u, v: _axis(coords(u), coords(v))
    return Topology(canon, kind, dims, n, n, links, route, neighbors, False, diam,
                    link_axis=lambda u, v: _axis(coords(u), coords(v)), **kw)


def _axis(cu, cv):
    diff = [i for i, (a, b) in enumerate(zip(cu, cv)) if a != b]
    return diff[0] if len(diff) == 1 else -1


def _ring(dims, spec, **kw):
    return _grid(dims, spec, True, kind="ring", **kw)


def _full(dims, spec, **kw):
    (n,) = dims
    links = [(u, v) for u in range(n) for v in range(n) if u != v]
    return Topology(f"full:{n}", "full", dims, n, n, links, lambda u, v: [[u, v]],
                    lambda u: [v for v in range(n) if v != u], False, 1 if n > 1 else 0, **kw)


# -- switched networks ---------------------------------------------------------------------------

def _switched(kind, dims, n, nswitch, links, route, **kw):
    everyone = lambda u: [v for v in range(n) if v != u]  # noqa: E731
    canon = f"{kind}:" + "x".join(map(str, dims))
    return Topology(canon, kind, dims, n, n + nswitch, links, route, everyone, True,
                    1 if n > 1 else 0, **kw)


def _fattree(dims, spec, **kw):
    nleaf, m = dims
    n = nleaf * m
    leaf = lambda r: n + r // m  # noqa: E731
    spine = lambda s: n + nleaf + s  # noqa: E731
    links = []
    for r in range(n):
        links += [(r, leaf(r)), (leaf(r), r)]
    for l, s in itertools.product(range(nleaf), range(m)):
        links += [(n + l, spine(s)), (spine(s), n + l)]

    def route(u, v):
        a, b = leaf(u), leaf(v)
        if a == b:
            return [[u, a, v]]
        # every spine is a route, rotated by the two ranks' places on their leaves; symmetric,
        # so route k from v to u is route k from u to v reversed
        return [[u, a, spine((u % m + v % m + k) % m), b, v] for k in range(m)]

    return _switched("fattree", dims, n, nleaf + m, links, route, **kw)


def _bigraph(dims, spec, **kw):
    m, nsw = dims
    if nsw < 2 or nsw % 2:
        raise _bad(spec, "bigraph needs an even number of switches, at least 2")
    n = m * nsw
    half = nsw // 2
    sw = lambda r: n + r // m  # noqa: E731
    upper = lambda s: s - n < half  # noqa: E731
    links = []
    for r in range(n):
        links += [(r, sw(r)), (sw(r), r)]
    for a, b in itertools.product(range(half), range(half, nsw)):
        links += [(n + a, n + b), (n + b, n + a)]

    def route(u, v):
        a, b = sw(u), sw(v)
        if a == b:
            return [[u, a, v]]
        if upper(a) != upper(b):
            return [[u, a, b, v]]
        other = range(half, nsw) if upper(a) else range(half)
        other = list(other)
        k0 = (u + v) % len(other)  # symmetric, as on the fat tree
        return [[u, a, n + other[(k0 + k) % len(other)], b, v] for k in range(len(other))]

    return _switched("bigraph", dims, n, nsw, links, route, **kw)


def _hier(dims, spec, **kw):
    nhost, r = dims
    n = nhost * r
    nic = lambda x: n + x // r  # noqa: E731
    switch = n + nhost
    links = []
    for u in range(n):
        links += [(u, v) for v in range(u - u % r, u - u % r + r) if v != u]
        links += [(u, nic(u)), (nic(u), u)]
    for h in range(nhost):
        links += [(n + h, switch), (switch, n + h)]

    def route(u, v):
        if nic(u) == nic(v):
            return [[u, v]]
        return [[u, nic(u), switch, nic(v), v]]

    def speed(a, b):
        if switch in (a, b):
            return NIC_BANDWIDTH, NIC_LATENCY
        return None

    def neighbors(u):
        return [v for v in range(n) if v != u]

    diam = 1 if n > 1 else 0
    return Topology(f"hier:{nhost}x{r}", "hier", dims, n, n + nhost + 1, links, route,
                    neighbors, False, diam, link_speed=speed,
                    host_of=lambda x: x // r if x < n else (x - n if x < switch else -1), **kw)


def _hosted(kind, dims, r, spec, **kw):
    """Hosts of ``r`` ranks each, joined by the direct network ``kind:dims`` (torus, mesh,
    ring, full): vertex ``n + h`` is host ``h``'s NIC, which links to its host's ranks (shared
    memory) and to the NICs of the host network's neighbours of ``h``; the ranks of a host are
    fully connected. A tree edge joins two ranks of one host, or of neighbouring hosts."""
    if kind == "full":
        (nhost,) = dims
        hlinks = [(a, b) for a in range(nhost) for b in range(nhost) if a != b]
        hroute = lambda a, b: [[a, b]]  # noqa: E731
        hnbrs = lambda a: [b for b in range(nhost) if b != a]  # noqa: E731
        hdiam, haxis = (1 if nhost > 1 else 0), (lambda a, b: -1)
    else:
        nhost, hlinks, hroute, hnbrs, hdiam, haxis = _grid(dims, spec, kind != "mesh", raw=True)
    n = nhost * r
    nic = lambda h: n + h  # noqa: E731
    links = []
    for u in range(n):
        h = u // r
        links += [(u, v) for v in range(h * r, h * r + r) if v != u]
        links += [(u, nic(h)), (nic(h), u)]
    links += [(nic(a), nic(b)) for a, b in hlinks]

    def route(u, v):
        a, b = u // r, v // r
        if a == b:
            return [[u, v]]
        if a < b:
            path = hroute(a, b)[0]
        else:  # the route functions answer a < b; the other way is the same path reversed
            path = hroute(b, a)[0][::-1]
        return [[u] + [nic(x) for x in path] + [v]]

    near = [sorted(v for b in [h] + list(hnbrs(h)) for v in range(b * r, b * r + r))
            for h in range(nhost)]

    def neighbors(u):
        return [v for v in near[u // r] if v != u]

    def speed(a, b):
        if a >= n and b >= n:
            return NIC_BANDWIDTH, NIC_LATENCY
        return None

    def axis(a, b):
        return haxis(a - n, b - n) if a >= n and b >= n else -1

    diam = max(hdiam, 1 if r > 1 else 0)
    canon = f"{kind}:" + "x".join(map(str, dims))
    return Topology(canon, "hosts", dims, n, n + nhost, links, route, neighbors, False, diam,
                    link_speed=speed, link_axis=axis,
                    host_of=lambda x: x // r if x < n else x - n, **kw)


_BUILDERS = {
    "torus": (lambda d, s, **kw: _grid(d, s, True, **kw), 0),
    "mesh": (lambda d, s, **kw: _grid(d, s, False, **kw), 0),
    "ring": (_ring, 1),
    "full": (_full, 1),
    "fattree": (_fattree, 2),
    "bigraph": (_bigraph, 2),
    "hier": (_hier, 2),
}


# -- communicators -------------------------------------------------------------------------------

def from_comm(comm, spec="auto", ports=None, leaders=None):
    """The topology for communicator ``comm``.

    ``auto`` looks at which ranks share a host (``leaders``, as :func:`host_leaders` returns
    them; asked for here when not given): when the ranks of each host are consecutive and every
    host has the same number of them, the result is ``hier:HxR``; otherwise (one host, or an
    irregular layout) the auto torus. Collective over ``comm`` when ``spec`` is ``auto`` and
    ``leaders`` is not given.
    """
    size = comm.Get_size()
    if isinstance(spec, str) and spec.strip().lower() == "auto":
        if leaders is None:
            leaders = host_leaders(comm)
        spec = hosts_spec(leaders) or auto_spec(size)
    return parse(spec, nranks=size, ports=ports)


def host_leaders(comm):
    """For every rank of ``comm``, the lowest rank on its host (one ``Split_type`` and one
    allgather; collective). :class:`mtcoll.Comm` asks once and uses the answer twice: for the
    topology and for how ranks wait (more ranks than cores on a host)."""
    from mpi4py import MPI

    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        leader = local.allreduce(comm.Get_rank(), op=MPI.MIN)
    finally:
        local.Free()
    return comm.allgather(leader)


def hosts_spec(leaders):
    """``hier:HxR`` for ranks whose host is known, or None.

    ``leaders[i]`` is the lowest rank sharing rank ``i``'s host (what
    ``Split_type(COMM_TYPE_SHARED)`` tells each rank). One host, or hosts whose ranks are not
    consecutive blocks of one size, give None (the caller falls back to the auto torus).
    """
    hosts = sorted(set(leaders))
    if len(hosts) < 2:
        return None
    r = len(leaders) // len(hosts)
    regular = all(leaders[i] == (i // r) * r for i in range(len(leaders))) \
        and len(leaders) == r * len(hosts)
    return f"hier:{len(hosts)}x{r}" if regular else None


def mpi_topology(comm, topo):
    """A new communicator carrying ``topo`` as an MPI virtual topology (ranks not reordered).

    Torus, mesh and ring become ``Create_cart`` with periods; the others a distributed graph
    (``Create_dist_graph_adjacent``) whose edges are the tree edges. The caller frees it.
    """
    if comm.Get_size() != topo.nranks:
        raise ValueError(f"topology {topo.spec!r} has {topo.nranks} ranks but the communicator "
                         f"has {comm.Get_size()}")
    if topo.kind in ("torus", "mesh", "ring"):
        periodic = topo.kind != "mesh"
        return comm.Create_cart(list(topo.dims), periods=[periodic] * len(topo.dims),
                                reorder=False)
    nbrs = topo.tree_neighbors(comm.Get_rank())
    return comm.Create_dist_graph_adjacent(nbrs, nbrs, reorder=False)
