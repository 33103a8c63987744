"""Measured links (``measure_links``): the rate of every link of a Comm's network, timed at
set-up, and the network spec that says what was measured.

Who calls: :class:`mtcoll.Comm`'s set-up, collectively, after the network model is built and
before anything is planned on it (:func:`measure`); ``python -m mtcoll --info``
(:func:`cached`, no message). The rest are pure functions the tests call serially.

How it measures (:func:`measure`):

1. Only the links that join two ranks directly are measured (torus, mesh, ring, full: every
   link of the network). Where routes cross switches or host NICs (``fattree``, ``bigraph``,
   ``hier``, ``per-host``) one rank-to-rank message crosses several links and shares them
   with other pairs' messages, so its time is no one link's rate: the network is left as
   its spec says (:func:`measurable` says why, in ``Comm.measured_links.source``).
2. Every rank looks up nothing itself: rank 0 reads the cache file of this network
   (:func:`mtcoll._calibrate._cache.links_key`: the spec, the ranks and where they run) and
   broadcasts it; a cached spec is used as it is, without a message on the links.
3. Otherwise all links at once: each rank sends one message of :func:`message_bytes` to each
   network neighbour at the same time (nonblocking, after a barrier); the receiver answers
   it with one byte, and the sender's time for the link runs from its send to that answer
   (its own clock, from a start the message cannot precede: a receiver that leaves the
   barrier late, or notices late, only adds time; a receiver's own clock from its own start
   would see a message sent before it started as infinitely fast). The links towards higher
   ranks carry data in one half-round and those towards lower ranks in the other, so an
   answer never waits behind data on the link back. Ranks test every
   :data:`POLL_SECONDS` and sleep in between (ranks that spin take the CPU the messages need
   where ranks outnumber cores). :data:`ROUNDS` rounds after one untimed round of one byte
   (connections are made then); each link keeps its fastest round (noise only slows) and
   its rate is bytes over that time.
4. Rank 0 gathers the rates and decides (:func:`measured_spec`): every link's measured rate
   over its rate in the spec, and the median of those ratios over all links. A link whose
   ratio is within [:data:`SLOW`, :data:`FAST`] of the median keeps the spec's rate; one
   outside gets an override ``A>B=RATE`` (``A-B=RATE`` when both directions are out and
   agree within :data:`AGREE`) at its spec rate times its ratio to the median. So the spec's scale stays (a spec
   without rates keeps the default link speed; only the links that differ from the others
   change), and a fixed cost per message common to all links cancels. Rank 0 writes the
   cache file (not with ``MTCOLL_CALIBRATE=off``) and broadcasts the spec; every rank
   parses the same spec into the Comm's network.

Cost: one message per directed link per round, :data:`ROUNDS` + 1 rounds of two halves, each
as long as the slowest link takes for one message. The message is 2 ms at the rate the spec names (the
median of its network links), but at least :data:`MIN_BYTES`: a shaper's burst allowance
passes the first bytes of a message at the line's speed (tc's tbf on the testbed: 10 ms of
the rate, at least 32 KiB), so a message must be several times that for its time to show
the rate; at most
:data:`MAX_BYTES`. On the testbed's torus:4x4 at 20 Mbit/s with one link at 5 Mbit/s:
docs/algorithms.md ("Measured links").

Messages travel on the Comm's private duplicate with tag :data:`TAG`; nothing else runs on it
during the set-up.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import time

import numpy as np
from mpi4py import MPI

from .._calibrate import _cache
from ..topology import parse
from . import _planning

__all__ = ["Measured", "measure", "measurable", "message_bytes", "measured_spec", "rate_text",
           "cached", "where", "MIN_BYTES", "MAX_BYTES", "TARGET_SECONDS", "ROUNDS", "SLOW",
           "FAST", "AGREE", "POLL_SECONDS", "TAG", "rates_here"]

#: the smallest message (see the module notes: well above a shaper's burst allowance; on the
#: testbed's ring:4 at 40 Mbit/s with one link at 10 Mbit/s, 128 KiB messages once measured
#: a 40 Mbit/s link at 0.56x the median; 256 KiB ones measured those links within 5 %)
MIN_BYTES = 256 * 1024
#: the largest message (a fast network named at its rate: 2 ms of 10 Gbit/s is 2.5 MB)
MAX_BYTES = 4 * 1024 * 1024
#: how long one message should take at the spec's rate
TARGET_SECONDS = 0.002
#: timed rounds (after one untimed round of one byte); each link keeps its fastest
ROUNDS = 3
#: a link slower than this share of the median (its spec rate's share) gets an override
SLOW = 0.7
#: a link faster than this many times the median gets one too
FAST = 1.4
#: two directions of a link whose overrides differ by at most this factor are one ``A-B``
#: override (at their geometric mean)
AGREE = 1.25
#: seconds between two tests of the receives
POLL_SECONDS = 50e-6
#: the tag of the measuring messages on the Comm's private duplicate
TAG = 7


class Measured:
    """What ``measure_links`` found (``Comm.measured_links``).

    Attributes: ``base`` (the spec measured from), ``spec`` (the measured network's spec, which
    :attr:`mtcoll.Comm.network` is), ``source`` (``"measured"``, ``"cache"`` or ``"skipped:
    why"``), ``seconds`` (what this Comm spent, rank 0's clock), ``nbytes`` (one message),
    ``rates`` (``{"A>B": bytes/s}`` measured), ``overrides`` (``{"A>B": bytes/s}`` set in the
    spec), ``path`` (the cache file, or None), ``saved`` (why it was not cached, or None).
    """

    def __init__(self, base, spec, source, seconds=0.0, nbytes=0, rates=None, overrides=None,
                 path=None, saved=None):
        self.base, self.spec, self.source, self.seconds = base, spec, source, seconds
        self.nbytes, self.path, self.saved = nbytes, path, saved
        self.rates = dict(rates or {})
        self.overrides = dict(overrides or {})

    def describe(self):
        """One line: the spec, where it came from, its time."""
        what = self.source if self.source != "measured" else \
            f"measured ({len(self.rates)} links, {self.nbytes // 1024} KiB messages)"
        slow = ", ".join(f"{k} {rate_text(v)}" for k, v in sorted(self.overrides.items()))
        return (f"measured links {self.spec!r} from {self.base!r}: {what}"
                + (f"; overrides {slow}" if slow else "; no link differs")
                + f" ({self.seconds * 1e3:.1f} ms)"
                + (f", cached in {self.path}" if self.path and not self.saved else "")
                + (f", not cached: {self.saved}" if self.saved else ""))

    def as_dict(self):
        return {"base": self.base, "spec": self.spec, "source": self.source,
                "seconds": self.seconds, "nbytes": self.nbytes, "rates": self.rates,
                "overrides": self.overrides, "path": self.path}

    def __repr__(self):
        return f"<mtcoll measured links {self.spec!r} ({self.source})>"


# -- pure: what is measured, how big, what the rates say ----------------------------------------

def measurable(topo):
    """``(links, None)``: the directed links to measure, as ``(src, dst)`` rank pairs; or
    ``(None, why)`` when the network's routes cross switches or NICs, or it has no link."""
    if topo.nvertices > topo.nranks or topo.switched:
        return None, (f"{topo.spec} routes through switches or host NICs: a message between "
                      f"two ranks is no one link's rate")
    links = [(int(a), int(b)) for a, b in zip(topo.link_src, topo.link_dst)]
    if not links:
        return None, f"{topo.spec} has no links"
    return links, None


def message_bytes(topo):
    """One measuring message: :data:`TARGET_SECONDS` at the median rate of ``topo``'s links
    where its spec names rates, else (the default link speed is no rate of this network)
    :data:`MIN_BYTES`; within [:data:`MIN_BYTES`, :data:`MAX_BYTES`], a multiple of 1 KiB."""
    rated = np.asarray(topo.link_rated, bool)
    if not rated.any():
        return MIN_BYTES
    rate = float(np.median(np.asarray(topo.bandwidth)[rated]))
    nbytes = int(rate * TARGET_SECONDS) // 1024 * 1024
    return max(MIN_BYTES, min(MAX_BYTES, nbytes))


def rate_text(bytes_per_s):
    """A rate rounded to two significant digits in a spec's spelling (``4.9mbit``)."""
    bits = float(f"{float(bytes_per_s) * 8:.2g}")
    for unit, mult in (("g", 1e9), ("m", 1e6), ("k", 1e3), ("", 1.0)):
        if bits >= mult or not unit:
            return f"{bits / mult:g}{unit}bit"
    raise AssertionError("unreachable")


def measured_spec(topo, rates, slow=SLOW, fast=FAST):
    """``(spec, overrides)``: the spec of ``topo`` with a rate override for each link whose
    measured rate differs from the others' (see the module notes), and those overrides as
    ``{(a, b): bytes/s}``. ``rates``: ``{(a, b): measured bytes/s}`` for links of ``topo``.

    Raises ValueError when ``rates`` is empty, names a pair that is no link of ``topo`` or holds
    a rate that is not a positive finite number (the message names the link).
    """
    if not rates:
        raise ValueError("no link was measured")
    ratio = {}
    for (a, b), r in sorted(rates.items()):
        try:
            spec_rate = float(topo.bandwidth[topo.link(int(a), int(b))])
        except KeyError:
            raise ValueError(f"measured link {a}>{b}: {topo.spec} has no link from vertex {a} "
                             f"to vertex {b}") from None
        if not (isinstance(r, (int, float, np.floating, np.integer)) and math.isfinite(r)
                and r > 0):
            raise ValueError(f"measured link {a}>{b}: rate {r!r} is not a positive number")
        ratio[(int(a), int(b))] = float(r) / spec_rate
    median = float(np.median(list(ratio.values())))
    overrides = {l: float(topo.bandwidth[topo.link(*l)]) * q / median
                 for l, q in ratio.items() if not slow <= q / median <= fast}
    opts = []
    for (a, b), r in sorted(overrides.items()):
        back = overrides.get((b, a))
        if back is not None and b < a:
            continue  # written with (b, a)
        if back is not None and max(r, back) <= AGREE * min(r, back):
            opts.append(f"{a}-{b}={rate_text(math.sqrt(r * back))}")
            continue
        opts.append(f"{a}>{b}={rate_text(r)}")
        if back is not None:
            opts.append(f"{b}>{a}={rate_text(back)}")
    spec = topo.spec + "".join("/" + o for o in opts)
    return parse(spec, nranks=topo.nranks).spec, overrides


# -- collective: measuring on the communicator --------------------------------------------------

def where():
    """This rank's host and network namespace, as text: links are a property of both."""
    try:
        ns = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        ns = 0
    return f"{MPI.Get_processor_name()}:{ns}"


def _round(dup, srcs, dsts, sendbuf, recvbufs):
    # One round: the receives of data (from srcs) and of acknowledgements (from dsts) posted, a
    # barrier, the data sent to every dst at once; each data message that arrives is answered
    # by a one-byte acknowledgement. Per dst, the seconds from this rank's sends to that
    # acknowledgement: on the sender's own clock, from a start the data cannot precede, so
    # whatever delays a rank (a late receiver, a descheduled process) only adds time.
    ack_out, ack_in = np.zeros(1, np.uint8), np.empty(max(len(dsts), 1), np.uint8)
    reqs = [dup.Irecv(recvbufs[i], source=s, tag=TAG) for i, s in enumerate(srcs)]
    reqs += [dup.Irecv(ack_in[j:j + 1], source=d, tag=TAG + 1) for j, d in enumerate(dsts)]
    dup.Barrier()
    t0 = time.perf_counter()
    sends = [dup.Isend(sendbuf, dest=d, tag=TAG) for d in dsts]
    seconds = np.full(len(dsts), np.inf)
    left, nsrc = len(reqs), len(srcs)
    while left:
        done = MPI.Request.Testsome(reqs)
        now = time.perf_counter()
        if not done:
            time.sleep(POLL_SECONDS)
            continue
        for i in done:
            if i < nsrc:
                sends.append(dup.Isend(ack_out, dest=srcs[i], tag=TAG + 1))
            else:
                seconds[i - nsrc] = now - t0
        left -= len(done)
    MPI.Request.Waitall(sends)
    return seconds


def rates_here(dup, links, nbytes, rounds=ROUNDS):
    """``{(this rank, dst): bytes/s}``: the fastest of ``rounds`` timed rounds on every link
    out of this rank (collective over ``dup``: every rank, the same ``links`` and sizes).

    A round is two half-rounds: data on the links to a higher rank, then on those to a lower
    one, so that a link's acknowledgements never queue behind data on the link back."""
    rank = dup.Get_rank()
    halves = [[(a, b) for a, b in links if (a < b) == up] for up in (True, False)]
    sendbuf = np.zeros(nbytes, np.uint8)
    best = {}
    for timed in [False] + [True] * rounds:  # an untimed round of one byte makes connections
        for half in halves:
            srcs = [a for a, b in half if b == rank]
            dsts = [b for a, b in half if a == rank]
            size = nbytes if timed else 1
            got = _round(dup, srcs, dsts, sendbuf[:size],
                         [np.empty(size, np.uint8) for _ in srcs])
            if timed:
                for d, t in zip(dsts, got):
                    best[d] = min(best.get(d, np.inf), t)
    return {(rank, d): float(nbytes / t) for d, t in best.items()}


def _key(comm, topo, here):
    return _cache.links_key(comm._dup.Get_size(), _cache.host_layout(comm._leaders), topo.spec,
                            hashlib.sha1("\n".join(here).encode()).hexdigest()[:16])


def _cached_on_rank0(comm, topo, here):
    # rank 0: ("cached", data, path), ("measure", key, path or None, why), or ("error", text)
    try:
        k = _key(comm, topo, here)
        if _cache.mode() == "off":
            return ("measure", k, None, "MTCOLL_CALIBRATE=off")
        try:
            path = _cache.links_path(k)
        except (OSError, RuntimeError) as e:
            return ("measure", k, None, f"no cache directory: {e}")
        if _cache.mode() != "refresh":
            data, why = _cache.read(path, k)
            if data is not None:
                return ("cached", data, str(path))
            if why:
                return ("measure", k, str(path), why)
        return ("measure", k, str(path), None)
    except Exception as e:  # noqa: BLE001 -- every rank must hear of it
        return ("error", f"{type(e).__name__}: {e}")


def _decide_on_rank0(topo, gathered, nbytes, k, path, why):
    # rank 0: the measured spec from every rank's rates, cached; or ("error", text)
    try:
        rates = {l: r for part in gathered for l, r in part.items()}
        spec, over = measured_spec(topo, rates)
        data = {"key": k, "spec": spec, "nbytes": nbytes,
                "rates": {f"{a}>{b}": r for (a, b), r in sorted(rates.items())},
                "overrides": {f"{a}>{b}": r for (a, b), r in sorted(over.items())},
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        saved = why
        if path is not None:
            ok, err = _cache.store(path, data)
            saved = None if ok else err
        return ("ok", data, path if saved is None else None, saved)
    except Exception as e:  # noqa: BLE001
        return ("error", f"{type(e).__name__}: {e}")


def measure(comm, topo, ports=None, debug=False):
    """``(network, Measured)``: ``topo`` as measured on ``comm``'s ranks (see the module
    notes). Collective over the Comm ``comm`` (its ``_dup``, ``_leaders`` and ``wait`` set);
    every rank returns the same spec. ``ports``: the Comm's port budget, kept on the new
    network. A failure on rank 0 (a cache directory that cannot be read is no failure) raises
    ValueError on every rank."""
    start = time.perf_counter()
    dup = comm._dup
    rank = dup.Get_rank()
    links, skip = measurable(topo)
    if links is None or dup.Get_size() < 2:
        out = Measured(topo.spec, topo.spec, f"skipped: {skip or 'one rank has no links'}")
        return topo, _said(out, start, debug, rank)
    here = dup.allgather(where())
    payload = _cached_on_rank0(comm, topo, here) if rank == 0 else None
    _planning.gate(comm)
    payload = dup.bcast(payload, root=0)
    _raise_if_error(payload, rank)
    if payload[0] == "cached":
        data, path = payload[1], payload[2]
        source, saved = "cache", None
    else:
        _, k, path, why = payload
        nbytes = message_bytes(topo)
        gathered = dup.gather(rates_here(dup, links, nbytes), root=0)
        decided = _decide_on_rank0(topo, gathered, nbytes, k, path, why) if rank == 0 else None
        _planning.gate(comm)
        decided = dup.bcast(decided, root=0)
        _raise_if_error(decided, rank)
        _, data, path, saved = decided
        source = "measured"
    try:
        network = parse(data["spec"], nranks=topo.nranks, ports=ports)
    except ValueError as e:
        raise ValueError(f"mtcoll measure_links (rank {rank}): the measured spec "
                         f"{data['spec']!r}: {e}") from None
    out = Measured(topo.spec, network.spec, source, nbytes=int(data.get("nbytes", 0)),
                   rates=data.get("rates"), overrides=data.get("overrides"), path=path,
                   saved=saved)
    return network, _said(out, start, debug, rank)


def _raise_if_error(payload, rank):
    if payload[0] == "error":
        raise ValueError(f"mtcoll measure_links (rank 0, for rank {rank}): {payload[1]}")


def _said(out, start, debug, rank):
    out.seconds = time.perf_counter() - start
    if debug and rank == 0:
        print(f"mtcoll[rank 0]: {out.describe()}", file=sys.stderr, flush=True)
    return out


def cached(comm, topo):
    """The cached measurement of ``topo`` on the Comm ``comm``'s ranks, as the file's dict with
    its ``path``, or None (collective: one allgather; only rank 0 reads the file). What
    ``python -m mtcoll --info`` shows."""
    here = comm._dup.allgather(where())
    if comm._dup.Get_rank() != 0:
        return None
    got = _cached_on_rank0(comm, topo, here)
    if got[0] != "cached":
        return None
    return dict(got[1], path=got[2])
